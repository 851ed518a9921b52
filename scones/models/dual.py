r"""Regularised dual potentials (φ, ψ) and the Lightning module that learns them (SCONES Alg. 1).

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
"""

from __future__ import annotations

import math

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


def log_skipped_step(module: pl.LightningModule) -> None:
    """Count a step skipped for a non-finite loss; logs the running count ``train/skipped_nonfinite``.

    Lightning repeats a key's last value on steps where it is not logged, so a running count (not 1 per skip)
    keeps the CSV curve truthful. Counted per process since the stage (re)started.
    """
    module.n_skipped_nonfinite = getattr(module, "n_skipped_nonfinite", 0) + 1
    module.log("train/skipped_nonfinite", float(module.n_skipped_nonfinite))


def loss_is_usable(module: pl.LightningModule, loss: Tensor, stage: str) -> bool:
    """True when ``loss`` is finite. Otherwise skip the step (``module.skip_nonfinite``: counted, returns False)
    or stop training with :class:`NonFiniteLossError` naming the stage and step."""
    if torch.isfinite(loss):
        return True
    if module.skip_nonfinite:
        log_skipped_step(module)
        return False
    check_finite_loss(loss, stage, module.global_step)
    return False  # unreachable: check_finite_loss raised


def is_log_step(module: pl.LightningModule) -> bool:
    """True on the steps whose metrics Lightning writes to its loggers (every ``trainer.log_every_n_steps`` and
    the last step); outside a Trainer always True.

    A ``self.log`` call costs ~2 ms on CPU (Lightning's result collection; an all-reduce per call with
    ``sync_dist`` under DDP), so the modules log per-step metrics only on these steps: the written curves are
    the same, the step is ~15% faster at the default sizes (docs/performance.md).
    """
    try:
        trainer = module.trainer
    except RuntimeError:  # not attached to a Trainer
        return True
    step, every = module.global_step + 1, int(trainer.log_every_n_steps or 0)
    return (every > 0 and step % every == 0) or step >= (trainer.max_steps or 0) > 0 or trainer.should_stop


def adam(module: pl.LightningModule, params, lr: float, **kwargs) -> torch.optim.Adam:
    """``torch.optim.Adam`` with the fused kernel when it is safe (one kernel updates every parameter).

    Fused: every parameter a float tensor on CPU/CUDA and no gradient clipping configured (Lightning's
    mixed-precision plugins refuse to clip with an optimizer that unscales internally). Same update as the
    default Adam; the optimizer step is ≈3× faster on CPU (docs/performance.md).
    """
    params = list(params)
    try:
        clip = float(module.trainer.gradient_clip_val or 0.0) > 0.0
    except RuntimeError:  # not attached to a Trainer
        clip = False
    fused = not clip and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(params, lr=lr, fused=True if fused else None, **kwargs)


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


OBJECTIVES = ("dual", "logmeanexp")


def dual_objective(
    pot, x: Tensor, y: Tensor, pairs: str = "all", objective: str = "dual"
) -> tuple[Tensor, Tensor]:
    """Monte-Carlo estimate of J (or J' for ``objective="logmeanexp"``, KL only) and of E_{p⊗q}[H] on a batch.

    Returns ``(J, mean_H)``.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"dual.objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if pairs == "all":
        fx, gy = pot.phi(x), pot.psi(y)
        v = fx[:, None] + gy[None, :] - pot.cost.pairwise(x, y)
    elif pairs == "diagonal":
        fx, gy = pot.phi(x), pot.psi(y)
        v = fx + gy - pot.cost(x, y)
    else:
        raise ValueError(f"dual.pairs must be 'all' or 'diagonal', got {pairs!r}")
    if objective == "logmeanexp":
        lam = _kl_lam(pot, "dual.objective=logmeanexp")
        log_mean_h = torch.logsumexp(v.flatten() / lam, 0) - math.log(v.numel())
        return fx.mean() + gy.mean() - lam * log_mean_h, log_mean_h.detach().exp()
    penalty = pot.regularizer.penalty(v).mean()
    j = fx.mean() + gy.mean() - penalty
    if getattr(pot.regularizer, "name", None) == "kl":  # H = exp(V/λ) = 1 + H*(V)/λ: no second n² exp for the log
        return j, 1.0 + penalty.detach() / pot.regularizer.lam
    return j, pot.regularizer.density(v.detach()).mean()


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


class DualModule(pl.LightningModule):
    """Learns (φ, ψ) by maximising the regularised dual J on independent batches ``(x, y)``.

    Logs ``train/dual`` (J), ``train/loss`` (−J) and ``train/mean_H`` (E_{p⊗q}[H], → 1 at the optimum; with
    ``objective="logmeanexp"`` it is uncalibrated until :func:`calibrate_mass_` runs after training).
    """

    def __init__(
        self,
        potentials: DualPotentials,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        pairs: str = "all",
        skip_nonfinite: bool = False,
        objective: str = "dual",
    ) -> None:
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"dual.objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
        if objective == "logmeanexp":
            _kl_lam(potentials, "dual.objective=logmeanexp")
        self.potentials = potentials
        self.lr, self.betas, self.weight_decay = lr, tuple(betas), weight_decay
        self.pairs, self.skip_nonfinite, self.objective = pairs, skip_nonfinite, objective

    def training_step(self, batch, batch_idx):
        x, y = batch
        j, mean_h = dual_objective(self.potentials, x, y, self.pairs, self.objective)
        loss = -j
        if not loss_is_usable(self, loss, "dual"):
            return None
        if is_log_step(self):
            self.log_dict(
                {"train/dual": j, "train/loss": loss, "train/mean_H": mean_h}, prog_bar=True, sync_dist=True
            )
        return loss

    def configure_optimizers(self):
        return adam(self, self.potentials.parameters(), lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)
