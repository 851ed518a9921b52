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

Writes ``<out>/gaussian_d<D>_lam<λ>.json`` and prints a table. With ``--eps`` instead of ``--lam`` the script
budgets a mixture-benchmark cell (the mixture part at the end of this file, ``mixture_main``). The functions are
importable (``budget_cell``) so
that other benchmarks can reuse the pattern.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

log = logging.getLogger("error_budget")


def compose(overrides: list[str]):
    from experiments.run import compose_config

    return compose_config(overrides, ROOT / "configs")


def ula_samples(pot, prior_score, x, y0, sampler: dict, batch_size: int, seed: int) -> torch.Tensor:
    from scones.sampling.conditional import sample_conditional

    g = torch.Generator().manual_seed(seed)
    return sample_conditional(prior_score, pot, x, y0, sampler, batch_size, g)


def budget_cell(dim: int, lam: float, overrides: list[str], out_dir: Path) -> dict:
    from omegaconf import OmegaConf

    from experiments import pipeline
    from experiments.startup import read_run
    from scones.metrics.bw_uvp import bw_uvp_samples
    from scones.ot.barycentric import potential_conditional_mean
    from scones.ot.gaussian import ExactGaussianPotentials, entropic_joint_covariance
    from scones.ot.health import dual_health
    from scones.sampling.conditional import ExactPriorScore

    tag = f"gaussian_d{dim}_lam{lam:g}"
    cfg = compose(["+experiment=gaussian", f"data.dim={dim}", f"regularizer.lam={lam:g}", *overrides])
    run_dir = ROOT / "outputs" / "error_budget" / tag
    cpu = {}
    t0 = time.process_time()
    stage_cpu = {}
    orig = {name: getattr(pipeline, name) for name in ("dual_stage", "bp_stage", "evaluate")}

    def timed(name):
        def wrapper(*a, **k):
            s = time.process_time()
            try:
                return orig[name](*a, **k)
            finally:
                stage_cpu[name] = round(time.process_time() - s, 1)

        return wrapper

    for name in orig:
        setattr(pipeline, name, timed(name))
    try:
        metrics = pipeline.run(cfg, run_dir)
    finally:
        for name, fn in orig.items():
            setattr(pipeline, name, fn)
    cpu["pipeline"] = round(time.process_time() - t0, 1)
    cpu.update({k.replace("_stage", ""): v for k, v in stage_cpu.items()})

    # rebuild what the run used (all stages are cached now)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    torch.set_num_threads(int(cfg.get("num_threads") or torch.get_num_threads()))
    problem = pipeline.build_problem(cfg)
    source, target, cost, regularizer = problem
    spec = read_run(cfg)
    learned, dual = pipeline.dual_stage(spec, problem)
    bp_net, _ = pipeline.bp_stage(spec, problem, learned, dual)
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
        s = time.process_time()
        ys[name] = fn()
        sample_cpu[name] = round(time.process_time() - s, 1)

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
    if "--eps" in sys.argv[1:]:  # mixture benchmark cell (the mixture part below)
        mixture_main(sys.argv[1:])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, required=True)
    p.add_argument("--lam", type=float, required=True)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "error_budget")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides after --")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    print_budget(budget_cell(a.dim, a.lam, a.overrides, a.out))


# ============================================================================================ mixture part

