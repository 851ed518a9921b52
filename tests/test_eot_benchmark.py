"""Gaussian-mixture entropic-OT benchmark (Gushchin et al. 2023) and the cBW-UVP metric, against independent
truths: the closed-form Gaussian entropic plan, POT's discrete Sinkhorn plan, torch.distributions, Monte-Carlo
statistics and analytic values of the metric."""

import math

import numpy as np
import ot
import pytest
import torch

from scones.data.eot_benchmark import (
    EOTBenchmarkSource,
    EOTBenchmarkTarget,
    EOTMixtureBenchmark,
    eot_mixture_benchmark,
    seeded_instance_parameters,
)
from scones.metrics.bw_uvp import bures_wasserstein_sq
from scones.metrics.cbw_uvp import (
    bures_wasserstein_sq_batched,
    cbw_uvp,
    cbw_uvp_from_moments,
    gaussian_fit,
    plan_bw_uvp,
)
from scones.ot.gaussian import entropic_conditional, entropic_joint_covariance, random_covariance


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _single_component(eps: float = 0.4, dim: int = 3, seed: int = 0) -> EOTMixtureBenchmark:
    """K = 1, anisotropic source and potential, non-zero means: P1 is Gaussian and the plan is closed form."""
    rng = np.random.default_rng(seed)
    A = random_covariance(dim, rng, 0.2, 1.0)
    S = random_covariance(dim, rng, 0.5, 2.0)
    return EOTMixtureBenchmark(eps, rng.normal(size=dim), A, [1.0], rng.normal(size=(1, dim)), S[None])


def _single_component_truth(b: EOTMixtureBenchmark):
    """Exact law of P1 = N(mean_b, B) for K = 1: y | x = N(bias + (Σ/ε) x, Σ), x ~ N(a, A)."""
    slope, sig, bias = b.cond_slope[0].numpy(), b.cond_covs[0].numpy(), b.cond_bias[0].numpy()
    A, a = b.source.cov_np, b.source.mean_np
    return bias + slope @ a, sig + slope @ A @ slope.T


# ---------------------------------------------------------------------------------------------- construction
@pytest.mark.parametrize("eps", [0.05, 0.4, 3.0])
def test_single_component_plan_is_the_closed_form_gaussian_plan_with_lam_2eps(eps):
    """With one potential component P0 and P1 are Gaussian: the construction's π*(y|x) must be the closed-form
    entropic plan of the project convention (cost ‖x−y‖², λ·KL) with λ = 2ε — and not with λ = ε."""
    b = _single_component(eps)
    mean_b, B = _single_component_truth(b)
    A, a = b.source.cov_np, b.source.mean_np
    truth = entropic_conditional(A, B, 2 * eps, a, mean_b)
    np.testing.assert_allclose(b.cond_slope[0].numpy(), truth.M, atol=1e-10)
    np.testing.assert_allclose(b.cond_covs[0].numpy(), truth.S, atol=1e-10)
    x = b.sample_source(7, _gen(0))
    np.testing.assert_allclose(b.conditional_mean(x).numpy(), truth.mean(x.double().numpy()), atol=1e-10)
    wrong = entropic_conditional(A, B, eps, a, mean_b)
    assert np.abs(wrong.M - truth.M).max() > 1e-2
    # Plan moments (Rao–Blackwellised MC over x, antithetic): the mean is linear in x, hence exact.
    mom = b.moments
    np.testing.assert_allclose(mom.mean_y, mean_b, atol=1e-12)
    joint = entropic_joint_covariance(A, B, 2 * eps)
    # MC error of a covariance from N = 2^16 draws: ~ sqrt(2/N) relative, i.e. ~0.6 %; allow 3 %.
    scale = np.sqrt(np.outer(np.diag(joint), np.diag(joint)))
    assert np.abs(mom.joint_cov - joint).max() / scale.max() < 0.03


