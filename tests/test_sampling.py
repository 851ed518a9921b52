"""Samplers checked against closed-form distributions."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from scones.data import Gaussian
from scones.metrics.bw_uvp import bw_uvp_samples
from scones.ot import KL, SquaredEuclidean
from scones.ot.gaussian import (
    covariance_pair,
    entropic_conditional,
    entropic_joint_covariance,
    exact_gaussian_potentials,
)
from scones.sampling.conditional import ConditionalScore
from scones.sampling.langevin import NonFiniteSampleError, annealed_langevin, ula
from scones.sampling.schedules import geometric_sigmas, langevin_step_sizes


def _exact_problem(dim, pair, lam):
    A, B = covariance_pair(dim, pair)
    phi, psi = exact_gaussian_potentials(A, B, lam)
    pot = SimpleNamespace(phi=phi, psi=psi, cost=SquaredEuclidean("sum"), regularizer=KL(lam))
    return A, B, pot, Gaussian(cov=B)


def test_ula_with_exact_potentials_reproduces_closed_form_conditional():
    """SCONES score = ∇log q + ∇log H with exact potentials ⇒ chains at a fixed x sample π*(·|x)."""
    A, B, pot, target = _exact_problem(2, 0, lam=4.0)
    cond = entropic_conditional(A, B, 4.0)
    x0 = np.array([[2.0, -1.5]])
    n = 4000
    x = torch.tensor(x0, dtype=torch.float32).expand(n, 2)
    model = ConditionalScore(lambda y, i: target.score(y), pot, x)
    y = ula(
        model,
        torch.zeros(n, 2),
        step_size=0.02,
        n_steps=1500,
        disable=True,
        generator=torch.Generator().manual_seed(0),
    )
    y = y.double().numpy()
    S = cond.S
    mean_err = y.mean(0) - cond.mean(x0)[0]
    # 5 standard errors of a mean of n samples (+ O(h) ULA bias on the mean: zero for a linear drift)
    assert np.all(np.abs(mean_err) < 5 * np.sqrt(np.diag(S) / n))
    # covariance within 10 % (sampling error ~ sqrt(2/n) ≈ 2 %, ULA bias h·λ_max(S⁻¹)/2 ≤ 2 %)
    np.testing.assert_allclose(np.cov(y.T), S, rtol=0.1, atol=0.05 * np.trace(S))


def test_ula_joint_bw_uvp_near_finite_sample_floor():
    dim, lam = 4, 8.0
    A, B, pot, target = _exact_problem(dim, 1, lam)
    sigma = entropic_joint_covariance(A, B, lam)
    n = 4000
    g = torch.Generator().manual_seed(1)
    x = Gaussian(cov=A).sample(n, generator=g)
    y = ula(
        ConditionalScore(lambda y, i: target.score(y), pot, x),
        torch.zeros(n, dim),
        0.05,
        1500,
        disable=True,
        generator=g,
    )
    got = bw_uvp_samples(np.hstack([x.numpy(), y.numpy()]), sigma)
    rng = np.random.default_rng(0)
    xs = rng.multivariate_normal(np.zeros(dim), A, size=n)
    floor = bw_uvp_samples(np.hstack([xs, entropic_conditional(A, B, lam).sample(xs, rng)]), sigma)
    indep = bw_uvp_samples(np.hstack([x.numpy(), target.sample(n, generator=g).numpy()]), sigma)
    assert got < max(5 * floor, 3e-3)
    assert got < 0.1 * indep


def test_annealed_langevin_matches_gaussian_with_exact_noised_scores():
    _, B = covariance_pair(3, 2)
    Bt = torch.tensor(B, dtype=torch.float32)
    sigmas = geometric_sigmas(3.0, 0.05, 8)
    precs = [torch.linalg.inv(Bt + s**2 * torch.eye(3)) for s in sigmas.tolist()]
    score = lambda y, i: -y @ precs[i]  # noqa: E731  exact score of q * N(0, σ_i² I)
    y = annealed_langevin(
        score, 3.0 * torch.randn(4000, 3), sigmas, step_lr=2e-3, n_steps_each=100, denoise=False, disable=True
    )
    assert bw_uvp_samples(y.numpy(), B) < 0.01


def test_schedules():
    s = geometric_sigmas(90.0, 0.01, 500)
    assert s[0] == pytest.approx(90.0) and s[-1] == pytest.approx(0.01, rel=1e-5)
    ratios = s[1:] / s[:-1]
    assert torch.allclose(ratios, ratios[0].expand_as(ratios), rtol=1e-4)
    # spec acceptance check 7: CelebA KL λ = 0.1 uses ε = 1.5e-6 → α_1 = 121.5, α_L = 1.5e-6
    a = langevin_step_sizes(s, 1.5e-6)
    assert float(a[0]) == pytest.approx(121.5, rel=1e-3) and float(a[-1]) == pytest.approx(1.5e-6)
    with pytest.raises(ValueError, match="sigma_max"):
        geometric_sigmas(0.01, 1.0, 5)


def test_nonfinite_chains_are_reported():
    with pytest.raises(NonFiniteSampleError, match="step"):
        ula(lambda y, i: y * 1e30, torch.ones(10, 2), step_size=1.0, n_steps=100, disable=True)


def test_resampled_chains_follow_the_plan_of_the_potentials():
    """init=resample: target samples resampled with weights H(x, ·) of exact potentials follow π*(·|x) at each x."""
    from scones.sampling.conditional import initial_chains, resampled_chains

    A, B, pot, target = _exact_problem(2, 0, lam=4.0)
    cond = entropic_conditional(A, B, 4.0)
    g = torch.Generator().manual_seed(0)
    pool = target.sample(40000, generator=g)
    x0 = torch.tensor([[2.0, -1.5], [-1.0, 0.5]])
    n = 3000
    x = x0.repeat_interleave(n, dim=0)
    y, ess = resampled_chains(pot, x, pool, generator=g)
    assert y.shape == x.shape and bool((ess > 100).all())
    for i in range(2):
        yi = y[i * n : (i + 1) * n].double().numpy()
        mean_err = yi.mean(0) - cond.mean(x0[i : i + 1].double().numpy())[0]
        # resampled draws repeat (n / ESS) — 8 standard errors of n independent samples leaves room for that
        assert np.all(np.abs(mean_err) < 8 * np.sqrt(np.diag(cond.S) / n)), mean_err
        np.testing.assert_allclose(np.cov(yi.T), cond.S, rtol=0.15, atol=0.05 * np.trace(cond.S))
    with pytest.raises(ValueError, match="resample needs"):
        initial_chains({"kind": "ula", "step_size": 0.1, "n_steps": 1, "init": "resample"}, x0)


def test_per_chain_steps_keep_full_chains_on_their_path_and_freeze_the_rest():
    """``chain_steps``: a chain with every step follows the same path as without it (same noise); one with 0 steps
    stays at its start; steps no chain takes are skipped."""
    y0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    sig = geometric_sigmas(0.1, 0.01, 3)

    def run(**kw):
        return annealed_langevin(lambda y, i: -y, y0, sig, 1e-2, 20, denoise=False, disable=True,
                                 generator=torch.Generator().manual_seed(1), **kw)

    full, part = run(), run(chain_steps=torch.tensor([20, 0, 5, 20]))
    torch.testing.assert_close(part[[0, 3]], full[[0, 3]], rtol=0, atol=0)
    torch.testing.assert_close(part[1], y0[1], rtol=0, atol=0)
    assert not torch.allclose(part[2], full[2])
    with pytest.raises(ValueError, match="chain_steps"):
        run(chain_steps=torch.tensor([21, 0, 0, 0]))


def test_refine_ess_shortens_refinement_where_the_pool_covers_the_plan():
    """``sampler.refine=ess``: the share of the schedule is min(1, max(k, 100)/ESS); with exact potentials and a pool
    that covers the plan the few steps left keep the resampled chains on the closed-form conditional."""
    from scones.sampling.conditional import chains_per_input, resampled_chains, sample_conditional
    from scones.sampling.settings import ESS_MIN, refine_fraction, validate_sampler

    frac = refine_fraction(torch.tensor([1.2, 69444.0, 50.0, 1000.0]), torch.tensor([1280, 1280, 1, 1]))
    torch.testing.assert_close(frac, torch.tensor([1.0, 1280 / 69444, 1.0, ESS_MIN / 1000]))
    A, B, pot, target = _exact_problem(2, 0, lam=4.0)
    cond = entropic_conditional(A, B, 4.0)
    g = torch.Generator().manual_seed(0)
    pool = target.sample(40000, generator=g)
    x0 = torch.tensor([[2.0, -1.5], [-1.0, 0.5]])
    n = 1000
    x = x0.repeat_interleave(n, dim=0)
    y0, ess = resampled_chains(pot, x, pool, generator=g)
    frac = refine_fraction(ess, chains_per_input(x))
    assert bool((chains_per_input(x) == n).all()) and float(frac.max()) < 0.5, frac.max()
    s = validate_sampler({"kind": "annealed", "init": "resample", "refine": "ess", "sigma_max": 0.1,
                          "sigma_min": 0.01, "n_levels": 3, "step_lr": 1e-3, "n_steps_each": 50})
    y = sample_conditional(lambda y, i: target.score(y), pot, x, y0, s, 10**6, g, fraction=frac)
    assert not torch.equal(y, y0)
    for i in range(2):
        yi = y[i * n : (i + 1) * n].double().numpy()
        mean_err = yi.mean(0) - cond.mean(x0[i : i + 1].double().numpy())[0]
        assert np.all(np.abs(mean_err) < 8 * np.sqrt(np.diag(cond.S) / n)), mean_err
        np.testing.assert_allclose(np.cov(yi.T), cond.S, rtol=0.2, atol=0.05 * np.trace(cond.S))
    with pytest.raises(ValueError, match="needs sampler.init=resample"):
        validate_sampler({"kind": "ula", "step_size": 0.1, "n_steps": 1, "init": "bp", "refine": "ess"})


@pytest.mark.parametrize("scale", [1.0, 0.01])
def test_gaussian_mixture_log_prob_and_score_match_torch_distributions(scale):
    """GaussianMixture (diagonal components, matrix-product form) against torch.distributions' mixture and its
    autograd score, in float32, down to σ = 0.01 (the empirical-mixture oracle of the digits score ablation)."""
    from scones.data import GaussianMixture

    g = torch.Generator().manual_seed(0)
    k, d = 7, 64
    means = torch.rand(k, d, generator=g)  # image-like: pixels in [0, 1]
    stds = scale * (0.5 + torch.rand(k, d, generator=g))
    weights = torch.rand(k, generator=g) + 0.1
    gm = GaussianMixture(means, stds, weights)
    ref = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(probs=(weights / weights.sum()).double()),
        torch.distributions.Independent(torch.distributions.Normal(means.double(), stds.double()), 1),
    )
    # points near the components (a few stds away) and between them
    y = means[torch.randint(0, k, (40,), generator=g)] + 2 * stds.mean() * torch.randn(40, d, generator=g)
    y = torch.cat([y, torch.rand(10, d, generator=g)])
    y64 = y.double().requires_grad_(True)
    ref_lp = ref.log_prob(y64)
    (ref_score,) = torch.autograd.grad(ref_lp.sum(), y64)
    torch.testing.assert_close(gm.log_prob(y).double(), ref_lp.detach(), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(gm.score(y).double(), ref_score, rtol=1e-4, atol=1e-4 / scale**2 * 1e-2)
    iso = GaussianMixture(means, stds=scale)  # one scalar std for every component (broadcast)
    full = GaussianMixture(means, stds=torch.full((k, d), scale))
    torch.testing.assert_close(iso.score(y), full.score(y))


def test_full_gaussian_mixture_matches_torch_and_its_fit():
    """FullGaussianMixture: log-density and score against torch.distributions' mixture of MultivariateNormals and
    its autograd score; convolved(σ) against C_k + σ²I written out; samples' moments; EM fit (scikit-learn) of
    two well-separated correlated components recovers their means, covariances and weights."""
    from scones.data import FullGaussianMixture

    g = torch.Generator().manual_seed(0)
    k, d = 4, 6
    means = 3 * torch.randn(k, d, generator=g, dtype=torch.float64)
    a = torch.randn(k, d, d, generator=g, dtype=torch.float64)
    covs = a @ a.transpose(1, 2) / d + 0.05 * torch.eye(d, dtype=torch.float64)
    weights = torch.rand(k, generator=g, dtype=torch.float64) + 0.1
    gm = FullGaussianMixture(means, covs, weights)
    y = means[torch.randint(0, k, (30,), generator=g)] + torch.randn(30, d, generator=g, dtype=torch.float64)
    for sigma in (0.0, 0.7):
        ref = torch.distributions.MixtureSameFamily(
            torch.distributions.Categorical(probs=weights / weights.sum()),
            torch.distributions.MultivariateNormal(means, covariance_matrix=covs + sigma**2 * torch.eye(d)),
        )
        mix = gm.convolved(sigma) if sigma else gm
        y_req = y.clone().requires_grad_(True)
        lp = ref.log_prob(y_req)
        (grad,) = torch.autograd.grad(lp.sum(), y_req)
        torch.testing.assert_close(mix.log_prob(y), lp.detach(), rtol=1e-7, atol=1e-6)
        torch.testing.assert_close(mix.score(y), grad, rtol=1e-7, atol=1e-6)
    # the score keeps an image batch's shape
    assert gm.score(y.float().view(30, 1, 2, 3)).shape == (30, 1, 2, 3)
    # samples: mixture mean and covariance (n = 40 000: a few standard errors)
    x = gm.sample(40_000, generator=g).double()
    w = weights / weights.sum()
    mean = (w[:, None] * means).sum(0)
    cov = (w[:, None, None] * (covs + means[:, :, None] * means[:, None, :])).sum(0) - torch.outer(mean, mean)
    torch.testing.assert_close(x.mean(0), mean, atol=0.1, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), cov, atol=0.1 * float(cov.diagonal().max()), rtol=0)
    # fit: two components 10 apart (no overlap), 3:1 weights
    two = FullGaussianMixture(means[:2] * 0 + torch.tensor([[-5.0], [5.0]], dtype=torch.float64), covs[:2],
                              torch.tensor([0.75, 0.25], dtype=torch.float64))
    fitted = FullGaussianMixture.fit(two.sample(20_000, generator=g), 2, reg_covar=1e-6, seed=0)
    order = fitted.means64[:, 0].argsort()
    torch.testing.assert_close(fitted.weights64[order], two.weights64, atol=0.02, rtol=0)
    torch.testing.assert_close(fitted.means64[order], two.means64, atol=0.05, rtol=0)
    fitted_covs = (fitted.evecs * fitted.evals[:, None, :]) @ fitted.evecs.transpose(1, 2)
    torch.testing.assert_close(fitted_covs[order], covs[:2], atol=0.05 * float(covs[:2].diagonal(0, 1, 2).max()),
                               rtol=0)
    with pytest.raises(ValueError, match="positive definite"):
        FullGaussianMixture(means[:1], torch.zeros(1, d, d))


def test_mixture_expert_moves_its_mixture_to_the_chains_device_once():
    """MixtureExpert.score on a batch: the convolved mixture's exact score, with the mixture's tensors held once per
    device (``FullGaussianMixture.to``); the moved copy scores the same."""
    from scones.data import FullGaussianMixture
    from scones.models.score import MixtureExpert

    g = torch.Generator().manual_seed(1)
    x = torch.randn(600, 5, generator=g) * torch.linspace(0.2, 1.0, 5) + (torch.rand(600, 1, generator=g) > 0.5) * 3
    expert = MixtureExpert.fit(x, 2, sigma_min=0.3, reg_covar=1e-4, seed=0)
    assert not expert.applies(0.29) and expert.applies(0.3)
    y = torch.randn(7, 5, generator=g)
    torch.testing.assert_close(expert.score(y, 0.5), expert.mixture.convolved(0.5).score(y))
    assert list(expert._on_device) == [y.device]
    moved = expert.mixture.to("cpu")
    assert isinstance(moved, FullGaussianMixture)
    torch.testing.assert_close(moved.log_prob(y), expert.mixture.log_prob(y))
    with pytest.raises(ValueError, match="sigma_min"):
        MixtureExpert(expert.mixture, 0.0)