MIXTURE_DOC = """Error budget of SCONES on the EOT mixture benchmark: swap in oracles one at a time (issue 13).

SCONES samples π(y | x) with the conditional score s_θ(y, σ_i) + G_θ(x, y): a learned noise-conditional target
score s_θ and the learned compatibility gradient G_θ = ∇_y log H_θ(x, y) = (∇ψ_θ(y) + 2(x − y))/λ, run through the
configured sampler (annealed Langevin, BP init). On the benchmark both pieces have oracles:

- S*(y, σ) = ∇ log (p1 ∗ N(0, σ²I))(y), the exact noised target score, by importance sampling over the source with
  an exact Gaussian proposal per mixture component (consistent, ``--n-mc`` draws per component; see
  :func:`noised_target_score`);
- G*(x, y) = ∇_y log π*(y | x) − ∇ log p1(y) (exact conditional score minus S*(y, 0)), the exact compatibility
  gradient (exact potentials of the construction: ψ = λ(log g − log p1)).

Variants, all with the same sampler, initialisation, test inputs and noise:

    scones        s_θ + G_θ            the method
    exact_score   S*  + G_θ            only the dual is learned   -> scones − exact_score ≈ cost of the score
    exact_dual    s_θ + G*             only the score is learned  -> scones − exact_dual  ≈ cost of the dual
    exact_both    S*  + G*             nothing learned            -> exact_both − floor  = cost of the sampler
    smoothed      ∇ log (π*(·|x) ∗ N(0, σ_i² I))   the ideal annealed conditional (a sampler reference)
    init_learned  the chain starts alone, no Langevin step (``sampler.init``: with ``resample``, pool samples
                  resampled by the learned H_θ(x, ·))               -> what the learned dual's weights give
    exact_cond    the smoothed exact conditional score from the learned starts (same y0 as scones): the
                  sampler with everything exact but its initialisation; scones − exact_cond = the joint cost
                  of s_θ + G_θ (the split needs S*, which is too noisy where the plan is sharp in D ≥ 16:
                  check ``oracle_noise`` in the JSON)
    init_exact    the same with the exact H*(x, ·) = π*(·|x)/p1 (for ``resample``; else = init_learned)
                                                                    -> the pool's own finite-sample cost

plus the exact-sample floor of the same protocol and, for scale, BP and the independent coupling. Per variant the
JSON also holds the per-input values (``per_x_percent``), the total-variation error of the mode weights
(``mode_weight_tv``: each sample assigned to its most likely component of π*(·|x), mean/max over inputs), the
effective sample size of the learned resampling weights per input (``resample_ess``), and the relative errors of the
learned pieces on plan samples (``relative_mse``; ``oracle_noise_S*_64_vs_64`` says whether S* is usable: where the
plan is sharp in D ≥ 16 two estimates of S* disagree and only ``exact_cond``/``cond_score_sigma*`` are meaningful).
A variant with a learned piece reuses that piece from the stage cache (training it the first time, like
``experiments.run``).

    python scripts/error_budget.py --dim 2 --eps 1
    python scripts/error_budget.py --dim 16 --eps 1 --variants scones exact_both -- sampler.n_steps_each=200

Writes ``<out>/mixture_d{D}_eps{ε}[_tag].json`` (default out: docs/results/error_budget). One thread.
"""

VARIANTS = ("scones", "exact_score", "exact_dual", "exact_both", "smoothed", "init_learned", "init_exact",
            "exact_cond")


def _iso(mats: torch.Tensor, what: str) -> torch.Tensor:
    """Scalar variances of isotropic ``(K, D, D)`` (or ``(D, D)``) matrices; refuses anything else."""
    m = mats if mats.ndim == 3 else mats[None]
    v = torch.diagonal(m, dim1=-2, dim2=-1)
    if not torch.allclose(m, torch.diag_embed(v)) or not torch.allclose(v, v[:, :1].expand_as(v)):
        raise SystemExit(f"error_budget: the oracle needs isotropic {what} (our seeded instances are)")
    return v[:, 0]


