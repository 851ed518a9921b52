"""Start-up validation of a composed config: every mistake ends in ONE line naming the key and the fix.

Called first thing by :func:`experiments.pipeline.run` (before any data is built or any device touched) and, on
the command line, by :func:`preflight` before Hydra composes the config and creates the run directory.

What is checked (explicit schema below, one table per config group):

- types and ranges: ``dual.lr='abc'`` or ``dual.lr=-1`` → ``dual.lr=-1 must be a number > 0``; bools, ints
  (``True`` is not an int), finite floats, optional (``null``) values;
- missing fields: ``~dual.lr`` → ``dual.lr is missing; expected a number > 0``;
- closed vocabularies: ``sampler.init='foo' is not one of source, bp, bp_noise, noise``;
- cross-field rules: λ > 0, ``sigma_max >= sigma_min``, ``skip_levels < n_levels``, data.source vs data.target
  ``dim``/``size`` when both are given, GPU trainer without a visible GPU;
- ``_target_`` nodes stay *open* (any extra kwargs are the plugged-in class's business) but their
  ``_target_`` must be importable, so a typo in ``bp.net._target_`` fails now, not after the dual stage trained;
- paths (``paths.*`` and any ``*_dir``/``*_root``/``*_path``/``*_file``/``root``/``path`` value, plus the run
  directory) must resolve — symlinks and ``..`` included — inside an allowed root: the repository, the working
  directory, ``paths.allowed_roots``, ``$SCONES_ALLOWED_ROOTS`` (``os.pathsep``-separated) and ``$SCONES_DATA``;
- CLI (:func:`preflight`): unknown config-group options (``sampler=foo``, ``+experiment=nope``) and Hydra
  composition errors (unknown keys) become one line listing the available options.

Keys the schema does not know are left alone (Hydra already rejects unknown keys unless added with ``+``; tests
and plug-ins add their own). A new ``dual.kind`` / ``sampler.kind`` / ``score.kind`` must be registered in the
tables here.
"""

from __future__ import annotations

import importlib
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"


class ConfigError(ValueError):
    """Invalid configuration; the message (one line) names the offending key and the fix."""


# --------------------------------------------------------------------------------------------- field specs

_MISSING = object()


@dataclass(frozen=True)
class Field:
    """One config value: ``kind`` in int/float/bool/str/choice/target/list/mapping, optional bounds/choices."""

    kind: str
    required: bool = True
    nullable: bool = False
    low: float | None = None
    low_open: bool = False  # True: value > low, False: value >= low
    choices: tuple = ()

    def expected(self) -> str:
        if self.kind == "choice":
            text = "one of " + ", ".join(map(str, self.choices))
        elif self.kind in ("int", "float"):
            text = "an integer" if self.kind == "int" else "a number"
            if self.low is not None:
                text += f" {'>' if self.low_open else '>='} {self.low:g}"
        elif self.kind == "target":
            text = "a node with a _target_ class path"
        else:
            text = {"bool": "true or false", "str": "a string", "list": "a list", "mapping": "a mapping"}[self.kind]
        return text + (" or null" if self.nullable else "")


def Int(low: float | None = None, **kw: Any) -> Field:  # noqa: N802 (schema constructors read like types)
    return Field("int", low=low, **kw)


def Float(low: float | None = None, low_open: bool = False, **kw: Any) -> Field:  # noqa: N802
    return Field("float", low=low, low_open=low_open, **kw)


def Positive(**kw: Any) -> Field:  # noqa: N802
    return Field("float", low=0.0, low_open=True, **kw)


def Choice(*choices: Any, **kw: Any) -> Field:  # noqa: N802
    return Field("choice", choices=tuple(choices), **kw)


BOOL = Field("bool")
OPT_BOOL = Field("bool", required=False)
STR = Field("str")
TARGET = Field("target")
COUNT = Int(1)  # steps, batch sizes, levels: >= 1

