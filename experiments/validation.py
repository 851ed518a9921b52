"""Start-up validation of a composed config: every mistake ends in ONE line naming the key and the fix.

Called first thing by :func:`experiments.pipeline.run` (before any data is built or any device touched) and, on
the command line, by :func:`preflight` before Hydra composes the config and creates the run directory.

What is checked:

- the schema (:mod:`experiments.schema`, pydantic models per group): types and ranges (``dual.lr=-1`` →
  ``dual.lr=-1 must be a number > 0``), missing keys (``dual.lr is missing; expected a number > 0``), closed
  vocabularies (``sampler.init='foo' is not one of source, bp, bp_noise, noise, resample``), the rules inside a group
  (``sigma_max >= sigma_min``, ``skip_levels < n_levels``); a value that came through an interpolation also
  names the key it came from (``data.eps=-1 ... makes regularizer.lam=-2 ...``);
- rules across groups: data.source vs data.target ``dim``/``size``, λ of the built-in regularisers,
  ``dual.objective=logmeanexp`` only with KL, GPU trainer or ``eval.device`` without a visible GPU;
- ``_target_`` nodes stay *open* (extra kwargs are the plugged-in class's business) but their ``_target_`` must
  be importable, and the arguments the class annotates must have the annotated type (``data.pair=abc`` fails
  now, naming ``data.pair``, not when ``data.source`` is built);
- paths (``paths.*`` and any ``*_dir``/``*_root``/``*_path``/``*_file``/``root``/``path`` value, plus the run
  directory) must resolve — symlinks and ``..`` included — inside an allowed root: the repository, the working
  directory, ``paths.allowed_roots``, ``$SCONES_ALLOWED_ROOTS`` (``os.pathsep``-separated) and ``$SCONES_DATA``;
- CLI (:func:`preflight`): unknown config-group options (``sampler=foo``, ``+experiment=nope``) and Hydra
  composition errors (unknown keys) become one line listing the available options.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

if typing.TYPE_CHECKING:
    from experiments.schema import RunConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"
# config keys whose string values are filesystem paths (besides everything under ``paths``)
PATH_KEY = re.compile(r"(^|_)(dir|root|path|file)$")


class ConfigError(ValueError):
    """Invalid configuration; the message (one line) names the offending key and the fix."""


GROUPS = ("data", "cost", "regularizer", "dual", "score", "bp", "sampler", "eval", "trainer", "logger", "paths")


@dataclass
class Problem:
    """One thing wrong with the config: ``key`` and the complaint; ``value`` when the key holds a bad value."""

    key: str
    complaint: str
    value: Any = None
    has_value: bool = True
    via: tuple[str, str, str] | None = None  # (user's values, the interpolation, user's keys): see :func:`trace`

    def __str__(self) -> str:
        if not self.has_value:
            return self.complaint
        text = f"{self.key}={show(self.value)}"
        if not self.via:
            return f"{text} {self.complaint}"
        return f"{self.via[0]} makes {text} ({self.key}: {self.via[1]}), which {self.complaint}; change {self.via[2]}"

    @property
    def order(self) -> int:
        head = self.key.split(".")[0]
        return 1 + GROUPS.index(head) if head in GROUPS else 0  # top-level keys (name, seed, ...) first


def show(value: Any) -> str:
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=False)
    return repr(value) if isinstance(value, str) else str(value)


def raise_first(problems: list[Problem]) -> None:
    """Raise the first problem as a one-line :class:`ConfigError`, the others summarised; a value the user set
    that breaks several keys through interpolations is reported once."""
    seen: set = set()
    unique = []
    for p in problems:
        cause = (p.via[2], p.complaint) if p.via else str(p)
        if cause not in seen:
            seen.add(cause)
            unique.append(p)
    if unique:
        lines = [" ".join(str(p).split()) for p in unique]
        more = f" (and {len(lines) - 1} more: {'; '.join(lines[1:])})" if len(lines) > 1 else ""
        raise ConfigError(lines[0] + more)


# --------------------------------------------------------------------------------------------- rules across groups


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _data_shapes(plain: dict) -> list[Problem]:
    data, out = plain.get("data") or {}, []
    for attr in ("dim", "size"):
        a, b = ((data.get(side) or {}).get(attr) for side in ("source", "target"))
        for side, v in (("source", a), ("target", b)):
            if v is not None and (not _is_int(v) or v < 1):
                out.append(Problem(f"data.{side}.{attr}", "must be an integer >= 1", v))
        if _is_int(a) and _is_int(b) and a != b:
            out.append(Problem("data", f"dimension mismatch: data.source.{attr}={a} but data.target.{attr}={b}; the "
                                       f"cost needs equal shapes (set data.dim, or both data.source.{attr} and "
                                       f"data.target.{attr})", has_value=False))  # fmt: skip
    return out


def _devices(run: RunConfig) -> list[Problem]:
    import torch

    out = []
    if run.trainer.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        out.append(Problem("trainer.accelerator", "but no CUDA device is visible; use trainer=cpu (or run on a "
                                                  "machine with a GPU)", run.trainer.accelerator))  # fmt: skip
    device = run.eval.device
    if device is None:
        return out
    fix = "use null (the trainer's accelerator), cpu or cuda[:N]"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        return [*out, Problem("eval.device", f"is not a torch device; {fix}", device)]
    if kind not in ("cpu", "cuda"):
        out.append(Problem("eval.device", f"is not supported; {fix}", device))
    elif kind == "cuda" and not torch.cuda.is_available():
        out.append(Problem("eval.device", "but no CUDA device is visible; use eval.device=cpu (or null)", device))
    return out


def _regularizer(run: RunConfig) -> list[Problem]:
    """λ of the built-in regularisers; the KL-only objective. Runs after the ``_target_`` imports."""
    out = []
    reg = run.regularizer
    if reg.target.startswith("scones.ot.") and reg.lam is None:
        out.append(Problem("regularizer.lam", "regularizer.lam is missing; expected a number > 0 (set "
                                              "regularizer.lam=...)", has_value=False))  # fmt: skip
    if getattr(run.dual, "objective", None) == "logmeanexp" and getattr(locate(reg.target), "name", None) != "kl":
        out.append(Problem("dual.objective", f"dual.objective=logmeanexp is the KL dual's shift-invariant form; "
                                             f"regularizer._target_={reg.target!r} needs dual.objective=dual or auto "
                                             "(or use regularizer=kl)", has_value=False))  # fmt: skip
    if getattr(run.dual, "pairs", None) == "rows" and getattr(locate(reg.target), "name", None) != "kl":
        out.append(Problem("dual.pairs", f"dual.pairs=rows is the KL dual's batch semi-dual; regularizer._target_="
                                         f"{reg.target!r} needs dual.pairs=all, diagonal or auto (or use "
                                         "regularizer=kl)", has_value=False))  # fmt: skip
    if getattr(run.dual, "estimator", None) == "langevin" and getattr(locate(reg.target), "name", None) != "kl":
        out.append(Problem("dual.estimator", f"dual.estimator=langevin samples the KL plan; regularizer."
                                             f"_target_={reg.target!r} needs dual.estimator=pairs or auto (or use "
                                             "regularizer=kl)", has_value=False))  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------- _target_ nodes


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


def _arguments(obj: Any, node: dict, key: str) -> list[Problem]:
    """Arguments in ``node`` that do not have the type ``obj`` annotates (unknown names are left alone)."""
    from pydantic import ConfigDict, TypeAdapter, ValidationError

    from experiments import schema_errors

    try:
        params = inspect.signature(obj).parameters
        hints = typing.get_type_hints(obj.__init__ if inspect.isclass(obj) else obj)
    except Exception:  # noqa: BLE001 - unannotated or unresolvable signatures are simply not checked
        return []
    out = []
    for name, value in node.items():
        hint = hints.get(name)
        if name not in params or hint is None or hint is Any or (isinstance(value, dict) and "_target_" in value):
            continue
        try:
            TypeAdapter(hint, config=ConfigDict(arbitrary_types_allowed=True)).validate_python(value)
        except ValidationError as e:
            wrong_type = any(x["type"] in schema_errors.TYPE_ERRORS for x in e.errors(include_url=False))
            want = schema_errors.expected(hint)
            complaint = f"has type {type(value).__name__}; expected {want}" if wrong_type else f"must be {want}"
            out.append(Problem(f"{key}.{name}", complaint, value))
        except Exception:  # noqa: BLE001 - a type pydantic cannot check (e.g. a protocol) is not checked
            continue
    return out


def _targets(node: Any, prefix: str) -> Iterator[Problem]:
    """Every ``_target_`` below ``node`` is an importable dotted path whose annotated arguments fit."""
    if not isinstance(node, dict):
        return
    target = node.get("_target_")
    if "_target_" in node:
        key = f"{prefix}._target_" if prefix else "_target_"
        if not isinstance(target, str) or "." not in target:
            yield Problem(key, "must be a full dotted class path (e.g. scones.data.SwissRoll)", target)
        else:
            try:
                obj = locate(target)
            except (ImportError, AttributeError) as e:
                yield Problem(key, f"cannot be imported ({type(e).__name__}: {e}); give a full dotted path to a class "
                                   "importable from the working directory", target)  # fmt: skip
            else:
                yield from _arguments(obj, node, prefix)
    for k, child in node.items():
        yield from _targets(child, f"{prefix}.{k}" if prefix else str(k))


def read_settings(cfg: DictConfig) -> RunConfig:
    """The typed settings of a composed config, checked against the schema only (:func:`validate_config` also
    checks the ``_target_`` imports, the paths and the devices); :class:`ConfigError` (one line) otherwise."""
    from experiments import schema_errors

    run, _, problems = schema_errors.check(cfg)
    raise_first(problems)
    return run


def validate_config(
    cfg: DictConfig, run_dir: str | os.PathLike | None = None, check_paths: bool = True
) -> RunConfig:
    """Check a composed config before anything is built and return it typed; raise :class:`ConfigError` (one
    line: the first problem, the others summarised) otherwise. ``run_dir`` (the Hydra run directory) is confined
    to the allowed roots too."""
    from experiments import schema_errors  # pydantic and the library's vocabularies: not needed by ``--cfg job``

    run, plain, problems = schema_errors.check(cfg)
    problems += _data_shapes(plain)
    if run is not None:
        problems += _devices(run)
    raise_first(sorted(problems, key=lambda p: p.order))  # value problems first: they need no imports
    problems = [schema_errors.trace(cfg, p) for p in _targets(plain, "")]
    raise_first(problems)
    raise_first(_regularizer(run))
    if check_paths:
        confine_paths(cfg, run_dir)
    return run


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
