"""Density-estimation metrics (experiments/density.py) and the moment-fitted Gaussians, against closed forms."""

import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from experiments import density
from experiments.density import GaussianPlan, calibration, kl_to_truth
from experiments.evaluation import gaussian_truth
from scones.coupling import Coupling
from scones.data import DatasetNotFoundError, Gaussian, StandardGaussian, SwissRoll
from scones.data.moments import MomentGaussian
from scones.ot import KL, SquaredEuclidean

A = np.array([[2.0, 0.6], [0.6, 1.0]])
B = np.array([[1.5, -0.4], [-0.4, 0.8]])
MA, MB = np.array([1.0, -2.0]), np.array([3.0, 0.5])


def gaussian_kl(m0, s0, m1, s1) -> float:
    """KL(N(m0, s0) ‖ N(m1, s1)), the textbook formula."""
    k = len(m0)
    s1_inv = np.linalg.inv(s1)
    dm = m1 - m0
    logdet = np.linalg.slogdet(s1)[1] - np.linalg.slogdet(s0)[1]
    return 0.5 * float(np.trace(s1_inv @ s0) + dm @ s1_inv @ dm - k + logdet)


class TruthPotentials:
    """(φ, ψ) with (φ(x) + ψ(y) − c(x, y))/λ = log π*(x, y) − log p(x) − log q(y) for a Gaussian plan π*.

    F = λ·log H* + c is separable for the optimal plan, so φ(x) = F(x, y₀) − F(x₀, y₀)/2 and
    ψ(y) = F(x₀, y) − F(x₀, y₀)/2 reproduce it exactly; any other plan would make the identity fail.
    """

    def __init__(self, plan: GaussianPlan, source, target, cost, lam: float, shift: float = 0.0):
        self.plan, self.source, self.target = plan, source, target
        self.cost, self.regularizer, self.shift = cost, KL(lam), shift
        self.x0 = torch.as_tensor(plan.conditional.mean_a, dtype=torch.float32)[None]
        self.y0 = torch.as_tensor(plan.conditional.mean_b, dtype=torch.float32)[None]
        self.f00 = float(self._f(self.x0, self.y0)[0])

    def _f(self, x, y):
        log_h = self.plan.log_prob(x, y) - self.source.log_prob(x.double()) - self.target.log_prob(y.double())
        return self.regularizer.lam * log_h + self.cost(x.double(), y.double())

    def phi(self, x):
        return (self._f(x, self.y0.expand_as(x)) - self.f00 / 2).float() + self.regularizer.lam * self.shift

    def psi(self, y):
        return (self._f(self.x0.expand_as(y), y) - self.f00 / 2).float()


def plan_for(source, target, cost, lam) -> GaussianPlan:
    return GaussianPlan.from_truth(gaussian_truth(source, target, KL(lam), cost))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_gaussian_truth_is_the_optimal_plan(reduction):
    """The closed-form plan with means and either cost scaling satisfies the optimality conditions.

    π is the λ·KL-regularised OT plan iff its marginals are p, q and log dπ/d(p⊗q) = (φ(x) + ψ(y) − c)/λ,
    i.e. the x–y block of the joint precision equals the one of −c/λ: −(2s/λ)·I with c = s‖x − y‖².
    """
    source, target, lam = Gaussian(MA, A), Gaussian(MB, B), 0.7
    cost = SquaredEuclidean(reduction)
    plan = plan_for(source, target, cost, lam)
    s = 1.0 if reduction == "sum" else 1.0 / 2
    cov = plan.joint.cov_np
    np.testing.assert_allclose(cov[:2, :2], A, atol=1e-12)
    np.testing.assert_allclose(cov[2:, 2:], B, atol=1e-12)
    np.testing.assert_allclose(plan.joint.mean_np, np.concatenate([MA, MB]), atol=1e-12)
    np.testing.assert_allclose(np.linalg.inv(cov)[:2, 2:], -(2 * s / lam) * np.eye(2), atol=1e-9)


def test_exact_plan_scores_zero_kl_and_calibrated_marginals():
    source, target, lam, cost = Gaussian(MA, A), Gaussian(MB, B), 0.7, SquaredEuclidean("mean")
    plan = plan_for(source, target, cost, lam)
    coupling = Coupling(TruthPotentials(plan, source, target, cost, lam), source, target)
    g = torch.Generator().manual_seed(0)
    cal = calibration(coupling, 1500, g)
    # E_{p⊗q}[H*] = 1: the estimate sits within 4 standard errors
    assert abs(cal["mean_H"] - 1) < 4 * cal["mean_H_se"]
    # per-point marginal errors of the exact plan are Monte-Carlo noise: rms deviation ~ its standard error (the
    # rows share the same y draws, so the ratio fluctuates by up to ~2 between seeds; see the next test)
    for side in ("x_marginal", "y_marginal"):
        assert cal[side]["rms_dev"] < 2.5 * cal[side]["mc_noise_rms"]
    kl = kl_to_truth(coupling, plan, 4000, math.log(cal["mean_H"]), g)
    assert abs(kl["kl_unnormalized"]) < 1e-4  # log π̂ ≡ log π* pointwise
    assert kl["kl"] == pytest.approx(math.log(cal["mean_H"]), abs=1e-4)
    expected_mi = gaussian_kl(plan.joint.mean_np, plan.joint.cov_np, plan.joint.mean_np,
                              np.block([[A, np.zeros((2, 2))], [np.zeros((2, 2)), B]]))
    assert kl["kl_independent"] == pytest.approx(expected_mi, rel=1e-9)


