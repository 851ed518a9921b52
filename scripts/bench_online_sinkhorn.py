"""Benchmark: Online Sinkhorn vs randomized Sinkhorn vs POT Sinkhorn on a fixed sample (Mensch & Peyré 2020, Fig. 2–3).

Accuracy of the entropic potentials, ‖f − f*‖_var + ‖g − g*‖_var (max − min of the difference, invariant to
the (f + k, g − k) gauge), against the samples consumed per side and the wall time (evaluation excluded):

A. Gaussians N(0, A) → N(0, B) in 2-D (eigenvalues in [0.5, 2]), cost ‖x − y‖², λ = 1: truth = closed-form
   quadratic potentials (scones.ot.gaussian.entropic_potentials). Error on the held-out points (1000 per side)
   inside the 95 % highest-density region (Mahalanobis radius ≤ 2.45); the paper's metric on all held-out
   points (``error_all``, recorded too) is dominated by the single most extreme test point and too noisy to
   rank methods with one fixed sample.
B. The paper's 2-D Gaussian mixtures (``gmm_2d``), λ = 0.5: truth = POT ``sinkhorn_log`` potentials on a large
   fixed reference sample; the stochastic methods draw with replacement from it; error on the reference points.

Methods (all in torch, same dtype and thread count):
- Online Sinkhorn (scones.ot.online_sinkhorn, default schedule b_t = ⌈100 (1 + 0.1t)^½⌉, η_t = (1 + 0.1t)^−0.85),
  several seeds;
- randomized Sinkhorn: a fresh batch of n points per step, f_{t+1} = T_{β̂_t}(g_t) (Online Sinkhorn with η ≡ 1,
  constant batch);
- POT ``ot.bregman.sinkhorn_log`` (torch backend) on a fixed sample of n points per side, run to a marginal
  error < 1e-6, potentials extended off-sample by the soft c-transform; time = cost matrix + POT call.

Headline: wall time for Online Sinkhorn to reach the error of POT on n = 10⁴ points (median over seeds), and its
ratio to POT's time, both measured in this run.

    python scripts/bench_online_sinkhorn.py            # ≈ 3–5 min on 2 CPU cores
    python scripts/bench_online_sinkhorn.py --quick    # ≈ 1 min, POT reference n = 2000

Writes ``docs/figures/online_sinkhorn_bench.png`` (``--figure``) and optionally a JSON record (``--json``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from scones.ot.discrete import sinkhorn
from scones.ot.gaussian import entropic_potentials, random_covariance
from scones.ot.online_sinkhorn import OnlineSinkhorn

CENTRAL_RADIUS = math.sqrt(-2.0 * math.log(0.05))  # χ²₂ 95 % quantile, square-rooted


def var_norm(h: torch.Tensor) -> float:
    return float(h.max() - h.min())


# ---------------------------------------------------------------------------------------------------------
# problems: samplers(seed) -> (sample_x, sample_y); error(potentials) -> float
# ---------------------------------------------------------------------------------------------------------
class GaussianProblem:
    name = "gaussian_2d"

    def __init__(self, lam: float, dtype: torch.dtype, n_test: int = 1000) -> None:
        rng = np.random.default_rng(0)
        self.A, self.B = random_covariance(2, rng, 0.5, 2.0), random_covariance(2, rng, 0.5, 2.0)
        self.lam, self.dtype = lam, dtype
        self.LA = torch.tensor(np.linalg.cholesky(self.A))
        self.LB = torch.tensor(np.linalg.cholesky(self.B))
        Qf, Qg = (torch.tensor(q) for q in entropic_potentials(self.A, self.B, lam))
        gen = torch.Generator().manual_seed(10**6)
        zx = torch.randn(n_test, 2, generator=gen, dtype=torch.float64)
        zy = torch.randn(n_test, 2, generator=gen, dtype=torch.float64)
        # Mahalanobis radius ≤ 2.448: the 95 % highest-density region of each Gaussian
        self.cx, self.cy = zx.norm(dim=1) <= CENTRAL_RADIUS, zy.norm(dim=1) <= CENTRAL_RADIUS
        self.xt, self.yt = zx @ self.LA.T, zy @ self.LB.T
        self.f_true = ((self.xt @ Qf) * self.xt).sum(1)
        self.g_true = ((self.yt @ Qg) * self.yt).sum(1)

    def samplers(self, seed: int):
        gen = torch.Generator().manual_seed(seed)
        return (
            lambda n: (torch.randn(n, 2, generator=gen, dtype=torch.float64) @ self.LA.T).to(self.dtype),
            lambda n: (torch.randn(n, 2, generator=gen, dtype=torch.float64) @ self.LB.T).to(self.dtype),
        )

    def errors(self, pot) -> dict:
        """``error``: var-norm errors on the held-out points in the 95 % region; ``error_all``: on all of them."""
        df = pot.f(self.xt.to(self.dtype)).double() - self.f_true
        dg = pot.g(self.yt.to(self.dtype)).double() - self.g_true
        return {
            "error": var_norm(df[self.cx]) + var_norm(dg[self.cy]),
            "error_all": var_norm(df) + var_norm(dg),
        }


def _gmm(means, variances, n: int, gen: torch.Generator) -> torch.Tensor:
    means = torch.tensor(means, dtype=torch.float64)
    std = torch.tensor(variances, dtype=torch.float64).sqrt()
    k = torch.randint(len(means), (n,), generator=gen)
    return means[k] + std[k, None] * torch.randn(n, 2, generator=gen, dtype=torch.float64)


class GMMReferenceProblem:
    """``gmm_2d`` of the reference code (onlikhorn/dataset.py); truth = POT on ``n_ref`` fixed points."""

    name = "gmm_2d"

    def __init__(self, lam: float, dtype: torch.dtype, n_ref: int) -> None:
        gen = torch.Generator().manual_seed(2 * 10**6)
        x = _gmm([(1, 0), (2, 1), (0, 1)], [0.1, 0.1, 0.4], n_ref, gen)
        y = _gmm([(0, -2), (2, -1), (3, 0)], [0.1, 0.1, 0.1], n_ref, gen)
        self.lam, self.dtype = lam, dtype
        self.x, self.y = x.to(dtype), y.to(dtype)
        self.ref = sinkhorn(x, y, lam, tol=1e-9)  # float64 reference
        self.ref_seconds = self.ref.solve_seconds

    def samplers(self, seed: int):
        gen = torch.Generator().manual_seed(seed)
        n = len(self.x)
        return (
            lambda k: self.x[torch.randint(n, (k,), generator=gen)],
            lambda k: self.y[torch.randint(n, (k,), generator=gen)],
        )

    def errors(self, pot) -> dict:
        err = var_norm(pot.f(self.x).double() - self.ref.f) + var_norm(pot.g(self.y).double() - self.ref.g)
        return {"error": err, "error_all": err}


# ---------------------------------------------------------------------------------------------------------
# methods
# ---------------------------------------------------------------------------------------------------------
def run_stochastic(
    problem, solver: OnlineSinkhorn, seed: int, max_samples: int, n_iter: int = 10**6, every: float = 2**0.5
) -> list[dict]:
    """Trajectory [{n_seen, seconds, error}] evaluated when n_seen passes geometric marks (factor ``every``; a
    value just above 1 evaluates every step); evaluation time is excluded from ``seconds``."""
    if every <= 1.0:
        raise ValueError(f"every must be > 1 (geometric evaluation marks), got {every}")
    records, mark = [], [solver.batch_size]

    def record(state):
        if state.n_seen >= mark[0] or state.n_seen >= max_samples or state.step == n_iter - 1:
            records.append({"n_seen": state.n_seen, "seconds": state.elapsed, **problem.errors(state.potentials)})
            while mark[0] <= state.n_seen:
                mark[0] *= every

    solver.fit(*problem.samplers(seed), n_iter=n_iter, max_samples=max_samples, callback=record)
    return records


def run_fixed(problem, n: int, seed: int) -> dict:
    sample_x, sample_y = problem.samplers(seed)
    res = sinkhorn(sample_x(n), sample_y(n), problem.lam, tol=1e-6, max_iter=2000, dtype=problem.dtype)
    return {"n": n, "seconds": res.solve_seconds, "iterations": res.n_iter, **problem.errors(res.potentials())}


def time_to_reach(trajectories: list[list[dict]], target: float, key: str = "error") -> tuple[float, float]:
    """Median over seeds of the first (seconds, n_seen) with ``key`` ≤ target (inf if a seed never gets there)."""
    hits = []
    for traj in trajectories:
        hit = next((r for r in traj if r[key] <= target), None)
        hits.append((hit["seconds"], hit["n_seen"]) if hit else (math.inf, math.inf))
    hits.sort()
    return hits[len(hits) // 2]


# ---------------------------------------------------------------------------------------------------------
def bench(
    problem, lam: float, fixed_sizes, online_samples: int, seeds, random_batch: int, random_steps: int, merge: bool
) -> dict:
    out = {"problem": problem.name, "lam": lam}
    t0 = time.perf_counter()
    out["fixed"] = [run_fixed(problem, n, seed=100 + i) for i, n in enumerate(fixed_sizes)]
    for r in out["fixed"]:
        print(
            f"  [{problem.name}] POT sinkhorn_log n={r['n']:6d}: {r['iterations']:4d} it, "
            f"{r['seconds']:7.2f} s, error {r['error']:.3f} (all points {r['error_all']:.3f})",
            flush=True,
        )
    out["online"] = []
    for seed in seeds:
        solver = OnlineSinkhorn(lam, merge_duplicates=merge)
        out["online"].append(run_stochastic(problem, solver, seed, online_samples))
        last = out["online"][-1][-1]
        print(
            f"  [{problem.name}] online seed {seed}: {last['n_seen']} samples, {last['seconds']:.2f} s, "
            f"error {last['error']:.3f} (all points {last['error_all']:.3f})",
            flush=True,
        )
    solver = OnlineSinkhorn(lam, batch_size=random_batch, batch_exp=0.0, lr=1.0, lr_exp=0.0, merge_duplicates=merge)
    out["randomized"] = run_stochastic(
        problem, solver, seeds[0], random_batch * random_steps, n_iter=random_steps, every=1.01
    )
    last = out["randomized"][-1]
    print(
        f"  [{problem.name}] randomized Sinkhorn b={random_batch}: {last['n_seen']} samples, "
        f"{last['seconds']:.2f} s, error {last['error']:.3f} (min {min(r['error'] for r in out['randomized']):.3f})",
        flush=True,
    )
    big = out["fixed"][-1]
    for key in ("error", "error_all"):
        secs, n_seen = time_to_reach(out["online"], big[key], key)
        out["headline" if key == "error" else "headline_all"] = {
            "pot_n": big["n"],
            "pot_seconds": big["seconds"],
            "pot_error": big[key],
            "online_seconds_to_reach": secs,
            "online_samples_to_reach": n_seen,
            "ratio": secs / big["seconds"],
        }
    out["bench_seconds"] = time.perf_counter() - t0
    return out


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(11, 4.2 * len(results)), squeeze=False)
    for row, res in zip(axes, results, strict=True):
        for ax, key, label in ((row[0], "n_seen", "samples seen per side"), (row[1], "seconds", "wall time (s)")):
            for i, traj in enumerate(res["online"]):
                ax.plot(
                    [r[key] for r in traj],
                    [r["error"] for r in traj],
                    "-o",
                    ms=2.5,
                    color="C0",
                    alpha=0.8,
                    label="Online Sinkhorn" if i == 0 else None,
                )
            rnd = res["randomized"]
            ax.plot(
                [r[key] for r in rnd],
                [r["error"] for r in rnd],
                "-",
                color="C1",
                alpha=0.8,
                label=f"randomized Sinkhorn (b = {rnd[0]['n_seen']})",
            )
            fx = res["fixed"]
            xs = [r["n"] if key == "n_seen" else r["seconds"] for r in fx]
            ax.plot(xs, [r["error"] for r in fx], "s--", color="C2", label="POT sinkhorn_log, fixed sample n")
            for r, xv in zip(fx, xs, strict=True):
                ax.annotate(f"{r['n']}", (xv, r["error"]), fontsize=7, textcoords="offset points", xytext=(3, 3))
            h = res["headline"]
            ax.axhline(h["pot_error"], color="C2", lw=0.7, ls=":")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel("‖f − f*‖_var + ‖g − g*‖_var")
            truth = "closed form" if res["problem"].startswith("gaussian") else "POT on reference sample"
            ax.set_title(f"{res['problem']}, λ = {res['lam']} (truth: {truth})", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
        row[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="≈ 1 min: smaller samples, POT reference n = 2000")
    p.add_argument("--threads", type=int, default=1, help="torch threads for every method (default 1)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--seeds", type=int, default=3, help="Online Sinkhorn seeds")
    p.add_argument("--figure", default="docs/figures/online_sinkhorn_bench.png")
    p.add_argument("--json", default=None, help="optional path of a JSON record of all numbers")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    seeds = list(range(args.seeds))
    if args.quick:
        gauss_sizes, gauss_online = [500, 1000, 2000], 16_000
        gmm_ref, gmm_sizes, gmm_online = 1500, [250, 500, 1000], 16_000
    else:
        gauss_sizes, gauss_online = [1000, 2000, 4000, 10_000], 96_000
        gmm_ref, gmm_sizes, gmm_online = 4000, [250, 500, 1000, 2000], 48_000
    start = time.perf_counter()
    machine = f"{cpu_name()} ({os.cpu_count()} cores), {torch.get_num_threads()} torch thread(s)"
    print(f"torch {torch.__version__}, {machine}, dtype {args.dtype}", flush=True)

    results = [bench(GaussianProblem(1.0, dtype), 1.0, gauss_sizes, gauss_online, seeds, 1000, 25, merge=False)]
    gmm = GMMReferenceProblem(0.5, dtype, gmm_ref)
    print(f"  [gmm_2d] reference POT on n={gmm_ref}: {gmm.ref.n_iter} it, {gmm.ref_seconds:.1f} s (float64)")
    results.append(bench(gmm, 0.5, gmm_sizes, gmm_online, seeds, 500, 25, merge=True))
    total = time.perf_counter() - start

    print("\nHeadline (median over Online Sinkhorn seeds; times exclude error evaluation):")
    for res in results:
        for key, what in (("headline", "error"), ("headline_all", "error on all test points")):
            h = res[key]
            if key == "headline_all" and res["problem"] != "gaussian_2d":
                continue
            print(
                f"  {res['problem']} ({what}): POT sinkhorn_log on n={h['pot_n']} reaches {h['pot_error']:.3f} in "
                f"{h['pot_seconds']:.2f} s; Online Sinkhorn reaches it after {h['online_samples_to_reach']} samples"
                f" in {h['online_seconds_to_reach']:.2f} s -> ratio {h['ratio']:.3f}"
            )
    print(f"total bench time {total:.0f} s")
    plot(results, Path(args.figure), f"Online Sinkhorn vs Sinkhorn ({args.dtype}, {machine})")
    print(f"figure: {args.figure}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(
                {
                    "args": vars(args),
                    "machine": machine,
                    "torch": torch.__version__,
                    "total_seconds": total,
                    "results": results,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