@pytest.mark.parametrize(("dim", "eps"), [(2, 1.0), (5, 1.0)])
def test_conditional_mean_matches_pot_sinkhorn_plan(dim, eps):
    """POT's log-domain Sinkhorn on n samples x ~ P0, y ~ P1 with M = ot.dist(x, y) (= ‖x−y‖²) and
    reg = λ = 2ε: its barycentric projection ŷ_i = Σ_j P_ij y_j / Σ_j P_ij must match the exact E[y | x_i].

    Tolerance: ŷ_i is a self-normalised importance-sampling average of the n target samples, whose squared
    error is ≈ tr Cov[y | x_i] / ESS_i even with exact potentials (ESS_i = 1 / Σ_j (P_ij / Σ_j P_ij)²); the
    potentials estimated from n samples add an error of the same O(1/n) order. We allow 6× that sampling floor
    (measured ratios 0.5–3.6 over seeds and n ∈ {1000, 2000}), and check that the test discriminates: the
    wrong conventions λ = ε and λ = 4ε (measured ratios ≥ 13) and the independent coupling fail it.
    """
    n = 1000
    b = eot_mixture_benchmark(dim, eps, seed=0)
    g = _gen(3)
    x = b.sample_source(n, g).double()
    y = b.sample_target(n, g).double()
    M = ot.dist(x, y)
    a = torch.full((n,), 1.0 / n, dtype=torch.float64)
    truth, cov = b.conditional_moments(x)
    tr_cov = torch.diagonal(cov, dim1=1, dim2=2).sum(-1)

    def error_and_floor(reg):
        P = ot.sinkhorn(a, a, M, reg=reg, method="sinkhorn_log", numItermax=5000, stopThr=1e-8)
        rows = P / P.sum(1, keepdim=True)
        mse = ((rows @ y - truth) ** 2).sum(1).mean()
        floor = (tr_cov * (rows**2).sum(1)).mean()
        return float(mse), float(floor)

    mse, floor = error_and_floor(2 * eps)
    tol = 6.0 * floor
    assert mse < tol, f"POT barycentric error {mse:.4g} exceeds 6 x sampling floor {floor:.4g}"
    for wrong_reg in (eps, 4 * eps):
        assert error_and_floor(wrong_reg)[0] > tol
    independent = float(((y.mean(0) - truth) ** 2).sum(1).mean())
    assert independent > 10 * tol


def test_sample_conditional_matches_exact_moments():
    """20 000 exact samples at a few x: mean within 5 standard errors, covariance within sampling error."""
    b = eot_mixture_benchmark(3, 0.5, seed=1)
    x = b.test_inputs(6)
    n = 20000
    ys = b.sample_conditional(x, n, generator=_gen(1))
    assert ys.shape == (6, n, 3) and ys.dtype == torch.float32
    mean, cov = b.conditional_moments(x)
    mh, ch = gaussian_fit(ys)
    se = np.sqrt(np.diagonal(cov.numpy(), axis1=1, axis2=2) / n)
    assert (np.abs(mh - mean.numpy()) < 5 * se).all()
    # Var(Ĉ_ij) ≈ E[d_i² d_j²] / n ≲ 10 C_ii C_jj / n for these mixtures → 5 s.e. ≈ 5 sqrt(10/n) relative.
    scale = np.sqrt(np.einsum("mi,mj->mij", *(2 * [np.diagonal(cov.numpy(), axis1=1, axis2=2)])))
    assert (np.abs(ch - cov.numpy()) / scale).max() < 5 * math.sqrt(10 / n)


def test_sample_conditional_law_in_one_dimension_ks():
    """D = 1: the whole law of the samples vs the mixture CDF Σ_k w_k Φ((y − μ_k)/σ_k), Kolmogorov–Smirnov."""
    from scipy import stats

    b = eot_mixture_benchmark(1, 0.3, seed=0)
    x = torch.tensor([[-0.6], [0.0], [0.7]])
    ys = b.sample_conditional(x, 5000, generator=_gen(0)).double()
    w, mu = b.component_log_weights(x).exp().numpy(), b.component_means(x)[..., 0].numpy()
    sd = b.cond_covs[:, 0, 0].sqrt().numpy()
    for i in range(3):
        cdf = lambda t, i=i: (w[i] * stats.norm.cdf((np.asarray(t)[:, None] - mu[i]) / sd)).sum(1)  # noqa: E731
        assert stats.kstest(ys[i, :, 0].numpy(), cdf).pvalue > 1e-3
        assert (w[i] > 0.02).sum() >= 2  # the conditional is genuinely multimodal at these x


