"""Error budget of the default job (Gaussian → Swiss roll, KL, λ = 2): swap learned parts for oracles one at a time.

Loads a finished ``python -m experiments.run`` run (its cached dual, score and BP stages) and re-samples SCONES with
each combination of

- target score: the run's learned DSM score, or the exact score of the noised Swiss roll
  ∇log q_σ(y) = (E[c(t) | y] − y)/s², s² = noise² + σ² (the roll is c(t) + noise·z with t uniform: a 1-D quadrature
  over a fine t-grid, exact at every σ);
- potentials: the run's learned ψ, or POT's entropic potentials between ``--pot-n`` fresh samples per side
  (out-of-sample soft c-transform);
- sampler: the run's sampler config, or overrides given as ``--sampler key=value,...`` (several allowed);

and reports for each the y-marginal sliced-W2 to fresh target samples (as ``metrics.json``), the joint energy
distance on raw coordinates to POT's plan between ``--joint-n`` fresh samples per side, ``--joint-refs`` plans pooled
(``metrics.json`` ``joint_raw_energy_to_pot_plan``, ``experiments.evaluation.joint_raw_energy``), and the
conditional energy distance to the exact-conditional reference (``conditional_energy_to_plan``,
``experiments.evaluation.conditional_plan_energy``), each with its floor (exact samples scored the same way).

    python scripts/swiss_roll_budget.py outputs/swiss_roll/runs/<time>
    python scripts/swiss_roll_budget.py RUN --sampler n_steps_each=300 --sampler step_lr=1e-4 --only score=exact
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import ot
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's experiments/
from experiments.evaluation import _source_atoms, exact_conditional_samples, pot_plan_draws, refs_spread
from experiments.loading import load_coupling
from scones.metrics.sample_distances import paired_energy_distance
from scones.ot.discrete import sinkhorn
from scones.sampling.conditional import LearnedPriorScore, initial_chains, sample_conditional
from scones.sampling.settings import validate_sampler


class SwissRollNoisedScore:
    """Exact ∇_y log q_σ(y) of the Swiss roll c(t) + noise·z (t ~ U[1.5π, 4.5π]) convolved with N(0, σ²I)."""

    def __init__(self, noise: float, sigmas, n_grid: int = 1500, scale: float = 1.0) -> None:
        t = 1.5 * math.pi * (1 + 2 * (torch.arange(n_grid, dtype=torch.float64) + 0.5) / n_grid)
        self.c = (scale * torch.stack([t * torch.cos(t), t * torch.sin(t)], 1)).float()
        self.s2 = [(scale * noise) ** 2 + float(s) ** 2 for s in sigmas]
        self.c2 = self.c.pow(2).sum(1)

    def __call__(self, y: torch.Tensor, level: int) -> torch.Tensor:
        s2 = self.s2[level]
        logits = (2 * y @ self.c.T - self.c2[None]) / (2 * s2)  # −‖y − c‖²/(2s²) up to a per-row constant
        w = torch.softmax(logits, dim=1)
        return (w @ self.c - y) / s2

    def to(self, device):
        return self


def parse_overrides(items: list[str]) -> list[dict]:
    out = []
    for item in items:
        d = {}
        for kv in item.split(","):
            k, v = kv.split("=")
            try:
                d[k] = int(v)
            except ValueError:
                try:
                    d[k] = float(v)
                except ValueError:
                    d[k] = {"true": True, "false": False}.get(v, v)
        out.append(d)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--n", type=int, default=1000, help="sources (one chain each)")
    ap.add_argument("--joint-n", type=int, default=4000, help="samples per side of each POT plan (joint metric)")
    ap.add_argument("--joint-refs", type=int, default=3, help="POT plans pooled (joint metric)")
    ap.add_argument("--pot-n", type=int, default=4000,
                    help="target samples of the POT potentials oracle (source: quadrature grid)")
    ap.add_argument("--sampler", action="append", default=[], help="key=value,... overrides of the run's sampler")
    ap.add_argument("--only", action="append", default=[], help="score=learned|exact, psi=learned|pot")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)

    plan = load_coupling(args.run_dir)
    source, target, lam, cost = plan.source, plan.target, plan.lam, plan.cost
    g = torch.Generator().manual_seed(args.seed)
    x = source.sample(args.n, generator=g)

    t0 = time.perf_counter()
    xs, a = _source_atoms(source, args.pot_n, g)
    pot_sk = sinkhorn(xs, target.sample(args.pot_n, generator=g), lam, a=a, cost=cost, max_iter=5000, tol=1e-6,
                      method="kernel")
    pot = pot_sk.potentials()
    pot.regularizer = plan.regularizer
    print(f"POT oracle potentials: n={args.pot_n}, {pot_sk.n_iter} it, err {pot_sk.marginal_error:.2e}, "
          f"{time.perf_counter() - t0:.1f}s")

    # references: joint draws of POT plans sharing the sources x, and the exact-conditional reference (as metrics.json)
    ref_joint = pot_plan_draws(source, target, cost, lam, x, args.joint_n, args.joint_refs,
                               torch.Generator().manual_seed(1000 + args.seed))
    gr = torch.Generator().manual_seed(77 + args.seed)
    ref_cond = exact_conditional_samples(source, target, cost, lam, x, 4, gr, n_pot=args.joint_n)
    exact_y = exact_conditional_samples(source, target, cost, lam, x, 1, torch.Generator().manual_seed(78 + args.seed),
                                        n_pot=args.joint_n)[:, 0]

    fresh = [target.sample(args.n, generator=g).double().numpy() for _ in range(5)]

    def metrics(y: torch.Tensor) -> dict:
        return {
            "sw2": float(np.mean([ot.sliced_wasserstein_distance(y.double().numpy(), f, n_projections=200, seed=2039)
                                  for f in fresh])),
            "joint_raw_energy_pot": paired_energy_distance(x, y, ref_joint),
            "cond_energy": paired_energy_distance(x, y, ref_cond),
        }

    rows = []
    rows.append({"name": "exact conditional (floor)", **metrics(exact_y)})
    between = refs_spread(x, ref_joint)
    if between is not None:
        rows.append({"name": "POT plans, one against another", "joint_raw_energy_pot": between})
    rows.append({"name": "independent", **metrics(target.sample(args.n, generator=g))})
    rows.append({"name": "BP", **metrics(plan.barycentric(x))})
    for r in rows:
        print(json.dumps(r))

    base = plan.sampler.model_dump()
    samplers = [base] + [{**base, **o} for o in parse_overrides(args.sampler)]
    only = dict(kv.split("=") for kv in args.only)
    for sampler in samplers:
        levels = validate_sampler(sampler).noise_levels()
        sig = [0.0] if levels is None else [float(v) for v in levels]
        exact_score = SwissRollNoisedScore(target.noise, sig, scale=target.scale)
        learned_score = LearnedPriorScore.for_sampler(plan.prior_score.module, sampler)
        for sname, score in (("learned", learned_score), ("exact", exact_score)):
            if only.get("score", sname) != sname:
                continue
            for pname, pp in (("learned", plan.potentials), ("pot", pot)):
                if only.get("psi", pname) != pname:
                    continue
                gs = torch.Generator().manual_seed(args.seed + 5)
                y_bp = plan.barycentric(x) if str(sampler.get("init", "")).startswith("bp") else None
                y0 = initial_chains(sampler, x, y_bp, gs)
                t0 = time.perf_counter()
                y = sample_conditional(score, pp, x, y0, sampler, 1000, gs)
                dt = time.perf_counter() - t0
                diff = {k: v for k, v in sampler.items() if base.get(k) != v}
                row = {"name": f"score={sname} psi={pname} sampler={diff or 'run'}", **metrics(y), "seconds": dt}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
