r"""Regularised dual potentials (φ, ψ) (SCONES Alg. 1): the pure maths, no Lightning.

    J(φ, ψ) = E_p[φ(x)] + E_q[ψ(y)] − E_{p⊗q}[H*(φ(x) + ψ(y) − c(x, y))]

is maximised with Adam on independent batches x ~ p, y ~ q. The estimator uses either all n² pairs of a
batch (``pairs="all"``, paper Alg. 1) or only the n diagonal pairs (``pairs="diagonal"``, SCONES code);
both are unbiased for the same expectation. The plan is π = H·p⊗q, H = regularizer.density(V).

For KL with a small λ the penalty λ(exp(V/λ) − 1) is stiff: at initialisation V/λ ≈ −c/λ is hugely negative
(H ≈ 0, no gradient from the penalty) and once a few pairs reach V > 0 their exp explodes. ``objective=
"logmeanexp"`` maximises instead the shift-invariant form

    J'(φ, ψ) = E_p[φ] + E_q[ψ] − λ·log E_{p⊗q}[exp(V/λ)]   (≥ J, equal when E[H] = 1),

whose gradient is E_p[∇φ] − E_π̂[∇φ] (+ the same for ψ) with π̂ the normalised plan: the same maximiser up to
the constant (φ + k, ψ) that J' cannot see. :func:`calibrate_mass_` restores it after training (E[H] = 1).

Both estimate E_π̂ by weighting the independent pairs of a batch. When the plan is so sharp that no pair of a batch
is a plausible plan pair (mutual information of π of tens of nats: KL λ = 1 at d = 64 has ≈ 72), that estimate is
dominated by the one best pair and is biased: even the exact potentials are not a fixed point (docs/results.md).
:func:`semidual_langevin_losses` (``dual.estimator=langevin``, KL with the squared cost) uses samples of the plan
itself instead: the semi-dual J(ψ) = E_q[ψ] − λ E_p log E_q[exp((ψ − c)/λ)] (φ = the soft c-transform of ψ) has the
gradient E_q[∇ψ] − E_{x~p, y~π_ψ(·|x)}[∇ψ(y)], and y ~ π_ψ(· | x) is what the SCONES sampler draws (persistent
conditional Langevin chains, :class:`scones.sampling.chains.ConditionalChains`); φ is learned through the
c-transform's gradient identity ∇φ(x) = 2s(x − E_π[y | x]), a regression on the same chains.

``pairs="rows"`` (KL) is the batch **semi-dual**: φ is implied, for ψ's term, by ψ's soft c-transform on the batch,
φ̂(x_i) = −λ log mean_j exp((ψ(y_j) − c(x_i, y_j))/λ), so ψ maximises mean_j ψ(y_j) + mean_i φ̂(x_i), whose
gradient is the batch's y-marginal error 1/m − mean_i softmax_j(…) — each source's row normalised, the quantity the
marginal health check (:mod:`scones.ot.health`) measures on fresh samples. The φ network plays no part in ψ's
gradient (with the plain pairs, an error of φ(x_i) scales row i's weights by exp(error/λ)); it is fitted by
``objective`` with ψ fixed, then calibrated (:func:`calibrate_mass_`). Self-normalised rows are biased by
O(1/ESS) of a row on the batch, so this suits plans whose batch rows carry mass (the plan's information ≲ 28 nats;
beyond, ``estimator="langevin"``).
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from scones.ot.costs import SquaredEuclidean
from scones.ot.regularizers import Regularizer


class DualPotentials(nn.Module):
    """φ, ψ with a cost and a regulariser: everything needed to evaluate the compatibility H.

    ``phi(x) -> (n,)``, ``psi(y) -> (n,)``. Any object with these two callables plus ``cost`` and
    ``regularizer`` (e.g. Online Sinkhorn potentials) can stand in for this class in the samplers.
    """

    def __init__(
        self, phi: nn.Module, psi: nn.Module, cost: SquaredEuclidean, regularizer: Regularizer
    ) -> None:
        super().__init__()
        self.phi, self.psi = phi, psi
        self.cost, self.regularizer = cost, regularizer


def violation(pot, x: Tensor, y: Tensor) -> Tensor:
    """V(x_i, y_i) = φ(x_i) + ψ(y_i) − c(x_i, y_i), shape ``(n,)`` (diagonal pairs)."""
    return pot.phi(x) + pot.psi(y) - pot.cost(x, y)


def violation_matrix(pot, x: Tensor, y: Tensor) -> Tensor:
    """V(x_i, y_j) for all pairs, shape ``(n, m)``."""
    return pot.phi(x)[:, None] + pot.psi(y)[None, :] - pot.cost.pairwise(x, y)


def compatibility(pot, x: Tensor, y: Tensor) -> Tensor:
    """H(x_i, y_i) = dπ/d(p⊗q) on diagonal pairs, shape ``(n,)``."""
    return pot.regularizer.density(violation(pot, x, y))


def grad_log_compatibility(pot, x: Tensor, y: Tensor) -> Tensor:
    """∇_y log H(x, y) = dlogH/dV · (∇ψ(y) − ∇_y c(x, y)), same shape as ``y``.

    ∇ψ is taken by autograd (works under ``torch.no_grad`` callers). φ is only needed for χ² (where
    dlogH/dV depends on V); for KL it drops out.
    """
    with torch.enable_grad():
        yg = y.detach().requires_grad_(True)
        psi = pot.psi(yg)
        (grad_psi,) = torch.autograd.grad(psi.sum(), yg)
    grad_v = grad_psi - pot.cost.grad_y(x, y)
    if pot.regularizer.name == "kl":
        return grad_v / pot.regularizer.lam
    with torch.no_grad():
        v = pot.phi(x) + psi.detach() - pot.cost(x, y)
    coeff = pot.regularizer.dlog_density(v)
    return coeff.reshape(-1, *([1] * (y.dim() - 1))) * grad_v


Pairs = Literal["all", "diagonal"]
"""Pairs of a batch the estimator uses: all n² (paper Alg. 1) or the n diagonal ones (SCONES code)."""
PAIRS: tuple[str, ...] = get_args(Pairs)
DualPairs = Literal["all", "diagonal", "rows"]
"""The dual's pairs: :data:`Pairs` or ``rows``, all n² pairs with each source's row normalised (the batch semi-dual,
KL only)."""
DUAL_PAIRS: tuple[str, ...] = get_args(DualPairs)
Objective = Literal["dual", "logmeanexp"]
"""J (the paper) or its shift-invariant form J' (KL only; then :func:`calibrate_mass_`)."""
OBJECTIVES: tuple[str, ...] = get_args(Objective)


