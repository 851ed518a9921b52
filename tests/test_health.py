"""The marginal check of the dual (scones.ot.health.marginal_violation): exact potentials pass, a wrong ψ fails,
a plan too sharp for the samples cannot be judged, and the χ² weights normalise as the plan requires."""

from types import SimpleNamespace

import pytest
import torch

from scones.data import RandomGaussian
from scones.ot import SquaredEuclidean
from scones.ot.gaussian import ExactGaussianPotentials
from scones.ot.health import _chi2_row_weights, dual_health, marginal_violation


def _pair(dim: int, lam: float, n: int, seed: int = 0):
    src, tgt = RandomGaussian(dim, role="source"), RandomGaussian(dim, role="target")
    g = torch.Generator().manual_seed(seed)
    return ExactGaussianPotentials(src.cov_np, tgt.cov_np, lam), src.sample(n, generator=g), tgt.sample(n, generator=g)


def _with_psi(pot, psi):
    return SimpleNamespace(phi=pot.phi, psi=psi, cost=pot.cost, regularizer=pot.regularizer)


@pytest.mark.parametrize("dim,lam", [(2, 1.0), (2, 4.0), (8, 16.0)])
def test_exact_potentials_pass_and_a_constant_shift_changes_nothing(dim, lam):
    """The closed-form ψ: violation within its noise bound (the null), and ψ + k gives the same plan."""
    exact, x, y = _pair(dim, lam, 1000)
    m = marginal_violation(exact, x, y)
    assert m["passes"] is True and m["violation"] <= 1.5 * m["noise"], m
    assert m["ess_hm"] > 5 and m["detectable"] < 1.0
    shifted = marginal_violation(_with_psi(exact, lambda z: exact.psi(z) + 3.0), x, y)
    assert shifted["violation"] == pytest.approx(m["violation"], rel=1e-5)  # float32 ψ


@pytest.mark.parametrize("dim,lam", [(2, 4.0), (8, 16.0)])
def test_a_perturbed_psi_fails(dim, lam):
    """ψ + 0.5 λ·y₁ tilts every conditional by e^{y₁/2}: the plan's y-marginal is q tilted, beyond the noise.
    (At λ = 1, d = 2 the same tilt moves the narrow conditionals too little for 1000 samples to see.)"""
    exact, x, y = _pair(dim, lam, 1000)
    bad = marginal_violation(_with_psi(exact, lambda z: exact.psi(z) + 0.5 * lam * z[:, 0]), x, y)
    assert bad["passes"] is False and bad["violation"] > 2 * bad["threshold"], bad
    h = dual_health(_with_psi(exact, lambda z: exact.psi(z) + 0.5 * lam * z[:, 0]), x, y)
    assert h["converged"] is False and h["method"] == "marginal"


def test_a_plan_too_sharp_for_the_samples_cannot_be_judged_and_the_moments_decide():
    """d = 16, λ = 1 on 300 samples: each source's weights sit on ~1 target sample (ESS ≈ 1), so even ψ = 0 (the
    untrained start) would pass the marginal check: it says so (None), and the moment check decides instead."""
    exact, x, y = _pair(16, 1.0, 300)
    m = marginal_violation(exact, x, y)
    assert m["passes"] is None and m["ess_hm"] < 2
    zero = marginal_violation(_with_psi(exact, lambda z: torch.zeros(z.shape[0])), x, y)
    assert zero["passes"] is None  # no power: the untrained ψ is not flagged either
    h = dual_health(exact, x, y)
    assert h["method"] == "moments" and h["converged"] is True and h["marginal"]["passes"] is None
    # the top-level numbers are the deciding check's (metrics.json dual.health, the grid's health column)
    assert (h["health"], h["threshold"]) == (h["moments"]["violation"], h["moments"]["threshold"])


def test_chi2_weights_normalise_the_plan_per_source():
    """χ² rows: w_ij ∝ relu(φ̃_i + t_ij) with Σ_j relu(φ̃_i + t_ij) = 2λm, checked against bisection for φ̃_i."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(5, 40, generator=g, dtype=torch.float64) * 3.0
    lam = 0.7
    w = _chi2_row_weights(t, lam)
    assert torch.allclose(w.sum(1), torch.ones(5, dtype=torch.float64))
    for i in range(5):
        lo, hi = -t[i].max().item(), 2 * lam * 40 - t[i].min().item()
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if torch.relu(mid + t[i]).sum() < 2 * lam * 40 else (lo, mid)
        ref = torch.relu(lo + t[i])
        assert torch.allclose(w[i], ref / ref.sum(), atol=1e-9)


def test_chi2_marginal_check_flags_a_tilted_psi():
    """χ² plan between N(0, I₂) and itself: a strongly tilted ψ (3·y₁) pulls every conditional towards large y₁,
    the plan's y-marginal is far from q and the check says so (the moment fallback is KL-only)."""
    from scones.ot.regularizers import ChiSquared

    pot = SimpleNamespace(phi=None, psi=lambda z: 5.0 + 3.0 * z[:, 0], cost=SquaredEuclidean(),
                          regularizer=ChiSquared(10.0))
    g = torch.Generator().manual_seed(0)
    h = dual_health(pot, torch.randn(500, 2, generator=g), torch.randn(500, 2, generator=g))
    assert h["method"] == "marginal" and h["converged"] is False and "moments" not in h and h["ess"] > 10
