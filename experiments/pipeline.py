"""The SCONES pipeline: dual → score (if learned) → barycentric projection → evaluate.

Hydra-free orchestration over a composed config (``experiments/run.py`` is the thin Hydra entry). Data flows one
way: config → typed run settings and problem (read once at start-up, :mod:`experiments.startup`) → trained
potentials / score / BP (cached stages) → :class:`~scones.coupling.Coupling` → samples → evaluators
(:mod:`experiments.evaluators`) → run directory. Each stage reads only its settings and what earlier stages saved.
"""

from __future__ import annotations

import functools
import io
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
from omegaconf import DictConfig, OmegaConf
from threadpoolctl import threadpool_limits

from experiments import evaluators, images
from experiments.atomic import atomic_torch_save, atomic_write_bytes, atomic_write_json
from experiments.distributed import gather_to_rank_zero, global_rank, is_distributed, is_rank_zero, world_size
from experiments.logging_utils import SamplingProgress, Tracker
from experiments.stages import Stage, make_stage, run_training_stage
from experiments.startup import Problem, RunSpec, build_problem, start_job  # noqa: F401 - build_problem re-exported
from experiments.validation import ConfigError
from scones.coupling import Coupling, chunk_seed
from scones.data.streams import stream_loader
from scones.models.barycentric import BarycentricModule
from scones.models.dual import DualModule
from scones.models.score import MixtureExpert, ScoreModule
from scones.ot.dual import DualPotentials
from scones.sampling import conditional
from scones.sampling.langevin import NonFiniteSampleError
from scones.sampling.schedules import geometric_sigmas
from scones.sampling.settings import SamplerSettings

BASELINE_SAMPLES = 5000  # target samples the score net's Gaussian baseline (score.net.gaussian_baseline) is fit on

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- stages


def online_sinkhorn_dual(run: RunSpec, stage: Stage, problem: Problem):
    """Dual stage without a network: Online Sinkhorn kernel-expansion potentials (KL only)."""
    from scones.ot.online_sinkhorn import EntropicPotentials
    from scones.ot.regularizers import KL

    source, target, cost, regularizer = problem
    if not isinstance(regularizer, KL):
        raise ConfigError(
            "dual=online_sinkhorn solves the KL-regularised problem; "
            f"got regularizer={regularizer!r} (use regularizer=kl)"
        )
    steps = int(run.dual.settings.steps)
    if stage.is_done():
        state = stage.load_state()
        stage.cached = True
        pot = EntropicPotentials.from_state_dict(state, cost=cost)
    else:
        solver = run.dual.node("solver").build(lam=regularizer.lam, cost=cost)
        g = torch.Generator().manual_seed(run.seed + 1)
        t0 = time.perf_counter()
        pot = solver.fit(
            lambda n: source.sample(n, generator=g),
            lambda n: target.sample(n, generator=g),
            n_iter=steps,
            progress=True,
        )
        stage.dir.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(pot.state_dict(), stage.weights_file)
        stage.finish(None, time.perf_counter() - t0, {"steps": steps, "support": len(pot.f)})
    pot.regularizer = regularizer
    return pot


def uses_langevin_estimator(run: RunSpec) -> bool:
    """The neural dual trains on samples of its plan (``dual.estimator=langevin``): it needs the score first."""
    return run.dual.settings.kind == "neural" and getattr(run.dual.settings, "estimator", "pairs") == "langevin"


