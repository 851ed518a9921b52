"""Online Sinkhorn and the POT wrapper against ground truth: POT potentials and the Gaussian closed form.

Error metric: variation norm ‖h‖_var = max h − min h (potentials are defined up to (f + k, g − k)).
"""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch

from scones.ot.costs import SquaredEuclidean
from scones.ot.discrete import sinkhorn, sinkhorn_divergence
from scones.ot.gaussian import (
    entropic_cross_covariance,
    entropic_ot_value,
    entropic_potentials,
    random_covariance,
)
from scones.ot.online_sinkhorn import EntropicPotentials, OnlineSinkhorn, SoftMinExpansion
from scones.ot.regularizers import KL


def var_norm(h: torch.Tensor) -> float:
    return float(h.max() - h.min())


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------------
# Discrete measures: sampling with replacement from fixed weighted point clouds, truth = POT sinkhorn_log
# ------------------------------------------------------------------------------------------------------
def _discrete_problem(n: int = 30):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64)
    y = 0.7 * torch.randn(n, 2, generator=g, dtype=torch.float64) + torch.tensor([1.0, 0.5], dtype=torch.float64)
    a = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    return x, y, a / a.sum()


def _resamplers(x, y, a, seed):
    gen = torch.Generator().manual_seed(seed)
    return (
        lambda k: x[torch.multinomial(a, k, replacement=True, generator=gen)],
        lambda k: y[torch.randint(len(y), (k,), generator=gen)],
    )


@pytest.mark.parametrize("lam", [0.25, 1.0])
def test_fully_corrective_converges_to_pot_on_discrete_measures(lam):
    """η ≡ 1 fully-corrective updates = Sinkhorn on the empirical frequencies of the stream; with 4·10⁶ draws
    the frequency noise (≈ √(30/4e6) ≈ 3e-3 relative) puts the potentials within 1e-2 of POT's. λ ≠ 1
    checks the λ factor on the weights (without it the fixed point has marginals a^{1/λ}, far from a)."""
    x, y, a = _discrete_problem()
    ref = sinkhorn(x, y, lam, a=a, tol=1e-12)
    solver = OnlineSinkhorn(
        lam, batch_size=1000, batch_exp=1.0, lr=1.0, lr_exp=0.0, fully_corrective=True, merge_duplicates=True
    )
    pot = solver.fit(*_resamplers(x, y, a, seed=1), n_iter=10**4, max_samples=4 * 10**6)
    assert len(pot.f) == len(y) and len(pot.g) == len(x)  # duplicates merged: support = the distinct points
    assert var_norm(pot.f(x) - ref.f) < 1e-2
    assert var_norm(pot.g(y) - ref.g) < 1e-2


def test_plain_online_sinkhorn_converges_to_pot_on_discrete_measures():
    """Default Robbins–Monro schedule (b_t ∝ t^½, η_t ∝ t^−0.85), λ = 0.5: ‖f − f*‖_var + ‖g − g*‖_var shrinks
    with samples and is < 5e-2 after 2·10⁶ draws per side (measured 0.010–0.024 on 4 seeds, ≈ 0.7 at 16k)."""
    x, y, a = _discrete_problem()
    lam = 0.5
    ref = sinkhorn(x, y, lam, a=a, tol=1e-12)
    errors = {}

    def record(state):
        for mark in (16_000, 2 * 10**6):
            if state.n_seen >= mark and mark not in errors:
                p = state.potentials
                errors[mark] = var_norm(p.f(x) - ref.f) + var_norm(p.g(y) - ref.g)

    OnlineSinkhorn(lam, batch_size=1000, merge_duplicates=True).fit(
        *_resamplers(x, y, a, seed=2), n_iter=10**4, max_samples=2 * 10**6, callback=record
    )
    assert errors[2 * 10**6] < 5e-2
    assert errors[2 * 10**6] < errors[16_000] / 4


# ------------------------------------------------------------------------------------------------------
# Gaussians: truth = closed-form quadratic potentials f(x) = xᵀQf x, g(y) = yᵀQg y
# ------------------------------------------------------------------------------------------------------
LAM = 1.0


