"""The Lightning module that learns the dual potentials (φ, ψ) (SCONES Alg. 1); the maths is in
:mod:`scones.ot.dual`."""

from __future__ import annotations

import pytorch_lightning as pl

from scones.models.base import adam, is_log_step, loss_is_usable
from scones.ot.dual import OBJECTIVES, DualPotentials, _kl_lam, dual_objective


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