def test_target_samples_match_plan_moments():
    """y ~ P1 by ancestral sampling vs the Rao–Blackwellised moments of P1 (independent estimators)."""
    b = eot_mixture_benchmark(4, 1.0, seed=0)
    n = 200_000
    y = b.sample_target(n, _gen(2)).double().numpy()
    mom = b.moments
    se_mean = np.sqrt(np.diag(mom.cov_y) / n)
    assert (np.abs(y.mean(0) - mom.mean_y) < 5 * se_mean).all()
    # Var of a sample variance ≈ (κ − 1)σ⁴/n, κ ≤ 5 here: 5 s.e. ≈ 10/sqrt(n) relative (+ moments' MC error).
    var_hat = y.var(0).sum()
    assert abs(var_hat - mom.target_variance) / mom.target_variance < 10 / math.sqrt(n) + 5e-3
    x, yy = b.sample_plan(n, _gen(3))
    cxy = np.cov(x.double().numpy().T, yy.double().numpy().T)[:4, 4:]
    assert np.abs(cxy - mom.cov_xy).max() < 5 * math.sqrt(np.diag(mom.cov_x).max() * np.diag(mom.cov_y).max() / n)


def test_conditional_log_prob_and_score_match_torch_mixture():
    """log π*(y|x) vs torch.distributions.MixtureSameFamily built from the closed form; score vs autograd."""
    b = eot_mixture_benchmark(3, 0.3, seed=2)
    x = b.test_inputs(5).double()
    y = b.sample_conditional(x, 1, generator=_gen(0))[:, 0].double() + 0.3 * torch.randn(5, 3, generator=_gen(1))
    mix = torch.distributions.Categorical(logits=b.component_log_weights(x))
    comp = torch.distributions.MultivariateNormal(
        b.component_means(x), covariance_matrix=b.cond_covs.expand(5, -1, -1, -1)
    )
    ref = torch.distributions.MixtureSameFamily(mix, comp)
    np.testing.assert_allclose(b.conditional_log_prob(x, y).numpy(), ref.log_prob(y).numpy(), atol=1e-10)
    y_req = y.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(ref.log_prob(y_req).sum(), y_req)
    np.testing.assert_allclose(b.conditional_score(x, y).numpy(), grad.numpy(), atol=1e-9)
    # Component weights w_k(x) ∝ q_k N(x; m_k, S_k + εI), from torch's MultivariateNormal.
    wcov = b.pot_covs + b.eps * torch.eye(3, dtype=torch.float64)
    ref_w = torch.log_softmax(
        b.log_q + torch.distributions.MultivariateNormal(b.pot_means, covariance_matrix=wcov).log_prob(x[:, None, :]),
        1,
    )
    np.testing.assert_allclose(b.component_log_weights(x).numpy(), ref_w.numpy(), atol=1e-10)


def test_target_score_estimate():
    """MC score of P1: exact Gaussian score if K = 1; Stein identities E[s] = 0, E[s (y − ȳ)ᵀ] = −I if K = 5."""
    b = _single_component(0.4)
    mean_b, B = _single_component_truth(b)
    y = torch.as_tensor(np.random.default_rng(0).multivariate_normal(mean_b, B, size=100))
    est = b.target_score_estimate(y, n_mc=4096, generator=_gen(0))
    exact = -(y - torch.as_tensor(mean_b)) @ torch.linalg.inv(torch.as_tensor(B))
    assert float((est - exact).norm() / exact.norm()) < 0.1  # measured 2.5 % (SNIS, n_mc = 4096)
    bm = eot_mixture_benchmark(2, 1.0, seed=0)
    n = 4000
    yy = bm.sample_target(n, _gen(1)).double()
    s = bm.target_score_estimate(yy, n_mc=256, generator=_gen(2))
    assert (s.mean(0).abs() < 5 * s.std(0) / math.sqrt(n)).all()
    prod = s[:, :, None] * (yy - yy.mean(0))[:, None, :]
    stein = prod.mean(0)
    assert ((stein + torch.eye(2)).abs() < 5 * prod.std(0) / math.sqrt(n) + 0.02).all()  # + SNIS bias allowance