@pytest.fixture(scope="module")
def gaussian():
    rng = np.random.default_rng(0)
    A, B = random_covariance(2, rng, 0.5, 2.0), random_covariance(2, rng, 0.5, 2.0)
    Qf, Qg = (torch.tensor(q) for q in entropic_potentials(A, B, LAM))
    LA, LB = torch.tensor(np.linalg.cholesky(A)), torch.tensor(np.linalg.cholesky(B))
    g = torch.Generator().manual_seed(123)
    zx, zy = (
        torch.randn(1000, 2, generator=g, dtype=torch.float64),
        torch.randn(1000, 2, generator=g, dtype=torch.float64),
    )
    # held-out points in the 95 % highest-density region (Mahalanobis radius ≤ 2.448): the variation norm over
    # all held-out points is set by the single most extreme one and is too noisy for a seeded test
    xt, yt = zx[zx.norm(dim=1) <= 2.448] @ LA.T, zy[zy.norm(dim=1) <= 2.448] @ LB.T

    def samplers(seed, dtype=torch.float32):
        gen = torch.Generator().manual_seed(seed)
        return (
            lambda n: (torch.randn(n, 2, generator=gen, dtype=torch.float64) @ LA.T).to(dtype),
            lambda n: (torch.randn(n, 2, generator=gen, dtype=torch.float64) @ LB.T).to(dtype),
        )

    def error(pot):
        """‖f − f*‖_var + ‖g − g*‖_var on the held-out points (the paper's metric, on the 95 % region)."""
        f = pot.f(xt.to(pot.f.atoms.dtype)).double()
        g_ = pot.g(yt.to(pot.g.atoms.dtype)).double()
        return var_norm(f - ((xt @ Qf) * xt).sum(1)) + var_norm(g_ - ((yt @ Qg) * yt).sum(1))

    return dict(A=A, B=B, Qf=Qf, Qg=Qg, samplers=samplers, error=error)


def test_online_sinkhorn_approaches_gaussian_closed_form(gaussian):
    """Error vs the closed form decreases with samples seen (2 seeds), and after 16k samples per side it beats
    POT Sinkhorn on a fixed sample of 1000 points (measured: 1.8 at 2k → 0.49 at 16k, vs 0.90)."""
    errs = {(2000, 0): None, (16000, 0): None, (2000, 1): None, (16000, 1): None}
    for seed in (0, 1):

        def record(state, seed=seed):
            for mark, s in errs:
                if s == seed and state.n_seen >= mark and errs[mark, s] is None:
                    errs[mark, s] = gaussian["error"](state.potentials)

        pot = OnlineSinkhorn(LAM).fit(*gaussian["samplers"](seed), n_iter=10**4, max_samples=16000, callback=record)
        assert pot.f.atoms.dtype == torch.float32  # dtype follows the samplers
    early, late = (np.mean([errs[mark, s] for s in (0, 1)]) for mark in (2000, 16000))
    assert late < 0.6 * early, (early, late)
    sample_x, sample_y = gaussian["samplers"](7, torch.float64)
    fixed = sinkhorn(sample_x(1000), sample_y(1000), LAM, tol=1e-8).potentials()
    assert late < gaussian["error"](fixed), (late, gaussian["error"](fixed))


def test_memory_cap_and_blocked_evaluation(gaussian):
    """Support never exceeds max_support; the capped estimate (FIFO window of 1500 atoms, biased) stays within
    2× the error of POT on a fixed sample of 1000 points (measured 1.30 vs 0.90); evaluations split into blocks
    give the same values and gradients as a single block."""
    cap, sizes = 1500, []
    pot = OnlineSinkhorn(LAM, max_support=cap).fit(
        *gaussian["samplers"](3, torch.float64),
        n_iter=10**4,
        max_samples=12000,
        callback=lambda s: sizes.append((len(s.potentials.f), len(s.potentials.g))),
    )
    assert max(max(s) for s in sizes) <= cap and sizes[-1] == (cap, cap)
    sample_x, sample_y = gaussian["samplers"](7, torch.float64)
    fixed = sinkhorn(sample_x(1000), sample_y(1000), LAM, tol=1e-8).potentials()
    assert gaussian["error"](pot) < 2.0 * gaussian["error"](fixed)

    z = sample_x(300)
    small = SoftMinExpansion(pot.f.atoms, pot.f.log_weights, LAM, block_size=1000)  # 1 row per block
    assert torch.allclose(small(z), pot.f(z), rtol=0, atol=1e-10)
    assert torch.allclose(small.grad(z), pot.f.grad(z), rtol=0, atol=1e-10)


