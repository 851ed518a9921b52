"""Read the config once: the composed config becomes typed objects at start-up, and nothing below reads it again.

:func:`experiments.pipeline.run` validates the config (:func:`experiments.validation.validate_config`, which returns
the typed :class:`~experiments.schema.RunConfig`), builds the :class:`Problem` (:func:`build_problem`), resolves the
``auto`` settings and then reads the run once (:func:`read_run`) into a :class:`RunSpec`:

- one :class:`StageSpec` per training stage: its typed settings, its resolved config section (hashed into the
  stage's cache key, recorded in ``done.json``) and the sections it depends on;
- :class:`TrainingSpec`: the Lightning trainer settings, checkpoint interval, threads and the cache directory;
- the sampler's settings (:class:`scones.sampling.settings.SamplerSettings`);
- :class:`EvalSpec`: the evaluation plan (``eval`` settings, seed, experiment name, device rule).

The stages (:mod:`experiments.pipeline`, :mod:`experiments.stages`) and the evaluators
(:mod:`experiments.evaluators`) receive these objects, never the ``DictConfig`` (an import-linter contract keeps
OmegaConf and Hydra out of the modules below start-up).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from experiments.validation import ConfigError, read_settings, validate_config

if TYPE_CHECKING:
    from experiments.schema import RunConfig

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- the problem


class Problem(NamedTuple):
    """The transport problem: source p, target q, cost c and regulariser (λ·divergence)."""

    source: Any
    target: Any
    cost: Any
    regularizer: Any

    @property
    def dim(self) -> int:
        """Flat dimension of one sample."""
        return int(np.prod(self.source.shape))

    @property
    def is_image(self) -> bool:
        """True for image pairs (samples ``(C, H, W)``)."""
        return len(tuple(getattr(self.source, "shape", ()))) == 3


@dataclass(frozen=True)
class Node:
    """A resolved ``_target_`` node of the config and its key (named in the one-line errors of :meth:`build`)."""

    key: str
    spec: Any

    def build(self, **kwargs: Any) -> Any:
        """``hydra.utils.instantiate(spec, **kwargs)`` with a one-line :class:`ConfigError` naming the key."""
        key, node = self.key, self.spec
        if node is None:
            raise ConfigError(f"missing config node '{key}'")
        try:
            return instantiate(node, **kwargs)
        except InstantiationException as e:
            target = node.get("_target_", "?") if isinstance(node, dict) else "?"
            cause = e.__cause__ or e
            first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
            if isinstance(cause, FileNotFoundError):  # missing dataset file: keep which files and the fix, one line
                raise ConfigError(f"{key} (_target_={target!r}): {' '.join(str(cause).split())}") from None
            if "Error locating target" in str(e) or isinstance(cause, (ImportError, AttributeError)):
                raise ConfigError(
                    f"{key}._target_={target!r} cannot be imported ({first}); give a full dotted path to a class "
                    "with sample(n) (e.g. scones.data.SwissRoll), importable from the working directory"
                ) from None
            raise ConfigError(f"{key} (_target_={target!r}) could not be built: {first}") from None
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{key}: {e}") from None


def _plain(cfg: DictConfig, key: str) -> Any:
    node = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def node(cfg: DictConfig, key: str) -> Node:
    """The ``_target_`` node at ``key``, resolved."""
    return Node(key, _plain(cfg, key))


def build_problem(cfg: DictConfig) -> Problem:
    """Source, target, cost and regulariser from the config, with dimension checks."""
    source = node(cfg, "data.source").build()
    target = node(cfg, "data.target").build()
    for key, dist in (("data.source", source), ("data.target", target)):
        if not callable(getattr(dist, "sample", None)):
            raise ConfigError(f"{key} ({type(dist).__name__}) has no sample(n) method")
    if tuple(source.shape) != tuple(target.shape):
        raise ConfigError(
            f"dimension mismatch: data.source has shape {tuple(source.shape)} but data.target has shape "
            f"{tuple(target.shape)}; the squared-Euclidean cost needs equal shapes (set data.dim for both)"
        )
    return Problem(source, target, node(cfg, "cost").build(), node(cfg, "regularizer").build())


def resolve_auto_settings(cfg: DictConfig, problem: Problem) -> dict:
    """Start-up: replace the config values ``auto`` (keys of :data:`scones.autoconfig.KEYS`) in ``cfg``, in place,
    by their rules (:mod:`scones.autoconfig`) for this λ, dimension and target scale (variances of 2000 seeded
    target samples). Returns ``{"values": {key: value}, "scale": {...}}`` (empty when nothing is ``auto``)."""
    from scones import autoconfig

    if OmegaConf.select(cfg, "dual.estimator") in ("langevin", autoconfig.AUTO):  # chains' settings: auto if absent
        with open_dict(cfg):
            for k in ("dual.langevin.step_size", "dual.langevin.burn_in"):
                if OmegaConf.select(cfg, k) is None:
                    OmegaConf.update(cfg, k, autoconfig.AUTO, merge=False, force_add=True)
    requested = {k: OmegaConf.select(cfg, k) for k in autoconfig.KEYS}
    if not any(v == autoconfig.AUTO for v in requested.values() if isinstance(v, str)):
        return {}
    _, target, cost, regularizer = problem
    g = torch.Generator().manual_seed(int(cfg.seed) + 5)
    y = target.sample(2000, generator=g)
    lam = float(getattr(regularizer, "lam", 1.0))
    cost_scale = cost.scale(y) if hasattr(cost, "scale") else 1.0
    scale = autoconfig.problem_scale(y.numpy(), lam, cost_scale, getattr(regularizer, "name", "other"))
    values = autoconfig.resolve_auto(requested, scale)
    for key, value in values.items():
        OmegaConf.update(cfg, key, value, merge=False)
    log.info("auto settings (scones.autoconfig): %s", ", ".join(f"{k}={v}" for k, v in values.items()))
    return {"values": values, "scale": scale.as_dict()}


def sampler_settings(cfg: DictConfig) -> Any:
    """The ``sampler`` node as the typed settings the samplers take (:mod:`scones.sampling.settings`)."""
    from scones.sampling.settings import validate_sampler

    return validate_sampler(_plain(cfg, "sampler"))


# --------------------------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class StageSpec:
    """One training stage: typed ``settings``, the resolved config ``section`` and what else its cache key hashes.

    The cache key is ``config_key(name, section, *upstream stage keys, *inputs)``
    (:func:`experiments.stages.make_stage`), the same sections the stage always hashed.
    """

    name: str
    settings: Any
    section: dict
    inputs: tuple = ()

    def node(self, key: str) -> Node:
        """The ``_target_`` node ``<name>.<key>`` of the section (e.g. ``dual.net``)."""
        return Node(f"{self.name}.{key}", self.section.get(key))


@dataclass(frozen=True)
class TrainingSpec:
    """What every training stage's Lightning run takes (``trainer`` group, ``checkpoint_every``, threads, cache)."""

    trainer: Any  # experiments.schema.Trainer
    checkpoint_every: int
    num_threads: int | None
    num_workers: int
    cache_dir: Path