def dual_stage(run: RunSpec, problem: Problem, tracker: Tracker | None = None, prior_score=None,
               score: Stage | None = None) -> tuple[Any, Stage]:
    """The dual potentials (``run.dual``): neural (trained, then calibrated) or Online Sinkhorn.

    ``dual.estimator=langevin`` needs ``prior_score`` (the score stage's, run first: :func:`score_stage` is called
    here when it is not given); a learned score's stage key (``score``) then enters the dual's cache key."""
    if prior_score is None and uses_langevin_estimator(run):
        prior_score, score = score_stage(run, problem.target, tracker)
    stage = make_stage(run.training, run.dual, *([score.key] if score is not None else []))
    if run.dual.settings.kind == "online_sinkhorn":
        return online_sinkhorn_dual(run, stage, problem), stage
    ds = run.dual.settings
    source, target, cost, regularizer = problem
    pl.seed_everything(run.seed, workers=True, verbose=False)
    net = run.dual.node("net")
    pot = DualPotentials(net.build(dim=problem.dim), net.build(dim=problem.dim), cost, regularizer)
    langevin = {}
    if uses_langevin_estimator(run):
        from scones.sampling.chains import ConditionalChains

        lg = ds.langevin
        if prior_score is None or not hasattr(cost, "scale"):
            raise ConfigError("dual.estimator=langevin needs the target's score and the squared cost "
                              "(cost=squared_euclidean or mean_squared); use dual.estimator=pairs")
        if "auto" in (lg.step_size, lg.burn_in):
            raise ConfigError("dual.langevin.step_size / burn_in are 'auto' but were not resolved; set numbers")
        chains = ConditionalChains(int(ds.batch_size), tuple(source.shape), float(lg.step_size),
                                   int(lg.steps_per_update), int(lg.burn_in), seed=run.seed + 6)
        langevin = {"estimator": "langevin", "prior_score": prior_score, "chains": chains}
    module = DualModule(
        pot, lr=ds.lr, pairs=ds.pairs, skip_nonfinite=ds.skip_nonfinite,
        objective=dual_objective_name(ds.objective, regularizer), lr_schedule=ds.lr_schedule,
        **health_logging(run, source, target), **langevin,
    )
    loader = stream_loader([source, target], ds.batch_size, run.seed + 1, run.training.num_workers)
    run_training_stage(run.training, stage, module, loader, int(ds.steps), pot, tracker)
    calibrate_dual(run, pot, source, target)
    return pot, stage


def health_logging(run: RunSpec, source, target) -> dict:
    """``health_data`` (held-out samples, ``eval.dual_health_samples`` per side, at most 1000) and ``health_every``
    (``eval.dual_health_every``; 0 = about 10 times per stage, at most every 100 steps, on logging steps) for
    :class:`DualModule`."""
    n = min(int(run.eval.settings.dual_health_samples), 1000)
    every = int(run.eval.settings.dual_health_every or 0)
    if n < 4:
        return {}
    if every <= 0:
        log_every = max(1, int(run.training.trainer.log_every_n_steps))
        steps = int(run.dual.settings.steps)
        every = log_every * max(math.ceil(100 / log_every), math.ceil(steps / (10 * log_every)))
    # drawn at the first health step (seeded): a run shorter than `every` steps draws nothing; a partial of a
    # module-level function, since ddp_spawn pickles the module with it
    return {"health_data": functools.partial(_draw_health_data, source, target, n, run.seed + 3), "health_every": every}


