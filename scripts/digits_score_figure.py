"""Side-by-side figure of unconditional score samples from ``scripts/digits_score_ablation.py`` runs.

Each ``LABEL=TITLE`` names a run of the ablation script (its grid ``<out>/<LABEL>.png`` and its last line with
that label in ``--json``); the panels are put side by side, left to right, and captioned with each run's background
statistic ``bg`` and unconditional feature FID beside the target images' ``bg`` and feature-FID floor.
``LABEL@K=TITLE`` is that run's ``--oracle-levels`` chains with the empirical mixture below level K.

    python scripts/digits_score_figure.py baseline="Gaussian baseline, 800 steps" s1600cos="1600 steps, cosine" \
        --out docs/figures/digits_score_samples.png
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments import images  # noqa: E402


def last_result(path: Path, label: str) -> dict:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("label") == label]
    if not rows:
        raise SystemExit(f"no result labelled {label!r} in {path}: run scripts/digits_score_ablation.py "
                         f"--label {label} [--json {path}] -- <overrides> first")
    return rows[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("panels", nargs="+", help="LABEL=TITLE, left to right")
    ap.add_argument("--dir", type=Path, default=ROOT / "outputs" / "score_ablation", help="the ablation's --out")
    ap.add_argument("--json", type=Path, default=None, help="the ablation's --json (default <dir>/results.jsonl)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    from PIL import Image

    results = args.json or args.dir / "results.jsonl"
    tiles, lines, runs = [], [], []
    for i, panel in enumerate(args.panels):
        spec, _, title = panel.partition("=")
        label, _, k = spec.partition("@")
        r = last_result(results, label)
        runs.append(r)
        where = {1: ["samples"], 2: ["left", "right"], 3: ["left", "middle", "right"]}.get(
            len(args.panels), [f"panel {j + 1}" for j in range(len(args.panels))])[i]
        if k:  # an --oracle-levels run of the ablation: the empirical mixture below level K
            rows = [o for o in r.get("oracle", []) if o["K"] == int(k)]
            if not rows:
                raise SystemExit(f"run {label!r} has no --oracle-levels result for K = {k}")
            lines.append(f"{where}, {title or spec}: feature FID {rows[0]['ffid']:.1f}, "
                         f"confident {rows[0]['confident']:.2f}")
            tiles.append(Image.open(args.dir / f"{label}_oracle{k}.png").convert("RGB"))
            continue
        u = r["uncond"]
        extra = f", confident {u['confident']:.2f}" if "confident" in u else ""
        lines.append(f"{where}, {title or label}: bg {u['bg']['abs']:.3f}, feature FID {u['ffid']:.1f}{extra}")
        tiles.append(Image.open(args.dir / f"{label}.png").convert("RGB"))
    ref, n = runs[0]["reference"], runs[0]["uncond"]
    gap = 16
    w = sum(t.size[0] for t in tiles) + gap * (len(tiles) - 1)
    h = max(t.size[1] for t in tiles)
    canvas = Image.new("RGB", (w, h), "white")
    x = 0
    for t in tiles:
        canvas.paste(t, (x, 0))
        x += t.size[0] + gap
    buf = io.BytesIO()
    canvas.save(buf, format="png")
    caption = "\n".join([
        "Unconditional samples of the digits score model alone",
        f"(U[0,1] start, 10 levels x {n['n_steps_each']} steps, denoising step)",
        *lines,
        f"target images: bg {ref['target_bg']['abs']:.3f}, feature FID floor {ref['ffid_floor']:.1f}"
        + (f", confident {ref['confident']:.2f}" if "confident" in ref else ""),
    ])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(images.captioned_png(buf.getvalue(), caption))
    print(caption)
    print(args.out)


if __name__ == "__main__":
    main()
