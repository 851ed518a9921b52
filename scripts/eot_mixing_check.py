"""Does Langevin mixing alone limit SCONES on the mixture benchmark at small ε? (docs/results.md, issue 6 plan (ii))

Runs ULA on the *exact* conditional score ∇_y log π*(y | x) of the seeded benchmark instance (no learned score, no
learned potentials), started where the SCONES sampler starts (the barycentric projection, here the exact conditional
mean), for several step sizes and step counts, and reports cBW-UVP (%) against the exact conditional next to the
exact-sample floor. If these numbers sit at the floor, the sampler's budget is not what limits SCONES; if they stay
high at ε = 0.1, mixing across the conditional's mixture modes is a limit by itself.

    python scripts/eot_mixing_check.py                       # D = 2, 16; ε = 0.1, 1; ~2 min on one core
    python scripts/eot_mixing_check.py --dims 64 --eps 0.1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from scones.data.eot_benchmark import eot_mixture_benchmark
from scones.metrics.cbw_uvp import cbw_uvp
from scones.sampling.langevin import ula

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", type=int, nargs="*", default=[2, 16])
    ap.add_argument("--eps", type=float, nargs="*", default=[0.1, 1.0])
    ap.add_argument("--n-x", type=int, default=100)
    ap.add_argument("--per-x", type=int, default=100)
    ap.add_argument("--steps", type=int, nargs="*", default=[100, 1000, 5000])
    ap.add_argument("--step-scale", type=float, nargs="*", default=[0.1, 0.02], help="h = scale · ε (λ/2)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "eot_mixing_check.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for dim in args.dims:
        for eps in args.eps:
            bench = eot_mixture_benchmark(dim, eps, seed=0)
            x = bench.test_inputs(args.n_x)
            mean, cov = bench.conditional_moments(x)
            var = bench.target_variance
            xr = x.repeat_interleave(args.per_x, dim=0)
            exact = bench.sample_conditional(x, args.per_x, generator=torch.Generator().manual_seed(1))
            floor = 100 * float(cbw_uvp(exact, mean, cov, var))
            start = bench.conditional_mean(x).repeat_interleave(args.per_x, dim=0)

            def score(y, level, xr=xr, bench=bench):
                return bench.conditional_score(xr, y).to(y.dtype)

            for scale in args.step_scale:
                h = scale * eps
                y, done = start.clone(), 0
                t0 = time.perf_counter()
                for n_steps in sorted(args.steps):
                    y = ula(score, y, h, n_steps - done, generator=torch.Generator().manual_seed(n_steps), disable=True)
                    done = n_steps
                    value = 100 * float(cbw_uvp(y.reshape(args.n_x, args.per_x, -1), mean, cov, var))
                    rows.append({"dim": dim, "eps": eps, "step": h, "n_steps": n_steps, "cbw_uvp": round(value, 3),
                                 "floor": round(floor, 3), "seconds": round(time.perf_counter() - t0, 1)})
                    print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