# ---------------------------------------------------------------------------------------------- Hydra classes
def test_source_target_classes_share_one_instance_and_follow_the_protocol():
    from hydra.utils import instantiate

    src = instantiate({"_target_": "scones.data.eot_benchmark.EOTBenchmarkSource", "dim": 3, "eps": 1, "seed": 5})
    tgt = instantiate({"_target_": "scones.data.eot_benchmark.EOTBenchmarkTarget", "dim": 3, "eps": 1.0, "seed": 5})
    assert src.benchmark is tgt.benchmark  # one cached construction (int/float ε normalised)
    assert src.has_score and not tgt.has_score
    with pytest.raises(NotImplementedError, match="train a score model"):
        tgt.score(torch.zeros(2, 3))
    assert src.dim == tgt.dim == 3 and tgt.shape == (3,)
    xs, ys = src.sample(50_000, _gen(0)), tgt.sample(50_000, _gen(0))
    assert xs.dtype == ys.dtype == torch.float32 and ys.shape == (50_000, 3)
    np.testing.assert_allclose(xs.var(0).numpy(), 0.25, rtol=0.05)  # P0 = N(0, 0.5² I)
    assert abs(float(ys.double().var(0).sum()) - tgt.benchmark.target_variance) / tgt.benchmark.target_variance < 0.05
    assert torch.equal(tgt.sample(10, _gen(4)), tgt.sample(10, _gen(4)))
    other = EOTBenchmarkTarget(dim=3, eps=1.0, seed=6)
    assert not torch.equal(other.benchmark.pot_means, tgt.benchmark.pot_means)
    assert EOTBenchmarkSource(3, 1.0, 5).benchmark is src.benchmark


def test_seeded_instance_layout_and_errors():
    p = seeded_instance_parameters(4, 0.1, seed=0, n_components=5)
    assert sorted(np.unique(p["means"]).tolist()) == [-2.0, -1.0, 0.0, 1.0, 2.0]
    for col in p["means"].T:  # each coordinate is a permutation of {−2, …, 2} across components
        assert sorted(col.tolist()) == [-2.0, -1.0, 0.0, 1.0, 2.0]
    assert math.isclose(p["weights"].sum(), 1.0)
    # ε sweeps share centres and weights
    q = seeded_instance_parameters(4, 10.0, seed=0, n_components=5)
    assert np.array_equal(p["means"], q["means"]) and np.array_equal(p["weights"], q["weights"])
    with pytest.raises(ValueError, match="eps"):
        EOTBenchmarkTarget(dim=2, eps=0.0)
    with pytest.raises(ValueError, match="n_components"):
        seeded_instance_parameters(2, 1.0, n_components=0)
    with pytest.raises(ValueError, match="means has shape"):
        EOTMixtureBenchmark(1.0, np.zeros(2), np.eye(2), [1.0], np.zeros((1, 3)), np.eye(2)[None])


# ---------------------------------------------------------------------------------------------- cBW-UVP
def test_batched_bures_matches_bw_uvp_helper():
    rng = np.random.default_rng(0)
    covs = np.stack([random_covariance(6, rng, 0.1, 3.0) for _ in range(8)])
    hats = np.stack([random_covariance(6, rng, 0.1, 3.0) for _ in range(8)])
    hats[0] = 0.0  # singular model covariance is allowed (constant predictor)
    ref = np.array([bures_wasserstein_sq(h, c) for h, c in zip(hats, covs, strict=True)])
    np.testing.assert_allclose(bures_wasserstein_sq_batched(hats, covs), ref, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="positive definite"):
        bures_wasserstein_sq_batched(hats[:2], np.zeros((2, 6, 6)))
    with pytest.raises(ValueError, match=r"expected samples of shape \(m, n, D\)"):
        cbw_uvp(np.zeros((3, 10, 6)), np.zeros((4, 6)), covs[:4], 1.0)


