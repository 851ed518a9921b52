"""Load a finished run directory as a :class:`scones.coupling.Coupling`: the one call from a run to its plan.

::

    from experiments.loading import load_coupling
    plan = load_coupling("outputs/density_gaussian_d2/runs/<date_time>")
    y = plan.sample(x, n=10)              # (len(x), 10, d)

The library (:mod:`scones`) knows nothing of run directories or configs; this app module rebuilds the run's
objects with the pipeline's own builders, so the loaded plan samples exactly as the run's evaluate stage did.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from experiments import pipeline
from experiments.startup import build_problem, read_run
from experiments.validation import ConfigError
from scones.coupling import Coupling
from scones.ot.dual import DualPotentials
from scones.sampling.conditional import ExactPriorScore, LearnedPriorScore


class RunDirError(FileNotFoundError):
    """A run directory (or a stage it points at) is missing or incomplete; the message says what and why."""


def load_coupling(run_dir: str | Path, device: str | torch.device = "cpu") -> Coupling:
    """The plan of a finished ``python -m experiments.run`` run.

    Reads ``<run_dir>/config.yaml`` (the resolved config) and ``<run_dir>/metrics.json``, whose
    ``stages.<name>.dir`` point at the cached stage directories (``final.pt``: weights-only state dicts, loaded with
    ``torch.load(weights_only=True)``). Distributions, cost, regulariser and networks are rebuilt from the saved
    config nodes through the pipeline's builders; the prior score is the run's (exact, or the learned one with its
    EMA weights) and sampling follows :mod:`scones.sampling.conditional`, as in the run's evaluate stage. Relative
    stage directories are looked up from the working directory, the run directory's parents (runs live in
    ``<output_root>/<name>/runs/<time>``, stages in ``<output_root>/cache``) and ``paths.cache_dir``. Nothing is
    trained: a missing stage raises :class:`RunDirError`.
    """
    run_dir = Path(run_dir)
    cfg_file, metrics_file = run_dir / "config.yaml", run_dir / "metrics.json"
    if not cfg_file.exists():
        raise RunDirError(f"{run_dir} is not a run directory: {cfg_file.name} is missing")
    if not metrics_file.exists():
        raise RunDirError(f"{run_dir} is not a finished run: {metrics_file.name} (written by the evaluate "
                          "stage) is missing; rerun the same command to finish it")
    cfg = OmegaConf.load(cfg_file)
    stages = json.loads(metrics_file.read_text()).get("stages") or {}
    device = torch.device(device)
    try:
        problem = build_problem(cfg)
        spec = read_run(cfg)
    except ConfigError as e:
        raise RunDirError(f"{cfg_file}: {e}") from None
    source, target, cost, regularizer = problem
    dim, sampler = problem.dim, spec.sampler

    def build(stage, key: str, **kwargs):
        try:
            return stage.node(key).build(**kwargs)
        except ConfigError as e:
            raise RunDirError(f"{cfg_file}: {e}") from None

    dual_dir = _stage_dir(run_dir, spec.training.cache_dir, stages, "dual")
    if spec.dual.settings.kind == "online_sinkhorn":
        from scones.ot.online_sinkhorn import EntropicPotentials

        potentials = EntropicPotentials.from_state_dict(_read_state(dual_dir), cost=cost)
        potentials.regularizer = regularizer
        potentials = potentials.to(device)
    else:
        potentials = DualPotentials(build(spec.dual, "net", dim=dim), build(spec.dual, "net", dim=dim), cost,
                                    regularizer)
        _load_module(potentials, dual_dir, "dual")
        pipeline.calibrate_dual(spec, potentials, source, target)  # the run's E[H] = 1 shift (logmeanexp)
        potentials = potentials.to(device)

    if stages.get("score") is None:  # the run sampled with the target's exact score
        if not getattr(target, "has_score", False):
            raise RunDirError(f"{metrics_file}: no score stage and {type(target).__name__} has no exact score")
        prior_score = ExactPriorScore(target)
    else:
        from scones.models.score import ScoreModule
        from scones.sampling.schedules import geometric_sigmas

        sc = spec.score.settings
        module = ScoreModule(build(spec.score, "net", dim=dim),
                             geometric_sigmas(sc.sigma_max, sc.sigma_min, sc.n_levels), ema_decay=sc.ema_decay)
        _load_module(module, _stage_dir(run_dir, spec.training.cache_dir, stages, "score"), "score")
        prior_score = LearnedPriorScore.for_sampler(module.to(device), sampler)

    bp_net = None
    if stages.get("bp") is not None:
        bp_net = build(spec.bp, "net", in_dim=dim, out_dim=dim)
        _load_module(bp_net, _stage_dir(run_dir, spec.training.cache_dir, stages, "bp"), "bp")
        bp_net = bp_net.to(device)

    return Coupling(
        potentials, source, target, prior_score=prior_score, barycentric_map=bp_net, sampler=sampler,
        batch_size=int(spec.eval.settings.batch_size), device=device, config=cfg, run_dir=run_dir,
    )


def _stage_dir(run_dir: Path, cache: Path, stages: Mapping, name: str) -> Path:
    entry = stages.get(name)
    if not entry or "dir" not in entry:
        raise RunDirError(f"{run_dir / 'metrics.json'} has no stages.{name}.dir")
    recorded = Path(entry["dir"])
    parents = list(run_dir.resolve().parents)
    candidates = [recorded] if recorded.is_absolute() else [Path.cwd() / recorded, *(p / recorded for p in parents)]
    candidates += [cache / recorded.name, *(p / cache / recorded.name for p in parents if not cache.is_absolute())]
    for c in candidates:
        if (c / "done.json").exists() and (c / "final.pt").exists():
            return c
    raise RunDirError(
        f"stage '{name}' of {run_dir} not found: no finished stage (done.json, final.pt) at {entry['dir']} (looked "
        f"relative to the working directory, the run directory's parents and paths.cache_dir={cache}); was the "
        "cache deleted? Rerun the run's command to rebuild it"
    )


def _read_state(stage_dir: Path) -> Any:
    return torch.load(stage_dir / "final.pt", map_location="cpu", weights_only=True)


def _load_module(module: nn.Module, stage_dir: Path, name: str) -> None:
    try:
        module.load_state_dict(_read_state(stage_dir), strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise RunDirError(f"{stage_dir / 'final.pt'} does not fit the '{name}' networks of the run's config "
                          f"({first})") from None
    module.requires_grad_(False)
    module.eval()


__all__ = ["RunDirError", "load_coupling"]
