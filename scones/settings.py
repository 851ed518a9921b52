"""Typed settings: the pydantic base of every settings object, and unions chosen by a ``kind`` key.

The library's settings (e.g. :mod:`scones.sampling.settings`) and the app's config schema
(:mod:`experiments.schema`) are built from these, so a vocabulary (a sampler ``kind``, an ``init``) is declared
once, next to the code that implements it, and the config is checked against that same declaration.

Conventions: validation is *strict* (``1`` is not ``True``, ``"3"`` is not ``3``; an ``int`` is a valid
``float``), numbers must be finite, and keys a model does not declare are kept (``extra="allow"``), so plug-ins
and tests may add their own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal, Union

from annotated_types import Ge, Gt
from pydantic import BaseModel, ConfigDict, Discriminator, Tag
from pydantic_core import PydanticCustomError

PositiveFloat = Annotated[float, Gt(0)]
NonNegativeFloat = Annotated[float, Ge(0)]
Count = Annotated[int, Ge(1)]  # steps, batch sizes, levels
NonNegativeInt = Annotated[int, Ge(0)]
Auto = Literal["auto"]  # a value resolved from the problem by scones.autoconfig before the stages run


class Settings(BaseModel):
    """Base of all settings: strict, finite, immutable, unknown keys kept."""

    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False, frozen=True, populate_by_name=True)


def _kind_of(value: Any) -> Any:
    return value.get("kind") if isinstance(value, Mapping) else getattr(value, "kind", None)


def by_kind(models: Mapping[str, type[Settings]]) -> Any:
    """The annotation of a settings group whose ``kind`` key picks the model: ``{kind: model}``, in the order the
    kinds are listed in error messages (one model may serve several kinds)."""
    members = tuple(Annotated[model, Tag(kind)] for kind, model in models.items())
    return Annotated[Union[members], Discriminator(_kind_of)]  # noqa: UP007 (a runtime tuple of members)


def order_error(key: str, value: Any, relation: str, other: str, other_value: Any) -> PydanticCustomError:
    """A cross-field error ``key=value must be <relation> other=other_value`` (keys relative to the model)."""
    return PydanticCustomError(
        "order",
        "{key}={value} must be {relation} {other}={other_value}",
        {"key": key, "value": value, "relation": relation, "other": other, "other_value": other_value},
    )


__all__ = ["Auto", "Count", "NonNegativeFloat", "NonNegativeInt", "PositiveFloat", "Settings", "by_kind", "order_error"]
