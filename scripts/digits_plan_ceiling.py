"""How label-consistent is the *exact* entropic plan of the `digits` experiment? (docs/images.md)

Between the two disjoint halves the `digits` experiment transports (source: even-indexed sklearn digits, 16 px,
2x downsampled and upsampled back; target: odd-indexed digits at 16 px), with the experiment's per-pixel mean
squared cost, this solves the discrete regularised OT problem with POT for each λ and reports the share of each
source's conditional mass that lands on target images of the same digit ("label mass"). It is the ceiling of
SCONES' label consistency for that λ (up to the classifier's own errors): SCONES samples π(y|x), and on these
finite sets π(y|x) is this discrete plan's row (up to the generalisation of the learned potentials).

    python scripts/digits_plan_ceiling.py   # ~10 min on one core; writes docs/results/digits_plan_ceiling.md

KL: POT ``sinkhorn_log`` with reg = λ (KL to a⊗b differs from POT's entropy by a constant). χ²: POT
``smooth_ot_dual(reg_type="l2")`` with reg = 2λnm, since λ·E_{a⊗b}[(dπ/d(a⊗b))²] = λ·nm·‖π‖²_F and POT's
penalty is (reg/2)·‖π‖²_F.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import ot

from scones.data import DigitsImages
from scones.ot import SquaredEuclidean

ROOT = Path(__file__).resolve().parents[1]


def label_mass(plan: np.ndarray, same: np.ndarray) -> float:
    rows = plan / plan.sum(1, keepdims=True)
    return float((rows * same).sum(1).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--kl", type=float, nargs="*", default=[0.01, 0.005, 0.002, 0.001])
    ap.add_argument("--chi2", type=float, nargs="*", default=[0.01, 0.001, 0.0001])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "digits_plan_ceiling.md")
    args = ap.parse_args()

    src = DigitsImages(size=args.size, subset="even", downsample=2)
    tgt = DigitsImages(size=args.size, subset="odd")
    cost = SquaredEuclidean("mean").pairwise(src.images, tgt.images).double().numpy()
    n, m = cost.shape
    a, b = np.full(n, 1 / n), np.full(m, 1 / m)
    same = (src.labels[:, None] == tgt.labels[None, :]).numpy()
    rows = [("nearest neighbour (min cost)", "-", float(same[np.arange(n), cost.argmin(1)].mean()), 0.0)]
    t = time.perf_counter()
    rows.append(("unregularised OT (ot.emd)", "0", label_mass(ot.emd(a, b, cost), same), time.perf_counter() - t))
    for lam in args.kl:
        t = time.perf_counter()
        plan = ot.sinkhorn(a, b, cost, lam, method="sinkhorn_log", numItermax=50000, stopThr=1e-9)
        rows.append(("KL", f"{lam:g}", label_mass(plan, same), time.perf_counter() - t))
        print(rows[-1], flush=True)
    for lam in args.chi2:
        t = time.perf_counter()
        plan = ot.smooth.smooth_ot_dual(a, b, cost, 2 * lam * n * m, reg_type="l2", numItermax=5000, stopThr=1e-12)
        rows.append(("chi2", f"{lam:g}", label_mass(plan, same), time.perf_counter() - t))
        print(rows[-1], flush=True)
    lines = [
        f"Exact discrete plan between the `digits` halves ({n} sources, {m} targets, {args.size} px, per-pixel mean",
        "squared cost; `python scripts/digits_plan_ceiling.py`). Label mass = share of π(·|x) on targets of x's digit.",
        "",
        "| plan | λ | label mass | seconds |",
        "|---|---|---|---|",
        *[f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:.1f} |" for r in rows],
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
