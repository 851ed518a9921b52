r"""The barycentric-projection losses (Seguy et al. 2018) for frozen dual potentials: pure maths, no Lightning.

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
from torch import Tensor

from scones.ot.dual import compatibility, violation_matrix

Estimator = Literal["seguy", "self_normalised", "potential"]
ESTIMATORS: tuple[str, ...] = get_args(Estimator)


def potential_conditional_mean(pot, x: Tensor) -> Tensor:
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


def barycentric_loss(pot, tx: Tensor, x: Tensor, y: Tensor, estimator: str = "seguy", pairs: str = "all") -> Tensor:
    """The loss of the map's outputs ``tx`` = T(x) (shape of ``x``) on a batch of independent ``x``, ``y`` for the
    frozen potentials ``pot`` (see the module docstring); gradients flow into ``tx`` only."""
    if estimator == "potential":
        return pot.cost(tx, potential_conditional_mean(pot, x)).mean()
    if estimator == "self_normalised":
        with torch.no_grad():
            w = torch.softmax(pot.regularizer.log_density(violation_matrix(pot, x, y)), dim=1)
            target = (w @ y.reshape(y.shape[0], -1)).reshape(x.shape)
        return pot.cost(tx, target).mean()
    if estimator != "seguy":
        raise ValueError(f"bp.estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    with torch.no_grad():
        h = pot.regularizer.density(violation_matrix(pot, x, y)) if pairs == "all" else compatibility(pot, x, y)
    if pairs == "all":
        return (h * pot.cost.pairwise(tx, y)).mean()
    return (h * pot.cost(tx, y)).mean()


__all__ = ["ESTIMATORS", "Estimator", "barycentric_loss", "potential_conditional_mean"]