def test_marginal_errors_detect_a_plan_with_the_wrong_target():
    """H = dπ'/d(p⊗q') of the exact plan from p to q' = N(m_b + 1, B), used with target q.

    Per x: ∫H(x, y) q(dy) = E_{π'(y|x)}[q/q'] varies with x (log-linear in E[y | x]); per y: ∫H(x, y) p(dx) = 1
    still holds exactly, since π' has x-marginal p.
    """
    source, target, lam, cost = Gaussian(MA, A), Gaussian(MB, B), 0.7, SquaredEuclidean("mean")
    wrong_target = Gaussian(MB + 1.0, B)
    pot = TruthPotentials(plan_for(source, wrong_target, cost, lam), source, wrong_target, cost, lam)
    cal = calibration(Coupling(pot, source, target), 1500, torch.Generator().manual_seed(0))
    assert cal["x_marginal"]["rms_dev"] > 5 * cal["x_marginal"]["mc_noise_rms"]
    assert cal["y_marginal"]["rms_dev"] < 2.5 * cal["y_marginal"]["mc_noise_rms"]


def test_kl_estimate_matches_closed_form_gaussian_kl():
    """π̂ = the exact plan at λ' ≠ λ (a normalised Gaussian): KL(π*_λ ‖ π*_λ') by the textbook formula."""
    source, target, cost = Gaussian(MA, A), Gaussian(MB, B), SquaredEuclidean("sum")
    truth, other = plan_for(source, target, cost, 1.0), plan_for(source, target, cost, 3.0)
    coupling = Coupling(TruthPotentials(other, source, target, cost, 3.0), source, target)
    g = torch.Generator().manual_seed(1)
    kl = kl_to_truth(coupling, truth, 20000, 0.0, g)
    expected = gaussian_kl(truth.joint.mean_np, truth.joint.cov_np, other.joint.mean_np, other.joint.cov_np)
    assert expected > 0.1  # a real difference, not the noise floor
    assert kl["kl"] == pytest.approx(expected, abs=4 * kl["kl_se"] + 1e-3)


def test_constant_shift_of_phi_only_moves_the_normaliser():
    """φ + λc multiplies H by e^c: mean_H by e^c, raw KL by −c; the normalised KL is unchanged."""
    source, target, lam, cost = Gaussian(MA, A), Gaussian(MB, B), 0.7, SquaredEuclidean("mean")
    plan = plan_for(source, target, cost, lam)
    out = {}
    for shift in (0.0, 0.3):
        coupling = Coupling(TruthPotentials(plan, source, target, cost, lam, shift), source, target)
        cal = calibration(coupling, 500, torch.Generator().manual_seed(2))
        out[shift] = {**cal, **kl_to_truth(coupling, plan, 2000, math.log(cal["mean_H"]),
                                           torch.Generator().manual_seed(3))}
    assert out[0.3]["mean_H"] == pytest.approx(math.exp(0.3) * out[0.0]["mean_H"], rel=1e-5)
    assert out[0.3]["kl_unnormalized"] == pytest.approx(out[0.0]["kl_unnormalized"] - 0.3, abs=1e-4)
    assert out[0.3]["kl"] == pytest.approx(out[0.0]["kl"], abs=1e-4)
    # generalised KL of unnormalised measures: kl_raw + Z − 1, i.e. it grows by (e^c − 1)·Z₀ − c ≥ 0
    grow = out[0.3]["kl_generalized"] - out[0.0]["kl_generalized"]
    assert grow == pytest.approx((math.exp(0.3) - 1) * out[0.0]["mean_H"] - 0.3, abs=1e-4) and grow > 0


def test_density_section_only_for_known_densities(tmp_path):
    from experiments.schema import DensitySettings

    opts = DensitySettings(n_pairs=200, n_kl=500, grid=20)
    source, cost, lam = StandardGaussian(2), SquaredEuclidean("sum"), 2.0
    plan_target = Gaussian(MB, B)
    plan = plan_for(source, plan_target, cost, lam)
    pot = TruthPotentials(plan, source, plan_target, cost, lam)
    assert density.evaluate(opts, tmp_path, Coupling(pot, source, SwissRoll(), batch_size=500), None, seed=0) is None
    out = density.evaluate(opts, tmp_path, Coupling(pot, source, plan_target, batch_size=500), plan, seed=0)
    assert {"mean_H", "kl", "kl_independent", "x_marginal", "y_marginal"} <= set(out)
    assert (tmp_path / "density_slice.png").exists()


def test_moment_gaussian_has_the_digits_pixel_moments():
    pixels = load_digits().data / 16.0  # (1797, 64), independent of the library's image loader
    target = MomentGaussian("digits", ridge=0.1)
    assert target.dim == 64 and target.image_shape == (1, 8, 8)
    np.testing.assert_allclose(target.mean_np, pixels.mean(0), atol=1e-6)
    np.testing.assert_allclose(target.cov_np, np.cov(pixels, rowvar=False) + 0.1 * np.eye(64), atol=1e-6)
    y = target.sample(4000, generator=torch.Generator().manual_seed(0)).double().numpy()
    assert np.abs(y.mean(0) - pixels.mean(0)).max() < 5 * np.sqrt(np.diag(target.cov_np).max() / 4000)


def test_moment_gaussian_errors(tmp_path):
    with pytest.raises(ValueError, match="ridge"):
        MomentGaussian("digits", ridge=0.0)
    with pytest.raises(ValueError, match="dataset"):
        MomentGaussian("cifar")
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path)):
        MomentGaussian("mnist", root=tmp_path)
