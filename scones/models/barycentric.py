r"""Barycentric projection baseline (Seguy et al. 2018) with frozen dual potentials.

    min_T  E_{p⊗q}[ H(x, y) · c(T(x), y) ]

whose minimiser for the squared cost is the conditional mean T(x) = E_π[y | x]. Estimators (``estimator``):

- ``seguy``: the loss above on independent batches with all n² pairs (``pairs="all"``) or the diagonal pairs
  (``pairs="diagonal"``, SCONES code). Unbiased, but at a small λ H is so heavy-tailed that a batch holds almost
  no mass (KL λ = 1 at d = 16: one pair in ~10⁶) and T collapses towards a constant.
- ``self_normalised``: regress T(x_i) on Σ_j w_ij y_j, w_ij = softmax_j log H(x_i, y_j) over the batch's y
  (per-source self-normalised weights). Never collapses, but with an effective sample size ≈ 1 per source it is
  biased towards the batch's nearest y (d = 16, λ = 1: BW-UVP ≈ 0.11 with the exact potentials at batch 500,
  against 0.02 for the exact map).
- ``potential`` (KL, squared cost): regress T(x) on x − ∇φ(x)/(2s), the conditional mean the potential φ
  implies (∇φ(x) = E_π[∇_x c(x, y) | x] for the soft c-transform; c = s‖x − y‖²): the entropic map estimator
  of Pooladian & Niles-Weed (2021), exact when φ is, no weights and no sampling of the plan.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import nn

from scones.models.base import StageModule
from scones.ot.dual import compatibility, violation_matrix

Estimator = Literal["seguy", "self_normalised", "potential"]
ESTIMATORS: tuple[str, ...] = get_args(Estimator)


def potential_conditional_mean(pot, x):
    """x − ∇φ(x)/(2s): E_π[y | x] implied by the KL potential φ for the cost c = s‖x − y‖² (shape of ``x``)."""
    if getattr(pot.regularizer, "name", None) != "kl" or not hasattr(pot.cost, "grad_y"):
        raise ValueError(
            f"bp.estimator=potential needs the KL regulariser and a squared cost; got {pot.regularizer!r} "
            "(use bp.estimator=seguy or self_normalised)"
        )
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(pot.phi(xg).sum(), xg)
    return (x - grad / (2.0 * pot.cost.scale(x))).detach()


class BarycentricModule(StageModule):
    """Trains the map ``net`` (T) against frozen ``potentials``; only T's parameters are optimised."""

    stage = "bp"

    def __init__(
        self, net: nn.Module, potentials, lr: float = 1e-4, pairs: str = "all", skip_nonfinite: bool = False,
        estimator: str = "seguy",
    ):
        super().__init__(lr, skip_nonfinite)
        if estimator not in ESTIMATORS:
            raise ValueError(f"bp.estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
        self.net, self.pairs, self.estimator = net, pairs, estimator
        self.potentials = potentials
        if isinstance(potentials, nn.Module):  # frozen; non-module potentials (Online Sinkhorn) have no params
            potentials.requires_grad_(False)

    def loss(self, batch):
        x, y = batch
        pot = self.potentials
        tx = self.net(x).reshape(x.shape)
        if self.estimator == "potential":
            return pot.cost(tx, potential_conditional_mean(pot, x)).mean(), {}
        if self.estimator == "self_normalised":
            with torch.no_grad():
                w = torch.softmax(pot.regularizer.log_density(violation_matrix(pot, x, y)), dim=1)
                target = (w @ y.reshape(y.shape[0], -1)).reshape(x.shape)
            return pot.cost(tx, target).mean(), {}
        with torch.no_grad():
            if self.pairs == "all":
                h = pot.regularizer.density(violation_matrix(pot, x, y))
            else:
                h = compatibility(pot, x, y)
        if self.pairs == "all":
            return (h * pot.cost.pairwise(tx, y)).mean(), {}
        return (h * pot.cost(tx, y)).mean(), {}

    def trained_parameters(self):
        return self.net.parameters()
