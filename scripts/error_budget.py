"""Error budget of a Gaussian → Gaussian SCONES cell: swap in oracles one at a time (issue 13).

Runs (or reuses from the stage cache) the pipeline of ``+experiment=gaussian data.dim=D regularizer.lam=λ`` with
its defaults, then evaluates on the same n sources x (the run's eval protocol):

==================== ==========================================================================================
``scones``           the run as is: learned ψ, exact target score, ULA from the learned BP
``learned_psi_long`` learned ψ, exact score, ULA with 4× the steps at half the step size (sampler converged):
                     the error of the learned dual alone
``exact_psi``        closed-form potentials (:class:`scones.ot.gaussian.ExactGaussianPotentials`, i.e. the exact
                     ∇_y log H = −S⁻¹(y − Mx) + B⁻¹y), exact score, the run's ULA from the learned BP: the
                     sampler's own error (exact-score ULA alone)
``exact_psi_exact_init`` the same started at the exact conditional mean Mx: the sampler with a perfect BP init
``exact``            exact conditional samples: the protocol's finite-sample floor
``bp``               the learned BP network;  ``bp_phi``: x − ∇φ(x)/2 from the learned φ without a network;
                     ``bp_exact``: the exact barycentric map Mx;  ``independent``: y ~ q independent of x
==================== ==========================================================================================

plus the dual's health diagnostic for the learned and the exact potentials, and the CPU time of each stage.

    python scripts/error_budget.py --dim 16 --lam 1 -- num_threads=1
    python scripts/error_budget.py --dim 16 --lam 4 --out docs/results/error_budget -- num_threads=1 dual.steps=6000

Writes ``<out>/gaussian_d<D>_lam<λ>.json`` and prints a table. The functions are importable (``budget_cell``) so
that other benchmarks can reuse the pattern.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

log = logging.getLogger("error_budget")


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from experiments.run import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def ula_samples(pot, prior_score, x, y0, sampler: dict, batch_size: int, seed: int) -> torch.Tensor:
    from scones.sampling.conditional import sample_conditional

    g = torch.Generator().manual_seed(seed)
    return sample_conditional(prior_score, pot, x, y0, sampler, batch_size, g)


def budget_cell(dim: int, lam: float, overrides: list[str], out_dir: Path) -> dict:
    from omegaconf import OmegaConf

    from experiments import pipeline
    from scones.metrics.bw_uvp import bw_uvp_samples
    from scones.models.barycentric import potential_conditional_mean
    from scones.ot.gaussian import ExactGaussianPotentials, entropic_joint_covariance
    from scones.ot.health import dual_health
    from scones.sampling.conditional import ExactPriorScore

    tag = f"gaussian_d{dim}_lam{lam:g}"
    cfg = compose(["+experiment=gaussian", f"data.dim={dim}", f"regularizer.lam={lam:g}", *overrides])
    run_dir = ROOT / "outputs" / "error_budget" / tag
    cpu = {}
    t0 = cpu_seconds()
    stage_cpu = {}
    orig = {name: getattr(pipeline, name) for name in ("dual_stage", "bp_stage", "evaluate")}

    def timed(name):
        def wrapper(*a, **k):
            s = cpu_seconds()
            try:
                return orig[name](*a, **k)
            finally:
                stage_cpu[name] = round(cpu_seconds() - s, 1)

        return wrapper

    for name in orig:
        setattr(pipeline, name, timed(name))
    try:
        metrics = pipeline.run(cfg, run_dir)
    finally:
        for name, fn in orig.items():
            setattr(pipeline, name, fn)
    cpu["pipeline"] = round(cpu_seconds() - t0, 1)
    cpu.update({k.replace("_stage", ""): v for k, v in stage_cpu.items()})

    # rebuild what the run used (all stages are cached now)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    torch.set_num_threads(int(cfg.get("num_threads") or torch.get_num_threads()))
    source, target, cost, regularizer = pipeline.build_problem(cfg)
    learned, dual = pipeline.dual_stage(cfg, source, target, cost, regularizer)
    bp_net, _ = pipeline.bp_stage(cfg, source, target, learned, dual)
    exact = ExactGaussianPotentials(source.cov_np, target.cov_np, lam)
    prior = ExactPriorScore(target)
    sigma = entropic_joint_covariance(source.cov_np, target.cov_np, lam)

    n = int(cfg.eval.n_samples)
    bs = int(cfg.eval.batch_size)
    g = torch.Generator().manual_seed(int(cfg.seed) + 1000)
    x = source.sample(n, generator=g)
    with torch.no_grad():
        y_bp = torch.cat([bp_net(xb).reshape(xb.shape) for xb in x.split(bs)])
    y_exact_mean = exact.barycentric(x)
    sampler = OmegaConf.to_container(cfg.sampler, resolve=True)
    long = {**sampler, "step_size": sampler["step_size"] / 2, "n_steps": 4 * int(sampler["n_steps"])}

    ys, sample_cpu = {}, {}

    def timed_sample(name, fn):
        s = cpu_seconds()
        ys[name] = fn()
        sample_cpu[name] = round(cpu_seconds() - s, 1)

    seed = int(cfg.seed) + 2000
    timed_sample("scones", lambda: ula_samples(learned, prior, x, y_bp, sampler, bs, seed))
    timed_sample("learned_psi_long", lambda: ula_samples(learned, prior, x, y_bp, long, bs, seed))
    timed_sample("exact_psi", lambda: ula_samples(exact, prior, x, y_bp, sampler, bs, seed))
    timed_sample("exact_psi_exact_init", lambda: ula_samples(exact, prior, x, y_exact_mean, sampler, bs, seed))
    rng = np.random.default_rng(int(cfg.seed))
    ys["exact"] = torch.from_numpy(exact.conditional.sample(x.double().numpy(), rng)).float()
    ys["bp"] = y_bp
    ys["bp_phi"] = torch.cat([potential_conditional_mean(learned, xb) for xb in x.split(bs)])
    ys["bp_exact"] = y_exact_mean
    ys["independent"] = target.sample(n, generator=g)
    bw = {k: bw_uvp_samples(np.hstack([x.double().numpy(), v.double().numpy()]), sigma) for k, v in ys.items()}

    gh = torch.Generator().manual_seed(int(cfg.seed) + 3000)
    hx, hy = source.sample(2000, generator=gh), target.sample(2000, generator=gh)
    health = {"learned": dual_health(learned, hx, hy), "exact": dual_health(exact, hx, hy)}
    out = {
        "cell": tag, "dim": dim, "lam": lam, "n": n, "overrides": overrides,
        "command": " ".join(["python scripts/error_budget.py", f"--dim {dim}", f"--lam {lam:g}", "--", *overrides]),
        "bw_uvp": bw, "health": health, "run_metrics_bw_uvp": {
            k: v.get("bw_uvp") for k, v in (metrics or {}).get("methods", {}).items()},
        "auto": (metrics or {}).get("auto"), "cpu_s": {**cpu, "sampling_oracles": sample_cpu},
        "sampler": sampler, "dual": OmegaConf.to_container(cfg.dual, resolve=True),
    }  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{tag}.json").write_text(json.dumps(out, indent=2, default=float))
    return out


def print_budget(out: dict) -> None:
    bw, fl = out["bw_uvp"], out["bw_uvp"]["exact"]
    print(f"\n== {out['cell']} (n = {out['n']}; BW-UVP, floor = exact samples {fl:.4f})")
    for k, v in bw.items():
        print(f"  {k:22s} {v:.5f}   ({v / fl:5.1f}x floor)")
    for k, h in out["health"].items():
        print(f"  health {k:8s} {h['health']:.4f} (threshold {h['threshold']:.4f}, converged {h['converged']})")
    print("  cpu s:", out["cpu_s"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, required=True)
    p.add_argument("--lam", type=float, required=True)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "error_budget")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides after --")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    print_budget(budget_cell(a.dim, a.lam, a.overrides, a.out))


if __name__ == "__main__":
    main()
