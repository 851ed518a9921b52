"""The dual's convergence diagnostic (``scones.ot.health.dual_health``) on cached dual stages, one table.

For each cell (a config, given by overrides) the script loads the finished dual stage from the stage cache
(``paths.cache_dir``; it never trains one unless ``--train``), draws the fresh samples the run's health check
draws (``eval.dual_health_samples`` per side, seed ``seed + 4``) and evaluates both checks: the marginal check
(V, its noise N = N_x + N_y, threshold 2N, the smallest detectable violation, the rows' ESS, verdict) and the
moment check (violation, threshold, verdict), plus, for Gaussian pairs, the same checks on the closed-form
potentials, and for the mixture benchmark the marginal check of its exact ψ* on the same draw (the null). The
SCONES accuracy of the cell is read from ``docs/results/fidelity/cells/<cell>.json`` when that exists, or from
``--metrics NAME=path/to/metrics.json``.

    python scripts/dual_health_table.py                                  # every known cell whose dual is cached
    python scripts/dual_health_table.py --cells gaussian_d16_lam1 swiss_roll
    python scripts/dual_health_table.py --cells gaussian_d16_lam1_steps100 --train   # an under-trained dual

Writes ``<out>/<cell>.json`` (default ``docs/results/dual_health``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _cells() -> dict[str, list[str]]:
    cells = {}
    for d, lams in ((2, ("0.5", "1", "4")), (16, ("1", "4", "32")), (64, ("1", "16"))):
        for lam in lams:
            cells[f"gaussian_d{d}_lam{lam}"] = ["+experiment=gaussian", f"data.dim={d}", f"regularizer.lam={lam}"]
    for d in (2, 16, 64):
        for eps in ("0.1", "1", "10"):
            cells[f"mixture_d{d}_eps{eps}"] = ["+experiment=eot_benchmark", f"data.dim={d}", f"data.eps={eps}"]
    cells["swiss_roll"] = []
    cells["digits"] = ["+experiment=digits"]
    # deliberately under-trained duals (train in seconds with --train)
    cells["gaussian_d16_lam1_steps100"] = [*cells["gaussian_d16_lam1"], "dual.steps=100"]
    cells["gaussian_d16_lam32_steps100"] = [*cells["gaussian_d16_lam32"], "dual.steps=100"]
    cells["mixture_d16_eps1_steps100"] = [*cells["mixture_d16_eps1"], "dual.steps=100"]
    cells["swiss_roll_steps100"] = ["dual.steps=100"]
    return cells


CELLS = _cells()


def compose(overrides: list[str]):
    from experiments.run import compose_config

    return compose_config(overrides, ROOT / "configs")


def load_dual(overrides: list[str], train: bool):
    """(spec, problem, potentials, stage) of the cell's dual stage, from the cache (trained only if ``train``)."""
    from experiments import pipeline
    from experiments.stages import make_stage
    from experiments.startup import start_job

    cfg = compose(overrides)
    problem, spec, _ = start_job(cfg, ROOT / "outputs" / "dual_health_table")
    torch_threads(spec)
    upstream, kwargs = [], {}
    if pipeline.uses_langevin_estimator(spec):  # the dual trains on chains of the score stage: its key is upstream
        score = make_stage(spec.training, spec.score)
        if not score.is_done() and not train:
            raise FileNotFoundError(f"score stage not cached: {score.dir} (run the cell first, or pass --train)")
        kwargs["prior_score"], kwargs["score"] = pipeline.score_stage(spec, problem.target)
        upstream = [kwargs["score"].key] if kwargs["score"] is not None else []
    stage = make_stage(spec.training, spec.dual, *upstream)
    if not stage.is_done() and not train:
        raise FileNotFoundError(f"dual stage not cached: {stage.dir} (run the cell first, or pass --train)")
    pot, stage = pipeline.dual_stage(spec, problem, **kwargs)
    return spec, problem, pot, stage


def torch_threads(spec) -> None:
    import torch

    torch.set_num_threads(int(getattr(spec, "num_threads", None) or 1))


