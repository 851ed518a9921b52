"""Settings rules (scones.autoconfig) per regime, the dual health diagnostic, and its report in metrics.json."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from scones import autoconfig
from scones.ot import KL, SquaredEuclidean
from scones.ot.gaussian import covariance_pair, entropic_conditional, exact_gaussian_potentials
from scones.ot.health import dual_health, moment_marginal_violation
from tests.helpers import make_cfg


def gaussian_scale(dim: int, lam: float) -> tuple[autoconfig.ProblemScale, np.ndarray]:
    """The rules' view of the Gaussian benchmark pair 0 (target samples) and the exact conditional covariance."""
    _, B = covariance_pair(dim, 0)
    y = np.random.default_rng(0).multivariate_normal(np.zeros(dim), B, size=4000)
    A, B = covariance_pair(dim, 0)
    return autoconfig.problem_scale(y, lam, 1.0, "kl"), entropic_conditional(A, B, lam).S


@pytest.mark.parametrize("dim,lam", [(2, 1.0), (16, 1.0), (16, 4.0), (16, 32.0), (64, 1.0), (64, 16.0), (64, 128.0)])
def test_rules_pick_a_stable_mixing_sampler_against_the_exact_conditional(dim, lam):
    """ULA on the exact conditional N(Mx, S): the rule's step must be small against S's smallest variance (stability
    and a stationary bias ≲ h/(2 s_min) of a few %) and its n_steps·h long against the largest (mixing from BP)."""
    p, S = gaussian_scale(dim, lam)
    s = np.linalg.eigvalsh(S)
    h, n = autoconfig.rule("sampler.step_size", p), autoconfig.rule("sampler.n_steps", p)
    assert h / s.min() <= 0.1, (h, s.min())  # bias h/(2 s_min) ≤ 5 %, far from the stability limit 2 s_min
    assert h / s.min() >= 0.005  # ... but not needlessly small
    assert n * h >= 3.0 * s.max(), (n, h, s.max())  # exp(-2·n·h/s_max) ≤ e⁻⁶ of the BP-init variance deficit
    assert 1000 <= n <= 20000


@pytest.mark.parametrize("dim,lam", [(2, 1.0), (16, 1.0), (16, 32.0), (64, 1.0), (64, 128.0)])
def test_rules_dual_and_eval_settings_per_regime(dim, lam):
    p, _ = gaussian_scale(dim, lam)
    r = {k: autoconfig.rule(k, p) for k in autoconfig.KEYS}
    assert r["dual.objective"] == "logmeanexp" and r["bp.estimator"] == "potential"
    sharp = p.sharpness > 4
    assert (lam == 1.0 and dim >= 16) <= sharp and (lam >= 2 * dim) <= (not sharp)
    assert r["dual.batch_size"] == (1000 if sharp else 500)
    # the weighted batch pairs up to the plan's information I = (d/2) log(1 + κ) ≈ 20 nats (converged at d = 16, λ = 1
    # and d = 64, λ = 16); plan samples from conditional chains beyond (d = 64, λ = 1: I ≈ 80), with fewer steps
    langevin = dim == 64 and lam == 1.0
    assert r["dual.estimator"] == ("langevin" if langevin else "pairs")
    if langevin:
        assert r["dual.steps"] == 2000
    else:
        assert r["dual.steps"] >= 3000 and (dim <= 16) == (r["dual.steps"] == 3000)
    # BW-UVP floor ~ d/n: the protocol keeps n/d >= 125 (d = 16: 2000; d = 64: 10⁴)
    assert r["eval.n_samples"] >= 2000 and r["eval.n_samples"] / dim >= 125
    assert autoconfig.rule("dual.objective", autoconfig.ProblemScale(dim, lam, 1.0, "chi2", 1, 1, 1)) == "dual"


def test_the_lam_2d_table_keeps_its_settings():
    """λ = 2d (docs/results.md table, measured with h = 0.05, 1000 steps): the same cost, a step within 2× (its
    stationary bias is bounded against the exact conditional in the test above)."""
    for dim in (2, 16):
        p, _ = gaussian_scale(dim, 2.0 * dim)
        assert autoconfig.rule("sampler.n_steps", p) == 1000
        assert 0.05 / 2 <= autoconfig.rule("sampler.step_size", p) <= 0.05 * 2
        assert autoconfig.rule("dual.batch_size", p) == 500 and autoconfig.rule("dual.steps", p) == 3000
        assert autoconfig.rule("eval.n_samples", p) == 2000