def dual_objective(
    pot, x: Tensor, y: Tensor, pairs: str = "all", objective: str = "dual"
) -> tuple[Tensor, Tensor]:
    """Monte-Carlo estimate of J (or J' for ``objective="logmeanexp"``, KL only) and of E_{p⊗q}[H] on a batch.

    ``pairs="rows"`` (KL): ψ's term is the batch semi-dual, φ's the objective with ψ fixed (module docstring); J is
    then their sum, not the dual's value. Returns ``(J, mean_H)``.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"dual.objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if pairs not in DUAL_PAIRS:
        raise ValueError(f"dual.pairs must be one of {', '.join(DUAL_PAIRS)}, got {pairs!r}")
    if pairs == "rows":
        return _semidual_rows(pot, x, y, objective)
    if pairs == "all":
        fx, gy = pot.phi(x), pot.psi(y)
        v = fx[:, None] + gy[None, :] - pot.cost.pairwise(x, y)
    else:
        fx, gy = pot.phi(x), pot.psi(y)
        v = fx + gy - pot.cost(x, y)
    if objective == "logmeanexp":
        lam = _kl_lam(pot, "dual.objective=logmeanexp")
        log_mean_h = torch.logsumexp(v.flatten() / lam, 0) - math.log(v.numel())
        return fx.mean() + gy.mean() - lam * log_mean_h, log_mean_h.detach().exp()
    penalty = pot.regularizer.penalty(v).mean()
    j = fx.mean() + gy.mean() - penalty
    if getattr(pot.regularizer, "name", None) == "kl":  # H = exp(V/λ) = 1 + H*(V)/λ: no second n² exp for the log
        return j, 1.0 + penalty.detach() / pot.regularizer.lam
    return j, pot.regularizer.density(v.detach()).mean()


def _semidual_rows(pot, x: Tensor, y: Tensor, objective: str) -> tuple[Tensor, Tensor]:
    """``pairs="rows"``: ψ by the batch semi-dual (per-row normalised weights), φ by ``objective`` with ψ fixed."""
    lam = _kl_lam(pot, "dual.pairs=rows")
    fx, gy = pot.phi(x), pot.psi(y)
    t = (gy[None, :] - pot.cost.pairwise(x, y)) / lam  # (ψ_j − c_ij)/λ
    j_psi = gy.mean() - lam * (torch.logsumexp(t, 1) - math.log(t.shape[1])).mean()  # mean ψ + mean φ̂
    v = fx[:, None] + lam * t.detach()  # φ_i + ψ_j − c_ij with ψ fixed
    if objective == "logmeanexp":
        log_mean_h = torch.logsumexp(v.flatten() / lam, 0) - math.log(v.numel())
        return j_psi + fx.mean() - lam * log_mean_h, log_mean_h.detach().exp()
    penalty = pot.regularizer.penalty(v).mean()
    return j_psi + fx.mean() - penalty, 1.0 + penalty.detach() / lam


DualEstimator = Literal["pairs", "langevin"]
"""How the dual's expectation under the plan is estimated: weighted independent batch pairs (:func:`dual_objective`)
or samples of the plan from conditional Langevin chains (:func:`semidual_langevin_losses`)."""
ESTIMATORS: tuple[str, ...] = get_args(DualEstimator)


def semidual_langevin_losses(pot, x: Tensor, y_plan: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Losses of the ``langevin`` estimator (KL, squared cost c = s‖x − y‖²) on one update.

    ``x`` (n) sources with ``y_plan`` (n) samples of the current plan π_ψ(· | x) (chains, detached), ``y`` (m) fresh
    target samples. Returns ``(loss_psi, loss_phi, gap)``:

    - ``loss_psi = −(mean ψ(y) − mean ψ(y_plan))``: minus the semi-dual, whose ψ-gradient is exactly
      −(E_q[∇ψ] − E_π[∇ψ]) (the plan's samples carry the λ log E_q exp term);
    - ``loss_phi = mean ‖∇φ(x)/2s − (x − y_plan)‖²``: φ = the soft c-transform of ψ, fitted through
      ∇φ(x) = 2s(x − E_π[y | x]) (the conditional mean the health check and the ``potential`` BP read from φ);
    - ``gap = mean ψ(y) − mean ψ(y_plan)`` (detached): the y-marginal's ψ-moment mismatch, → 0 at convergence.
    """
    _kl_lam(pot, "dual.estimator=langevin")
    s = float(pot.cost.scale(x)) if hasattr(pot.cost, "scale") else 1.0
    gap = pot.psi(y).mean() - pot.psi(y_plan.detach()).mean()
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        (grad_phi,) = torch.autograd.grad(pot.phi(xg).sum(), xg, create_graph=True)
    resid = grad_phi / (2.0 * s) - (xg.detach() - y_plan.detach())
    loss_phi = resid.reshape(resid.shape[0], -1).pow(2).sum(1).mean()
    return -gap, loss_phi, gap.detach()