def test_gradients_plan_and_value(gaussian):
    """∇f by autograd equals the analytic 2(x − E_π[Y|x]) for ‖x−y‖²; ∇f is closer to the closed form 2 Qf x than
    the gradient of POT potentials on a fixed sample of 1000 points; the Monte-Carlo plan mass is ≈ 1 and the
    dual value matches the closed-form OT_λ."""
    pot = OnlineSinkhorn(LAM).fit(*gaussian["samplers"](4), n_iter=10**4, max_samples=16000)
    pot = pot.to(dtype=torch.float64)  # fitted in float32, checked in float64
    sample_x, sample_y = gaussian["samplers"](5, torch.float64)
    x, y = sample_x(1000), sample_y(1000)
    assert torch.allclose(pot.grad_f(x), 2 * (x - pot.conditional_mean(x)), atol=1e-8)
    assert torch.allclose(pot.grad_g(y), 2 * (y - pot.g.softmax_mean(y)), atol=1e-8)

    central = x[x.norm(dim=1) < 1.5]
    exact = 2 * central @ gaussian["Qf"]

    def grad_error(p):
        return float((p.grad_f(central) - exact).norm(dim=1).mean() / exact.norm(dim=1).mean())

    fixed = sinkhorn(sample_x(1000), sample_y(1000), LAM, tol=1e-8).potentials()
    assert grad_error(pot) < min(0.5, grad_error(fixed)), (grad_error(pot), grad_error(fixed))
    mass = float(pot.pairwise_density(x, y).mean())
    assert abs(mass - 1.0) < 0.05, mass
    truth = entropic_ot_value(gaussian["A"], gaussian["B"], LAM)
    assert abs(pot.dual_objective(x, y) - truth) < 0.05 * abs(truth), (pot.dual_objective(x, y), truth)


# ------------------------------------------------------------------------------------------------------
# POT wrapper
# ------------------------------------------------------------------------------------------------------
def test_pot_wrapper_conventions():
    """KL-convention potentials: P = a bᵀ exp((f ⊕ g − C)/λ), OT_λ = aᵀf + bᵀg = ot.solve(...).value, and the
    out-of-sample potentials reproduce (f, g) on the samples; they form a SCONES dual."""
    x, y, a = _discrete_problem(40)
    lam = 0.3
    res = sinkhorn(x, y, lam, a=a, tol=1e-12)
    C = SquaredEuclidean("sum").pairwise(x, y)
    b = torch.full((len(y),), 1.0 / len(y), dtype=torch.float64)
    plan = a[:, None] * b[None, :] * torch.exp((res.f[:, None] + res.g[None, :] - C) / lam)
    assert torch.allclose(plan, res.plan, atol=1e-12)
    solved = ot.solve(ot.dist(x.numpy(), y.numpy()), a.numpy(), b.numpy(), reg=lam)
    assert res.value == pytest.approx(float(solved.value), rel=1e-8)
    assert res.value == pytest.approx(float(a @ res.f + b @ res.g), rel=1e-8)
    pot = res.potentials()
    assert isinstance(pot, EntropicPotentials) and isinstance(pot.regularizer, KL) and pot.regularizer.lam == lam
    assert torch.allclose(pot.phi(x), res.f, atol=1e-9) and torch.allclose(pot.psi(y), res.g, atol=1e-8)
    # warm start from the converged potentials: POT stops at its first check
    assert sinkhorn(x, y, lam, a=a, tol=1e-9, warmstart=(res.f, res.g)).n_iter == 1