def test_langevin_estimator_rules_for_the_d64_lam1_regime():
    """d = 64, λ = 1: chains with the sampler's step, a burn-in after which the chains used (ages burn_in … 3 burn_in)
    lack on average ≤ 1 % of the widest exact conditional variance from their mean start (the rule's v_c ignores ψ's
    curvature and is 2× too small here: that is what the test checks against), 2000 steps; an explicit
    ``dual.estimator=pairs`` keeps the pairs' step count (the steps rule reads the estimator actually used)."""
    p, S = gaussian_scale(64, 1.0)
    out = autoconfig.resolve_auto({k: "auto" for k in autoconfig.KEYS}, p)
    assert out["dual.estimator"] == "langevin" and out["dual.steps"] == 2000 and out["dual.batch_size"] == 1000
    assert out["dual.langevin.step_size"] == out["sampler.step_size"]
    h, burn = out["dual.langevin.step_size"], out["dual.langevin.burn_in"]
    v = np.linalg.eigvalsh(S).max()
    rate = 2 * h / v  # the variance deficit of a chain started at the mean decays as exp(−rate·age)
    mean_deficit = (np.exp(-rate * burn) - np.exp(-rate * 3 * burn)) / (rate * 2 * burn)
    assert mean_deficit <= 0.01 and burn <= 1000, (mean_deficit, burn)
    kept = autoconfig.resolve_auto({"dual.estimator": "pairs", "dual.steps": "auto"}, p)
    assert kept == {"dual.steps": 6000}
    assert autoconfig.rule("dual.estimator", autoconfig.ProblemScale(64, 1.0, 1.0, "chi2", 1, 5, 10)) == "pairs"


def test_resolve_auto_only_touches_auto_values():
    p, _ = gaussian_scale(2, 1.0)
    out = autoconfig.resolve_auto({"dual.lr": "auto", "dual.steps": 10, "sampler.n_steps": "auto"}, p)
    assert set(out) == {"dual.lr", "sampler.n_steps"}
    with pytest.raises(KeyError, match="no rule"):
        autoconfig.rule("dual.nope", p)


def _pot(Qs, lam):
    from scones.ot.gaussian import QuadraticPotential

    return SimpleNamespace(
        phi=QuadraticPotential(Qs[0]), psi=QuadraticPotential(Qs[1]), cost=SquaredEuclidean(), regularizer=KL(lam)
    )


@pytest.mark.parametrize("dim,lam", [(2, 1.0), (8, 1.0), (8, 16.0)])
def test_health_passes_for_exact_potentials_and_fails_for_untrained_ones(dim, lam):
    """The closed-form potentials pass at any λ (the marginal check where it can judge, the moment identities
    where the plan is too sharp for it), and the untrained pair (φ = ψ = 0) is flagged."""
    from scones.data import RandomGaussian
    from scones.ot.gaussian import entropic_potentials

    src, tgt = RandomGaussian(dim, role="source"), RandomGaussian(dim, role="target")
    g = torch.Generator().manual_seed(0)
    x, y = src.sample(2000, generator=g), tgt.sample(2000, generator=g)
    Qf, Qg = entropic_potentials(src.cov_np, tgt.cov_np, lam)
    good = dual_health(_pot((Qf, Qg), lam), x, y)
    assert good["converged"] is True and good["method"] in ("marginal", "moments")
    bad = dual_health(_pot((0 * Qf, 0 * Qg), lam), x, y)
    assert bad["converged"] is False
    check = bad["marginal"] if bad["method"] == "marginal" else bad["moments"]
    assert check["violation"] > check["threshold"]
    # exact_gaussian_potentials are the same callables the oracles use
    phi, psi = exact_gaussian_potentials(src.cov_np, tgt.cov_np, lam)
    m = moment_marginal_violation(SimpleNamespace(phi=phi, psi=psi, cost=SquaredEuclidean(), regularizer=KL(lam)), x, y)
    assert m["violation"] <= 2 * m["noise"]


def test_chi2_health_is_the_marginal_check():
    from scones.ot.regularizers import ChiSquared

    lin = torch.nn.Linear(2, 1)
    f = lambda z: lin(z).squeeze(-1) + 5.0  # noqa: E731
    pot = SimpleNamespace(phi=f, psi=f, cost=SquaredEuclidean(), regularizer=ChiSquared(10.0))
    g = torch.Generator().manual_seed(0)
    h = dual_health(pot, torch.randn(300, 2, generator=g), torch.randn(300, 2, generator=g))
    assert h["method"] == "marginal" and h["health"] >= 0 and h["ess"] > 10 and "moments" not in h