def accuracy(name: str, metrics: dict[str, str]) -> dict:
    """The cell's SCONES number (and its protocol's floor, independent coupling) where one is recorded."""
    base = name.removesuffix("_steps100")
    if name in metrics:
        m = json.loads(Path(metrics[name]).read_text())
        out = {"source": metrics[name]}
        meth = m.get("methods", {})
        if "conditional" in m:
            cb = m["conditional"]["cbw_uvp_percent"]
            out.update(metric="cBW-UVP %", scones=cb.get("scones"), floor=cb.get("exact"),
                       independent=cb.get("independent"))
        elif "bw_uvp" in meth.get("scones", {}):
            out.update(metric="BW-UVP", scones=meth["scones"]["bw_uvp"], floor=meth.get("exact", {}).get("bw_uvp"),
                       independent=meth["independent"]["bw_uvp"])
        elif "joint_raw_energy_to_pot_plan" in meth.get("scones", {}):
            out.update(metric="joint raw energy to POT plan", scones=meth["scones"]["joint_raw_energy_to_pot_plan"],
                       floor=m.get("pot_reference", {}).get("joint_raw_energy_floor"),
                       independent=meth["independent"]["joint_raw_energy_to_pot_plan"])
        elif "label_consistency" in meth.get("scones", {}):
            out.update(metric="label consistency", scones=meth["scones"]["label_consistency"],
                       independent=meth.get("independent", {}).get("label_consistency"))
        return out
    path = ROOT / "docs" / "results" / "fidelity" / "cells" / f"{base}.json"
    if path.exists() and base == name:
        c = json.loads(path.read_text())
        return {"source": str(path.relative_to(ROOT)), "metric": c.get("metric"), "scones": c.get("scones"),
                "floor": c.get("floor"), "independent": c.get("independent")}
    return {}


def evaluate_cell(name: str, overrides: list[str], train: bool, extra: list[str]) -> dict:
    import torch

    from scones.ot.health import dual_health

    t0 = time.process_time()
    spec, problem, pot, stage = load_dual([*overrides, *extra], train)
    load_cpu = time.process_time() - t0
    if hasattr(pot, "eval"):
        pot.eval()
    n = int(spec.eval.settings.dual_health_samples) or 2000
    g = torch.Generator().manual_seed(spec.seed + 4)  # the draw of experiments.pipeline.assess_dual
    x, y = problem.source.sample(n, generator=g), problem.target.sample(n, generator=g)
    t1 = time.process_time()
    h = dual_health(pot, x, y, moments=True)
    out = {"cell": name, "overrides": [*overrides, *extra], "stage": stage.dir.name, "lam": float(pot.regularizer.lam),
           "regularizer": pot.regularizer.name, "n": n, "learned": h, "cpu_s": round(time.process_time() - t1, 1),
           "load_cpu_s": round(load_cpu, 1)}
    if hasattr(problem.source, "cov_np") and hasattr(problem.target, "cov_np") and pot.regularizer.name == "kl":
        from scones.ot.gaussian import ExactGaussianPotentials

        exact = ExactGaussianPotentials(problem.source.cov_np, problem.target.cov_np, pot.regularizer.lam)
        out["exact"] = dual_health(exact, x, y, moments=True)
    elif hasattr(problem.target, "benchmark") and pot.regularizer.name == "kl":
        from scones.ot.health import marginal_violation

        t2 = time.process_time()
        exact = MixtureExactPsi(problem.target.benchmark, pot)
        out["exact"] = {"marginal": marginal_violation(exact, x, y), "n_mc": exact.n_mc,
                        "cpu_s": round(time.process_time() - t2, 1)}
    return out


class MixtureExactPsi:
    """The mixture benchmark's exact ψ* = λ(log g − log p1) (marginal check only: values, no derivatives), log p1 by
    the Monte-Carlo integral of ``scripts/error_budget.py`` (``NoisedTargetScore``, exact Gaussian inner integrals,
    ``n_mc`` draws per component; 256 keeps its own error below the check's noise at D = 64, ε = 1, where 32 does
    not: docs/results.md, "Dual health")."""

    def __init__(self, bench, pot, n_mc: int = 256, seed: int = 6) -> None:
        import torch

        from scripts.error_budget import NoisedTargetScore

        self.bench, self.cost, self.regularizer, self.n_mc = bench, pot.cost, pot.regularizer, int(n_mc)
        self.log_p1 = NoisedTargetScore(bench, self.n_mc, torch.Generator().manual_seed(seed))

    def psi(self, y):
        import torch

        b = self.bench
        y64 = y.double()
        log_g = torch.logsumexp(b.log_q[None] - 0.5 * (b._maha(y64, b.pot_precs) + torch.logdet(b.pot_covs)[None]), 1)
        return b.lam * (log_g - self.log_p1.log_density(y64, 0.0, block=250))


