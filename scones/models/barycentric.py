"""The Lightning module of the barycentric-projection stage; the losses are :mod:`scones.ot.barycentric`."""

from __future__ import annotations

from torch import nn

from scones.models.base import StageModule
from scones.ot.barycentric import ESTIMATORS, barycentric_loss


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
        tx = self.net(x).reshape(x.shape)
        return barycentric_loss(self.potentials, tx, x, y, self.estimator, self.pairs), {}

    def trained_parameters(self):
        return self.net.parameters()
