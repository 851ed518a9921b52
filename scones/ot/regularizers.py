r"""f-divergence regularisers of entropic OT, in the dual form used by SCONES.

Primal:  min_π E_π[c] + λ·D_f(π ‖ p⊗q).
Dual:    max_{φ,ψ} E_p[φ] + E_q[ψ] − E_{p⊗q}[H*(V)],   V(x, y) = φ(x) + ψ(y) − c(x, y).
Plan:    dπ/d(p⊗q)(x, y) = H(x, y)  (the *compatibility*),  with E_{p⊗q}[H] = 1 at the optimum.

Each regulariser provides the penalty ``penalty(V) = H*(V)``, the compatibility ``density(V) = H``,
``log_density(V) = log H`` and ``dlog_density(V) = d log H / dV``, so that the conditional score term is

    ∇_y log H(x, y) = dlog_density(V) · (∇ψ(y) − ∇_y c(x, y)).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


class Regularizer:
    """Base class. ``lam`` is λ > 0, the weight of the divergence."""

    name = "base"

    def __init__(self, lam: float) -> None:
        lam = float(lam)
        if not math.isfinite(lam) or lam <= 0:
            raise ValueError(f"regularizer.lam must be a finite number > 0, got {lam}")
        self.lam = lam

    def penalty(self, v: Tensor) -> Tensor:  # H*(V)
        raise NotImplementedError

    def density(self, v: Tensor) -> Tensor:  # H = (H*)'(V)
        raise NotImplementedError

    def log_density(self, v: Tensor) -> Tensor:
        raise NotImplementedError

    def dlog_density(self, v: Tensor) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(lam={self.lam})"


class KL(Regularizer):
    """Relative entropy λ·KL(π ‖ p⊗q) (POT / OTT / Online Sinkhorn convention).

    H*(V) = λ (exp(V/λ) − 1),   H = exp(V/λ),   ∇_y log H = (1/λ)(∇ψ(y) − ∇_y c(x, y)).

    This is the "shifted" entropy of the SCONES code (``cuturi-entropy``); the ``t log t`` form
    H = exp(V/λ − 1) only moves φ by λ. With it, Sinkhorn potentials (f, g) *are* (φ, ψ).
    """

    name = "kl"

    def penalty(self, v: Tensor) -> Tensor:
        return self.lam * torch.expm1(v / self.lam)

    def density(self, v: Tensor) -> Tensor:
        return torch.exp(v / self.lam)

    def log_density(self, v: Tensor) -> Tensor:
        return v / self.lam

    def dlog_density(self, v: Tensor) -> Tensor:
        return torch.full_like(v, 1.0 / self.lam)


class ChiSquared(Regularizer):
    """χ² regulariser λ·E_{p⊗q}[(dπ/d(p⊗q))²] (SCONES code name ``l2``).

    H*(V) = relu(V)² / (4λ),   H = relu(V) / (2λ).

    log H is −∞ where V ≤ 0, so the score term uses the softplus smoothing of the SCONES code,
    H_β = softplus_β(V) / (2λ) with softplus_β(v) = log(1 + exp(βv)) / β, giving

        d log H_β / dV = sigmoid(βV) / softplus_β(V).

    ``beta`` really is used here (the original code read it from the wrong config node and always
    used β = 1, see spec pitfall P1). Larger β → closer to the exact ∇V / V on {V > 0}.
    """

    name = "chi2"

    def __init__(self, lam: float, beta: float = 1.0) -> None:
        super().__init__(lam)
        beta = float(beta)
        if not math.isfinite(beta) or beta <= 0:
            raise ValueError(f"regularizer.beta must be > 0, got {beta}")
        self.beta = beta

    def penalty(self, v: Tensor) -> Tensor:
        return F.relu(v).pow(2) / (4.0 * self.lam)

    def density(self, v: Tensor) -> Tensor:
        return F.relu(v) / (2.0 * self.lam)

    def log_density(self, v: Tensor) -> Tensor:
        """Smoothed log H_β = log softplus_β(V) − log 2λ (finite everywhere, ≈ βV − log β for βV ≪ 0)."""
        t = self.beta * v
        log_sp = torch.where(t <= -30.0, t, torch.log(F.softplus(t.clamp_min(-30.0))))
        return log_sp - math.log(self.beta) - math.log(2.0 * self.lam)

    def dlog_density(self, v: Tensor) -> Tensor:
        t = self.beta * v
        ratio = torch.sigmoid(t) / F.softplus(t.clamp_min(-30.0))
        return self.beta * torch.where(t < -30.0, torch.ones_like(t), ratio)

    def __repr__(self) -> str:
        return f"ChiSquared(lam={self.lam}, beta={self.beta})"

