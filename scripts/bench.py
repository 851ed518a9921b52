"""Performance harness for the SCONES hot paths; prints one JSON document (results in docs/performance.md).

    python scripts/bench.py                 # CPU (and CUDA when visible), ≲ 5 min on 2 CPU cores
    python scripts/bench.py --quick         # smaller repeats/subsets, ≲ 1 min
    python scripts/bench.py --device cuda --compile --out bench.json

Benchmarks (sizes are the shipped config defaults, composed with Hydra, unless stated):

- ``dual_step``: one Adam step on the regularised dual J (φ, ψ MLPs, all n² pairs) — forward + backward + step;
  variants: diagonal pairs, ``torch.compile`` (``--compile``), bf16 autocast (CUDA), and the same step inside
  ``Trainer.fit`` (Lightning + batch stream overhead), for the Swiss-roll default and the Gaussian d=16 preset;
- ``dsm_step``: one Adam step of denoising score matching on the noise-conditional score MLP;
- ``langevin_step``: one annealed-Langevin step of ``eval.batch_size`` chains with the SCONES conditional score
  (learned score net + ∇ψ by autograd); baseline: the unvectorised reference, one chain at a time in a Python
  loop (timed on a subset of chains, reported per chain);
- ``ula_gaussian_step``: one ULA step with the exact Gaussian target score (d=16) + ∇ψ;
- ``gaussian_score``: ``Gaussian.score`` alone against the pre-optimisation code (float64 → float32
  conversion of the precision matrix on every call);
- ``bw_uvp``: BW-UVP of n joint samples against the closed-form covariance; baseline: POT's
  ``ot.gaussian.bures_wasserstein_distance`` on the same moments (values must agree);
- ``online_sinkhorn`` (when :mod:`scones.ot.online_sinkhorn` exists): a fit of T steps vs POT's log-domain
  Sinkhorn on the same number of samples (capped), both scored against the closed-form OT_λ.

Every record has ``ms`` (median time per call over ``repeats`` timed blocks), throughput, peak memory
(CPU: tracemalloc peak of Python/NumPy allocations and the RSS high-water-mark increase, both in MiB, taken in a
separate untimed pass; CUDA: ``torch.cuda.max_memory_allocated`` above the starting allocation) and, where a
baseline exists, ``speedup`` = baseline time / time. Timings use ``--threads`` torch threads (default 1: this
harness runs on shared 2-core machines, where more threads oversubscribe).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
import tracemalloc
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scones.data import Gaussian, RandomGaussian, StandardGaussian, SwissRoll  # noqa: E402
from scones.metrics.bw_uvp import bw_uvp_samples  # noqa: E402
from scones.models.dual import DualModule  # noqa: E402
from scones.models.score import dsm_loss  # noqa: E402
from scones.nets.mlp import NoiseConditionalScoreMLP, Potential  # noqa: E402
from scones.ot import KL, SquaredEuclidean  # noqa: E402
from scones.ot.dual import DualPotentials, dual_objective  # noqa: E402
from scones.ot.gaussian import covariance_pair, entropic_joint_covariance, entropic_ot_value  # noqa: E402
from scones.sampling.conditional import ConditionalScore  # noqa: E402
from scones.sampling.langevin import annealed_langevin, ula  # noqa: E402
from scones.sampling.schedules import geometric_sigmas  # noqa: E402

# --------------------------------------------------------------------------------------------- measuring


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rss_mib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _reset_rss_peak() -> bool:
    try:  # Linux: writing 5 to clear_refs resets VmHWM to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory(fn: Callable[[], object], device: str) -> dict:
    """Peak memory of one call of ``fn`` (MiB), measured outside the timed loop."""
    sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync(device)
        return {"cuda_max_allocated_mib": round((torch.cuda.max_memory_allocated() - base) / 2**20, 2)}
    can_reset = _reset_rss_peak()
    rss0 = _rss_mib("VmRSS")
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    out = {"tracemalloc_peak_mib": round(peak / 2**20, 3), "torch_cpu_peak_mib": round(torch_cpu_peak(fn) / 2**20, 3)}
    if can_reset and rss0 is not None:
        out["rss_peak_increase_mib"] = round(max(_rss_mib("VmHWM") - rss0, 0.0), 2)
    return out


@contextlib.contextmanager
def _quiet_stderr():
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def torch_cpu_peak(fn: Callable[[], object]) -> float:
    """Peak bytes of live torch CPU tensors during ``fn`` (profiler allocation/free events, in time order).

    tracemalloc does not see torch's allocator and the RSS high-water mark misses memory that glibc keeps
    after the warm-up calls, so the tensors' own peak is reconstructed from ``profile_memory=True``.
    """
    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings(), _quiet_stderr():  # the profiler backend prints start/stop lines on fd 2
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    deltas = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    live = peak = 0
    for _, change in deltas:
        live += change
        peak = max(peak, live)
    return float(peak)


def timeit(fns: dict[str, Callable[[], object]], device: str, iters: int, repeats: int, warmup: int = 2) -> dict:
    """Median (and min) seconds per call of each function over ``repeats`` blocks of ``iters`` calls.

    The variants are timed *interleaved* (block of A, block of B, block of A, …) so that a load change on a
    shared machine hits all of them alike; ratios are therefore more trustworthy than absolute times.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    per_call: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            sync(device)
            per_call[name].append((time.perf_counter() - t0) / iters)
    return {
        name: {"s": statistics.median(v), "s_min": min(v), "iters": iters, "repeats": repeats}
        for name, v in per_call.items()
    }


