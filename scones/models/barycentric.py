r"""Barycentric projection baseline (Seguy et al. 2018) with frozen dual potentials.

    min_T  E_{p⊗q}[ H(x, y) · c(T(x), y) ]

whose minimiser for the squared cost is the conditional mean T(x) = E_π[y | x]. Estimated on independent
batches with all n² pairs (``pairs="all"``) or the diagonal pairs (``pairs="diagonal"``, SCONES code).
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import nn

from scones.models.base import adam, is_log_step, loss_is_usable
from scones.ot.dual import compatibility, violation_matrix


class BarycentricModule(pl.LightningModule):
    def __init__(
        self, net: nn.Module, potentials, lr: float = 1e-4, pairs: str = "all", skip_nonfinite: bool = False
    ):
        super().__init__()
        self.net, self.lr, self.pairs, self.skip_nonfinite = net, lr, pairs, skip_nonfinite
        self.potentials = potentials
        if isinstance(potentials, nn.Module):  # frozen; non-module potentials (Online Sinkhorn) have no params
            potentials.requires_grad_(False)

    def loss(self, x, y):
        pot = self.potentials
        tx = self.net(x).reshape(x.shape)
        with torch.no_grad():
            if self.pairs == "all":
                h = pot.regularizer.density(violation_matrix(pot, x, y))
            else:
                h = compatibility(pot, x, y)
        if self.pairs == "all":
            return (h * pot.cost.pairwise(tx, y)).mean()
        return (h * pot.cost(tx, y)).mean()

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss(x, y)
        if not loss_is_usable(self, loss, "bp"):
            return None
        if is_log_step(self):
            self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def configure_optimizers(self):
        return adam(self, self.net.parameters(), lr=self.lr)
