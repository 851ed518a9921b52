"""Sample-set distances checked against closed-form values."""

import math

import torch
from scipy.stats import norm

from scones.metrics.sample_distances import energy_distance


def _folded_normal_mean(mu: float, var: float) -> float:
    s = math.sqrt(var)
    return s * math.sqrt(2 / math.pi) * math.exp(-(mu**2) / (2 * var)) + mu * (1 - 2 * norm.cdf(-mu / s))


def test_energy_distance_matches_closed_form_for_shifted_gaussians():
    g = torch.Generator().manual_seed(0)
    n, mu = 3000, 1.0
    a = torch.randn(n, 1, generator=g)
    b = torch.randn(n, 1, generator=g) + mu
    exact = 2 * _folded_normal_mean(mu, 2.0) - 2 * _folded_normal_mean(0.0, 2.0)
    # U-statistic standard error at n = 3000 is ~0.01 for these unit-scale variables
    assert abs(energy_distance(a, b) - exact) < 0.03
    same = energy_distance(a, torch.randn(n, 1, generator=g))
    assert abs(same) < 0.01 < exact


def test_exact_conditional_reference_and_conditional_energy_against_a_closed_form_plan():
    """The Swiss-roll joint metric's machinery on a pair with a closed-form entropic plan (2-D Gaussians, λ = 1).

    ``exact_conditional_samples`` (POT potentials + self-normalised weights over target samples) must reproduce
    the closed-form conditional y | x ~ N(Mx, S): regression slope and residual variances of 1600 draws. Then
    ``conditional_energy`` of closed-form conditional samples against it sits at the noise level (measured over
    3 seeds: |value| ≤ 0.003), while the independent coupling (0.05-0.06) and the conditional mean (BP's ideal,
    a point mass per x: 0.012-0.014) are clearly above it.
    """
    import numpy as np

    from experiments.evaluation import conditional_energy, exact_conditional_samples
    from scones.data import Gaussian, StandardGaussian
    from scones.ot import SquaredEuclidean
    from scones.ot.gaussian import entropic_conditional

    src, tgt, lam, n, k = StandardGaussian(2), Gaussian(cov=np.diag([4.0, 0.25])), 1.0, 400, 4
    g = torch.Generator().manual_seed(0)
    x = src.sample(n, generator=g)
    ref = exact_conditional_samples(src, tgt, SquaredEuclidean("sum"), lam, x, k, g, n_pot=1000, n_atoms=8000)
    assert ref.shape == (n, k, 2)
    truth = entropic_conditional(src.cov_np, tgt.cov_np, lam)
    xs, ys = x.repeat_interleave(k, 0).double(), ref.reshape(-1, 2).double()
    slope = torch.linalg.lstsq(xs, ys).solution.T.numpy()
    np.testing.assert_allclose(slope, truth.M, atol=0.05)  # M = diag(1.77, 0.31); LS error ~ 0.02
    resid = (ys - xs @ torch.from_numpy(slope).T).var(0).numpy()
    np.testing.assert_allclose(resid, np.diag(truth.S), rtol=0.15)  # S = diag(0.88, 0.155); 1600 draws: ~4 %

    exact = torch.from_numpy(truth.sample(x.double().numpy(), np.random.default_rng(0))).float()
    mean = torch.from_numpy(truth.mean(x.double().numpy())).float()
    floor = conditional_energy(x, exact, ref)
    assert abs(floor) < 0.006
    assert conditional_energy(x, mean, ref) > 0.008
    assert conditional_energy(x, tgt.sample(n, generator=g), ref) > 0.03
