"""Reproduce the Gaussian → Gaussian BW-UVP table (SCONES paper, λ = 2d) as a Hydra multirun.

Each (d, pair) cell is one job of ``python -m experiments.run -m +experiment=gaussian data.dim=... data.pair=...``,
so the sweep can go to a cluster with any Hydra launcher (``--launcher submitit_slurm``). The script then reads every
job's ``metrics.json`` and writes ``gaussian_table.csv``, ``gaussian_table.md`` and ``gaussian_table.png`` (BW-UVP
mean ± std over pairs for SCONES, BP, the independent coupling and exact samples = the finite-sample floor).

    python scripts/gaussian_table.py --dims 2 16 --pairs 0 1 2               # CPU, ~5 min per cell
    python scripts/gaussian_table.py --dims 64 128 256 -- trainer=gpu model=paper
    python scripts/gaussian_table.py --collect outputs/gaussian_table/multiruns/<date>   # only aggregate
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

METHODS = ("scones", "bp", "independent", "exact")
ROOT = Path(__file__).resolve().parents[1]


def launch(experiment: str, grid: dict, sweep_dir: Path, extra: list[str], launcher: str | None) -> None:
    """``python -m experiments.run -m +experiment=<experiment> key=v1,v2 ...`` (one job per grid cell)."""
    cmd = [
        sys.executable,
        "-m",
        "experiments.run",
        "-m",
        f"+experiment={experiment}",
        *(f"{k}={','.join(map(str, v))}" for k, v in grid.items()),
        f"hydra.sweep.dir={sweep_dir}",
        *extra,
    ]
    if launcher:
        cmd.append(f"hydra/launcher={launcher}")
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def collect(sweep_dir: Path) -> list[dict]:
    rows = []
    for f in sorted(sweep_dir.glob("**/metrics.json")):
        m = json.loads(f.read_text())
        gt = m.get("ground_truth") or {}
        if gt.get("kind") != "gaussian_closed_form":
            continue
        cfg_file = f.parent / "config.yaml"
        pair = None
        if cfg_file.exists():
            import yaml

            pair = yaml.safe_load(cfg_file.read_text()).get("data", {}).get("pair")
        row = {"dim": gt["dim"], "lam": gt["lam"], "pair": pair, "n": m.get("n_samples")}
        for meth in METHODS:
            row[meth] = m["methods"].get(meth, {}).get("bw_uvp", float("nan"))
        row["mean_H"] = m.get("dual", {}).get("mean_H")
        row["seconds"] = sum(v for v in m.get("timings_s", {}).values())
        rows.append(row)
    if not rows:
        raise SystemExit(f"no Gaussian metrics.json under {sweep_dir}")
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for d in sorted({r["dim"] for r in rows}):
        cell = [r for r in rows if r["dim"] == d]
        s = {"dim": d, "lam": cell[0]["lam"], "pairs": len(cell)}
        for meth in METHODS:
            v = np.array([r[meth] for r in cell], dtype=float)
            s[f"{meth}_mean"], s[f"{meth}_std"] = float(np.nanmean(v)), float(np.nanstd(v))
        s["minutes_per_cell"] = float(np.mean([r["seconds"] for r in cell]) / 60)
        out.append(s)
    return out


def write(summary: list[dict], rows: list[dict], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "gaussian_table_cells.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(out_dir / "gaussian_table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(summary[0]))
        w.writeheader()
        w.writerows(summary)
    lines = [
        "| d | λ | pairs | SCONES | BP | independent | exact samples (floor) | min/cell |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        cells = [f"{s[f'{m}_mean']:.4f} ± {s[f'{m}_std']:.4f}" for m in METHODS]
        lines.append(
            f"| {s['dim']} | {s['lam']:g} | {s['pairs']} | " + " | ".join(cells) + f" | {s['minutes_per_cell']:.1f} |"
        )
    (out_dir / "gaussian_table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    dims = [s["dim"] for s in summary]
    for m in METHODS:
        ax.errorbar(
            dims,
            [s[f"{m}_mean"] for s in summary],
            yerr=[s[f"{m}_std"] for s in summary],
            marker="o",
            label=m,
            capsize=3,
        )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="dimension d (λ = 2d)",
        ylabel="BW-UVP (fraction)",
        title="Gaussian → Gaussian, entropic plan",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "gaussian_table.png", dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", type=int, nargs="+", default=[2, 16])
    p.add_argument("--pairs", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--sweep-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    p.add_argument("--launcher", default=None, help="Hydra launcher, e.g. joblib or submitit_slurm")
    p.add_argument("--collect", type=Path, default=None, help="only aggregate an existing sweep dir")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides (after --)")
    a = p.parse_args()
    if a.collect is None:
        from datetime import datetime

        sweep = a.sweep_dir or ROOT / "outputs" / "gaussian_table" / "multiruns" / datetime.now().strftime(
            "%Y-%m-%d_%H-%M-%S"
        )
        launch("gaussian", {"data.dim": a.dims, "data.pair": a.pairs}, sweep, a.overrides, a.launcher)
    else:
        sweep = a.collect
    rows = collect(sweep)
    write(summarise(rows), rows, a.out)


if __name__ == "__main__":
    main()