def _kl_lam(pot, what: str) -> float:
    if getattr(pot.regularizer, "name", None) != "kl":
        raise ValueError(f"{what} needs the KL regulariser (regularizer=kl); got {pot.regularizer!r}")
    return float(pot.regularizer.lam)


def shift_output_(net: nn.Module, value: float) -> None:
    """Add ``value`` to the scalar output of a potential network, in place, through the bias of its last
    ``nn.Linear`` (the project's potentials end in ``Linear(h, 1)``)."""
    last = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if not last or last[-1].bias is None or last[-1].out_features != 1:
        raise ValueError(
            f"cannot shift the output of {type(net).__name__}: it must end in an nn.Linear(…, 1) with a bias"
        )
    with torch.no_grad():
        last[-1].bias += value


@torch.no_grad()
def calibrate_mass_(pot, x: Tensor, y: Tensor, block: int = 1024) -> float:
    """Shift φ so that E_{p⊗q}[H] = 1 on all pairs of the samples ``x`` (n) and ``y`` (m), KL only.

    k = λ·log mean_ij exp(V_ij/λ) is subtracted from φ (through its output bias); returns k. The conditional
    π(y|x) and ∇_y log H do not depend on k; the mean of H, the plan density and the BP weights' scale do.
    """
    lam = _kl_lam(pot, "calibrate_mass_")
    psi = pot.psi(y)
    parts = []
    for xb in x.split(block):
        v = pot.phi(xb)[:, None] + psi[None, :] - pot.cost.pairwise(xb, y)
        parts.append(torch.logsumexp(v.double().flatten() / lam, 0))
    k = lam * float(torch.logsumexp(torch.stack(parts), 0) - math.log(x.shape[0] * y.shape[0]))
    shift_output_(pot.phi, -k)
    return k