PAIRS = ("all", "diagonal")
DUAL_OBJECTIVES = ("dual", "logmeanexp", "auto")  # auto: logmeanexp for KL, dual otherwise
SAMPLER_INITS = ("source", "bp", "bp_noise", "noise")
PRECISIONS = (
    "64", "64-true", "32", "32-true", "16", "16-mixed", "16-true", "bf16", "bf16-mixed", "bf16-true",
    "transformer-engine", "transformer-engine-float16", 16, 32, 64,
)  # fmt: skip
ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "tpu", "auto")

TOP = {
    "name": STR,
    "seed": Int(0),
    "num_workers": Int(0),
    "num_threads": Int(1, nullable=True, required=False),
    "checkpoint_every": Int(0, required=False),
}
NET_TRAINING = {"steps": COUNT, "batch_size": COUNT, "lr": Positive(), "skip_nonfinite": OPT_BOOL}
DUAL = {
    "neural": {
        "kind": Choice("neural", "online_sinkhorn"), "net": TARGET, "pairs": Choice(*PAIRS),
        "objective": Choice(*DUAL_OBJECTIVES, required=False), "calibration_samples": Int(1, required=False),
        **NET_TRAINING,
    },
    "online_sinkhorn": {"kind": Choice("neural", "online_sinkhorn"), "solver": TARGET, "steps": COUNT},
}
SCORE_KINDS = ("auto", "exact", "learned")
SCORE_LEARNED = {
    "kind": Choice(*SCORE_KINDS),
    "net": TARGET,
    "sigma_max": Positive(),
    "sigma_min": Positive(),
    "n_levels": COUNT,
    **NET_TRAINING,
}
BP = {"net": TARGET, "pairs": Choice(*PAIRS), **NET_TRAINING}
SAMPLER_COMMON = {
    "kind": Choice("ula", "annealed"),
    "init": Choice(*SAMPLER_INITS),
    "guidance": Float(0.0, required=False),
}
SAMPLER = {
    "ula": {**SAMPLER_COMMON, "step_size": Positive(), "n_steps": COUNT, "init_noise": Float(0.0, required=False)},
    "annealed": {
        **SAMPLER_COMMON,
        "sigma_max": Positive(),
        "sigma_min": Positive(),
        "n_levels": COUNT,
        "step_lr": Positive(),
        "n_steps_each": COUNT,
        "skip_levels": Int(0, required=False),
        "denoise": BOOL,
    },
}
EVAL = {
    "n_samples": Int(2),
    "batch_size": COUNT,
    "pot_reference_n": Int(0, required=False),
    "pot_reference_max_dim": Int(1, required=False),
    "pot_divergence_lam": Positive(required=False),
    "conditional_n_x": Int(1, required=False, nullable=True),
    "conditional_n_per_x": Int(1, required=False, nullable=True),
    "device": Field("str", required=False, nullable=True),
}
TRAINER = {
    "accelerator": Choice(*ACCELERATORS),
    "strategy": STR,
    "precision": Choice(*PRECISIONS),
    "num_nodes": Int(1, required=False),
    "log_every_n_steps": Int(1, required=False),
    "gradient_clip_val": Float(0.0, nullable=True, required=False),
    "deterministic": Choice(True, False, "warn", required=False),
}
PATHS = {
    "output_root": STR,
    "cache_dir": STR,
    "data_dir": STR,
    "allowed_roots": Field("list", required=False, nullable=True),
}
# config keys whose string values are filesystem paths (besides everything under ``paths``)
PATH_KEY = re.compile(r"(^|_)(dir|root|path|file)$")


# --------------------------------------------------------------------------------------------- checking


