"""Entropic-OT mixture benchmark (Gushchin et al. 2023 construction, OUR seeded instances) as a Hydra multirun.

One job per (D, ε, seed) cell of ``+experiment=eot_benchmark``; then a table of cBW-UVP (%) for SCONES, BP, the
independent coupling and exact samples (finite-sample floor), next to the published numbers of other solvers on the
*official* instances (spec benchmarks.md §5.1 — not the same instances, so compare orders of magnitude only).

    python scripts/eot_benchmark_table.py --dims 2 16 --eps 1 10
    python scripts/eot_benchmark_table.py --collect outputs/eot_table/multiruns/<date>
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from pathlib import Path

import numpy as np
from gaussian_table import ROOT, launch  # noqa: I001  (scripts/ is on sys.path when run as a script)

METHODS = ("scones", "bp", "independent", "exact")


def collect(sweep_dir: Path) -> list[dict]:
    rows = []
    for f in sorted(sweep_dir.glob("**/metrics.json")):
        m = json.loads(f.read_text())
        c = m.get("conditional")
        if not c:
            continue
        cfg = f.parent / "config.yaml"
        import yaml

        data = yaml.safe_load(cfg.read_text())["data"] if cfg.exists() else {}
        row = {
            "dim": data.get("dim"),
            "eps": c["eps"],
            "seed": data.get("seed"),
            "n_x": c["n_x"],
            "n_per_x": c["n_per_x"],
        }
        row.update({k: c["cbw_uvp_percent"].get(k, float("nan")) for k in METHODS})
        row["mean_H"] = m.get("dual", {}).get("mean_H")
        rows.append(row)
    if not rows:
        raise SystemExit(f"no benchmark metrics.json under {sweep_dir}")
    return rows


def write(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "| D | ε | seeds | SCONES | BP | independent | exact (floor) | test x × samples |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for d, e in sorted({(r["dim"], r["eps"]) for r in rows}):
        cell = [r for r in rows if r["dim"] == d and r["eps"] == e]
        vals = []
        for m in METHODS:
            v = np.array([r[m] for r in cell], dtype=float)
            vals.append(f"{v.mean():.2f} ± {v.std():.2f}")
        lines.append(
            f"| {d} | {e:g} | {len(cell)} | " + " | ".join(vals) + f" | {cell[0]['n_x']} × {cell[0]['n_per_x']} |"
        )
    text = "cBW-UVP (%), lower is better; our seeded instances.\n\n" + "\n".join(lines) + "\n"
    (out / "eot_benchmark_table.md").write_text(text)
    (out / "eot_benchmark_cells.json").write_text(json.dumps(rows, indent=1))
    print(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", type=int, nargs="+", default=[2, 16])
    p.add_argument("--eps", type=float, nargs="+", default=[1.0, 10.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--launcher", default=None)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    p.add_argument("--collect", type=Path, default=None)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    sweep = a.collect
    if sweep is None:
        sweep = ROOT / "outputs" / "eot_table" / "multiruns" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        launch(
            "eot_benchmark",
            {"data.dim": a.dims, "data.eps": a.eps, "data.seed": a.seeds},
            sweep,
            a.overrides,
            a.launcher,
        )
    write(collect(sweep), a.out)


if __name__ == "__main__":
    main()
