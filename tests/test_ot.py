"""Costs, regularisers and the Gaussian closed form, checked against POT and autograd."""

import numpy as np
import ot
import pytest
import torch

from scones.metrics.bw_uvp import bw_uvp, bw_uvp_samples
from scones.nets.mlp import Potential
from scones.ot import KL, ChiSquared, SquaredEuclidean
from scones.ot.dual import DualPotentials, grad_log_compatibility, violation
from scones.ot.gaussian import (
    covariance_pair,
    entropic_conditional,
    entropic_joint_covariance,
    entropic_ot_value,
    entropic_potentials,
)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_cost_pairwise_matches_diagonal_and_grad(reduction):
    cost = SquaredEuclidean(reduction)
    x, y = torch.randn(5, 3, 4, 4, dtype=torch.float64), torch.randn(6, 3, 4, 4, dtype=torch.float64)
    m = cost.pairwise(x, y)
    assert torch.allclose(m[2, 4], cost(x[2:3], y[4:5])[0])
    scale = 1.0 if reduction == "sum" else 1.0 / 48
    assert torch.allclose(m[0, 0], scale * ((x[0] - y[0]) ** 2).sum())
    yg = y[:5].clone().requires_grad_(True)
    (g,) = torch.autograd.grad(cost(x, yg).sum(), yg)
    assert torch.allclose(g, cost.grad_y(x, y[:5]))


def test_regularizer_validation():
    with pytest.raises(ValueError, match="regularizer.lam"):
        KL(0.0)
    with pytest.raises(ValueError, match="regularizer.lam"):
        ChiSquared(-1.0)
    with pytest.raises(ValueError, match="regularizer.beta"):
        ChiSquared(1.0, beta=0.0)


@pytest.mark.parametrize("reg", [KL(0.7), ChiSquared(0.3, beta=1.0), ChiSquared(0.3, beta=50.0)])
def test_penalty_is_convex_conjugate_derivative(reg):
    # H = (H*)' : check by autograd on a grid, and dlog_density = d log H_smoothed / dV.
    v = torch.linspace(-2, 2, 401, dtype=torch.float64).requires_grad_(True)
    (dpen,) = torch.autograd.grad(reg.penalty(v).sum(), v)
    assert torch.allclose(dpen, reg.density(v.detach()), atol=1e-10)
    (dlog,) = torch.autograd.grad(reg.log_density(v).sum(), v)
    assert torch.allclose(dlog, reg.dlog_density(v.detach()), rtol=1e-6, atol=1e-8)


def test_chi2_beta_takes_effect():
    v = torch.tensor([0.01], dtype=torch.float64)
    r1, r2 = ChiSquared(1.0, beta=1.0), ChiSquared(1.0, beta=1000.0)
    # exact d log H / dV = 1/V = 100 on {V > 0}: β = 1000 is close, β = 1 is far (spec pitfall P1)
    assert abs(float(r2.dlog_density(v)) - 100.0) < 15.0
    assert float(r1.dlog_density(v)) < 2.0


@pytest.mark.parametrize("reg", [KL(1.5), ChiSquared(0.5, beta=5.0)])
def test_grad_log_compatibility_matches_autograd(reg):
    torch.manual_seed(1)
    pot = DualPotentials(Potential(3, (32, 32)), Potential(3, (32, 32)), SquaredEuclidean(), reg).double()
    x, y = torch.randn(64, 3, dtype=torch.float64), torch.randn(64, 3, dtype=torch.float64)
    yg = y.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(reg.log_density(violation(pot, x, yg)).sum(), yg)
    assert torch.allclose(grad_log_compatibility(pot, x, y), ref, rtol=1e-6, atol=1e-9)


def test_closed_form_first_order_condition_and_value():
    A, B = covariance_pair(3, 0)
    lam = 1.3
    sigma = entropic_joint_covariance(A, B, lam)
    prec = np.linalg.inv(sigma)
    # optimality: the off-diagonal block of the joint precision is −(2/λ) I exactly
    np.testing.assert_allclose(prec[:3, 3:], -2.0 / lam * np.eye(3), atol=1e-9)
    C = sigma[:3, 3:]
    from scipy.linalg import sqrtm

    np.testing.assert_allclose(
        C, np.real(sqrtm(A @ B + lam**2 / 16 * np.eye(3))) - lam / 4 * np.eye(3), atol=1e-8
    )
    assert entropic_ot_value(A, B, lam) > 0