class _Checker:
    """Collects problems; :meth:`raise_first` raises the first as a one-line :class:`ConfigError`."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg, self.problems = cfg, []

    def add(self, msg: str) -> None:
        self.problems.append(" ".join(str(msg).split()))

    def raise_first(self) -> None:
        if self.problems:
            first, rest = self.problems[0], self.problems[1:]
            more = f" (and {len(rest)} more: {'; '.join(rest)})" if rest else ""
            raise ConfigError(first + more)

    def get(self, key: str) -> Any:
        """The resolved value at dotted ``key``; ``_MISSING`` if absent or ``???``; records resolution errors."""
        node: Any = self.cfg
        for part in key.split("."):
            if not isinstance(node, DictConfig) or part not in node:
                return _MISSING
            try:
                node = node[part]
            except OmegaConfBaseException as e:
                self.add(f"{key} cannot be resolved: {str(e).splitlines()[0]}")
                return _MISSING
        return node

    def field(self, key: str, spec: Field) -> Any:
        value = self.get(key)
        if value is _MISSING:
            if spec.required:
                self.add(f"{key} is missing; expected {spec.expected()} (set {key}=...)")
            return _MISSING
        if value is None:
            if not spec.nullable:
                self.add(f"{key}=null is not allowed; expected {spec.expected()}")
            return None
        problem = _check_value(value, spec)
        if problem is not None:
            shown = repr(value) if isinstance(value, str) else _show(value)
            self.add(f"{key}={shown} {problem}")
            return _MISSING
        return value

    def group(self, prefix: str, schema: dict[str, Field]) -> dict[str, Any]:
        """Check the keys of ``schema`` under ``prefix``; other keys of the group are left alone."""
        node = self.get(prefix) if prefix else self.cfg
        if node is _MISSING or not isinstance(node, DictConfig):
            self.add(f"config group '{prefix}' is missing or not a mapping (add {prefix}=<option> or restore it)")
            return {}
        return {name: self.field(f"{prefix}.{name}" if prefix else name, spec) for name, spec in schema.items()}


def _show(value: Any) -> str:
    if OmegaConf.is_config(value):
        return str(OmegaConf.to_container(value, resolve=False))
    return str(value)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_value(value: Any, spec: Field) -> str | None:
    """None if ``value`` fits ``spec``, else the complaint (without the key)."""
    kind = spec.kind
    if kind == "choice":
        return None if value in spec.choices else f"is not one of {', '.join(map(str, spec.choices))}"
    if kind == "bool":
        return None if isinstance(value, bool) else f"has type {type(value).__name__}; expected true or false"
    if kind == "str":
        return None if isinstance(value, str) else f"has type {type(value).__name__}; expected a string"
    if kind == "list":
        return None if isinstance(value, (ListConfig, list, tuple)) else "must be a list, e.g. [a, b]"
    if kind in ("mapping", "target"):
        if not isinstance(value, DictConfig):
            return f"has type {type(value).__name__}; expected {spec.expected()}"
        return None
    if kind == "int":
        if not _is_int(value):
            return f"has type {type(value).__name__}; expected {spec.expected()}"
    elif kind == "float":
        if not (isinstance(value, (int, float)) and not isinstance(value, bool)):
            return f"has type {type(value).__name__}; expected {spec.expected()}"
        if not math.isfinite(float(value)):
            return f"must be finite; expected {spec.expected()}"
    if spec.low is not None:
        bad = value <= spec.low if spec.low_open else value < spec.low
        if bad:
            return f"must be {spec.expected()}"
    return None


def locate(path: str) -> Any:
    """Import ``a.b.C`` (module part, then attributes) without instantiating anything."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError as e:
            if e.name is not None and not ".".join(parts[:i]).startswith(e.name):
                raise  # the module exists but one of its own imports is missing
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(f"No module named '{parts[0]}'")