@dataclass(frozen=True)
class EvalSpec:
    """The evaluation plan: the typed ``eval`` settings, the seed, the experiment's name and the device rule."""

    settings: Any  # experiments.schema.Eval
    seed: int
    name: str
    accelerator: str = "cpu"

    def device(self) -> torch.device:
        """Where the chains run (:func:`experiments.distributed.evaluation_device`; asked when evaluating, since a
        DDP rank only knows its GPU once the process group exists)."""
        from experiments.distributed import evaluation_device

        return evaluation_device(self.settings.device, self.accelerator)


@dataclass(frozen=True)
class RunSpec:
    """The whole run, typed, read once from the config (:func:`read_run`)."""

    settings: Any  # experiments.schema.RunConfig: every group, typed
    seed: int
    dual: StageSpec
    score: StageSpec
    bp: StageSpec
    sampler: Any  # scones.sampling.settings.SamplerSettings
    training: TrainingSpec
    eval: EvalSpec


def _without(section: dict, key: str) -> dict:
    return {k: v for k, v in section.items() if k != key} if isinstance(section, dict) else section


def read_run(cfg: DictConfig, settings: RunConfig | None = None) -> RunSpec:
    """The typed :class:`RunSpec` of a composed (and validated) config; ``settings`` is its
    :class:`~experiments.schema.RunConfig` when already checked (else it is read here, schema checks only)."""
    run = settings if settings is not None else read_settings(cfg)
    seed = int(run.seed)
    return RunSpec(
        settings=run,
        seed=seed,
        dual=StageSpec("dual", run.dual, _plain(cfg, "dual"),
                       (_plain(cfg, "data"), _plain(cfg, "cost"), _plain(cfg, "regularizer"), seed)),
        # score.expert is fitted when the stage is built or loaded (seconds), not trained: outside the cache key
        score=StageSpec("score", run.score, _without(_plain(cfg, "score"), "expert"),
                        (_plain(cfg, "data.target"), seed)),
        bp=StageSpec("bp", run.bp, _plain(cfg, "bp"), (seed,)),
        sampler=run.sampler,
        training=TrainingSpec(
            trainer=run.trainer, checkpoint_every=int(run.checkpoint_every), num_threads=run.num_threads,
            num_workers=int(run.num_workers), cache_dir=Path(run.paths.cache_dir),
        ),
        eval=EvalSpec(run.eval, seed, str(run.name), str(run.trainer.accelerator)),
    )


__all__ = [
    "EvalSpec", "Node", "Problem", "RunSpec", "StageSpec", "TrainingSpec", "build_problem", "node", "read_run",
    "resolve_auto_settings", "sampler_settings",
]


def start_job(cfg: DictConfig, run_dir=None) -> tuple[Problem, RunSpec, dict]:
    """The start of every job (``experiments.run`` and the scripts): validate ``cfg`` (one-line ConfigError),
    set ``num_threads`` when given, build the :class:`Problem`, resolve the ``auto`` values from it (then the typed
    settings are read again with them) and read the :class:`RunSpec`, so stage keys match the run's.
    Returns (problem, spec, the resolved ``auto`` values)."""
    settings = validate_config(cfg, run_dir)  # before any data, device or directory is touched
    if settings.num_threads:
        torch.set_num_threads(int(settings.num_threads))
    problem = build_problem(cfg)
    resolved = resolve_auto_settings(cfg, problem)
    if resolved:  # the typed settings with the resolved values (the stages read them)
        settings = validate_config(cfg, run_dir)
    return problem, read_run(cfg, settings), resolved  # the config is read here, once
