r"""Regularised dual potentials (φ, ψ) and the Lightning module that learns them (SCONES Alg. 1).

    J(φ, ψ) = E_p[φ(x)] + E_q[ψ(y)] − E_{p⊗q}[H*(φ(x) + ψ(y) − c(x, y))]

is maximised with Adam on independent batches x ~ p, y ~ q. The estimator uses either all n² pairs of a
batch (``pairs="all"``, paper Alg. 1) or only the n diagonal pairs (``pairs="diagonal"``, SCONES code);
both are unbiased for the same expectation. The plan is π = H·p⊗q, H = regularizer.density(V).
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from scones.ot.costs import SquaredEuclidean
from scones.ot.regularizers import Regularizer


class NonFiniteLossError(RuntimeError):
    """Raised when a training loss becomes NaN/Inf; the message names the stage and step."""


def check_finite_loss(loss: Tensor, stage: str, step: int) -> None:
    if not torch.isfinite(loss):
        raise NonFiniteLossError(
            f"stage '{stage}': loss is {loss.item()} at step {step}. Training stopped; the last good checkpoint is "
            "kept. Lower the learning rate, increase regularizer.lam, or set "
            f"{stage}.skip_nonfinite=true to skip such steps."
        )


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


def dual_objective(pot, x: Tensor, y: Tensor, pairs: str = "all") -> tuple[Tensor, Tensor]:
    """Monte-Carlo estimate of J and of E_{p⊗q}[H] on a batch. Returns ``(J, mean_H)``."""
    if pairs == "all":
        fx, gy = pot.phi(x), pot.psi(y)
        v = fx[:, None] + gy[None, :] - pot.cost.pairwise(x, y)
    elif pairs == "diagonal":
        fx, gy = pot.phi(x), pot.psi(y)
        v = fx + gy - pot.cost(x, y)
    else:
        raise ValueError(f"dual.pairs must be 'all' or 'diagonal', got {pairs!r}")
    j = fx.mean() + gy.mean() - pot.regularizer.penalty(v).mean()
    return j, pot.regularizer.density(v.detach()).mean()


class DualModule(pl.LightningModule):
    """Learns (φ, ψ) by maximising the regularised dual J on independent batches ``(x, y)``.

    Logs ``train/dual`` (J), ``train/loss`` (−J) and ``train/mean_H`` (E_{p⊗q}[H], → 1 at the optimum).
    """

    def __init__(
        self,
        potentials: DualPotentials,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        pairs: str = "all",
        skip_nonfinite: bool = False,
    ) -> None:
        super().__init__()
        self.potentials = potentials
        self.lr, self.betas, self.weight_decay = lr, tuple(betas), weight_decay
        self.pairs, self.skip_nonfinite = pairs, skip_nonfinite

    def training_step(self, batch, batch_idx):
        x, y = batch
        j, mean_h = dual_objective(self.potentials, x, y, self.pairs)
        loss = -j
        if not torch.isfinite(loss):
            if self.skip_nonfinite:
                self.log("train/skipped_nonfinite", 1.0, reduce_fx="sum")
                return None
            check_finite_loss(loss, "dual", self.global_step)
        self.log_dict(
            {"train/dual": j, "train/loss": loss, "train/mean_H": mean_h}, prog_bar=True, sync_dist=True
        )
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(
            self.potentials.parameters(), lr=self.lr, betas=self.betas, weight_decay=self.weight_decay
        )