class Bench:
    """Collects records; prints a one-line summary of each to stderr as it goes."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.records = args, []
        self.repeats = 3 if args.quick else 5

    def compare(self, bench: str, device: str, variants: dict[str, Callable[[], object]], *, iters: int,
                items: dict[str, float], params: dict | None = None, baseline: str | None = None,
                memory: bool = True, per_call: int = 1, extra: dict | None = None) -> dict[str, dict]:  # fmt: skip
        """Time ``variants`` interleaved; one record each. ``per_call``: work units (e.g. sampler steps) per
        call, so that ``ms`` is per unit; ``speedup`` = baseline ms / ms."""
        times = timeit(variants, device, iters, self.repeats)
        out = {}
        for variant, fn in variants.items():
            t = times[variant]
            s = t["s"] / per_call
            rec = {
                "bench": bench, "device": device, "variant": variant, "params": params or {},
                "ms": round(s * 1e3, 4), "ms_min": round(t["s_min"] / per_call * 1e3, 4),
                "iters": t["iters"] * per_call, "repeats": t["repeats"],
                "throughput": {f"{k}/s": round(v / s, 2) for k, v in items.items()},
            }  # fmt: skip
            if memory:
                rec["peak_memory"] = peak_memory(fn, device)
            rec.update(extra or {})
            out[variant] = rec
        for variant, rec in out.items():
            if baseline is not None and variant != baseline and baseline in out:
                rec["speedup_vs"] = {"variant": baseline, "speedup": round(out[baseline]["ms"] / rec["ms"], 3)}
            self.records.append(rec)
            sp = f"  x{rec['speedup_vs']['speedup']:.2f} vs {baseline}" if "speedup_vs" in rec else ""
            print(f"{bench:>20} {device:>5} {variant:<30} {rec['ms']:10.3f} ms{sp}", file=sys.stderr)
        return out

    def find(self, bench: str, device: str, variant: str, params: dict | None = None) -> dict | None:
        for r in self.records:
            if (r["bench"], r["device"], r["variant"]) == (bench, device, variant) and r["params"] == (params or {}):
                return r
        return None


def maybe_compile(fn: Callable, enabled: bool) -> Callable | None:
    if not enabled:
        return None
    try:
        return torch.compile(fn)
    except Exception as e:  # noqa: BLE001 - report and go on without
        warnings.warn(f"torch.compile unavailable: {e}", stacklevel=2)
        return None


def default_configs() -> dict:
    """The shipped defaults: Swiss roll (learned score) and the Gaussian d=16 preset."""
    from experiments.run import compose_config

    return {
        "swiss_roll": compose_config([], ROOT / "configs"),
        "gaussian_d16": compose_config(["+experiment=gaussian", "data.dim=16"], ROOT / "configs"),
    }


# --------------------------------------------------------------------------------------------- benchmarks


def potentials(dim: int, hidden, lam: float, device: str) -> DualPotentials:
    pot = DualPotentials(Potential(dim, list(hidden)), Potential(dim, list(hidden)), SquaredEuclidean(), KL(lam))
    return pot.to(device)


def reference_dual_objective(pot, x: torch.Tensor, y: torch.Tensor, pairs: str):
    """The pre-optimisation ``dual_objective``: a second n² ``exp`` only for the logged E[H]."""
    fx, gy = pot.phi(x), pot.psi(y)
    v = fx[:, None] + gy[None, :] - pot.cost.pairwise(x, y) if pairs == "all" else fx + gy - pot.cost(x, y)
    j = fx.mean() + gy.mean() - pot.regularizer.penalty(v).mean()
    return j, pot.regularizer.density(v.detach()).mean()


def _adam_step(loss_fn: Callable, opt: torch.optim.Optimizer) -> None:
    loss = loss_fn()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _compiled_variant(b: Bench, fn: Callable[[], object], device: str) -> tuple[Callable | None, dict]:
    compiled = maybe_compile(fn, b.args.compile)
    if compiled is None:
        return None, {}
    t0 = time.perf_counter()
    compiled()
    sync(device)
    return compiled, {"compile_s": round(time.perf_counter() - t0, 1)}


def bench_dual(b: Bench, cfg, tag: str, source, target, device: str) -> None:
    """Reference (default Adam + extra exp) vs the library step (DualModule's optimizer + dual_objective)."""
    d, n, pairs = source.dim, int(cfg.dual.batch_size), str(cfg.dual.pairs)
    other = "diagonal" if pairs == "all" else "all"
    torch.manual_seed(0)
    module = DualModule(potentials(d, cfg.dual.net.hidden, float(cfg.regularizer.lam), "cpu"),
                        lr=float(cfg.dual.lr), pairs=pairs).to(device)  # fmt: skip
    opt = module.configure_optimizers()  # fused Adam where safe
    ref_pot = potentials(d, cfg.dual.net.hidden, float(cfg.regularizer.lam), device)
    ref_opt = torch.optim.Adam(ref_pot.parameters(), lr=float(cfg.dual.lr))  # the pre-optimisation optimizer
    x, y = source.sample(n).to(device), target.sample(n).to(device)
    pot = module.potentials

    def current(p: str = pairs, autocast: bool = False):
        def loss():
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                return -dual_objective(pot, x, y, p)[0]

        _adam_step(loss, opt)

    variants = {
        "reference": lambda: _adam_step(lambda: -reference_dual_objective(ref_pot, x, y, pairs)[0], ref_opt),
        "current": current,
        f"current_pairs_{other}": lambda: current(other),
    }
    if device.startswith("cuda"):
        variants["current_bf16_autocast"] = lambda: current(autocast=True)
    compiled, extra = _compiled_variant(b, current, device)
    if compiled is not None:
        variants["current_compiled"] = compiled
    params = {"config": tag, "dim": d, "batch": n, "pairs": pairs, "hidden": list(cfg.dual.net.hidden)}
    b.compare("dual_step", device, variants, iters=5 if b.args.quick else 15, items={"steps": 1, "samples": n},
              params=params, baseline="reference", extra=extra)  # fmt: skip
    if device == "cpu" and not b.args.skip_lightning and tag == "swiss_roll":  # Lightning's cost is config-free
        bench_lightning_dual(b, cfg, source, target, params)


def bench_lightning_dual(b: Bench, cfg, source, target, params: dict) -> None:
    """Marginal per-step cost of the dual step inside ``Trainer.fit`` (batch stream, logging, checkpoints).

    Fits of N and 3N steps: per-step = (T(3N) − T(N)) / 2N, fixed setup/teardown = T(N) − N·per-step.
    ``log_every_n_steps=1`` makes the modules call ``self.log`` on every step, as they all did before
    :func:`scones.models.base.is_log_step` (≈ the pre-optimisation cost); 25 is the shipped setting.
    """
    import logging
    import tempfile

    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger

    from scones.data.streams import stream_loader

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    n_short = 10 if b.args.quick else 20

    def fit(steps: int, log_every: int) -> float:
        module = DualModule(potentials(source.dim, cfg.dual.net.hidden, float(cfg.regularizer.lam), "cpu"),
                            lr=float(cfg.dual.lr), pairs=str(cfg.dual.pairs))  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = pl.Trainer(
                max_steps=steps, max_epochs=-1, accelerator="cpu", devices=1, logger=CSVLogger(tmp, name="logs"),
                callbacks=[ModelCheckpoint(dirpath=tmp, every_n_train_steps=max(1, steps // 5), save_last=True)],
                enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=log_every,
            )  # fmt: skip
            loader = stream_loader([source, target], int(cfg.dual.batch_size), 0)
            t0 = time.perf_counter()
            trainer.fit(module, train_dataloaders=loader)
            return time.perf_counter() - t0

    times: dict[int, dict[str, list[float]]] = {1: {"short": [], "long": []}, 25: {"short": [], "long": []}}
    repeats = 2 if b.args.quick else 3
    for _ in range(repeats):
        for log_every, t in times.items():  # interleaved
            t["short"].append(fit(n_short, log_every))
            t["long"].append(fit(3 * n_short, log_every))
    raw = b.find("dual_step", "cpu", "current", params)
    recs = {}
    for log_every, t in times.items():
        short = statistics.median(t["short"])
        per_step = max((statistics.median(t["long"]) - short) / (2 * n_short), 1e-9)
        variant = f"lightning_fit_log_every_{log_every}"
        rec = {"bench": "dual_step", "device": "cpu", "variant": variant, "params": params,
               "ms": round(per_step * 1e3, 4), "fixed_setup_ms": round((short - n_short * per_step) * 1e3, 1),
               "iters": 4 * n_short, "repeats": repeats, "throughput": {"steps/s": round(1 / per_step, 2)},
               "note": "marginal per-step cost of Trainer.fit (stream, logging, 5 checkpoints per fit)"}  # fmt: skip
        if raw is not None:
            rec["overhead_vs_raw_step"] = round(rec["ms"] / raw["ms"], 3)
        recs[log_every] = rec
    recs[25]["speedup_vs"] = {"variant": recs[1]["variant"], "speedup": round(recs[1]["ms"] / recs[25]["ms"], 3)}
    for rec in recs.values():
        b.records.append(rec)
        print(f"{'dual_step':>20} {'cpu':>5} {rec['variant']:<30} {rec['ms']:10.3f} ms  "
              f"(fixed {rec['fixed_setup_ms']} ms per fit)", file=sys.stderr)  # fmt: skip


def bench_dsm(b: Bench, cfg, target, device: str) -> None:
    from scones.models.score import ScoreModule

    s = cfg.score
    torch.manual_seed(0)
    sigmas = geometric_sigmas(s.sigma_max, s.sigma_min, s.n_levels)
    module = ScoreModule(NoiseConditionalScoreMLP(target.dim, list(s.net.hidden)), sigmas, lr=float(s.lr)).to(device)
    opt = module.configure_optimizers()
    opt = opt[0] if isinstance(opt, (list, tuple)) else opt
    ref_net = NoiseConditionalScoreMLP(target.dim, list(s.net.hidden)).to(device)
    ref_opt = torch.optim.Adam(ref_net.parameters(), lr=float(s.lr))
    sig = sigmas.to(device)
    y = target.sample(int(s.batch_size)).to(device)

    def current(autocast: bool = False):
        def loss():
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                return dsm_loss(module.net, y, sig)

        _adam_step(loss, opt)

    variants = {"reference": lambda: _adam_step(lambda: dsm_loss(ref_net, y, sig), ref_opt), "current": current}
    if device.startswith("cuda"):
        variants["current_bf16_autocast"] = lambda: current(True)
    compiled, extra = _compiled_variant(b, current, device)
    if compiled is not None:
        variants["current_compiled"] = compiled
    params = {"dim": target.dim, "batch": int(s.batch_size), "hidden": list(s.net.hidden)}
    b.compare("dsm_step", device, variants, iters=5 if b.args.quick else 15,
              items={"steps": 1, "samples": int(s.batch_size)}, params=params, baseline="reference", extra=extra)


def bench_langevin(b: Bench, cfg, source, target, device: str) -> None:
    """One annealed step of ``eval.batch_size`` chains; baseline: one chain at a time."""
    torch.manual_seed(0)
    n, d = int(cfg.eval.batch_size), source.dim
    net = NoiseConditionalScoreMLP(d, list(cfg.score.net.hidden)).to(device).eval().requires_grad_(False)
    sigmas = geometric_sigmas(cfg.sampler.sigma_max, cfg.sampler.sigma_min, cfg.sampler.n_levels).to(device)
    pot = potentials(d, cfg.dual.net.hidden, float(cfg.regularizer.lam), device).requires_grad_(False)

    def prior(yy, level):
        return net(yy, sigmas[level].expand(yy.shape[0]))

    x, y0 = source.sample(n).to(device), target.sample(n).to(device)
    model = ConditionalScore(prior, pot, x)
    gen = torch.Generator(device=device).manual_seed(0)
    steps, alpha = 5, float(cfg.sampler.step_lr)
    params = {"chains": n, "dim": d, "score_hidden": list(cfg.score.net.hidden),
              "psi_hidden": list(cfg.dual.net.hidden)}  # fmt: skip

    def vectorised():  # the library loop: noise, update, periodic finiteness check, progress bar
        annealed_langevin(model, y0, sigmas[-1:], alpha, steps, denoise=False, disable=True, generator=gen)

    variants = {"vectorised": vectorised}
    if device.startswith("cuda"):
        def bf16():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                vectorised()

        variants["vectorised_bf16_autocast"] = bf16
    if b.args.compile:
        def one_step(yy, z):
            return yy + alpha * model(yy, len(sigmas) - 1) + math.sqrt(2 * alpha) * z

        compiled = maybe_compile(one_step, True)
        z0 = torch.randn(y0.shape, generator=gen, device=device)
        compiled_once, extra = _compiled_variant(b, lambda: compiled(y0, z0), device)
        if compiled_once is not None:
            def compiled_steps():
                yy = y0
                for _ in range(steps):
                    yy = compiled(yy, torch.randn(yy.shape, generator=gen, device=device))

            variants["step_compiled"] = compiled_steps
    else:
        extra = {}
    rec = b.compare("langevin_step", device, variants, iters=1 if b.args.quick else 3, per_call=steps,
                    items={"steps": 1, "chain_steps": n}, params=params, baseline="vectorised",
                    extra=extra)["vectorised"]  # fmt: skip

    subset = 20 if b.args.quick else 50

    def per_chain_loop():  # unvectorised reference: the same update, one chain (a 1-row batch) at a time
        out = []
        for i in range(subset):
            yi, mi = y0[i : i + 1], ConditionalScore(prior, pot, x[i : i + 1])
            z = torch.randn(yi.shape, generator=gen, device=device)
            out.append(yi + alpha * mi(yi, len(sigmas) - 1) + math.sqrt(2 * alpha) * z)
        return torch.cat(out)

    t = timeit({"loop": per_chain_loop}, device, 1, b.repeats, warmup=1)["loop"]
    per_chain_ms = t["s"] / subset * 1e3
    loop = {"bench": "langevin_step", "device": device, "variant": "per_chain_python_loop", "params": params,
            "ms": round(per_chain_ms * n, 4), "ms_measured_per_chain": round(per_chain_ms, 5),
            "chains_timed": subset, "throughput": {"chain_steps/s": round(1e3 / per_chain_ms, 2)},
            "note": "per sampler step of all chains, extrapolated from the chains timed"}  # fmt: skip
    b.records.append(loop)
    rec["speedup_vs"] = {"variant": "per_chain_python_loop", "speedup": round(loop["ms"] / rec["ms"], 2)}
    print(f"{'langevin_step':>20} {device:>5} {'per_chain_python_loop':<30} {loop['ms']:10.3f} ms  "
          f"(vectorised x{rec['speedup_vs']['speedup']:.1f})", file=sys.stderr)  # fmt: skip


def reference_gaussian_score(g: Gaussian):
    """The pre-optimisation ``Gaussian.score``: float64 → float32 casts of Σ⁻¹ and m on every call."""
    return lambda y: -(y - g.mean64.to(y)) @ g._prec.to(y)


def bench_ula_gaussian(b: Bench, cfg, device: str) -> None:
    """One ULA step with the exact Gaussian score (the Gaussian experiment's sampler) + ∇ψ."""
    torch.manual_seed(0)
    d, n = int(cfg.data.dim), int(cfg.eval.batch_size)
    source = RandomGaussian(d, int(cfg.data.pair), "source", int(cfg.data.cov_seed))
    target = RandomGaussian(d, int(cfg.data.pair), "target", int(cfg.data.cov_seed))
    pot = potentials(d, cfg.dual.net.hidden, float(cfg.regularizer.lam), device).requires_grad_(False)
    x, y0 = source.sample(n).to(device), target.sample(n).to(device)
    ref_score = reference_gaussian_score(target)
    models = {
        "reference_score": ConditionalScore(lambda yy, level: ref_score(yy), pot, x),
        "current": ConditionalScore(lambda yy, level: target.score(yy), pot, x),
    }
    gen = torch.Generator(device=device).manual_seed(0)
    steps, h = 5, float(cfg.sampler.step_size)
    variants = {k: (lambda m=m: ula(m, y0, h, steps, disable=True, generator=gen)) for k, m in models.items()}
    b.compare("ula_gaussian_step", device, variants, iters=1 if b.args.quick else 3, per_call=steps,
              items={"steps": 1, "chain_steps": n}, params={"chains": n, "dim": d,
                                                             "psi_hidden": list(cfg.dual.net.hidden)},
              baseline="reference_score")  # fmt: skip


def bench_gaussian_score(b: Bench, device: str, quick: bool) -> None:
    """``Gaussian.score`` alone vs the pre-optimisation code."""
    for d in (2, 16, 64):
        g = RandomGaussian(d, 0, "target")
        y = torch.randn(2000, d, device=device)
        ref = reference_gaussian_score(g)
        assert torch.allclose(ref(y), g.score(y), rtol=1e-4, atol=1e-4)
        variants = {"reference": lambda ref=ref, y=y: ref(y), "current": lambda g=g, y=y: g.score(y)}
        b.compare("gaussian_score", device, variants,
                  iters=50 if quick else 200, items={"calls": 1, "points": 2000}, params={"dim": d, "n": 2000},
                  baseline="reference", memory=False)  # fmt: skip


def bench_bw_uvp(b: Bench, quick: bool) -> None:
    """BW-UVP of joint samples vs the closed-form covariance; POT computes the same Bures distance.

    ``scones`` runs with NumPy's default BLAS threads, ``scones_blas_1_thread`` inside
    ``threadpool_limits(1, "blas")`` as the pipeline's evaluate stage now does.
    """
    import ot
    from threadpoolctl import ThreadpoolController

    blas = ThreadpoolController()  # built once: entering its limit costs µs, not the ms of a library scan
    for d in (2, 16, 64):
        a, bcov = covariance_pair(d, 0, 2039)
        sigma = entropic_joint_covariance(a, bcov, 2.0 * d)
        rng = np.random.default_rng(0)
        for n in (2000,) if quick else (2000, 10000):
            samples = rng.multivariate_normal(np.zeros(2 * d), sigma, size=n)

            def pot_bures(samples=samples, sigma=sigma):
                cov_hat = np.cov(samples, rowvar=False)
                zero = np.zeros(sigma.shape[0])
                w = float(ot.gaussian.bures_wasserstein_distance(zero, zero, cov_hat, sigma))
                return 0.5 * w**2 / (0.5 * np.trace(sigma))  # ½-cost convention of the SCONES BW-UVP

            def one_thread(samples=samples, sigma=sigma):
                with blas.limit(limits=1, user_api="blas"):
                    return bw_uvp_samples(samples, sigma)

            variants = {"pot_bures": pot_bures, "scones": lambda s=samples, c=sigma: bw_uvp_samples(s, c),
                        "scones_blas_1_thread": one_thread}  # fmt: skip
            recs = b.compare("bw_uvp", "cpu", variants, iters=3 if quick or n > 2000 else 10,
                             items={"evaluations": 1, "samples": n}, params={"joint_dim": 2 * d, "n": n},
                             baseline="pot_bures")  # fmt: skip
            recs["scones"]["abs_diff_vs_pot"] = float(abs(bw_uvp_samples(samples, sigma) - pot_bures()))


def bench_online_sinkhorn(b: Bench, quick: bool) -> None:
    """Online Sinkhorn fit vs POT log-domain Sinkhorn on the same samples, both against the closed form."""
    try:
        from scones.ot.online_sinkhorn import OnlineSinkhorn
    except ImportError:
        b.records.append({"bench": "online_sinkhorn", "skipped": "scones.ot.online_sinkhorn not importable"})
        return
    import ot

    d, lam = 2, 4.0
    a, bcov = covariance_pair(d, 0, 2039)
    truth = entropic_ot_value(a, bcov, lam)
    src, tgt = Gaussian(cov=a), Gaussian(cov=bcov)
    steps = 20 if quick else 60
    gen = torch.Generator().manual_seed(0)
    solver = OnlineSinkhorn(lam, batch_size=100)
    t0 = time.perf_counter()
    pot = solver.fit(lambda k: src.sample(k, gen).double(), lambda k: tgt.sample(k, gen).double(), n_iter=steps)
    fit_s = time.perf_counter() - t0
    n_seen = sum(solver.schedule(t)[0] for t in range(steps))
    xt, yt = src.sample(4000, gen).double(), tgt.sample(4000, gen).double()
    value = pot.dual_objective(xt, yt)
    rec = {"bench": "online_sinkhorn", "device": "cpu", "variant": "online_sinkhorn_fit",
           "params": {"dim": d, "lam": lam, "steps": steps, "samples_per_side": n_seen},
           "ms": round(fit_s * 1e3, 2), "ms_per_step": round(fit_s / steps * 1e3, 3),
           "throughput": {"samples/s": round(n_seen / fit_s, 1)},
           "rel_error_vs_closed_form": round(abs(value - truth) / abs(truth), 5)}  # fmt: skip
    b.records.append(rec)
    m = min(n_seen, 800 if quick else 2000)  # POT holds the m × m cost matrix; capped to keep the harness short
    xs, ys = src.sample(m, gen).double(), tgt.sample(m, gen).double()
    w = torch.full((m,), 1.0 / m, dtype=torch.float64)
    t0 = time.perf_counter()  # torch tensors in, so POT uses its torch backend (faster logsumexp than NumPy)
    res = ot.solve(ot.dist(xs, ys), w, w, reg=lam, method="sinkhorn_log", max_iter=5000, tol=1e-6)
    pot_s = time.perf_counter() - t0
    base = {"bench": "online_sinkhorn", "device": "cpu", "variant": "pot_sinkhorn_log",
            "params": {"dim": d, "lam": lam, "samples_per_side": m, "tol": 1e-6},
            "ms": round(pot_s * 1e3, 2), "throughput": {"samples/s": round(m / pot_s, 1)},
            "rel_error_vs_closed_form": round(abs(float(res.value) - truth) / abs(truth), 5)}  # fmt: skip
    b.records.append(base)
    rec["samples_per_s_vs_pot"] = round(rec["throughput"]["samples/s"] / base["throughput"]["samples/s"], 3)
    print(f"{'online_sinkhorn':>20} {'cpu':>5} fit {fit_s:.2f} s ({n_seen} samples, rel. err "
          f"{rec['rel_error_vs_closed_form']}); POT {pot_s:.2f} s ({m} samples, rel. err "
          f"{base['rel_error_vs_closed_form']})", file=sys.stderr)


# --------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats and smaller subsets (about 1 min on CPU)")
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="all", help="all = cpu + cuda if visible")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (default 1)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd steps (slow to compile)")
    p.add_argument("--skip-lightning", action="store_true", help="skip the Trainer.fit overhead measurement")
    p.add_argument("--only", default="", help="comma-separated benchmark names to run (default: all)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("WANDB_MODE", "disabled")

    devices = ["cpu"] if args.device == "cpu" else []
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append("cuda")
    if args.device == "all":
        devices.insert(0, "cpu")
    if args.device == "cuda" and not devices:
        p.error("--device cuda but no CUDA device is visible")
    only = {s.strip() for s in args.only.split(",") if s.strip()}

    def wanted(name: str) -> bool:
        return not only or name in only

    b = Bench(args)
    cfgs = default_configs()
    t_start = time.perf_counter()
    sr, g16 = cfgs["swiss_roll"], cfgs["gaussian_d16"]
    for device in devices:
        if wanted("dual_step"):
            bench_dual(b, sr, "swiss_roll", StandardGaussian(2), SwissRoll(0.25), device)
            src = RandomGaussian(16, int(g16.data.pair), "source", int(g16.data.cov_seed))
            tgt = RandomGaussian(16, int(g16.data.pair), "target", int(g16.data.cov_seed))
            bench_dual(b, g16, "gaussian_d16", src, tgt, device)
        if wanted("dsm_step"):
            bench_dsm(b, sr, SwissRoll(0.25), device)
        if wanted("langevin_step"):
            bench_langevin(b, sr, StandardGaussian(2), SwissRoll(0.25), device)
        if wanted("ula_gaussian_step"):
            bench_ula_gaussian(b, g16, device)
        if wanted("gaussian_score"):
            bench_gaussian_score(b, device, args.quick)
    if wanted("bw_uvp"):
        bench_bw_uvp(b, args.quick)
    if wanted("online_sinkhorn"):
        bench_online_sinkhorn(b, args.quick)

    out = {
        "env": {
            "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "machine": platform.machine(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "quick": args.quick, "compile": args.compile, "wall_s": round(time.perf_counter() - t_start, 1),
        },
        "results": b.records,
    }  # fmt: skip
    text = json.dumps(out, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return out


if __name__ == "__main__":
    main()