def _f(v, nd=3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "✓" if v else "✗"
    return f"{v:.{nd}g}" if isinstance(v, float) else str(v)


def verdict(passes) -> str:
    return {True: "pass", False: "**FAIL**", None: "cannot judge"}[passes]


def table(rows: list[dict]) -> str:
    head = ("| cell | dual stage | λ | V (marginal χ²) | noise N = N_x + N_y | threshold 2N + τ | detectable "
            "| ESS median / hm | marginal | moments (threshold) | **converged** | exact ψ: V / N "
            "| SCONES (floor, independent) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        h = r["learned"]
        mg, mo = h["marginal"], h.get("moments")
        mo = mo if mo and "violation" in mo else None
        ex = r.get("exact")
        acc = r.get("accuracy", {})
        acc_s = "–"
        if acc.get("scones") is not None:
            acc_s = f"{_f(acc['scones'])} ({_f(acc.get('floor'))}, {_f(acc.get('independent'))})"
            acc_s += f" {acc.get('metric', '')}"
        mo_s = f"{_f(mo['violation'])} ({_f(mo['threshold'])}) {'✓' if mo['passes'] else '✗'}" if mo else "–"
        conv = {True: "yes", False: "**no**", None: "cannot judge"}[h["converged"]] + f" ({h['method']})"
        ex_s = "–"
        if ex:
            em = ex["marginal"]
            ex_s = f"{_f(em['violation'])} / {_f(em['noise'])} {verdict(em['passes'])}"
        det = _f(mg["detectable"]) if mg["detectable"] is not None else "∞"
        lines.append(
            f"| {r['cell']} | {r['stage'].removeprefix('dual-')} | {_f(r['lam'])} | {_f(mg['violation'])} "
            f"| {_f(mg['noise'])} = {_f(mg['noise_sources'], 2)} + {_f(mg['noise_pool'], 2)} | {_f(mg['threshold'])} "
            f"| {det} | {_f(mg['ess'])} / {_f(mg['ess_hm'])} | {verdict(mg['passes'])} | {mo_s} "
            f"| {conv} | {ex_s} | {acc_s} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", nargs="*", default=None, help=f"cells (default: all cached): {', '.join(CELLS)}")
    ap.add_argument("--train", action="store_true", help="train a dual stage that is not cached")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "dual_health"))
    ap.add_argument("--metrics", nargs="*", default=[], help="NAME=path/to/metrics.json for the SCONES column")
    ap.add_argument("--summary", action="store_true", help="only print the table of the JSONs in --out")
    ap.add_argument("overrides", nargs="*", help="extra overrides for every cell (after --)")
    args = ap.parse_args(argv)
    logging_quiet()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = dict(kv.split("=", 1) for kv in args.metrics)
    names = args.cells or [c for c in CELLS if not c.endswith("_steps100")]
    extra = ["num_threads=1", *args.overrides]
    rows = []
    for name in names:
        path = out / f"{name}.json"
        if args.summary:
            if path.exists():
                rows.append(json.loads(path.read_text()))
            continue
        if name not in CELLS:
            raise SystemExit(f"unknown cell {name!r}; known: {', '.join(CELLS)}")
        t = time.time()
        try:
            r = evaluate_cell(name, CELLS[name], args.train, extra)
        except FileNotFoundError as e:
            print(f"{name}: skipped ({e})", file=sys.stderr)
            continue
        r["accuracy"] = accuracy(name, metrics)
        r["wall_s"] = round(time.time() - t, 1)
        path.write_text(json.dumps(r, indent=1, default=float) + "\n")
        rows.append(r)
        h = r["learned"]
        mg = h["marginal"]
        print(f"{name}: V={mg['violation']:.4g} noise={mg['noise']:.4g} ess={h['ess']:.3g} converged={h['converged']} "
              f"({h['method']}) cpu={r['cpu_s']} s", file=sys.stderr, flush=True)
    print(table(rows))
    return 0


def logging_quiet() -> None:
    import logging
    import warnings

    logging.getLogger().setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")


if __name__ == "__main__":
    raise SystemExit(main())
