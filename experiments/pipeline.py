"""The SCONES pipeline: dual → score (if learned) → barycentric projection → evaluate.

Hydra-free orchestration over a composed config (``experiments/run.py`` is the thin Hydra entry).
Data flows one way: config → pair + cost + regulariser → trained potentials / score / BP → sampler →
samples → metrics and plots. Each stage reads only what earlier stages saved.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from threadpoolctl import threadpool_limits

from experiments import images
from experiments.atomic import atomic_torch_save, atomic_write_bytes, atomic_write_json
from experiments.distributed import (
    evaluation_device,
    gather_to_rank_zero,
    global_rank,
    is_distributed,
    is_rank_zero,
    world_size,
)
from experiments.logging_utils import SamplingProgress, Tracker
from experiments.schema import RunConfig
from experiments.stages import Stage, make_stage, run_training_stage
from experiments.validation import ConfigError, validate_config
from scones.coupling import Coupling, chunk_seed
from scones.data.streams import stream_loader
from scones.models.barycentric import BarycentricModule
from scones.models.dual import DualModule
from scones.models.score import ScoreModule
from scones.ot.dual import DualPotentials, violation
from scones.sampling import conditional
from scones.sampling.langevin import NonFiniteSampleError
from scones.sampling.schedules import geometric_sigmas
from scones.sampling.settings import SamplerSettings, validate_sampler

log = logging.getLogger(__name__)


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
        if isinstance(cause, FileNotFoundError):  # missing dataset file: keep which files and the fix, on one line
            raise ConfigError(f"{key} (_target_={target!r}): {' '.join(str(cause).split())}") from None
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


def online_sinkhorn_dual(cfg: DictConfig, stage: Stage, source, target, cost, regularizer):
    """Dual stage without a network: Online Sinkhorn kernel-expansion potentials (KL only)."""
    from scones.ot.online_sinkhorn import EntropicPotentials
    from scones.ot.regularizers import KL

    if not isinstance(regularizer, KL):
        raise ConfigError(
            "dual=online_sinkhorn solves the KL-regularised problem; "
            f"got regularizer={regularizer!r} (use regularizer=kl)"
        )
    if stage.is_done():
        state = stage.load_state()
        stage.cached = True
        pot = EntropicPotentials.from_state_dict(state, cost=cost)
    else:
        solver = instantiate_node(cfg, "dual.solver", lam=regularizer.lam, cost=cost)
        g = torch.Generator().manual_seed(_seed(cfg, 1))
        t0 = time.perf_counter()
        pot = solver.fit(
            lambda n: source.sample(n, generator=g),
            lambda n: target.sample(n, generator=g),
            n_iter=int(cfg.dual.steps),
            progress=True,
        )
        stage.dir.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(pot.state_dict(), stage.weights_file)
        stage.finish(None, time.perf_counter() - t0, {"steps": int(cfg.dual.steps), "support": len(pot.f)})
    pot.regularizer = regularizer
    return pot


def dual_stage(
    cfg: DictConfig, source, target, cost, regularizer, tracker: Tracker | None = None
) -> tuple[Any, Stage]:
    stage = make_stage(cfg, "dual", cfg.dual, cfg.data, cfg.cost, cfg.regularizer, cfg.seed)
    if cfg.dual.kind == "online_sinkhorn":
        return online_sinkhorn_dual(cfg, stage, source, target, cost, regularizer), stage
    dim = data_dim(source)
    pl.seed_everything(_seed(cfg, 0), workers=True, verbose=False)
    pot = DualPotentials(
        instantiate_node(cfg, "dual.net", dim=dim), instantiate_node(cfg, "dual.net", dim=dim), cost, regularizer
    )
    module = DualModule(
        pot, lr=cfg.dual.lr, pairs=cfg.dual.pairs, skip_nonfinite=cfg.dual.get("skip_nonfinite", False),
        objective=dual_objective_name(cfg, regularizer), lr_schedule=str(cfg.dual.get("lr_schedule", "constant")),
        **health_logging(cfg, source, target),
    )
    loader = stream_loader([source, target], cfg.dual.batch_size, _seed(cfg, 1), cfg.get("num_workers", 0))
    run_training_stage(cfg, stage, module, loader, int(cfg.dual.steps), pot, tracker)
    calibrate_dual(cfg, pot, source, target)
    return pot, stage


def health_logging(cfg: DictConfig, source, target) -> dict:
    """``health_data`` (held-out samples, ``eval.dual_health_samples`` per side, at most 1000) and ``health_every``
    (``eval.dual_health_every``; 0 = about 10 times per stage, at most every 100 steps, on logging steps) for
    :class:`DualModule`."""
    n = min(int(cfg.eval.get("dual_health_samples", 2000)), 1000)
    every = int(cfg.eval.get("dual_health_every", 0) or 0)
    if n < 4:
        return {}
    if every <= 0:
        log_every = max(1, int(cfg.trainer.get("log_every_n_steps", 25) or 25))
        every = log_every * max(math.ceil(100 / log_every), math.ceil(int(cfg.dual.steps) / (10 * log_every)))
    def draw():  # at the first health step (seeded): a run shorter than `every` steps draws nothing
        g = torch.Generator().manual_seed(_seed(cfg, 3))
        return source.sample(n, generator=g), target.sample(n, generator=g)

    return {"health_data": draw, "health_every": every}


def assess_dual(cfg: DictConfig, potentials, source, target) -> dict:
    """The dual's convergence diagnostic on ``eval.dual_health_samples`` fresh samples per side (seeded; also for
    a cached stage), logged, with a warning when it fails. Returns the ``dual`` entries of metrics.json."""
    from scones.ot.health import dual_health

    n = int(cfg.eval.get("dual_health_samples", 2000))
    if n < 4:
        return {}
    g = torch.Generator().manual_seed(_seed(cfg, 4))
    x, y = source.sample(n, generator=g), target.sample(n, generator=g)
    try:
        h = dual_health(potentials, x, y)
    except Exception as e:  # noqa: BLE001 - a diagnostic must never stop the run
        log.warning("dual health diagnostic failed: %s: %s", type(e).__name__, e)
        return {"health": None, "converged": None, "health_error": f"{type(e).__name__}: {e}"}
    out = {"health": h["health"], "converged": h["converged"], "health_detail": h}
    if h["converged"] is False:
        out["warning"] = (
            f"dual stage unconverged: {h['method']} marginal violation {h['health']:.4g} > threshold "
            f"{h['threshold']:.4g} (dual.health in metrics.json); train longer (dual.steps), or check dual.lr"
        )
        log.warning(out["warning"])
    elif h["converged"] is None:
        out["warning"] = (
            f"dual convergence not assessable: the plan is too sharp for the sample check (effective sample size "
            f"{h['ess']:.3g} < 10 on {n} fresh samples)"
        )
        log.warning(out["warning"])
    else:
        log.info("dual: converged (%s marginal violation %.4g <= %.4g)", h["method"], h["health"], h["threshold"])
    return out


def resolve_auto_settings(cfg: DictConfig, target, cost, regularizer) -> dict:
    """Replace the config values ``auto`` (keys of :data:`scones.autoconfig.KEYS`) in ``cfg``, in place, by their
    rules (:mod:`scones.autoconfig`) for this λ, dimension and target scale (variances of 2000 seeded target
    samples). Returns ``{"values": {key: value}, "scale": {...}}`` (empty when nothing is ``auto``); logged."""
    from scones import autoconfig

    requested = {k: OmegaConf.select(cfg, k) for k in autoconfig.KEYS}
    if not any(v == autoconfig.AUTO for v in requested.values() if isinstance(v, str)):
        return {}
    g = torch.Generator().manual_seed(_seed(cfg, 5))
    y = target.sample(2000, generator=g)
    lam = float(getattr(regularizer, "lam", 1.0))
    cost_scale = cost.scale(y) if hasattr(cost, "scale") else 1.0
    scale = autoconfig.problem_scale(y.numpy(), lam, cost_scale, getattr(regularizer, "name", "other"))
    values = autoconfig.resolve_auto(requested, scale)
    for key, value in values.items():
        OmegaConf.update(cfg, key, value, merge=False)
    log.info("auto settings (scones.autoconfig): %s", ", ".join(f"{k}={v}" for k, v in values.items()))
    return {"values": values, "scale": scale.as_dict()}


def dual_objective_name(cfg: DictConfig, regularizer) -> str:
    """``dual.objective`` with ``auto`` resolved: ``logmeanexp`` for KL, ``dual`` otherwise."""
    name = str(cfg.dual.get("objective", "dual"))
    if name == "auto":
        return "logmeanexp" if getattr(regularizer, "name", None) == "kl" else "dual"
    return name


def calibrate_dual(cfg: DictConfig, pot, source, target) -> None:
    """``dual.objective=logmeanexp``: fix the constant J' cannot see, so that E_{p⊗q}[H] = 1 on
    ``dual.calibration_samples`` fresh samples per side (seeded: a cached stage gets the same shift)."""
    if dual_objective_name(cfg, pot.regularizer) != "logmeanexp":
        return
    from scones.ot.dual import calibrate_mass_

    n = int(cfg.dual.get("calibration_samples", 2000))
    g = torch.Generator().manual_seed(_seed(cfg, 2))
    k = calibrate_mass_(pot, source.sample(n, generator=g), target.sample(n, generator=g))
    log.info("dual: calibrated E[H] = 1 on %d x %d pairs (phi shifted by %.4g)", n, n, -k)


def score_stage(
    cfg: DictConfig, target, settings: RunConfig, tracker: Tracker | None = None
) -> tuple[Any, Stage | None]:
    """Returns ``prior_score(y, level)`` and the stage (None when the target's exact score is used).

    ``settings`` are the run's typed settings (``settings.score``, ``settings.sampler``); ``cfg`` gives the score
    net's ``_target_`` node and the config sections the stage's cache key hashes."""
    sc = settings.score
    has_exact = getattr(target, "has_score", False)
    if sc.kind == "exact" or (sc.kind == "auto" and has_exact):
        if not has_exact:
            raise ConfigError(
                f"score.kind=exact but data.target ({type(target).__name__}) has no score(y); use score=mlp"
            )
        return conditional.ExactPriorScore(target), None
    stage = make_stage(cfg, "score", cfg.score, cfg.data.target, cfg.seed)
    sigmas = geometric_sigmas(sc.sigma_max, sc.sigma_min, sc.n_levels)
    pl.seed_everything(settings.seed + 10, workers=True, verbose=False)
    net = instantiate_node(cfg, "score.net", dim=data_dim(target))
    check_score_schedule(settings.sampler, net, sigmas)
    module = ScoreModule(
        net, sigmas, lr=sc.lr, skip_nonfinite=sc.skip_nonfinite, ema_decay=sc.ema_decay,
        callbacks=images.score_callbacks(cfg, stage.dir, target),
    )
    loader = stream_loader([target], sc.batch_size, settings.seed + 11, settings.num_workers)
    run_training_stage(cfg, stage, module, loader, sc.steps, module, tracker)
    module.eval()
    return conditional.LearnedPriorScore.for_sampler(module, settings.sampler), stage


def check_score_schedule(sampler: SamplerSettings, net, sigmas: torch.Tensor) -> None:
    """A score net that stores its schedule (NCSN, NCSNv2) must store the score.sigma_* one; a level-conditional
    net (NCSN v1) can only be sampled at those levels, so the annealed sampler must use a subset of them."""
    own = getattr(net, "sigmas", None)
    if own is not None and (own.shape != sigmas.shape or not torch.allclose(own.float(), sigmas, rtol=1e-5)):
        raise ConfigError(
            f"score.net holds {own.numel()} noise levels {float(own[0]):.4g} … {float(own[-1]):.4g} but score.sigma_* "
            f"give {sigmas.numel()} levels {float(sigmas[0]):.4g} … {float(sigmas[-1]):.4g}; build the net from the "
            "same keys (score.net.sigmas: geometric_sigmas(${score.sigma_max}, ${score.sigma_min}, ${score.n_levels}))"
        )
    levels = sampler.levels_run()  # None: the sampler passes no level (ULA)
    if getattr(net, "level_conditional", False) and levels is not None:
        used = torch.tensor(levels)
        gap = (used.log()[:, None] - sigmas.log()[None]).abs().min(dim=1).values
        if bool((gap > 1e-4).any()):
            raise ConfigError(
                f"score.net ({type(net).__name__}) is conditioned on the level index, so sampler.sigma_max/sigma_min/"
                "n_levels must give levels of the training schedule; set them to ${score.sigma_max}, "
                "${score.sigma_min}, ${score.n_levels} (skip levels with sampler.skip_levels)"
            )


def sampler_settings(cfg: DictConfig) -> SamplerSettings:
    """The ``sampler`` node as the typed settings the samplers take (:mod:`scones.sampling.settings`)."""
    return validate_sampler(OmegaConf.to_container(cfg.sampler, resolve=True))


def bp_stage(
    cfg: DictConfig, source, target, potentials, dual: Stage, settings: RunConfig, tracker: Tracker | None = None
) -> tuple[Any, Stage]:
    """The barycentric projection T(x) ≈ E_π[y | x] trained with frozen potentials (``settings.bp``)."""
    bp = settings.bp
    stage = make_stage(cfg, "bp", cfg.bp, dual.key, cfg.seed)
    dim = data_dim(source)
    pl.seed_everything(settings.seed + 20, workers=True, verbose=False)
    net = instantiate_node(cfg, "bp.net", in_dim=dim, out_dim=dim)
    module = BarycentricModule(
        net, potentials, lr=bp.lr, pairs=bp.pairs, skip_nonfinite=bp.skip_nonfinite, estimator=bp.estimator
    )
    loader = stream_loader([source, target], bp.batch_size, settings.seed + 21, settings.num_workers)
    run_training_stage(cfg, stage, module, loader, bp.steps, net, tracker)
    net.eval()
    return net, stage


# --------------------------------------------------------------------------------------------- sampling


def _to(obj, device: torch.device):
    """``obj`` on ``device`` through its ``.to`` (modules and prior scores move in place and return themselves,
    Online Sinkhorn potentials return a moved copy); anything without ``.to`` is returned as is."""
    return obj.to(device) if hasattr(obj, "to") else obj


@contextmanager
def evaluation_coupling(cfg: DictConfig, source, target, potentials, prior_score, bp_net) -> Iterator[Coupling]:
    """The run's plan as the :class:`~scones.coupling.Coupling` a user loads, on the evaluation device
    (:func:`~experiments.distributed.evaluation_device`: ``eval.device``, the GPU of a GPU run), ``eval.batch_size``
    chains per chunk. Objects moved in place are moved back to the CPU afterwards, so the CPU-side metrics that
    follow (calibration, density, classifier) see them where they were trained (a moved copy is simply dropped)."""
    device = evaluation_device(cfg)
    objs = (potentials, prior_score, bp_net)
    moved = [_to(o, device) for o in objs]
    try:
        yield Coupling(moved[0], source, target, prior_score=moved[1], barycentric_map=moved[2],
                       sampler=sampler_settings(cfg), batch_size=int(cfg.eval.batch_size), device=device)
    except ValueError as e:  # sampler settings the sampler refuses (e.g. sampler.init): name the config keys
        raise ConfigError(str(e)) from None
    except NonFiniteSampleError as e:  # name the stage and the sampler (the message has the level/step)
        raise NonFiniteSampleError(f"stage 'evaluate' (sampler.kind={cfg.sampler.kind}): {e}") from None
    finally:
        if device.type != "cpu":
            for o, m in zip(objs, moved, strict=True):
                if m is o:
                    _to(o, torch.device("cpu"))


def sample_sharded(coupling: Coupling, x: torch.Tensor, y0: torch.Tensor, g: torch.Generator) -> torch.Tensor | None:
    """:meth:`Coupling.run_chains` over all chunks of ``x``, shared out between the processes of a DDP run.

    With an initialised process group (``trainer=ddp``) rank r runs chunks r, r+W, r+2W, ... and rank 0 gathers all
    of them; the other ranks return ``None``. Chunk seeds come from ``g``'s state (left untouched), so the samples
    do not depend on how chunks are spread. A failure on any rank is raised on every rank (no rank waits forever in
    the gather). With a GPU the noise comes from a CUDA generator: samples differ from a CPU run's by the stream.
    """
    seed = chunk_seed(g)
    rank, world = (global_rank(), world_size()) if is_distributed() else (0, 1)
    mine = [c for c in range(coupling.n_chunks(x.shape[0])) if c % world == rank]
    desc = "sampling" if world == 1 else f"sampling (rank 0 of {world})"
    progress = SamplingProgress(coupling.sampler.steps_per_chain * len(mine), desc, None if rank == 0 else False)
    out: dict[int, torch.Tensor] = {}
    error: Exception | None = None
    try:
        out = {c: t.cpu() for c, t in coupling.run_chains(x, y0, seed, mine, callback=progress).items()}
    except (ValueError, NonFiniteSampleError) as e:
        error = e
    parts = gather_to_rank_zero((out, error))
    errors = [error] if parts is None else [e for _, e in parts if e is not None]
    if errors and errors[0] is not None:
        raise errors[0]
    if parts is None:
        return None
    chunks = {c: t for part, _ in parts for c, t in part.items()}
    return torch.cat([chunks[c] for c in range(len(chunks))])


# --------------------------------------------------------------------------------------------- evaluate


def evaluate(cfg: DictConfig, run_dir: Path, source, target, cost, regularizer, potentials, prior_score, bp_net,
             stages: dict[str, Stage | None], dual_health: dict | None = None, resolved: dict | None = None) -> dict:
    from experiments import density, evaluation

    n = int(cfg.eval.n_samples)
    g = torch.Generator().manual_seed(_seed(cfg, 100))
    t0 = time.perf_counter()
    x, x_labels = images.sample_with_labels(source, n, g)  # labels: digit image sets (label consistency)
    plan = (cfg, source, target, potentials, prior_score, bp_net)
    with evaluation_coupling(*plan) as coupling:
        y_bp = coupling.barycentric(x).cpu()
        y = sample_sharded(coupling, x, coupling.start_chains(x, y_bp, g), g)
    if y is None:  # rank > 0 of a DDP run: its chains went to rank 0, which computes and writes everything
        return None
    sampling_seconds = time.perf_counter() - t0

    y_ind = target.sample(n, generator=g)
    with torch.no_grad():
        mean_h = float(regularizer.density(violation(potentials, source.sample(n, generator=g), y_ind)).mean())
    metrics = evaluation.coupling_metrics(cfg, source, target, cost, regularizer, x, {"scones": y, "bp": y_bp,
                                                                                     "independent": y_ind}, g)
    metrics["dual"] = {"mean_H": mean_h}
    warnings = []
    if dual_health:
        health = dict(dual_health)
        if "warning" in health:
            warnings.append(health.pop("warning"))
        metrics["dual"].update(health)
    if resolved:
        metrics["auto"] = resolved
    density_metrics = density.evaluate(cfg, run_dir, source, target, cost, regularizer, potentials, _seed(cfg, 200))
    if density_metrics is not None:  # p and q have known densities: calibration, marginals, KL to the truth
        metrics["density"] = density_metrics

    def scones_sampler(xr: torch.Tensor) -> torch.Tensor:  # fresh SCONES samples for other sources (this process)
        with evaluation_coupling(*plan) as coupling:
            progress = SamplingProgress(coupling.sampler.steps_per_chain * coupling.n_chunks(len(xr)), "sampling")
            return coupling.sample(xr, generator=g, callback=progress).reshape(xr.shape).cpu()

    bench = getattr(target, "benchmark", None)
    if bench is not None and hasattr(bench, "conditional_moments"):  # exact conditional plan known (EOT benchmark)
        metrics["conditional"] = evaluation.conditional_benchmark_metrics(cfg, bench, scones_sampler, bp_net, g)
    image_seconds = None
    if images.is_image(source):  # image grid, FID, label consistency (experiments/images.py)
        extra = images.evaluate_images(cfg, run_dir, target, x, x_labels, {"scones": y, "bp": y_bp,
                                                                            "independent": y_ind}, scones_sampler, g)
        for name, values in extra.pop("per_method").items():
            metrics["methods"][name].update(values)
        image_seconds = extra.pop("timings_s")
        metrics.update(extra)
    metrics["timings_s"] = {name: round(st.seconds, 2) for name, st in stages.items() if st is not None}
    metrics["timings_s"]["sampling"] = round(sampling_seconds, 2)
    if image_seconds is not None:
        metrics["timings_s"]["image_eval"] = image_seconds
    metrics["stages"] = {
        name: {"dir": str(st.dir), "cached": st.cached} if st is not None else None for name, st in stages.items()
    }
    metrics["warnings"] = warnings
    metrics["experiment"] = cfg.get("name", "custom")
    metrics["n_samples"] = n

    arrays = {"x": x.numpy(), "y": y.numpy(), "y_bp": y_bp.numpy()}
    if x_labels is not None:
        arrays["x_labels"] = x_labels.numpy()
    arrays.update(evaluation.ground_truth_arrays(source, target, regularizer, cost))
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(run_dir / "samples.npz", buf.getvalue())
    atomic_write_json(run_dir / "metrics.json", metrics)
    evaluation.save_plots(cfg, run_dir, x, y, y_bp, target.sample(n, generator=g), stages)
    return metrics


# --------------------------------------------------------------------------------------------- entry


def run(cfg: DictConfig, run_dir: Path) -> dict | None:
    """All stages into ``run_dir``; returns the metrics (``None`` on DDP ranks > 0, which write nothing).

    With ``logger.wandb`` set, one W&B run (rank 0) receives the stage losses, the metrics, the plots and the
    artifacts (:class:`experiments.logging_utils.Tracker`); it is finished even when a stage fails.
    """
    settings = validate_config(cfg, run_dir)  # one-line ConfigError before any data, device or directory is touched
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(int(cfg.get("num_threads") or torch.get_num_threads()))
    source, target, cost, regularizer = build_problem(cfg)
    resolved = resolve_auto_settings(cfg, target, cost, regularizer)
    if resolved:  # the typed settings with the resolved values (the stages read them)
        settings = validate_config(cfg, run_dir)
    if is_rank_zero():
        atomic_write_bytes(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True).encode())

    tracker = Tracker.from_config(cfg, run_dir)
    exit_code = 1
    try:
        potentials, dual = dual_stage(cfg, source, target, cost, regularizer, tracker)
        with threadpool_limits(limits=1, user_api="blas"):
            health = assess_dual(cfg, potentials, source, target) if is_rank_zero() else {}
        prior_score, score = score_stage(cfg, target, settings, tracker)
        bp_net, bp = bp_stage(cfg, source, target, potentials, dual, settings, tracker)
        stages = {"dual": dual, "score": score, "bp": bp}
        if not is_distributed() and not is_rank_zero():
            exit_code = 0  # a launcher rank > 0 whose stages were all cached: rank 0 evaluates alone
            return None
        # NumPy/SciPy BLAS only sees the evaluation's small matrices (covariances, POT references): one thread is
        # fastest and stops OpenBLAS threads fighting torch's OpenMP pool (up to 90x slower; docs/performance.md)
        with threadpool_limits(limits=1, user_api="blas"):
            metrics = evaluate(cfg, run_dir, source, target, cost, regularizer, potentials, prior_score, bp_net, stages,
                               health, resolved)
        if metrics is not None:
            log.info("metrics written to %s", run_dir / "metrics.json")
            try:
                tracker.log_results(metrics, run_dir, stages)
            except Exception as e:  # noqa: BLE001 - tracking must never lose finished results
                log.warning("W&B logging of the results failed: %s: %s", type(e).__name__, e)
        exit_code = 0
        return metrics
    finally:
        tracker.finish(exit_code)
