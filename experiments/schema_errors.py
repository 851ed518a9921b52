"""Config problems in words: the resolved config checked against the schema (:mod:`experiments.schema`), each
pydantic error turned into ONE line naming the key the user typed and what it must be.

:func:`check` returns ``(typed config or None, resolved plain config, problems)``; a value that reached its key
through an interpolation (``regularizer.lam: ${mul:2,${data.eps}}``) names the key the user set too (:func:`trace`).
"""

from __future__ import annotations

import re
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from annotated_types import Ge, Gt
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException
from pydantic import BaseModel, ValidationError

from experiments.schema import RunConfig, Target
from experiments.validation import GROUPS, Problem, show

# --------------------------------------------------------------------------------------------- problems


def resolved(cfg: DictConfig) -> tuple[dict, list[Problem]]:
    """The config as plain containers, resolved key by key: a key that cannot be resolved is left out (and
    reported), a ``???`` value is left out (reported as missing by the schema)."""
    problems: list[Problem] = []

    def walk(node: DictConfig, prefix: str) -> dict:
        out = {}
        for k in node.keys():
            key = f"{prefix}.{k}" if prefix else str(k)
            if key == "hydra":
                continue
            try:
                value = node[k]
                if isinstance(value, ListConfig):
                    value = OmegaConf.to_container(value, resolve=True)
            except MissingMandatoryValue:
                continue
            except OmegaConfBaseException as e:
                problems.append(Problem(key, f"{key} cannot be resolved: {str(e).splitlines()[0]}", has_value=False))
                continue
            out[str(k)] = walk(value, key) if isinstance(value, DictConfig) else value
        return out

    return walk(cfg, ""), problems


_REFERENCE = re.compile(r"\$\{([A-Za-z_][\w.]*)\}")


def user_keys(cfg: DictConfig, key: str) -> list[str]:
    """The keys whose values flow into ``key`` through interpolations (``[]`` when ``key`` holds its own value)."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, throw_on_resolution_failure=False) if parent else cfg
    if not isinstance(node, DictConfig) or leaf not in node:
        return []
    raw = node._get_node(leaf)._value()  # the unresolved value ("${...}" for an interpolation)
    if not isinstance(raw, str) or "${" not in raw:
        return []
    out: list[str] = []
    for ref in _REFERENCE.findall(raw):
        for k in user_keys(cfg, ref) or [ref]:
            if k not in out:
                out.append(k)
    return out


def trace(cfg: DictConfig, problem: Problem) -> Problem:
    """Name the key(s) the user set when ``problem.key`` got its value by interpolation."""
    keys = user_keys(cfg, problem.key) if problem.has_value else []
    if keys:
        values = ", ".join(f"{k}={show(OmegaConf.select(cfg, k, default=None))}" for k in keys)
        parent, _, leaf = problem.key.rpartition(".")
        raw = (OmegaConf.select(cfg, parent) if parent else cfg)._get_node(leaf)._value()
        problem.via = (values, raw, " or ".join(keys))
    return problem


# --------------------------------------------------------------------------------------------- messages


def expected(annotation: Any, metadata: list | tuple = (), description: str | None = None) -> str:
    """What a value of ``annotation`` (with ``annotated_types`` bounds in ``metadata``) must be, in words."""
    if description:
        return description
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return expected(args[0], [*args[1:], *metadata])
    if origin in (Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        tags = [str(m.__metadata__[0].tag) for m in members if get_origin(m) is Annotated and hasattr(
            m.__metadata__[0], "tag")]  # fmt: skip
        text = f"one of {', '.join(tags)}" if tags else " or ".join(expected(m) for m in members)
        return text + (" or null" if len(members) < len(args) else "")
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if annotation is bool:
        return "true or false"
    if annotation in (int, float):
        text = "an integer" if annotation is int else "a number"
        for m in metadata:
            if isinstance(m, Gt):
                text += f" > {m.gt:g}"
            elif isinstance(m, Ge):
                text += f" >= {m.ge:g}"
        return text
    if isinstance(annotation, type) and issubclass(annotation, Target):
        return "a node with a _target_ class path"
    return {str: "a string", list: "a list", dict: "a mapping"}.get(origin or annotation, "a mapping")


def _field(loc: tuple) -> tuple[str, Any]:
    """The dotted key of a pydantic error location (union tags dropped) and the field's info (or None)."""
    parts: list[str] = []
    model: Any = RunConfig
    info = None
    items = list(loc)
    while items:
        name = str(items.pop(0))
        parts.append(name)
        fields = getattr(model, "model_fields", {}) if isinstance(model, type) else {}
        info = fields.get(name) or next((f for f in fields.values() if f.alias == name), None)
        model = None
        if info is None:
            continue
        ann = info.annotation
        members = get_args(ann) if get_origin(ann) in (Union, types.UnionType) else (ann,)
        tagged = {str(m.__metadata__[0].tag): get_args(m)[0] for m in members
                  if get_origin(m) is Annotated and hasattr(m.__metadata__[0], "tag")}  # fmt: skip
        if tagged and items and str(items[0]) in tagged:
            model = tagged[str(items.pop(0))]
        else:
            models = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
            model = models[0] if models else None
            if get_origin(ann) in (Union, types.UnionType) and not tagged and items and not models:
                items.clear()  # a plain union (number or 'auto'): the rest names union members
    return ".".join(parts), info


