r"""Barycentric projection baseline (Seguy et al. 2018) with frozen dual potentials.

    min_T  E_{p⊗q}[ H(x, y) · c(T(x), y) ]

whose minimiser for the squared cost is the conditional mean T(x) = E_π[y | x]. Estimated on independent
batches with all n² pairs (``pairs="all"``) or the diagonal pairs (``pairs="diagonal"``, SCONES code).
"""

from __future__ import annotations

import torch
from torch import nn

from scones.models.base import StageModule
from scones.ot.dual import compatibility, violation_matrix


class BarycentricModule(StageModule):
    """Trains the map ``net`` (T) against frozen ``potentials``; only T's parameters are optimised."""

    stage = "bp"

    def __init__(
        self, net: nn.Module, potentials, lr: float = 1e-4, pairs: str = "all", skip_nonfinite: bool = False
    ):
        super().__init__(lr, skip_nonfinite)
        self.net, self.pairs = net, pairs
        self.potentials = potentials
        if isinstance(potentials, nn.Module):  # frozen; non-module potentials (Online Sinkhorn) have no params
            potentials.requires_grad_(False)

    def loss(self, batch):
        x, y = batch
        pot = self.potentials
        tx = self.net(x).reshape(x.shape)
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