class NoisedTargetScore:
    r"""S*(y, σ) = ∇_y log (p1 ∗ N(0, σ² I))(y) for an instance with isotropic source and potential covariances.

    p1_σ(y) = Σ_k ∫ p0(x) w_k(x) N(y; α_k + β_k x, v_k I) dx with v_k = c_k + σ², w_k(x) = q_k N(x; m_k, u_k I) / Z̃(x),
    u_k = s_k² + ε, Z̃(x) = Σ_l q_l N(x; m_l, u_l I). For each k the numerator p0(x) q_k N(x; m_k, u_k) N(y; α_k + β_k x,
    v_k) is Gaussian in x: integrate it exactly (log mass L_k(y)), draw ``n_mc`` x's from it, weight by 1/Z̃(x). Then
    S* = Σ_{k,j} ω_kj (α_k + β_k x_kj − y) / v_k with ω_kj ∝ exp(L_k(y)) / Z̃(x_kj), normalised over (k, j).
    """

    def __init__(self, bench, n_mc: int = 32, generator: torch.Generator | None = None) -> None:
        self.b, self.n_mc, self.g = bench, int(n_mc), generator
        self.a2 = float(_iso(bench.source.cov64, "source covariance")[0])
        if float(bench.source.mean64.abs().max()) > 0:
            raise SystemExit("error_budget: the oracle assumes a zero-mean source (our seeded instances)")
        self.u = _iso(bench.pot_covs, "potential covariances") + bench.eps  # (K,)
        self.c = _iso(bench.cond_covs, "conditional covariances")  # (K,)
        self.beta = _iso(bench.cond_slope, "conditional slopes")  # (K,)
        self.alpha = bench.cond_bias  # (K, D)

    def __call__(self, y: torch.Tensor, sigma: float) -> torch.Tensor:
        return self._terms(y, sigma)[0]

    def log_density(self, y: torch.Tensor, sigma: float = 0.0, block: int = 2000) -> torch.Tensor:
        """log p1_σ(y) up to a constant, ``(n,)`` float64 (Monte-Carlo, same draws as the score)."""
        return torch.cat([self._terms(y[i : i + block], sigma)[1] for i in range(0, y.shape[0], block)])

    def _terms(self, y: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        b, d = self.b, self.b.dim
        y64 = y.detach().to("cpu", torch.float64)
        n, K = y64.shape[0], b.n_components
        v = self.c + sigma**2  # (K,)
        # x-precision of p0 · N(x; m_k, u_k) · N(y; α_k + β_k x, v_k): P_k = 1/a² + 1/u_k + β_k²/v_k (scalar)
        prec = 1.0 / self.a2 + 1.0 / self.u + self.beta**2 / v
        r = y64[:, None, :] - self.alpha[None]  # (n, K, D): y − α_k
        lin = b.pot_means[None] / self.u[None, :, None] + self.beta[None, :, None] * r / v[None, :, None]
        mean = lin / prec[None, :, None]  # (n, K, D)
        # log ∫ = log q_k − ½[ |m_k|²/u_k + |r|²/v_k − |lin|²/P_k ] − (D/2) log(a² u_k v_k P_k) − D log 2π … (+ const)
        quad = (b.pot_means**2).sum(-1)[None] / self.u[None] + (r**2).sum(-1) / v[None] - (lin**2).sum(-1) / prec[None]
        log_mass = b.log_q[None] - 0.5 * quad - 0.5 * d * torch.log(self.a2 * self.u * v * prec)[None]
        z = torch.randn(n, K, self.n_mc, d, generator=self.g, dtype=torch.float64)
        x = mean[:, :, None, :] + z / prec.sqrt()[None, :, None, None]  # (n, K, M, D)
        m = b.pot_means  # (K', D); |x − m|² = |x|² − 2 x·m + |m|² without an (n, K, M, K', D) tensor
        maha = ((x**2).sum(-1, keepdim=True) - 2 * x @ m.T + (m**2).sum(-1)) / self.u  # (n, K, M, K')
        log_zt = torch.logsumexp(b.log_q - 0.5 * maha - 0.5 * d * torch.log(2 * math.pi * self.u), dim=-1)
        logw = log_mass[:, :, None] - log_zt  # (n, K, M)
        w = torch.softmax(logw.reshape(n, -1), dim=1).reshape(n, K, self.n_mc)
        drift = (self.alpha[None, :, None, :] + self.beta[None, :, None, None] * x - y64[:, None, None, :])
        s = (w[..., None] * drift / v[None, :, None, None]).sum((1, 2))
        return s.to(y), torch.logsumexp(logw.reshape(n, -1), dim=1) - math.log(self.n_mc)


def smoothed_conditional_score(bench, x: torch.Tensor, y: torch.Tensor, sigma: float) -> torch.Tensor:
    """∇_y log (π*(· | x) ∗ N(0, σ² I))(y): the conditional mixture with component covariances Σ_k + σ² I."""
    c = _iso(bench.cond_covs, "conditional covariances") + sigma**2  # (K,)
    x64, y64 = x.to("cpu", torch.float64), y.to("cpu", torch.float64)
    diff = y64[:, None, :] - bench.component_means(x64)  # (n, K, D)
    logp = bench.component_log_weights(x64) - 0.5 * (diff**2).sum(-1) / c - 0.5 * bench.dim * torch.log(c)
    resp = torch.softmax(logp, dim=1)
    return (-(resp[..., None] * diff / c[None, :, None]).sum(1)).to(y)


def mixture_main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=MIXTURE_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, required=True)
    ap.add_argument("--eps", type=float, required=True)
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--n-x", type=int, default=20, help="test inputs (the first n of the benchmark's)")
    ap.add_argument("--n-per-x", type=int, default=None, help="chains per input (default: the protocol rule)")
    ap.add_argument("--n-mc", type=int, default=16, help="importance draws per component for S*")
    ap.add_argument("--n-mc-pool", type=int, default=1024,
                    help="importance draws per component for log p1 on the resampling pool (exact H*)")
    ap.add_argument("--tag", default="", help="suffix of the output file name")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "error_budget")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of +experiment=eot_benchmark (after --)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)

    from experiments import pipeline
    from experiments.evaluation import conditional_protocol
    from experiments.run import compose_config
    from scones.metrics.cbw_uvp import cbw_uvp
    from scones.ot.dual import grad_log_compatibility
    from scones.sampling.conditional import sample_conditional

    overrides = ["+experiment=eot_benchmark", f"data.dim={a.dim}", f"data.eps={a.eps:g}", "num_threads=1",
                 f"paths.output_root={ROOT / 'outputs'}", *a.overrides]
    cfg = compose_config(overrides, ROOT / "configs")
    from experiments.startup import start_job
    from scones.coupling import Coupling
    from scones.sampling.conditional import initial_chains

    problem, spec, _ = start_job(cfg)  # config values `auto`, as experiments.run does
    source, target, cost, regularizer = problem
    bench = target.benchmark
    learned = {v for v in a.variants if v in ("scones", "exact_score", "exact_dual", "init_learned",
                                                  "exact_cond")}
    t0 = time.process_time()
    pot = bp_net = prior = None
    if learned or cfg.sampler.init.startswith("bp"):
        pot, dual_stage = pipeline.dual_stage(spec, problem)
        bp_net, _ = pipeline.bp_stage(spec, problem, pot, dual_stage)
    if {"scones", "exact_dual"} & learned:
        prior, _ = pipeline.score_stage(spec, target)
    train_cpu = time.process_time() - t0

    _, rule_k = conditional_protocol(spec.eval.settings, a.dim)
    k = a.n_per_x or rule_k
    x = bench.test_inputs(max(a.n_x, 1)).float()
    mean, cov = bench.conditional_moments(x)
    var = bench.target_variance
    xr = x.repeat_interleave(k, dim=0)
    s = spec.sampler
    sig_list = s.noise_levels() or [0.0]
    oracle = NoisedTargetScore(bench, a.n_mc, torch.Generator().manual_seed(1))

    def s_star(y, level):  # exact noised target score at the sampler's σ_level (σ = 0 for ULA)
        return oracle(y, sig_list[level] if s.kind == "annealed" else 0.0)

    def g_star(xb, y):  # exact ∇_y log H = ∇ log π*(y|x) − ∇ log p1(y)
        return (bench.conditional_score(xb, y) - oracle(y, 0.0).double()).to(y)

    pool = target.sample(s.pool_size, generator=torch.Generator().manual_seed(0))  # the Coupling's pool

    pool_log_p1 = []  # log p1 on the pool, computed once (the expensive part of the exact resampling)

    def exact_resample(gen):  # y0 = pool_j, j ~ H*(x, pool_j) ∝ π*(pool_j | x) / p1(pool_j)
        if not pool_log_p1:
            pool_log_p1.append(NoisedTargetScore(bench, a.n_mc_pool, torch.Generator().manual_seed(6)).log_density(
                pool, block=500))
        log_p1 = pool_log_p1[0]
        y0 = torch.empty_like(xr)
        for i in range(x.shape[0]):
            xi = x[i : i + 1].expand(pool.shape[0], -1)
            logw = bench.conditional_log_prob(xi, pool) - log_p1
            j = torch.multinomial(torch.softmax(logw, 0).float(), k, replacement=True, generator=gen)
            y0[i * k : (i + 1) * k] = pool[j]
        return y0

    def run_variant(name: str) -> torch.Tensor:
        with torch.no_grad():
            y_bp = torch.cat([bp_net(xr[i : i + 10000]) for i in range(0, len(xr), 10000)]) if bp_net is not None \
                else bench.conditional_mean(xr).float()
        g2 = torch.Generator().manual_seed(2)
        frac = None  # sampler.refine=ess: the learned plan's ESS sets each chain's share of the schedule
        if s.init == "resample" and name in ("exact_dual", "exact_both", "smoothed", "init_exact"):  # exact H
            y0 = exact_resample(g2)
        elif pot is not None:
            y0, frac = Coupling(pot, source, target, prior_score=prior or s_star, sampler=s,
                                batch_size=int(cfg.eval.batch_size)).start(xr, y_bp, g2)
        else:
            y0 = initial_chains(s, xr, y_bp, g2)
        gen = torch.Generator().manual_seed(3)
        bs = int(cfg.eval.batch_size)
        if name.startswith("init_"):
            return y0
        if name == "scones":
            return sample_conditional(prior, pot, xr, y0, s, bs, gen, fraction=frac)
        if name == "exact_score":
            return sample_conditional(s_star, pot, xr, y0, s, bs, gen, fraction=frac)
        # variants with G* or the smoothed conditional: the whole conditional score in the prior slot, no potentials
        out = []
        for i in range(0, xr.shape[0], bs):
            xb = xr[i : i + bs]

            def fn(y, lv, xb=xb):
                if name == "exact_dual":
                    return prior(y, lv) + g_star(xb, y)
                if name == "exact_both":
                    return s_star(y, lv) + g_star(xb, y)
                # smoothed / exact_cond: the ideal annealed conditional
                return smoothed_conditional_score(bench, xb, y, sig_list[lv] if s.kind == "annealed" else 0.0)

            out.append(sample_conditional(fn, None, xb, y0[i : i + bs], s, bs, gen,
                                          fraction=None if frac is None else frac[i : i + bs]))
        return torch.cat(out)

    exact = bench.sample_conditional(x, k, generator=torch.Generator().manual_seed(4))
    res = {"dim": a.dim, "eps": a.eps, "n_x": int(x.shape[0]), "n_per_x": k, "overrides": a.overrides,
           "sampler": s.model_dump(),
           "train_cpu_s": round(train_cpu, 1), "cbw_uvp_percent": {}, "se_percent": {}, "cpu_s": {}}

    w_exact = bench.component_log_weights(x).exp()  # (n_x, K) exact mode weights of π*(·|x)
    c_iso = _iso(bench.cond_covs, "conditional covariances")

    def mode_tv(samples):  # total variation between the exact mode weights and the samples' mode frequencies
        ys = samples.reshape(-1, a.dim).double()
        logp = (bench.component_log_weights(xr) - 0.5 * ((ys[:, None, :] - bench.component_means(xr)) ** 2).sum(-1)
                / c_iso - 0.5 * a.dim * torch.log(c_iso))
        onehot = torch.nn.functional.one_hot(logp.argmax(1), w_exact.shape[1]).double()
        freq = onehot.reshape(x.shape[0], k, -1).mean(1)
        return 0.5 * (freq - w_exact).abs().sum(1)  # (n_x,)

    def score_of(name, samples):
        per = 100 * cbw_uvp(samples.reshape(x.shape[0], k, -1), mean, cov, var, per_x=True)
        tv = mode_tv(samples)
        res.setdefault("mode_weight_tv", {})[name] = [round(float(tv.mean()), 4), round(float(tv.max()), 4)]
        res["cbw_uvp_percent"][name] = round(float(per.mean()), 4)
        res["se_percent"][name] = round(float(per.std(ddof=1) / math.sqrt(len(per))), 4) if len(per) > 1 else None
        res.setdefault("per_x_median_max_percent", {})[name] = [round(float(np.median(per)), 4),
                                                                 round(float(np.max(per)), 4)]
        res.setdefault("per_x_percent", {})[name] = [round(float(v), 3) for v in per]
        print(f"{name:12s} {res['cbw_uvp_percent'][name]:8.3f} ± {res['se_percent'][name]}  (per x median "
              f"{float(np.median(per)):.3f}, max {float(np.max(per)):.3f}; mode-weight TV mean {float(tv.mean()):.3f}, "
              f"max {float(tv.max()):.3f})  "
              f"({res['cpu_s'].get(name, 0):.0f} s CPU)", flush=True)

    if prior is not None or pot is not None:  # direct errors of the learned pieces on plan samples (x, y) ~ π*
        xs, ys = bench.sample_plan(2000, generator=torch.Generator().manual_seed(7))
        ref = NoisedTargetScore(bench, 64, torch.Generator().manual_seed(8))
        errs = {}
        if pot is not None:
            gt = (bench.conditional_score(xs, ys) - ref(ys.double(), 0.0)).float()
            gl = grad_log_compatibility(pot, xs, ys)
            errs["compat_grad"] = float(((gl - gt) ** 2).sum(1).mean() / (gt**2).sum(1).mean())
        if prior is not None and pot is not None:  # s_θ + G_θ against the exact smoothed conditional score
            for lv, sg in enumerate(sig_list):
                yn = ys + sg * torch.randn(ys.shape, generator=torch.Generator().manual_seed(9 + lv))
                ct = smoothed_conditional_score(bench, xs, yn, sg).float()
                with torch.no_grad():
                    cl = prior(yn, lv)
                cl = cl + grad_log_compatibility(pot, xs, yn)
                errs[f"cond_score_sigma{sg:.3g}"] = float(((cl - ct) ** 2).sum(1).mean() / (ct**2).sum(1).mean())
        if prior is not None:
            for lv, sg in enumerate(sig_list):
                yn = ys + sg * torch.randn(ys.shape, generator=torch.Generator().manual_seed(9 + lv))
                st = ref(yn.double(), sg).float()
                with torch.no_grad():
                    sl = prior(yn, lv)
                errs[f"score_sigma{sg:.3g}"] = float(((sl - st) ** 2).sum(1).mean() / (st**2).sum(1).mean())
        ref2 = NoisedTargetScore(bench, 64, torch.Generator().manual_seed(10))(ys.double(), 0.0)
        r1 = ref(ys.double(), 0.0)
        errs["oracle_noise_S*_64_vs_64"] = float(((r1 - ref2) ** 2).sum(1).mean() / (r1**2).sum(1).mean())
        res["relative_mse"] = {kk: round(vv, 4) for kk, vv in errs.items()}
        print("relative MSE of the learned pieces on plan samples:", json.dumps(res["relative_mse"]), flush=True)
    if pot is not None and s.init == "resample":  # effective sample size of the learned weights per test input
        from scones.sampling.conditional import resampled_chains

        ess = resampled_chains(pot, x, pool, torch.Generator().manual_seed(2))[1]
        res["resample_ess"] = [round(float(v), 1) for v in ess]
        print(f"resample ESS of H_θ(x, ·) on the {pool.shape[0]} pool samples: median {float(ess.median()):.1f}, "
              f"min {float(ess.min()):.1f}", flush=True)
    score_of("floor", exact)
    if bp_net is not None:
        with torch.no_grad():
            score_of("bp", bp_net(x).reshape(x.shape)[:, None, :].expand(-1, k, -1).reshape(-1, a.dim))
    score_of("independent", bench.sample_target(x.shape[0] * k, generator=torch.Generator().manual_seed(5)))
    for name in a.variants:
        t = time.process_time()
        try:
            y = run_variant(name)
        except Exception as e:  # noqa: BLE001 - a diverging variant is a result too
            res["cbw_uvp_percent"][name] = None
            res.setdefault("errors", {})[name] = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            print(f"{name:12s} failed: {res['errors'][name]}", flush=True)
            continue
        res["cpu_s"][name] = round(time.process_time() - t, 1)
        score_of(name, y)
    c = res["cbw_uvp_percent"]
    if all(c.get(v) is not None for v in ("scones", "exact_score", "exact_dual", "exact_both")):
        res["budget_points"] = {
            "score (scones - exact_score)": round(c["scones"] - c["exact_score"], 3),
            "dual (scones - exact_dual)": round(c["scones"] - c["exact_dual"], 3),
            "sampler (exact_both - floor)": round(c["exact_both"] - c["floor"], 3),
        }
        print(json.dumps(res["budget_points"]))
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"mixture_d{a.dim}_eps{a.eps:g}{'_' + a.tag if a.tag else ''}.json"
    path.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {path}")



if __name__ == "__main__":
    main()
