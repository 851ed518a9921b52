"""Pooled y-marginal error budget of a Swiss-roll run: which learned part moves SCONES' y-marginal off q.

The job's ``target_sliced_w2`` reads 1000 samples; at that size the reading scatters by ±10–30 % and cannot resolve a
marginal error of the size left here (docs/results.md, "Swiss roll"). This script samples ``--n`` sources (4000:
chains in batches of 1000) for each combination given, pools them, and reports the sliced-W2 of the pooled y to three
fresh n-sets (500 projections, averaged), beside the same reading for six fresh n-sets (the fresh-sample level) and for
exact-conditional samples (``experiments.evaluation.exact_conditional_samples``: the floor), plus the Kolmogorov
distance of the radius |y| to 20 000 fresh samples (where along the roll the mass sits). Combinations
``SCORE:PSI[:SAMPLER]``:

- SCORE: ``learned`` (the run's DSM score), ``exact`` (the noised roll's score by quadrature,
  ``swiss_roll_budget.SwissRollNoisedScore``) or ``learned@0,1,2`` (learned at those sampler levels, exact elsewhere:
  which noise levels' score error matters);
- PSI: ``learned`` (the run's ψ), ``pot`` (POT's potentials between a quadrature grid of the source and 4000 target
  samples) or ``none`` (no compatibility term: plain annealed Langevin on the target score, chains started at x);
- SAMPLER: ``key=value,...`` overrides of the run's sampler (e.g. ``init=resample,skip_levels=9``: exact draws of the
  learned plan from a 10 000-sample pool, then one level of Langevin; the starts are reported too).

    python scripts/swiss_roll_marginal.py outputs/swiss_roll/runs/<time> learned:learned exact:learned exact:pot \\
        learned:none exact:none
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import ot
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's experiments/
sys.path.insert(0, str(Path(__file__).resolve().parent))
from swiss_roll_budget import SwissRollNoisedScore, parse_overrides  # noqa: E402

from experiments.evaluation import _source_atoms, exact_conditional_samples  # noqa: E402
from experiments.loading import load_coupling  # noqa: E402
from scones.ot.discrete import sinkhorn  # noqa: E402
from scones.sampling.conditional import LearnedPriorScore, initial_chains, sample_conditional  # noqa: E402
from scones.sampling.settings import validate_sampler  # noqa: E402


class MixedScore:
    """The learned score at the sampler levels in ``learned_levels``, the exact one elsewhere."""

    def __init__(self, learned, exact, learned_levels: set[int]) -> None:
        self.learned, self.exact, self.levels = learned, exact, learned_levels

    def __call__(self, y: torch.Tensor, level: int) -> torch.Tensor:
        return (self.learned if level in self.levels else self.exact)(y, level)

    def to(self, device):
        return self


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("combos", nargs="+", help="SCORE:PSI[:key=value,...]")
    ap.add_argument("--n", type=int, default=4000, help="sources (one chain each), pooled")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)

    plan = load_coupling(args.run_dir)
    src, tgt, n = plan.source, plan.target, args.n
    base = plan.sampler.model_dump()

    def fresh(m: int, seed: int) -> np.ndarray:
        return tgt.sample(m, generator=torch.Generator().manual_seed(seed)).double().numpy()

    refs = [fresh(n, 300 + i) for i in range(3)]
    radius_ref = np.sort(np.linalg.norm(fresh(20000, 5), axis=1))

    def reading(y: np.ndarray) -> dict:
        sw2 = float(np.mean([ot.sliced_wasserstein_distance(y, r, n_projections=500, seed=2039) for r in refs]))
        r = np.sort(np.linalg.norm(y, axis=1))
        ks = np.abs(np.searchsorted(radius_ref, r) / len(radius_ref) - np.arange(1, len(r) + 1) / len(r)).max()
        return {"sliced_w2": sw2, "ks_radius": float(ks)}

    level = [reading(fresh(n, 400 + i))["sliced_w2"] for i in range(6)]
    rows = [{"name": "fresh samples (level)", "sliced_w2": float(np.mean(level)), "sd": float(np.std(level, ddof=1)),
             "ks_radius": reading(fresh(n, 77))["ks_radius"]}]
    x = src.sample(n, generator=torch.Generator().manual_seed(args.seed))
    exact_y = exact_conditional_samples(src, tgt, plan.cost, plan.lam, x, 1, torch.Generator().manual_seed(50),
                                        n_pot=4000)[:, 0]
    rows.append({"name": "exact conditional (floor)", **reading(exact_y.double().numpy())})
    for r in rows:
        print(json.dumps(r), flush=True)

    pot = None
    for combo in args.combos:
        parts = combo.split(":")
        if len(parts) not in (2, 3):
            raise SystemExit(f"combination {combo!r}: expected SCORE:PSI[:key=value,...]")
        sname, pname = parts[0], parts[1]
        sampler = {**base, **(parse_overrides([parts[2]])[0] if len(parts) == 3 else {})}
        levels = validate_sampler(sampler).noise_levels()
        sigmas = [0.0] if levels is None else [float(v) for v in levels]
        learned = LearnedPriorScore.for_sampler(plan.prior_score.module, sampler)
        exact = SwissRollNoisedScore(tgt.noise, sigmas, scale=tgt.scale)
        if sname == "learned":
            score = learned
        elif sname == "exact":
            score = exact
        elif sname.startswith("learned@"):
            score = MixedScore(learned, exact, {int(v) for v in sname[len("learned@"):].split(",")})
        else:
            raise SystemExit(f"SCORE must be learned, exact or learned@i,j,...; got {sname!r}")
        if pname == "pot" and pot is None:
            g = torch.Generator().manual_seed(11)
            xs, w = _source_atoms(src, 4000, g)
            pot = sinkhorn(xs, tgt.sample(4000, generator=g), plan.lam, a=w, cost=plan.cost, max_iter=5000, tol=1e-6,
                           method="kernel").potentials()
            pot.regularizer = plan.regularizer
        if pname not in ("learned", "pot", "none"):
            raise SystemExit(f"PSI must be learned, pot or none; got {pname!r}")
        potentials = {"learned": plan.potentials, "pot": pot, "none": None}[pname]
        gs = torch.Generator().manual_seed(args.seed + 5)
        pool = None
        if sampler.get("init") == "resample":
            pool = tgt.sample(int(sampler.get("pool_size", 10000)), generator=torch.Generator().manual_seed(0))
        y_bp = plan.barycentric(x) if str(sampler.get("init", "")).startswith("bp") else None
        y0 = initial_chains(sampler, x, y_bp, gs, potentials=potentials, pool=pool)
        if pool is not None:
            row = {"name": f"{combo} (resampled starts)", **reading(y0.double().numpy())}
            rows.append(row)
            print(json.dumps(row), flush=True)
        t0 = time.process_time()
        y = sample_conditional(score, potentials, x, y0, sampler, 1000, gs)
        row = {"name": combo, **reading(y.double().numpy()), "cpu_s": time.process_time() - t0}
        if potentials is not None:
            row["mean_cost"] = float(plan.cost(x, y).mean())
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
