"""The KL dual's shift-invariant ``logmeanexp`` objective: same plan as POT's Sinkhorn at a small λ where the
plain dual is stiff, E[H] = 1 after calibration, and clear errors outside KL."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch
from torch import nn

from scones.models.dual import DualModule
from scones.nets.mlp import Potential
from scones.ot import KL, ChiSquared, SquaredEuclidean
from scones.ot.dual import (
    DualPotentials,
    calibrate_mass_,
    dual_objective,
    grad_log_compatibility,
    shift_output_,
    violation_matrix,
)

D = 2  # rows are [coordinates (D), one-hot index]: the cost sees the coordinates, the potentials the index


class CoordinateCost:
    """‖x−y‖² on the first D columns (the one-hot tail only indexes the potential tables)."""

    def __init__(self) -> None:
        self.base = SquaredEuclidean("sum")

    def pairwise(self, x, y):
        return self.base.pairwise(x[:, :D], y[:, :D])

    def __call__(self, x, y):
        return self.base(x[:, :D], y[:, :D])


class Table(nn.Module):
    """A free potential value per atom: Linear(one-hot → 1) (its bias is the constant calibration shifts)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.lin = nn.Linear(n, 1)
        nn.init.zeros_(self.lin.weight)

    def forward(self, z):
        return self.lin(z[:, D:]).squeeze(-1)