def _check_targets(chk: _Checker, node: Any, prefix: str) -> None:
    """Every ``_target_`` below ``node`` must be an importable dotted path (nodes stay open otherwise)."""
    if not isinstance(node, DictConfig):
        return
    for k in node.keys():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k == "_target_":
            target = chk.get(key)
            if not isinstance(target, str) or "." not in target:
                chk.add(f"{key}={target!r} must be a full dotted class path (e.g. scones.data.SwissRoll)")
                continue
            try:
                locate(target)
            except (ImportError, AttributeError) as e:
                chk.add(
                    f"{key}={target!r} cannot be imported ({type(e).__name__}: {e}); give a full dotted path to a "
                    "class importable from the working directory"
                )
            continue
        if k == "hydra" and not prefix:
            continue
        try:
            child = node[k]
        except OmegaConfBaseException:
            continue  # reported where the value is checked
        _check_targets(chk, child, key)


def _check_target_node(chk: _Checker, key: str) -> None:
    node = chk.get(key)
    if node is _MISSING:
        chk.add(f"{key} is missing; expected {TARGET.expected()}")
    elif not isinstance(node, DictConfig) or "_target_" not in node:
        chk.add(f"{key} must be a node with a _target_ class path (got {_show(node)})")


def _check_data(chk: _Checker) -> None:
    for side in ("source", "target"):
        _check_target_node(chk, f"data.{side}")
    chk.field("data.dim", Int(1, required=False))
    for attr in ("dim", "size"):
        a, b = chk.get(f"data.source.{attr}"), chk.get(f"data.target.{attr}")
        for key, v in ((f"data.source.{attr}", a), (f"data.target.{attr}", b)):
            if v is not _MISSING and v is not None and (not _is_int(v) or v < 1):
                chk.add(f"{key}={_show(v)} must be an integer >= 1")
        if _is_int(a) and _is_int(b) and a != b:
            chk.add(
                f"dimension mismatch: data.source.{attr}={a} but data.target.{attr}={b}; the cost needs equal "
                f"shapes (set data.dim, or both data.source.{attr} and data.target.{attr})"
            )


def _check_cost_and_regularizer(chk: _Checker) -> None:
    _check_target_node(chk, "cost")
    _check_target_node(chk, "regularizer")
    chk.field("cost.reduction", Choice("sum", "mean", required=False))
    target = chk.get("regularizer._target_")
    builtin = isinstance(target, str) and target.startswith("scones.ot.")  # KL / ChiSquared need lam
    chk.field("regularizer.lam", Positive(required=builtin))
    chk.field("regularizer.beta", Positive(required=False))


def _check_sigmas(chk: _Checker, prefix: str, values: dict) -> None:
    hi, lo = values.get("sigma_max"), values.get("sigma_min")
    if isinstance(hi, (int, float)) and isinstance(lo, (int, float)) and hi < lo:
        chk.add(f"{prefix}.sigma_max={hi} must be >= {prefix}.sigma_min={lo}")


def _kind(chk: _Checker, key: str, kinds: tuple[str, ...]) -> str | None:
    value = chk.get(key)
    if value is _MISSING:
        chk.add(f"{key} is missing; expected one of {', '.join(kinds)}")
        return None
    if value not in kinds:
        chk.add(f"{key}={value!r} is not one of {', '.join(kinds)}")
        return None
    return value


def _check_stages(chk: _Checker) -> None:
    kind = _kind(chk, "dual.kind", tuple(DUAL))
    if kind is not None:
        values = chk.group("dual", DUAL[kind])
        reg = chk.get("regularizer._target_")
        if values.get("objective") == "logmeanexp" and isinstance(reg, str) and not reg.endswith(".KL"):
            chk.add(
                f"dual.objective=logmeanexp is the KL dual's shift-invariant form; regularizer._target_={reg!r} "
                "needs dual.objective=dual or auto (or use regularizer=kl)"
            )

    kind = _kind(chk, "score.kind", SCORE_KINDS)
    if kind == "exact":
        chk.group("score", {"kind": Choice(*SCORE_KINDS)})
    elif kind is not None:
        _check_sigmas(chk, "score", chk.group("score", SCORE_LEARNED))

    chk.group("bp", BP)

    kind = _kind(chk, "sampler.kind", tuple(SAMPLER))
    if kind is not None:
        values = chk.group("sampler", SAMPLER[kind])
        if kind == "annealed":
            _check_sigmas(chk, "sampler", values)
            levels, skip = values.get("n_levels"), values.get("skip_levels")
            if _is_int(levels) and _is_int(skip) and skip >= levels:
                chk.add(f"sampler.skip_levels={skip} must be < sampler.n_levels={levels}")


