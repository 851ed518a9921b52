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
    ``paired_energy_distance`` (the paired U-statistic) of closed-form conditional samples against it sits at the noise
    level (8 seeds: −0.001 … 0.007; the same draws against 4 closed-form draws per x instead: ±0.003), while the
    independent coupling (0.05-0.07) and the conditional mean (BP's ideal, a point mass per x: 0.018-0.024) are
    clearly above it.
    """
    import numpy as np

    from experiments.evaluation import exact_conditional_samples
    from scones.data import Gaussian, StandardGaussian
    from scones.metrics.sample_distances import paired_energy_distance
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
    floor = paired_energy_distance(x, exact, ref)
    assert abs(floor) < 0.01
    assert paired_energy_distance(x, mean, ref) > floor + 0.008
    assert paired_energy_distance(x, tgt.sample(n, generator=g), ref) > 0.03


def test_paired_energy_distance_matches_brute_force_and_drops_same_source_pairs():
    """The row-blocked sum equals the definition (pairs of different sources only), block size irrelevant."""
    from scones.metrics import sample_distances as sd

    g = torch.Generator().manual_seed(0)
    n, k = 7, 3
    x, y, yr = torch.randn(n, 2, generator=g), torch.randn(n, 1, generator=g), torch.randn(n, k, 1, generator=g)
    z = torch.cat([x, y], 1).double()
    zr = [(i, torch.cat([x[i], yr[i, r]]).double()) for i in range(n) for r in range(k)]
    ab = sum((z[i] - b).norm() for i in range(n) for j, b in zr if j != i) / (n * (n - 1) * k)
    aa = sum((z[i] - z[j]).norm() for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    bb = sum((a - b).norm() for i, a in zr for j, b in zr if i != j) / (n * (n - 1) * k * k)
    assert abs(sd.paired_energy_distance(x, y, yr) - float(2 * ab - aa - bb)) < 1e-9
    assert abs(float(sd._sum_other_sources(z, z, n, block=5)) - float(aa) * n * (n - 1)) < 1e-9


def test_joint_raw_energy_to_pot_plan_against_a_closed_form_plan():
    """``joint_raw_energy_to_pot_plan``'s reference (POT plans between the sources x ∪ fresh sources and fresh target
    samples, pooled; :func:`experiments.evaluation.pot_plan_draws`) on 2-D Gaussians with a closed-form plan (λ = 1).

    Closed-form conditional samples score at the floor (5 seeds at these sizes: −0.001 … 0.006), the conditional mean
    (BP's ideal, a point mass per x: 0.018-0.024) and the independent coupling (0.04-0.06) clearly above it. Takes
    about a second.
    """
    import numpy as np

    from experiments.evaluation import pot_plan_draws
    from scones.data import Gaussian, StandardGaussian
    from scones.metrics.sample_distances import paired_energy_distance
    from scones.ot import SquaredEuclidean
    from scones.ot.gaussian import entropic_conditional

    src, tgt, lam, n = StandardGaussian(2), Gaussian(cov=np.diag([4.0, 0.25])), 1.0, 400
    g = torch.Generator().manual_seed(0)
    x = src.sample(n, generator=g)
    ref = pot_plan_draws(src, tgt, SquaredEuclidean("sum"), lam, x, 1500, 2, g)
    assert ref.shape == (n, 2, 2)
    truth = entropic_conditional(src.cov_np, tgt.cov_np, lam)
    exact = torch.from_numpy(truth.sample(x.double().numpy(), np.random.default_rng(0))).float()
    mean = torch.from_numpy(truth.mean(x.double().numpy())).float()
    floor = paired_energy_distance(x, exact, ref)
    assert abs(floor) < 0.01
    assert paired_energy_distance(x, mean, ref) > max(0.012, floor + 0.006)
    assert paired_energy_distance(x, tgt.sample(n, generator=g), ref) > 0.03


def test_sliced_w2_sorted_equals_pot_and_marginal_reading_sits_at_the_fresh_level():
    """The sorted-projection sliced-W2 is POT's on the same directions; the marginal protocol reads fresh samples
    of the target at its fresh level and a shifted target above it."""
    from types import SimpleNamespace

    import numpy as np
    import ot

    from experiments.evaluation import marginal_sliced_w2
    from scones.data.distributions import SwissRoll
    from scones.metrics.sample_distances import sliced_w2_sorted, sorted_projections

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 3)), rng.normal(1.0, 2.0, size=(300, 3))
    proj = ot.sliced.get_random_projections(3, 50, seed=1)
    ours = sliced_w2_sorted(sorted_projections(a, proj), sorted_projections(torch.from_numpy(b), proj))
    assert math.isclose(ours, ot.sliced_wasserstein_distance(a, b, projections=proj), rel_tol=1e-10)

    target, g = SwissRoll(0.25), torch.Generator().manual_seed(0)
    settings = SimpleNamespace(marginal_refs=4, marginal_fresh_sets=8, marginal_projections=100)
    ys = {"fresh": target.sample(500, generator=g), "shifted": target.sample(500, generator=g) + 1.0}
    out = marginal_sliced_w2(settings, 0, target, ys, g)
    ref = out["reference"]
    level, sd = ref["target_sliced_w2_fresh"], ref["target_sliced_w2_fresh_sd"]
    assert abs(out["per_method"]["fresh"] - level) < 4 * sd  # a fresh set is one draw of the level's spread
    assert out["per_method"]["shifted"] > level + 4 * sd  # a unit shift (√2 in sliced-W2 units ≈ 1) is far above
    assert (ref["n"], ref["refs"], ref["fresh_sets"], ref["projections"]) == (500, 4, 8, 100)
