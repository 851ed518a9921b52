"""The config schema: one pydantic model per config group, checked once at start-up (docs/config.md).

:func:`check` validates the resolved config against :class:`RunConfig` and returns the typed settings, or the
problems, each a :class:`Problem` that formats to ONE line naming the key and what it must be. Vocabularies are
the library's own: sampler settings and inits from :mod:`scones.sampling.settings`, pairs and objectives from
:mod:`scones.ot.dual`, cost reductions from :mod:`scones.ot.costs`; ``kind`` keys pick the model of their group
(:func:`scones.settings.by_kind`). Defaults of the composed config live in ``configs/``; a default here only
covers a key older configs may lack, and is never written back (the stage cache keys hash the config itself).

When a bad value reached its key through an interpolation (``regularizer.lam: ${mul:2,${data.eps}}``), the
problem names the key the user set (``data.eps``) as well.
"""

from __future__ import annotations

import re
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from annotated_types import Ge, Gt
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from experiments.validation import GROUPS, Problem, show
from scones.ot.costs import Reduction
from scones.ot.dual import Objective, Pairs
from scones.sampling.settings import Sampler
from scones.settings import Auto, Count, NonNegativeFloat, NonNegativeInt, PositiveFloat, Settings, by_kind, order_error

# --------------------------------------------------------------------------------------------- vocabularies

ACCELERATORS = Literal["cpu", "gpu", "cuda", "mps", "tpu", "auto"]
PRECISIONS = Literal[
    "64", "64-true", "32", "32-true", "16", "16-mixed", "16-true", "bf16", "bf16-mixed", "bf16-true",
    "transformer-engine", "transformer-engine-float16", 16, 32, 64,
]  # fmt: skip  (Lightning's precision flags)
DualObjective = Literal[Objective, "auto"]  # auto: logmeanexp for KL, dual otherwise


# --------------------------------------------------------------------------------------------- groups


class Target(Settings):
    """A node Hydra instantiates: ``_target_`` (checked importable) and the class's own arguments (open)."""

    target: str = Field(alias="_target_", description="a node with a _target_ class path")


class Data(Settings):
    source: Target
    target: Target
    dim: Count = Field(None, validate_default=False)  # optional, never null


class Cost(Target):
    reduction: Reduction = Field(None, validate_default=False)


class Regularizer(Target):
    lam: PositiveFloat = Field(None, validate_default=False)  # required by the built-in regularisers
    beta: PositiveFloat = Field(None, validate_default=False)


class NetTraining(Settings):
    steps: Count
    batch_size: Count
    lr: PositiveFloat
    skip_nonfinite: bool = False


class NeuralDual(NetTraining):
    kind: Literal["neural"]
    net: Target
    pairs: Pairs
    objective: DualObjective = "dual"
    calibration_samples: Count = 2000
    steps: Count | Auto  # auto: scones.autoconfig rules, resolved before the stages
    batch_size: Count | Auto
    lr: PositiveFloat | Auto
    lr_schedule: Literal["constant", "cosine"] = "constant"


class OnlineSinkhornDual(Settings):
    kind: Literal["online_sinkhorn"]
    solver: Target
    steps: Count


class LearnedScore(NetTraining):
    kind: Literal["auto", "learned"]
    net: Target
    sigma_max: PositiveFloat
    sigma_min: PositiveFloat
    n_levels: Count
    ema_decay: float | None = None

    @model_validator(mode="after")
    def _schedule(self) -> LearnedScore:
        if self.sigma_max < self.sigma_min:
            raise order_error("sigma_max", self.sigma_max, ">=", "sigma_min", self.sigma_min)
        return self


class ExactScore(Settings):
    kind: Literal["exact"]


class BarycentricProjection(NetTraining):
    net: Target
    pairs: Pairs
    estimator: Literal["seguy", "self_normalised", "potential", "auto"] = "seguy"  # scones.models.barycentric