def discrete_problem(n=6, m=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs, ys = torch.randn(n, D, generator=g, dtype=torch.float64), torch.randn(m, D, generator=g, dtype=torch.float64)
    x = torch.cat([xs, torch.eye(n, dtype=torch.float64)], 1)
    y = torch.cat([ys, torch.eye(m, dtype=torch.float64)], 1)
    return x, y


def pot_plan(x, y, lam):
    n, m = x.shape[0], y.shape[0]
    c = SquaredEuclidean("sum").pairwise(x[:, :D], y[:, :D]).numpy()
    return ot.sinkhorn(np.full(n, 1 / n), np.full(m, 1 / m), c, lam, method="sinkhorn_log", stopThr=1e-13,
                       numItermax=100000)


@pytest.mark.parametrize("lam", [0.05, 0.5])
def test_logmeanexp_objective_recovers_pots_plan_and_calibrates(lam):
    """Full-batch ascent of J' on free tables reaches POT's entropic plan (up to φ + k); calibration sets E[H]=1."""
    torch.manual_seed(0)
    x, y = discrete_problem()
    pot = DualPotentials(Table(x.shape[0]), Table(y.shape[0]), CoordinateCost(), KL(lam)).double()
    opt = torch.optim.Adam(pot.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.997)  # 0.05 → 1e-4 over 2000 steps
    for _ in range(2000):
        j, _ = dual_objective(pot, x, y, "all", "logmeanexp")
        opt.zero_grad()
        (-j).backward()
        opt.step()
        sched.step()
    shift = calibrate_mass_(pot, x, y)
    with torch.no_grad():
        h = pot.regularizer.density(violation_matrix(pot, x, y))
    assert float(h.mean()) == pytest.approx(1.0, abs=1e-9)
    plan = (h / h.numel()).numpy()
    exact = pot_plan(x, y, lam)
    err = np.abs(plan - exact).sum()  # 2 × total variation; the plan's entries sum to 1
    print(f"lam={lam}: 2TV to POT {err:.2e}")
    assert err < 1e-3, err
    assert np.isfinite(shift)
    # after calibration the plain dual J equals J' (E[H] = 1): the two objectives agree at the optimum
    with torch.no_grad():
        j_plain, _ = dual_objective(pot, x, y, "all", "dual")
        j_lme, _ = dual_objective(pot, x, y, "all", "logmeanexp")
    assert float(j_plain) == pytest.approx(float(j_lme), abs=1e-8)


def test_plain_dual_is_stiff_at_small_lambda_where_logmeanexp_is_not():
    """Same budget, same optimiser: at λ = 0.05 the plain dual has not found the plan, J' has (the reason for
    the option; docs/images.md)."""
    lam, x_y = 0.05, discrete_problem()
    x, y = x_y
    exact = pot_plan(x, y, lam)
    errors = {}
    for objective in ("dual", "logmeanexp"):
        torch.manual_seed(0)
        pot = DualPotentials(Table(x.shape[0]), Table(y.shape[0]), CoordinateCost(), KL(lam)).double()
        opt = torch.optim.Adam(pot.parameters(), lr=0.05)
        for _ in range(300):
            j, _ = dual_objective(pot, x, y, "all", objective)
            opt.zero_grad()
            (-j).backward()
            opt.step()
        if objective == "logmeanexp":
            calibrate_mass_(pot, x, y)
        with torch.no_grad():
            h = pot.regularizer.density(violation_matrix(pot, x, y))
        errors[objective] = float(np.abs((h / h.numel()).numpy() - exact).sum())  # total variation × 2
    print(errors)
    assert errors["logmeanexp"] < 0.05 < errors["dual"], errors


def test_calibration_leaves_the_conditional_score_unchanged():
    torch.manual_seed(0)
    pot = DualPotentials(Potential(dim=3, hidden=[16]), Potential(dim=3, hidden=[16]), SquaredEuclidean(), KL(0.3))
    x, y = torch.randn(50, 3), torch.randn(60, 3)
    before = grad_log_compatibility(pot, x[:10], y[:10])
    k = calibrate_mass_(pot, x, y)
    after = grad_log_compatibility(pot, x[:10], y[:10])
    assert abs(k) > 1e-3 and torch.allclose(before, after, atol=1e-6)
    with torch.no_grad():
        assert float(pot.regularizer.density(violation_matrix(pot, x, y)).mean()) == pytest.approx(1.0, rel=1e-4)


def _chi2_potentials():
    return DualPotentials(Potential(dim=2, hidden=[8]), Potential(dim=2, hidden=[8]), SquaredEuclidean(),
                          ChiSquared(0.1))


def test_logmeanexp_needs_kl_and_shift_needs_a_bias():
    pot = _chi2_potentials()
    with pytest.raises(ValueError, match="needs the KL regulariser"):
        DualModule(pot, objective="logmeanexp")
    with pytest.raises(ValueError, match="dual.objective must be one of dual, logmeanexp"):
        dual_objective(pot, torch.zeros(2, 2), torch.zeros(2, 2), objective="lme")
    with pytest.raises(ValueError, match="must end in an nn.Linear"):
        shift_output_(nn.Sequential(nn.Linear(2, 1, bias=False)), 1.0)


@pytest.mark.parametrize("objective", ["dual", "logmeanexp"])
def test_rows_semidual_recovers_pots_plan_whatever_phi_does(objective):
    """``pairs="rows"``: full-batch ascent of the batch semi-dual on a free ψ table reaches POT's entropic plan as
    the row-normalised weights (the plan the health check and the sampler read from ψ); φ, fitted with ψ fixed by
    either objective and calibrated, gives the same plan as exp(V/λ)/nm."""
    lam = 0.5
    x, y = discrete_problem()
    torch.manual_seed(0)
    pot = DualPotentials(Table(x.shape[0]), Table(y.shape[0]), CoordinateCost(), KL(lam)).double()
    opt = torch.optim.Adam(pot.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.997)
    for _ in range(2000):
        j, _ = dual_objective(pot, x, y, "rows", objective)
        opt.zero_grad()
        (-j).backward()
        opt.step()
        sched.step()
    calibrate_mass_(pot, x, y)
    exact = pot_plan(x, y, lam)
    with torch.no_grad():
        t = (pot.psi(y)[None, :] - CoordinateCost().pairwise(x, y)) / lam
        rows = (torch.softmax(t, 1) / x.shape[0]).numpy()
        h = pot.regularizer.density(violation_matrix(pot, x, y))
    err_rows, err_h = np.abs(rows - exact).sum(), np.abs((h / h.numel()).numpy() - exact).sum()
    print(f"{objective}: 2TV rows {err_rows:.2e}, 2TV exp(V/λ) {err_h:.2e}")
    assert err_rows < 1e-3 and err_h < 1e-3, (err_rows, err_h)


def test_rows_needs_kl_and_all_pairs_name_the_key():
    pot = _chi2_potentials()
    with pytest.raises(ValueError, match="dual.pairs=rows needs the KL regulariser"):
        DualModule(pot, pairs="rows")
    with pytest.raises(ValueError, match="dual.pairs must be one of all, diagonal, rows"):
        dual_objective(pot, torch.zeros(2, 2), torch.zeros(2, 2), pairs="row")