def test_pot_wrapper_reproduces_gaussian_closed_form(gaussian):
    """On n = 1000 samples per side: plan cross-covariance within Monte-Carlo tolerance of C_λ (entries have
    standard error ≈ sqrt(A_ii B_jj / n) ≈ 0.05; tolerance 0.2 ≈ 4 s.e., measured ≤ 0.085 on 4 seeds), value
    within 5 % of OT_λ (measured ≤ 2.4 %), potentials near the quadratic closed form on the central region."""
    sample_x, sample_y = gaussian["samplers"](11, torch.float64)
    x, y = sample_x(1000), sample_y(1000)
    res = sinkhorn(x, y, LAM, tol=1e-8)
    C = entropic_cross_covariance(gaussian["A"], gaussian["B"], LAM)
    assert np.abs(res.cross_covariance().numpy() - C).max() < 0.2
    truth = entropic_ot_value(gaussian["A"], gaussian["B"], LAM)
    assert res.value == pytest.approx(truth, rel=0.05)
    pot = res.potentials()
    central = x[x.norm(dim=1) < 2.0]
    assert var_norm(pot.f(central) - ((central @ gaussian["Qf"]) * central).sum(1)) < 1.2


def test_sinkhorn_divergence_gaussian():
    """Debiased S_λ from 1000 samples per side vs the closed form OT(α,β) − ½OT(α,α) − ½OT(β,β) (2-D; sample
    bias and noise are O(n^{-1/2}): −15 … +10 % on 4 seeds, tolerance 25 %), and S_λ(sample, independent
    sample of the same law) is a small fraction of S_λ between the two laws."""
    rng = np.random.default_rng(5)
    A, B = random_covariance(2, rng, 0.5, 2.0), random_covariance(2, rng, 0.5, 2.0)
    lam, n = 1.0, 1000
    truth = entropic_ot_value(A, B, lam) - 0.5 * entropic_ot_value(A, A, lam) - 0.5 * entropic_ot_value(B, B, lam)
    x, y, x2 = (torch.tensor(rng.multivariate_normal(np.zeros(2), cov, size=n)) for cov in (A, B, A))
    s = sinkhorn_divergence(x, y, lam, tol=1e-7)
    same = sinkhorn_divergence(x, x2, lam, tol=1e-7)
    assert s == pytest.approx(truth, rel=0.25), (s, truth)
    assert 0 <= same < 0.25 * truth, (same, truth)


# ------------------------------------------------------------------------------------------------------
# API
# ------------------------------------------------------------------------------------------------------
def test_schedule_state_dict_and_errors():
    s = OnlineSinkhorn(0.5, batch_size=10, batch_exp=1.0)
    assert s.lr_exp == pytest.approx(0.6)  # auto: 1 − 1/2 + 0.1
    assert OnlineSinkhorn(0.5, fully_corrective=True, batch_exp=0.0).lr_exp == pytest.approx(0.6)
    assert s.schedule(0) == (10, 1.0) and s.schedule(10) == (20, pytest.approx(2**-0.6))
    with pytest.raises(ValueError, match="lr"):
        OnlineSinkhorn(1.0, lr=1.5)
    with pytest.raises(ValueError, match="lam"):
        OnlineSinkhorn(0.0)
    with pytest.raises(ValueError, match="sample_target"):
        OnlineSinkhorn(1.0).fit(lambda n: torch.zeros(n, 2), lambda n: torch.zeros(n), n_iter=2)
    gen = torch.Generator().manual_seed(0)
    pot = OnlineSinkhorn(1.0, batch_size=50).fit(
        lambda n: torch.randn(n, 3, generator=gen, dtype=torch.float64),
        lambda n: torch.randn(n, 3, generator=gen, dtype=torch.float64) + 1,
        n_iter=5,
    )
    back = EntropicPotentials.from_state_dict(pot.state_dict())
    z = torch.randn(7, 3, dtype=torch.float64)
    assert torch.equal(back.phi(z), pot.phi(z)) and torch.equal(back.psi(z), pot.psi(z))
    assert pot.phi(z.float()).dtype == torch.float32
