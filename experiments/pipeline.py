"""The SCONES pipeline: dual → score (if learned) → barycentric projection → evaluate.

Hydra-free orchestration over a composed config (``experiments/run.py`` is the thin Hydra entry).
Data flows one way: config → pair + cost + regulariser → trained potentials / score / BP → sampler →
samples → metrics and plots. Each stage reads only what earlier stages saved.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from experiments.stages import Stage, atomic_write_bytes, atomic_write_json, make_stage, run_training_stage
from scones.data.streams import stream_loader
from scones.models.barycentric import BarycentricModule
from scones.models.dual import DualModule, DualPotentials, violation
from scones.models.score import ScoreModule
from scones.sampling.conditional import ConditionalScore
from scones.sampling.langevin import annealed_langevin, ula
from scones.sampling.schedules import geometric_sigmas

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """Invalid configuration; the message names the offending key and the fix."""


# --------------------------------------------------------------------------------------------- building


def instantiate_node(cfg: DictConfig, key: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate(cfg.<key>)`` with a one-line error naming the key."""
    node = OmegaConf.select(cfg, key)
    if node is None:
        raise ConfigError(f"missing config node '{key}'")
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        target = node.get("_target_", "?") if isinstance(node, DictConfig) else "?"
        cause = e.__cause__ or e
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        if "Error locating target" in str(e) or isinstance(cause, (ImportError, AttributeError)):
            raise ConfigError(
                f"{key}._target_={target!r} cannot be imported ({first}); give a full dotted path to a class "
                "with sample(n) (e.g. scones.data.SwissRoll), importable from the working directory"
            ) from None
        raise ConfigError(f"{key} (_target_={target!r}) could not be built: {first}") from None
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{key}: {e}") from None


def build_problem(cfg: DictConfig):
    """Source, target, cost and regulariser from the config, with dimension checks."""
    source = instantiate_node(cfg, "data.source")
    target = instantiate_node(cfg, "data.target")
    for key, dist in (("data.source", source), ("data.target", target)):
        if not callable(getattr(dist, "sample", None)):
            raise ConfigError(f"{key} ({type(dist).__name__}) has no sample(n) method")
    if tuple(source.shape) != tuple(target.shape):
        raise ConfigError(
            f"dimension mismatch: data.source has shape {tuple(source.shape)} but data.target has shape "
            f"{tuple(target.shape)}; the squared-Euclidean cost needs equal shapes (set data.dim for both)"
        )
    cost = instantiate_node(cfg, "cost")
    regularizer = instantiate_node(cfg, "regularizer")
    return source, target, cost, regularizer


def data_dim(dist) -> int:
    return int(np.prod(dist.shape))


def _seed(cfg: DictConfig, offset: int) -> int:
    return int(cfg.seed) + offset


# --------------------------------------------------------------------------------------------- stages


def dual_stage(cfg: DictConfig, source, target, cost, regularizer) -> tuple[Any, Stage]:
    stage = make_stage(cfg, "dual", cfg.dual, cfg.data, cfg.cost, cfg.regularizer, cfg.seed)
    dim = data_dim(source)
    pl.seed_everything(_seed(cfg, 0), workers=True, verbose=False)
    pot = DualPotentials(
        instantiate_node(cfg, "dual.net", dim=dim), instantiate_node(cfg, "dual.net", dim=dim), cost, regularizer
    )
    module = DualModule(pot, lr=cfg.dual.lr, pairs=cfg.dual.pairs, skip_nonfinite=cfg.dual.get("skip_nonfinite", False))
    loader = stream_loader([source, target], cfg.dual.batch_size, _seed(cfg, 1), cfg.get("num_workers", 0))
    run_training_stage(cfg, stage, module, loader, int(cfg.dual.steps), pot)

    return pot, stage


def score_stage(cfg: DictConfig, target) -> tuple[Any, Stage | None]:
    """Returns ``prior_score(y, level)`` and the stage (None when the target's exact score is used)."""
    kind = cfg.score.kind
    has_exact = getattr(target, "has_score", False)
    if kind == "exact" or (kind == "auto" and has_exact):
        if not has_exact:
            raise ConfigError(
                f"score.kind=exact but data.target ({type(target).__name__}) has no score(y); use score=mlp"
            )
        return (lambda y, level: target.score(y)), None
    if kind not in ("auto", "learned"):
        raise ConfigError(f"score.kind must be one of auto, exact, learned; got {kind!r}")
    stage = make_stage(cfg, "score", cfg.score, cfg.data.target, cfg.seed)
    sigmas = geometric_sigmas(cfg.score.sigma_max, cfg.score.sigma_min, cfg.score.n_levels)
    pl.seed_everything(_seed(cfg, 10), workers=True, verbose=False)
    net = instantiate_node(cfg, "score.net", dim=data_dim(target))
    module = ScoreModule(net, sigmas, lr=cfg.score.lr, skip_nonfinite=cfg.score.get("skip_nonfinite", False))
    loader = stream_loader([target], cfg.score.batch_size, _seed(cfg, 11), cfg.get("num_workers", 0))
    run_training_stage(cfg, stage, module, loader, int(cfg.score.steps), module)
    module.eval()
    return module.score, stage