def _check_trainer(chk: _Checker) -> None:
    values = chk.group("trainer", TRAINER)
    devices = chk.get("trainer.devices")
    if devices is _MISSING:
        chk.add("trainer.devices is missing; expected an integer >= 1, -1 (all), 'auto' or a list of device ids")
    elif not (
        (_is_int(devices) and (devices >= 1 or devices == -1))
        or devices == "auto"
        or (isinstance(devices, ListConfig) and all(_is_int(d) for d in devices))
    ):
        chk.add(f"trainer.devices={_show(devices)} must be an integer >= 1, -1 (all), 'auto' or a list of ids")
    if values.get("accelerator") in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            chk.add(
                f"trainer.accelerator={values['accelerator']!r} but no CUDA device is visible; use trainer=cpu "
                "(or run on a machine with a GPU)"
            )


def _check_eval_device(chk: _Checker) -> None:
    device = chk.get("eval.device")
    if device is _MISSING or device is None or not isinstance(device, str):
        return
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        chk.add(f"eval.device={device!r} is not a torch device; use null (the trainer's accelerator), cpu or cuda[:N]")
        return
    if kind not in ("cpu", "cuda"):
        chk.add(f"eval.device={device!r} is not supported; use null (the trainer's accelerator), cpu or cuda[:N]")
    elif kind == "cuda" and not torch.cuda.is_available():
        chk.add(f"eval.device={device!r} but no CUDA device is visible; use eval.device=cpu (or null)")


def validate_config(cfg: DictConfig, run_dir: str | os.PathLike | None = None, check_paths: bool = True) -> None:
    """Check a composed config before anything is built; raise :class:`ConfigError` (one line) on the first problem.

    ``run_dir`` (the Hydra run directory) is confined to the allowed roots too. Problems after the first are
    summarised in the same line.
    """
    chk = _Checker(cfg)
    top = chk.group("", TOP)
    name = top.get("name")
    if isinstance(name, str) and (not name.strip() or ".." in Path(name).parts or Path(name).is_absolute()):
        chk.add(f"name={name!r} must be a relative directory name without '..' (it names the output folder)")
    _check_data(chk)
    _check_cost_and_regularizer(chk)
    _check_stages(chk)
    chk.group("eval", EVAL)
    _check_eval_device(chk)
    _check_trainer(chk)
    wandb = chk.get("logger.wandb")
    if wandb is not _MISSING and wandb is not None and not isinstance(wandb, DictConfig):
        chk.add(f"logger.wandb={_show(wandb)} must be null or a mapping of wandb.init arguments")
    roots = chk.group("paths", PATHS).get("allowed_roots")
    if isinstance(roots, ListConfig) and not all(isinstance(r, str) for r in roots):
        chk.add(f"paths.allowed_roots={_show(roots)} must be a list of directory paths")
    chk.raise_first()  # value problems first: they need no imports
    _check_targets(chk, cfg, "")
    chk.raise_first()
    if check_paths:
        confine_paths(cfg, run_dir)


# --------------------------------------------------------------------------------------------- paths


def allowed_roots(cfg: DictConfig | None = None) -> list[Path]:
    """Resolved roots every configured path must live under (see the module docstring)."""
    roots: list[str | Path] = [REPO_ROOT, Path.cwd()]
    extra = OmegaConf.select(cfg, "paths.allowed_roots", default=None) if cfg is not None else None
    roots += [str(r) for r in (extra or [])]
    roots += [r for r in os.environ.get("SCONES_ALLOWED_ROOTS", "").split(os.pathsep) if r]
    if os.environ.get("SCONES_DATA"):
        roots.append(os.environ["SCONES_DATA"])
    out: list[Path] = []
    for r in roots:
        p = Path(r).expanduser().resolve()
        if p not in out:
            out.append(p)
    return out