class ImageGrid(Settings):
    n_sources: NonNegativeInt
    samples_per_source: Count


class FIDSettings(Settings):
    enabled: bool
    weights_path: str | None
    feature_extractor: Target | None
    n_real: Count | None
    batch_size: Count
    device: str | None


class LabelConsistency(Settings):
    enabled: bool
    epochs: Count
    width: Count
    holdout: Annotated[float, Ge(0)]
    max_train: Count


class FeatureFID(Settings):
    enabled: bool
    n_splits: Count
    kid_subsets: Count


class ScoreGrid(Settings):
    every_n_steps: NonNegativeInt
    n_samples: Count
    step_lr: PositiveFloat
    n_steps_each: Count
    skip_levels: NonNegativeInt


class DensitySettings(Settings):
    n_pairs: Count
    n_kl: Count
    grid: Count


class Eval(Settings):
    n_samples: Annotated[int, Ge(2)] | Auto
    dual_health_samples: NonNegativeInt = 2000  # 0: no dual health diagnostic
    dual_health_every: NonNegativeInt = 0
    batch_size: Count
    device: str | None = None
    pot_reference_n: NonNegativeInt
    pot_reference_max_dim: Count
    pot_divergence_lam: PositiveFloat = Field(None, validate_default=False)
    conditional_n_x: Count | None  # null: the protocol rule (experiments/evaluation.conditional_protocol)
    conditional_n_per_x: Count | None
    grid: ImageGrid
    fid: FIDSettings
    label_consistency: LabelConsistency
    feature_fid: FeatureFID
    score_grid: ScoreGrid
    density: DensitySettings


DEVICES = "an integer >= 1, -1 (all), 'auto' or a list of ids"


class Trainer(Settings):
    accelerator: ACCELERATORS
    devices: Any = Field(description=DEVICES)
    strategy: str
    precision: PRECISIONS
    num_nodes: Count = 1
    log_every_n_steps: Count = 25
    gradient_clip_val: NonNegativeFloat | None = None
    deterministic: Literal[True, False, "warn"] = False

    @field_validator("devices")
    @classmethod
    def _devices(cls, v: Any) -> Any:
        def is_int(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        if (is_int(v) and (v >= 1 or v == -1)) or v == "auto" or (isinstance(v, list) and all(map(is_int, v))):
            return v
        raise PydanticCustomError("devices", f"must be {DEVICES}")


class Logger(Settings):
    wandb: dict[str, Any] | None = Field(None, description="null or a mapping of wandb.init arguments")


class Paths(Settings):
    output_root: str
    cache_dir: str
    data_dir: str
    allowed_roots: list[str] | None = Field(None, description="a list of directory paths")


class RunConfig(Settings):
    """The whole job config (``hydra`` excluded); the groups in the order problems are reported in (``GROUPS``)."""

    name: str
    seed: NonNegativeInt
    num_workers: NonNegativeInt = 0
    num_threads: Count | None = None
    checkpoint_every: NonNegativeInt = 0
    optimized_metric: str | None = None
    data: Data
    cost: Cost
    regularizer: Regularizer
    dual: by_kind({"neural": NeuralDual, "online_sinkhorn": OnlineSinkhornDual})
    score: by_kind({"auto": LearnedScore, "exact": ExactScore, "learned": LearnedScore})
    bp: BarycentricProjection
    sampler: Sampler
    eval: Eval
    trainer: Trainer
    logger: Logger
    paths: Paths

    @field_validator("name")
    @classmethod
    def _relative_name(cls, name: str) -> str:
        if not name.strip() or ".." in Path(name).parts or Path(name).is_absolute():
            raise PydanticCustomError("name", "must be a relative directory name without '..' (it names the "
                                              "output folder)")  # fmt: skip
        return name




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


__all__ = ["RunConfig", "Target", "check", "expected", "problems_of", "resolved"]