def test_cbw_uvp_closed_form_for_scaled_and_shifted_conditionals():
    """Fitted moments (m + δ, a²C): cBW-UVP = mean_x[½‖δ‖² + ½(a − 1)² tr C(x)] / (½ Var P1), exactly;
    exact samples transformed as y' = m + a (y − m) + δ give the same value up to a finite-sample error."""
    b = eot_mixture_benchmark(4, 1.0, seed=0)
    x = b.test_inputs(200)
    mean, cov = b.conditional_moments(x)
    scale, delta = 1.5, torch.tensor([0.3, -0.2, 0.0, 0.1], dtype=torch.float64)
    tr = torch.diagonal(cov, dim1=1, dim2=2).sum(-1)
    closed = float((0.5 * delta.pow(2).sum() + 0.5 * (scale - 1) ** 2 * tr).mean() / (0.5 * b.target_variance))
    got = cbw_uvp_from_moments(mean + delta, scale**2 * cov, mean, cov, b.target_variance)
    assert math.isclose(got, closed, rel_tol=1e-10)
    ys = b.sample_conditional(x, 2000, generator=_gen(0)).double()
    moved = mean[:, None, :] + scale * (ys - mean[:, None, :]) + delta
    assert abs(cbw_uvp(moved, mean, cov, b.target_variance) - closed) < 0.03 * closed  # measured ~1 %


def test_cbw_uvp_of_constant_predictor_is_one():
    """y ≡ E[Y]: per x, ½‖E Y − m(x)‖² + ½ tr C(x); its mean over x ~ P0 is ½ Var(P1) (total variance)."""
    b = eot_mixture_benchmark(3, 1.0, seed=0)
    x = b.sample_source(20_000, _gen(7))
    mean, cov = b.conditional_moments(x)
    const = torch.as_tensor(b.moments.mean_y).expand_as(mean)
    per = cbw_uvp_from_moments(const, torch.zeros_like(cov), mean, cov, b.target_variance, per_x=True)
    assert abs(per.mean() - 1.0) < 4 * per.std() / math.sqrt(len(per)) + 2e-3


def test_cbw_uvp_floor_of_exact_samples_matches_first_order_prediction_and_shrinks():
    """Exact Gaussian conditionals (K = 1, y | x ~ N(m(x), Σ)), to first order in 1/n:
    E[cBW-UVP] ≈ [tr Σ / 2 + ¼ Σ_ij λ_i λ_j (1 + δ_ij) / (λ_i + λ_j)] / (n · ½ Var P1), λ = eigenvalues of Σ
    (mean error + Wishart covariance error through the Bures metric). On a K = 5 mixture the floor must
    shrink ~4× when n grows 4×."""
    b = _single_component(0.4)
    lam = np.linalg.eigvalsh(b.cond_covs[0].numpy())
    x = b.test_inputs(300)
    mean, cov = b.conditional_moments(x)
    for n in (500, 2000):
        ys = b.sample_conditional(x, n, generator=_gen(n))
        pred = (lam.sum() / 2 + 0.25 * (np.outer(lam, lam) * (1 + np.eye(3)) / np.add.outer(lam, lam)).sum()) / n
        pred /= 0.5 * b.target_variance
        got = cbw_uvp(ys, mean, cov, b.target_variance)
        assert abs(got - pred) < 0.15 * pred, (n, got, pred)
    bm = eot_mixture_benchmark(2, 0.1, seed=0)
    x = bm.test_inputs(300)
    mean, cov = bm.conditional_moments(x)
    small = cbw_uvp(bm.sample_conditional(x, 500, generator=_gen(1)), mean, cov, bm.target_variance)
    large = cbw_uvp(bm.sample_conditional(x, 2000, generator=_gen(2)), mean, cov, bm.target_variance)
    assert 2.5 < small / large < 6.0, (small, large)


def test_plan_bw_uvp_exact_samples_vs_independent_coupling():
    b = eot_mixture_benchmark(2, 0.1, seed=0)
    mom = b.moments
    x, y = b.sample_plan(100_000, _gen(0))
    exact = plan_bw_uvp(x, y, mom.joint_mean, mom.joint_cov)
    y_ind = b.sample_target(100_000, _gen(1))
    indep = plan_bw_uvp(x, y_ind, mom.joint_mean, mom.joint_cov)
    # Floor of 10⁵ samples in 2D = 4 dims: ≈ (tr/2 + 4·5/8·λ)/n relative ~ 1e-4; independence loses Cov(X, Y).
    assert exact < 1e-3 < 0.1 < indep