def config_paths(cfg: DictConfig) -> Iterator[tuple[str, str]]:
    """(key, value) of every path-valued config entry: all of ``paths`` and keys named like PATH_KEY."""

    def walk(node: Any, prefix: str) -> Iterator[tuple[str, str]]:
        if not isinstance(node, DictConfig):
            return
        for k in node.keys():
            key = f"{prefix}.{k}" if prefix else str(k)
            if key in ("hydra", "paths.allowed_roots"):
                continue
            try:
                value = node[k]
            except OmegaConfBaseException:
                continue
            if isinstance(value, DictConfig):
                yield from walk(value, key)
            elif isinstance(value, str) and "://" not in value and (
                key.startswith("paths.") or PATH_KEY.search(str(k))
            ):
                yield key, value

    yield from walk(cfg, "")


def confine(path: str | os.PathLike, key: str, roots: list[Path]) -> Path:
    """``path`` resolved (``~``, ``..``, symlinks); :class:`ConfigError` naming ``key`` if outside ``roots``."""
    resolved = Path(path).expanduser().resolve()
    if any(resolved.is_relative_to(r) for r in roots):
        return resolved
    raise ConfigError(
        f"{key}={str(path)!r} resolves to {resolved}, outside the allowed roots ({', '.join(map(str, roots))}); "
        "move it under one of them or add a root to paths.allowed_roots (or $SCONES_ALLOWED_ROOTS)"
    )


def confine_paths(cfg: DictConfig, run_dir: str | os.PathLike | None = None) -> None:
    roots = allowed_roots(cfg)
    for key, value in config_paths(cfg):
        confine(value, key, roots)
    if run_dir is not None:
        confine(run_dir, "hydra.run.dir", roots)


# --------------------------------------------------------------------------------------------- CLI preflight

def group_options(group: str, config_dir: Path = CONFIG_DIR) -> list[str]:
    return sorted(p.stem for p in (config_dir / group).glob("*.yaml"))


def check_group_choices(overrides: list[str], config_dir: Path = CONFIG_DIR) -> None:
    """``group=option`` overrides (sweeps too) must name an existing ``configs/<group>/<option>.yaml``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as e:
        raise ConfigError(" ".join(str(e).split())) from None
    for o in parsed:
        group = o.key_or_group
        if o.is_delete() or o.package or group.startswith("hydra") or not (config_dir / group).is_dir():
            continue
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        options = group_options(group, config_dir)
        for v in values:
            if v != "null" and v not in options:
                raise ConfigError(
                    f"{group}={v!r} is not one of {', '.join(options)} (no configs/{group}/{v}.yaml)"
                )


def preflight(argv: list[str], config_dir: Path = CONFIG_DIR, config_name: str = "config") -> None:
    """Validate CLI overrides before Hydra runs: group options, composition, schema, paths (one-line errors).

    Multirun command lines only get the group-option check (each job is validated when it starts); other
    Hydra flags (``--cfg job``, ``--help``, ``-cn other``, …) are left entirely to Hydra.
    """
    flags = [a for a in argv if a.startswith("-")]
    if any(f not in ("-m", "--multirun") for f in flags):
        return
    overrides = [a for a in argv if not a.startswith("-")]
    check_group_choices(overrides, config_dir)
    if flags:
        return
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    except Exception as e:  # noqa: BLE001 - Hydra raises many types; all become one line
        text = f"{e}\n{e.__cause__}" if e.__cause__ is not None else str(e)
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith(("\t", "    "))]
        raise ConfigError(" ".join(lines[:3]) or type(e).__name__) from None
    run_dir = OmegaConf.select(cfg, "hydra.run.dir", default=None, throw_on_resolution_failure=False)
    job_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"])  # the job's view
    validate_config(job_cfg, run_dir=run_dir)