def test_unconverged_dual_is_reported_in_metrics(tmp_path):
    """5 dual steps at d = 16, λ = 1 cannot converge: metrics.json says so (dual.converged false + a warning)."""
    from experiments.pipeline import run

    cfg = make_cfg(tmp_path, [
        "+experiment=gaussian", "data.dim=16", "regularizer.lam=1", "dual.steps=5", "bp.steps=5",
        "eval.n_samples=200", "sampler.n_steps=5", "eval.dual_health_samples=500",
    ])  # fmt: skip
    m = run(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    detail = saved["dual"]["health_detail"]
    check = detail["marginal"] if detail["method"] == "marginal" else detail["moments"]
    assert saved["dual"]["converged"] is False and check["violation"] > check["threshold"]
    assert any("unconverged" in w for w in saved["warnings"])
    assert "mean_H" in saved["dual"]
    # the auto rules were resolved and recorded (dual.batch_size/lr; the explicit dual.steps was kept)
    assert saved["auto"]["values"]["dual.batch_size"] == 1000 and "dual.steps" not in saved["auto"]["values"]
    assert m["auto"]["scale"]["sharpness"] > 4


def test_potential_bp_target_is_the_exact_barycentric_map_for_exact_potentials():
    """x − ∇φ(x)/2 with the closed-form φ is E[y | x] = Mx, and the oracle's E[H] = 1 (its φ constant is exact)."""
    from scones.data import RandomGaussian
    from scones.models.barycentric import BarycentricModule
    from scones.ot.barycentric import barycentric_loss, potential_conditional_mean
    from scones.ot.dual import violation
    from scones.ot.gaussian import ExactGaussianPotentials

    src, tgt = RandomGaussian(4, role="source"), RandomGaussian(4, role="target")
    pot = ExactGaussianPotentials(src.cov_np, tgt.cov_np, 1.0)
    g = torch.Generator().manual_seed(0)
    x = src.sample(500, generator=g)
    assert torch.allclose(potential_conditional_mean(pot, x), pot.barycentric(x), atol=1e-3)
    xs, ys = src.sample(200000, generator=g), tgt.sample(200000, generator=g)
    assert abs(float(pot.regularizer.density(violation(pot, xs, ys)).mean()) - 1.0) < 0.05
    net = torch.nn.Linear(4, 4)
    y = tgt.sample(64, generator=g)
    for est in ("seguy", "self_normalised", "potential"):
        loss, _ = BarycentricModule(net, pot, estimator=est).loss((x[:64], y))
        assert loss.ndim == 0 and torch.isfinite(loss)
        assert loss == barycentric_loss(pot, net(x[:64]), x[:64], y, est)  # the module's loss is the pure function
    with pytest.raises(ValueError, match="bp.estimator"):
        BarycentricModule(net, pot, estimator="nope")


@pytest.mark.parametrize("dim", [2, 16, 64])
def test_mixture_benchmark_refines_by_ess_only_above_d16(tmp_path, dim):
    """eot_benchmark's ``sampler.refine: auto``: ``ess`` at D = 64 (measured there, docs/results.md), the full
    refinement the D ≤ 16 cells were measured with at D = 2 and 16."""
    cfg = make_cfg(tmp_path, ["+experiment=eot_benchmark", f"data.dim={dim}"])
    assert cfg.sampler.refine == "auto" and cfg.sampler.init == "resample"
    p = autoconfig.ProblemScale(dim, 2.0, 1.0, "kl", 0.1, 1.0, 3.0)
    assert autoconfig.rule("sampler.refine", p) == ("ess" if dim > 16 else "all")


@pytest.mark.parametrize("dim,eps", [(2, 1.0), (16, 0.1), (16, 10.0), (64, 0.1), (64, 1.0), (64, 10.0)])
def test_mixture_benchmark_dual_rules(tmp_path, dim, eps):
    """eot_benchmark's ``dual.estimator/pairs/lr: auto`` on the run's own start-up path: every D ≤ 16 cell resolves
    to what it was measured with (weighted batch pairs, the dual group's lr); D = 64 gets the batch semi-dual
    (``rows``, lr 3e-3) where the plan's information is ≤ 28 nats (ε = 1, 10) and plan samples from conditional
    chains (``langevin``) at ε = 0.1 (≈ 48 nats), where a batch row carries ≈ 1 effective sample (docs/results.md)."""
    from experiments.startup import build_problem, resolve_auto_settings

    cfg = make_cfg(tmp_path, ["+experiment=eot_benchmark", f"data.dim={dim}", f"data.eps={eps}"])
    assert (cfg.dual.estimator, cfg.dual.pairs, cfg.dual.lr) == ("auto", "auto", "auto")
    default_lr = make_cfg(tmp_path, []).dual.lr  # the dual group's default (the D ≤ 16 mixture cells' value)
    resolve_auto_settings(cfg, build_problem(cfg))
    got = (cfg.dual.estimator, cfg.dual.pairs, cfg.dual.lr)
    if dim <= 16:
        assert got == ("pairs", "all", default_lr)
    elif eps < 1:
        assert got == ("langevin", "all", default_lr)
    else:
        assert got == ("pairs", "rows", 3e-3)