def _expected_at(info: Any) -> str:
    return "a mapping" if info is None else expected(info.annotation, info.metadata, info.description)


TYPE_ERRORS = {"int_type", "float_type", "bool_type", "string_type", "list_type", "dict_type", "model_type",
               "int_parsing", "float_parsing", "model_attributes_type"}  # fmt: skip
RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


def problems_of(error: ValidationError) -> list[Problem]:
    """One :class:`Problem` per key of a pydantic error (union members' errors merged)."""
    by_key: dict[str, list[dict]] = {}
    for e in error.errors(include_url=False):
        key, _ = _field(e["loc"])
        by_key.setdefault(key, []).append(e)
    out = []
    for key, errors in by_key.items():
        out.append(_problem(key, errors))
    return out


def _problem(key: str, errors: list[dict]) -> Problem:
    e = errors[0]
    kind, value, ctx = e["type"], e.get("input"), e.get("ctx") or {}
    _, info = _field(e["loc"])
    want = _expected_at(info)
    if kind == "missing":
        if key in GROUPS:
            return Problem(key, f"config group '{key}' is missing or not a mapping (add {key}=<option> or restore "
                                "it)", has_value=False)  # fmt: skip
        return Problem(key, f"{key} is missing; expected {want} (set {key}=...)", has_value=False)
    if kind == "union_tag_not_found":
        return Problem(f"{key}.kind", f"{key}.kind is missing; expected {want}", has_value=False)
    if kind == "union_tag_invalid":
        tags = ctx["expected_tags"].replace("'", "")
        return Problem(f"{key}.kind", f"is not one of {tags}", ctx["tag"])
    if kind == "literal_error":
        return Problem(key, f"is not one of {want.removeprefix('one of ')}", value)
    if kind == "order":
        prefix = key + "." if key else ""
        return Problem(prefix + ctx["key"], f"must be {ctx['relation']} {prefix}{ctx['other']}={ctx['other_value']}",
                       ctx["value"])  # fmt: skip
    if key in GROUPS and kind in TYPE_ERRORS:
        return Problem(key, f"config group '{key}' is missing or not a mapping (add {key}=<option> or restore it)",
                       has_value=False)  # fmt: skip
    if any(x["type"] in RANGE_ERRORS for x in errors):
        return Problem(key, f"must be {want}", value)
    if kind == "finite_number":
        return Problem(key, f"must be finite; expected {want}", value)
    if value is None and kind in TYPE_ERRORS:
        return Problem(key, f"{key}=null is not allowed; expected {want}", has_value=False)
    if all(x["type"] in TYPE_ERRORS or x["type"] == "literal_error" for x in errors):
        return Problem(key, f"has type {type(value).__name__}; expected {want}", value)
    return Problem(key, " ".join(e["msg"].split()), value)  # a custom rule's own words ("must be ...")


def check(cfg: DictConfig) -> tuple[RunConfig | None, dict, list[Problem]]:
    """``(typed config or None, resolved plain config, problems)`` of a composed job config."""
    plain, problems = resolved(cfg)
    unresolved = {p.key for p in problems}
    typed = None
    try:
        typed = RunConfig.model_validate(plain)
    except ValidationError as e:
        problems += [p for p in problems_of(e) if not (p.key in unresolved and not p.has_value)]
    return typed, plain, [trace(cfg, p) for p in sorted(problems, key=lambda p: p.order)]


__all__ = ["check", "expected", "problems_of", "resolved", "trace", "user_keys"]