def _draw_health_data(source, target, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return source.sample(n, generator=g), target.sample(n, generator=g)


def assess_dual(run: RunSpec, potentials, source, target) -> dict:
    """The dual's convergence diagnostic on ``eval.dual_health_samples`` fresh samples per side (seeded; also for
    a cached stage), logged, with a warning when it fails. Returns the ``dual`` entries of metrics.json."""
    from scones.ot.health import dual_health

    n = int(run.eval.settings.dual_health_samples)
    if n < 4:
        return {}
    g = torch.Generator().manual_seed(run.seed + 4)
    x, y = source.sample(n, generator=g), target.sample(n, generator=g)
    try:
        h = dual_health(potentials, x, y)
    except Exception as e:  # noqa: BLE001 - a diagnostic must never stop the run
        log.warning("dual health diagnostic failed: %s: %s", type(e).__name__, e)
        return {"health": None, "converged": None, "health_error": f"{type(e).__name__}: {e}"}
    out = {"health": h["health"], "converged": h["converged"], "health_detail": h}
    mg, mo = h["marginal"], h.get("moments")
    mo = mo if mo and "violation" in mo else None
    marginal = (f"marginal violation {mg['violation']:.4g} (threshold {mg['threshold']:.4g}, rows' median ESS "
                f"{mg['ess']:.3g})")
    moments = f"moment violation {mo['violation']:.4g} (threshold {mo['threshold']:.4g})" if mo else ""
    if h["converged"] is False:
        why = marginal if h["method"] == "marginal" else f"{moments}; the marginal check cannot judge: {marginal}"
        out["warning"] = (
            f"dual stage unconverged: {why} (dual.health_detail in metrics.json); train longer (dual.steps), "
            f"or check dual.lr"
        )
        log.warning(out["warning"])
    elif h["converged"] is None:
        out["warning"] = (
            f"dual convergence cannot be judged: the plan is too sharp for the check on {n} fresh samples per side "
            f"({marginal}; raise eval.dual_health_samples)"
        )
        log.warning(out["warning"])
    else:
        log.info("dual: converged (%s)", marginal if h["method"] == "marginal" else f"{moments}; {marginal}")
    return out


def dual_objective_name(objective: str, regularizer) -> str:
    """``dual.objective`` with ``auto`` resolved: ``logmeanexp`` for KL, ``dual`` otherwise."""
    if objective == "auto":
        return "logmeanexp" if getattr(regularizer, "name", None) == "kl" else "dual"
    return str(objective)


def calibrate_dual(run: RunSpec, pot, source, target) -> None:
    """``dual.objective=logmeanexp``, ``dual.estimator=langevin`` or ``dual.pairs=rows``: fix the constant these
    cannot see, so that E_{p⊗q}[H] = 1 on ``dual.calibration_samples`` fresh samples per side (seeded: a cached stage
    gets the same shift)."""
    if dual_objective_name(run.dual.settings.objective, pot.regularizer) != "logmeanexp" and not (
        uses_langevin_estimator(run) or getattr(run.dual.settings, "pairs", None) == "rows"
    ):
        return
    from scones.ot.dual import calibrate_mass_

    n = int(run.dual.settings.calibration_samples)
    g = torch.Generator().manual_seed(run.seed + 2)
    k = calibrate_mass_(pot, source.sample(n, generator=g), target.sample(n, generator=g))
    log.info("dual: calibrated E[H] = 1 on %d x %d pairs (phi shifted by %.4g)", n, n, -k)


EXPERT_MAX_BYTES = 2 * 2**30  # k·d² float64 eigenvectors of score.expert's covariances


def mixture_expert(settings, target, seed: int) -> MixtureExpert | None:
    """``score.expert`` fitted to ``BASELINE_SAMPLES`` target samples (None when ``components`` is 0)."""
    k = int(settings.components)
    if k == 0:
        return None
    d = int(np.prod(target.shape))
    if k * d * d * 8 > EXPERT_MAX_BYTES:
        raise ConfigError(
            f"score.expert.components={k} on {d}-dimensional data needs {k * d * d * 8 / 2**30:.1f} GiB of "
            f"covariances (full, {d}x{d} each; limit {EXPERT_MAX_BYTES / 2**30:.0f} GiB): set "
            "score.expert.components=0 or fewer components"
        )
    t0 = time.perf_counter()
    x = target.sample(BASELINE_SAMPLES, generator=torch.Generator().manual_seed(seed + 13))
    expert = MixtureExpert.fit(x, k, float(settings.sigma_min), float(settings.reg_covar), seed=seed + 13)
    log.info("score: expert of %d Gaussians (sigma >= %g) fitted in %.1f s", k, settings.sigma_min,
             time.perf_counter() - t0)
    return expert


def score_stage(run: RunSpec, target, tracker: Tracker | None = None) -> tuple[Any, Stage | None]:
    """Returns ``prior_score(y, level)`` and the stage (None when the target's exact score is used)."""
    sc = run.score.settings
    has_exact = getattr(target, "has_score", False)
    if sc.kind == "exact" or (sc.kind == "auto" and has_exact):
        if not has_exact:
            raise ConfigError(
                f"score.kind=exact but data.target ({type(target).__name__}) has no score(y); use score=mlp"
            )
        return conditional.ExactPriorScore(target), None
    stage = make_stage(run.training, run.score)
    sigmas = geometric_sigmas(sc.sigma_max, sc.sigma_min, sc.n_levels)
    pl.seed_everything(run.seed + 10, workers=True, verbose=False)
    net = run.score.node("net").build(dim=int(np.prod(target.shape)))
    check_score_schedule(run.sampler, net, sigmas)
    if getattr(net, "gaussian_baseline", False):  # per-pixel data statistics of the net's Gaussian baseline
        net.fit_baseline(target.sample(BASELINE_SAMPLES, generator=torch.Generator().manual_seed(run.seed + 12)))
    module = ScoreModule(
        net, sigmas, lr=sc.lr, skip_nonfinite=sc.skip_nonfinite, ema_decay=sc.ema_decay,
        anneal_power=sc.anneal_power, lr_schedule=sc.lr_schedule,
        callbacks=images.score_callbacks(run.eval.settings.score_grid, run.seed, stage.dir, target),
    )
    module.expert = mixture_expert(sc.expert, target, run.seed)
    loader = stream_loader([target], sc.batch_size, run.seed + 11, run.training.num_workers)
    run_training_stage(run.training, stage, module, loader, sc.steps, module, tracker)
    module.eval()
    return conditional.LearnedPriorScore.for_sampler(module, run.sampler), stage


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


def bp_stage(run: RunSpec, problem: Problem, potentials, dual: Stage,
             tracker: Tracker | None = None) -> tuple[Any, Stage]:
    """The barycentric projection T(x) ≈ E_π[y | x] trained with frozen potentials (``run.bp``)."""
    bp = run.bp.settings
    stage = make_stage(run.training, run.bp, dual.key)
    pl.seed_everything(run.seed + 20, workers=True, verbose=False)
    net = run.bp.node("net").build(in_dim=problem.dim, out_dim=problem.dim)
    module = BarycentricModule(
        net, potentials, lr=bp.lr, pairs=bp.pairs, skip_nonfinite=bp.skip_nonfinite, estimator=bp.estimator
    )
    loader = stream_loader([problem.source, problem.target], bp.batch_size, run.seed + 21, run.training.num_workers)
    run_training_stage(run.training, stage, module, loader, bp.steps, net, tracker)
    net.eval()
    return net, stage


# --------------------------------------------------------------------------------------------- sampling


def _to(obj, device: torch.device):
    """``obj`` on ``device`` through its ``.to`` (modules and prior scores move in place and return themselves,
    Online Sinkhorn potentials return a moved copy); anything without ``.to`` is returned as is."""
    return obj.to(device) if hasattr(obj, "to") else obj


@contextmanager
def evaluation_coupling(run: RunSpec, source, target, potentials, prior_score, bp_net) -> Iterator[Coupling]:
    """The run's plan as the :class:`~scones.coupling.Coupling` a user loads, on the evaluation device
    (:meth:`~experiments.startup.EvalSpec.device`: ``eval.device``, the GPU of a GPU run), ``eval.batch_size``
    chains per chunk. Objects moved in place are moved back to the CPU afterwards, so the CPU-side metrics that
    follow (calibration, density, classifier) see them where they were trained (a moved copy is simply dropped)."""
    device = run.eval.device()
    objs = (potentials, prior_score, bp_net)
    moved = [_to(o, device) for o in objs]
    try:
        yield Coupling(moved[0], source, target, prior_score=moved[1], barycentric_map=moved[2],
                       sampler=run.sampler, batch_size=int(run.eval.settings.batch_size), device=device)
    except ValueError as e:  # sampler settings the sampler refuses (e.g. sampler.init): name the config keys
        raise ConfigError(str(e)) from None
    except NonFiniteSampleError as e:  # name the stage and the sampler (the message has the level/step)
        raise NonFiniteSampleError(f"stage 'evaluate' (sampler.kind={run.sampler.kind}): {e}") from None
    finally:
        if device.type != "cpu":
            for o, m in zip(objs, moved, strict=True):
                if m is o:
                    _to(o, torch.device("cpu"))


def sample_sharded(coupling: Coupling, x: torch.Tensor, y0: torch.Tensor, g: torch.Generator,
                   fraction: torch.Tensor | None = None) -> torch.Tensor | None:
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
        out = {c: t.cpu() for c, t in coupling.run_chains(x, y0, seed, mine, callback=progress,
                                                          fraction=fraction).items()}
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


def evaluate(run: RunSpec, problem: Problem, run_dir: Path, potentials, prior_score, bp_net,
             stages: dict[str, Stage | None], dual_health: dict | None = None, resolved: dict | None = None) -> dict:
    """Sample the plan (``eval.n_samples`` sources, one SCONES chain each, sharded over DDP ranks), run the
    evaluators that fit the pair (:mod:`experiments.evaluators`) and write ``metrics.json``, ``samples.npz`` and
    the plots into ``run_dir``. Returns the metrics (``None`` on DDP ranks > 0)."""
    source, target = problem.source, problem.target
    n = int(run.eval.settings.n_samples)
    g = torch.Generator().manual_seed(run.seed + 100)
    t0 = time.perf_counter()
    x, x_labels = images.sample_with_labels(source, n, g)  # labels: digit image sets (label consistency)
    # target images the compared sets are drawn from (independent coupling, resample pool): without the held-out
    # feature-FID reference images of digit pairs (a copied reference image would beat the floor)
    drawn = images.without_reference(run.eval.settings.label_consistency, run.seed, target)
    trained = (run, source, drawn, potentials, prior_score, bp_net)
    with evaluation_coupling(*trained) as coupling:
        y_bp = coupling.barycentric(x).cpu()
        y0, fraction = coupling.start(x, y_bp, g)
        y = sample_sharded(coupling, x, y0, g, fraction)
    if y is None:  # rank > 0 of a DDP run: its chains went to rank 0, which computes and writes everything
        return None
    sampling_seconds = time.perf_counter() - t0

    def resample(xr: torch.Tensor) -> torch.Tensor:  # fresh SCONES samples for other sources (this process)
        with evaluation_coupling(*trained) as coupling:
            progress = SamplingProgress(coupling.sampler.steps_per_chain * coupling.n_chunks(len(xr)), "sampling")
            return coupling.sample(xr, generator=g, callback=progress).reshape(xr.shape).cpu()

    samples = {"scones": y, "bp": y_bp, "independent": drawn.sample(n, generator=g)}
    ctx = evaluators.EvalContext.build(
        problem, run.eval, run_dir, x, x_labels, samples,
        Coupling(potentials, source, target, prior_score=prior_score, barycentric_map=bp_net, sampler=run.sampler,
                 batch_size=int(run.eval.settings.batch_size)),
        g, resample, stages, dual_health or {}, resolved or {}, sampling_seconds,
    )
    metrics = evaluators.run_evaluators(ctx)

    arrays = {"x": x.numpy(), "y": y.numpy(), "y_bp": y_bp.numpy()}
    if x_labels is not None:
        arrays["x_labels"] = x_labels.numpy()
    if ctx.truth is not None:
        arrays.update(ctx.truth.arrays())
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(run_dir / "samples.npz", buf.getvalue())
    atomic_write_json(run_dir / "metrics.json", metrics)
    evaluators.save_plots(ctx)
    return metrics


# --------------------------------------------------------------------------------------------- entry


def run(cfg: DictConfig, run_dir: Path) -> dict | None:
    """All stages into ``run_dir``; returns the metrics (``None`` on DDP ranks > 0, which write nothing).

    With ``logger.wandb`` set, one W&B run (rank 0) receives the stage losses, the metrics, the plots and the
    artifacts (:class:`experiments.logging_utils.Tracker`); it is finished even when a stage fails.
    """
    problem, spec, resolved = start_job(cfg, run_dir)  # validated first: one-line ConfigError
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_rank_zero():
        atomic_write_bytes(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True).encode())

    tracker = Tracker.from_config(cfg, run_dir)
    exit_code = 1
    try:
        prior_score = score = None
        if uses_langevin_estimator(spec):  # the dual trains on the plan's conditional chains: score first
            prior_score, score = score_stage(spec, problem.target, tracker)
        potentials, dual = dual_stage(spec, problem, tracker, prior_score, score)
        with threadpool_limits(limits=1, user_api="blas"):
            health = assess_dual(spec, potentials, problem.source, problem.target) if is_rank_zero() else {}
        if score is None:
            prior_score, score = score_stage(spec, problem.target, tracker)
        bp_net, bp = bp_stage(spec, problem, potentials, dual, tracker)
        stages = {"dual": dual, "score": score, "bp": bp}
        if not is_distributed() and not is_rank_zero():
            exit_code = 0  # a launcher rank > 0 whose stages were all cached: rank 0 evaluates alone
            return None
        # NumPy/SciPy BLAS only sees the evaluation's small matrices (covariances, POT references): one thread is
        # fastest and stops OpenBLAS threads fighting torch's OpenMP pool (up to 90x slower; docs/performance.md)
        with threadpool_limits(limits=1, user_api="blas"):
            metrics = evaluate(spec, problem, run_dir, potentials, prior_score, bp_net, stages, health, resolved)
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