def bp_stage(cfg: DictConfig, source, target, potentials, dual: Stage) -> tuple[Any, Stage]:
    stage = make_stage(cfg, "bp", cfg.bp, dual.key, cfg.seed)
    dim = data_dim(source)
    pl.seed_everything(_seed(cfg, 20), workers=True, verbose=False)
    net = instantiate_node(cfg, "bp.net", in_dim=dim, out_dim=dim)
    module = BarycentricModule(net, potentials, lr=cfg.bp.lr, pairs=cfg.bp.pairs)
    loader = stream_loader([source, target], cfg.bp.batch_size, _seed(cfg, 21), cfg.get("num_workers", 0))
    run_training_stage(cfg, stage, module, loader, int(cfg.bp.steps), net)
    net.eval()
    return net, stage


# --------------------------------------------------------------------------------------------- sampling


@torch.no_grad()
def batched(fn, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([fn(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])


def initial_chains(cfg: DictConfig, x: torch.Tensor, y_bp: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    init, s = cfg.sampler.init, cfg.sampler
    noise_scale = float(s.get("sigma_max", 1.0)) if s.kind == "annealed" else float(s.get("init_noise", 1.0))
    if init == "source":
        return x.clone()
    if init == "bp":
        return y_bp.clone()
    if init == "bp_noise":
        return y_bp + noise_scale * torch.randn(y_bp.shape, generator=g)
    if init == "noise":
        return noise_scale * torch.randn(y_bp.shape, generator=g)
    raise ConfigError(f"sampler.init must be one of source, bp, bp_noise, noise; got {init!r}")


def sample_scones(cfg: DictConfig, prior_score, potentials, x: torch.Tensor, y0: torch.Tensor, g) -> torch.Tensor:
    """Conditional Langevin for every source in ``x`` (vectorised in chunks of ``eval.batch_size`` chains)."""
    s = cfg.sampler
    out = []
    for i in range(0, x.shape[0], int(cfg.eval.batch_size)):
        xb, yb = x[i : i + int(cfg.eval.batch_size)], y0[i : i + int(cfg.eval.batch_size)]
        model = ConditionalScore(prior_score, potentials, xb, guidance=float(s.get("guidance", 1.0)))
        if s.kind == "ula":
            yb = ula(model, yb, float(s.step_size), int(s.n_steps), generator=g)
        elif s.kind == "annealed":
            sigmas = geometric_sigmas(s.sigma_max, s.sigma_min, s.n_levels)
            yb = annealed_langevin(
                model, yb, sigmas, float(s.step_lr), int(s.n_steps_each), denoise=bool(s.denoise),
                skip_levels=int(s.get("skip_levels", 0)), generator=g,
            )
        else:
            raise ConfigError(f"sampler.kind must be 'ula' or 'annealed'; got {s.kind!r}")
        out.append(yb)
    return torch.cat(out)


# --------------------------------------------------------------------------------------------- evaluate


def evaluate(cfg: DictConfig, run_dir: Path, source, target, cost, regularizer, potentials, prior_score, bp_net,
             stages: dict[str, Stage | None]) -> dict:
    from experiments import evaluation

    n = int(cfg.eval.n_samples)
    g = torch.Generator().manual_seed(_seed(cfg, 100))
    t0 = time.perf_counter()
    x = source.sample(n, generator=g)
    y_bp = batched(lambda xb: bp_net(xb).reshape(xb.shape), x, int(cfg.eval.batch_size))
    y0 = initial_chains(cfg, x, y_bp, g)
    y = sample_scones(cfg, prior_score, potentials, x, y0, g)
    sampling_seconds = time.perf_counter() - t0

    y_ind = target.sample(n, generator=g)
    with torch.no_grad():
        mean_h = float(regularizer.density(violation(potentials, source.sample(n, generator=g), y_ind)).mean())
    metrics = evaluation.coupling_metrics(cfg, source, target, cost, regularizer, x, {"scones": y, "bp": y_bp,
                                                                                     "independent": y_ind}, g)
    metrics["dual"] = {"mean_H": mean_h}
    metrics["timings_s"] = {name: round(st.seconds, 2) for name, st in stages.items() if st is not None}
    metrics["timings_s"]["sampling"] = round(sampling_seconds, 2)
    metrics["stages"] = {
        name: {"dir": str(st.dir), "cached": st.cached} if st is not None else None for name, st in stages.items()
    }
    metrics["experiment"] = cfg.get("name", "custom")
    metrics["n_samples"] = n

    arrays = {"x": x.numpy(), "y": y.numpy(), "y_bp": y_bp.numpy()}
    arrays.update(evaluation.ground_truth_arrays(source, target, regularizer, cost))
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(run_dir / "samples.npz", buf.getvalue())
    atomic_write_json(run_dir / "metrics.json", metrics)
    evaluation.save_plots(cfg, run_dir, x, y, y_bp, target.sample(n, generator=g), stages)
    return metrics


# --------------------------------------------------------------------------------------------- entry


def run(cfg: DictConfig, run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(cfg.get("num_threads") or torch.get_num_threads()))
    source, target, cost, regularizer = build_problem(cfg)
    atomic_write_bytes(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True).encode())

    potentials, dual = dual_stage(cfg, source, target, cost, regularizer)
    prior_score, score = score_stage(cfg, target)
    bp_net, bp = bp_stage(cfg, source, target, potentials, dual)
    metrics = evaluate(cfg, run_dir, source, target, cost, regularizer, potentials, prior_score, bp_net,
                       {"dual": dual, "score": score, "bp": bp})
    log.info("metrics written to %s", run_dir / "metrics.json")
    return metrics