def test_closed_form_matches_pot_sinkhorn_on_samples():
    """Plan cross-covariance and value from POT's log-domain Sinkhorn on samples ≈ closed form."""
    rng = np.random.default_rng(0)
    A, B = covariance_pair(2, 0)
    lam = 4.0
    n = 1500
    x = rng.multivariate_normal(np.zeros(2), A, size=n)
    y = rng.multivariate_normal(np.zeros(2), B, size=n)
    M = ot.dist(x, y)  # ‖x − y‖², no ½: reg = λ
    a = b = np.full(n, 1.0 / n)
    P = ot.sinkhorn(a, b, M, reg=lam, method="sinkhorn_log", numItermax=2000, stopThr=1e-7)
    xc, yc = x - x.mean(0), y - y.mean(0)
    C_pot = xc.T @ P @ yc
    C = entropic_joint_covariance(A, B, lam)[:2, 2:]
    # Monte-Carlo error of a covariance entry with n = 1500 and variances ≤ 10: ~ 10/sqrt(1500) ≈ 0.26
    np.testing.assert_allclose(C_pot, C, atol=0.6)
    value_pot = float((P * M).sum() + lam * (P * np.log(P / np.outer(a, b) + 1e-300)).sum())
    assert abs(value_pot - entropic_ot_value(A, B, lam)) / entropic_ot_value(A, B, lam) < 0.05
    # and the closed form's conditional mean matches POT's barycentric projection
    cond = entropic_conditional(A, B, lam)
    bary = (P @ y) / P.sum(1, keepdims=True)
    err = np.abs(bary - cond.mean(x)).mean()
    assert err < 0.25 * np.abs(cond.mean(x)).mean()


def test_potentials_reproduce_plan_density():
    """H = exp((f + g − c)/λ) with the closed-form quadratic potentials is the plan density (up to a constant)."""
    A, B = covariance_pair(2, 1)
    lam = 2.0
    Qf, Qg = entropic_potentials(A, B, lam)
    sigma = entropic_joint_covariance(A, B, lam)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((50, 2)), rng.standard_normal((50, 2))

    def log_gauss(z, S):
        return -0.5 * np.einsum("ni,ij,nj->n", z, np.linalg.inv(S), z)

    log_ratio = log_gauss(np.hstack([x, y]), sigma) - log_gauss(x, A) - log_gauss(y, B)
    log_h = (
        np.einsum("ni,ij,nj->n", x, Qf, x) + np.einsum("ni,ij,nj->n", y, Qg, y) - ((x - y) ** 2).sum(1)
    ) / lam
    diff = log_ratio - log_h
    assert np.ptp(diff) < 1e-8  # equal up to the normalising constant


def test_bw_uvp_known_values():
    A, B = covariance_pair(2, 0)
    assert bw_uvp(A, A) < 1e-12
    # scaling a covariance by s² gives BW² = ½ (1 − s)² tr Σ, so BW-UVP = (1 − s)²
    assert bw_uvp(4.0 * A, A) == pytest.approx(1.0, rel=1e-9)
    assert bw_uvp(0.25 * A, A) == pytest.approx(0.25, rel=1e-9)
    rng = np.random.default_rng(0)
    s = rng.multivariate_normal(np.zeros(2), A, size=200_000)
    assert bw_uvp_samples(s, A) < 1e-3


def test_discrete_sinkhorn_kernel_method_matches_log_domain_and_falls_back_when_it_underflows():
    from scones.ot.discrete import sinkhorn

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 2, generator=g), 3 + 2 * torch.randn(300, 2, generator=g)
    for lam, it in ((1.0, 3000), (0.002, 100)):  # 0.002: exp(−C/λ) underflows on whole rows -> log-domain redo
        log, ker = sinkhorn(x, y, lam, max_iter=it, tol=1e-9), sinkhorn(x, y, lam, max_iter=it, tol=1e-9,
                                                                        method="kernel")
        assert torch.isfinite(ker.plan).all() and torch.isfinite(ker.f).all()
        torch.testing.assert_close(ker.plan, log.plan, atol=1e-9, rtol=1e-5)
        torch.testing.assert_close(ker.f - ker.f.mean(), log.f - log.f.mean(), atol=1e-5 * lam, rtol=0)
    with pytest.raises(ValueError, match="method"):
        sinkhorn(x, y, 1.0, method="exp")
