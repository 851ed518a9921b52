"""The Lightning module that learns the dual potentials (φ, ψ) (SCONES Alg. 1); the maths is in
:mod:`scones.ot.dual`."""

from __future__ import annotations

import torch

from scones.models.base import StageModule
from scones.ot.dual import OBJECTIVES, DualPotentials, _kl_lam, dual_objective
from scones.ot.health import marginal_violation


class DualModule(StageModule):
    """Learns (φ, ψ) by maximising the regularised dual J on independent batches ``(x, y)``.

    Logs ``train/dual`` (J), ``train/loss`` (−J) and ``train/mean_H`` (E_{p⊗q}[H], → 1 at the optimum; with
    ``objective="logmeanexp"`` it is uncalibrated until :func:`calibrate_mass_` runs after training). With
    ``health_data=(x, y)`` (fixed held-out samples, or a zero-argument callable returning them, called at the first
    use) it also logs ``train/health`` and ``train/health_noise``, the marginal check of
    :func:`scones.ot.health.marginal_violation` (the violation → below 2× its noise at convergence; cheap: one
    n × m pass, no derivatives), every ``health_every`` steps. ``lr_schedule="cosine"`` decays the learning rate
    to 0 over the stage (the late, small steps average the heavy-tailed gradient noise of a sharp plan out).
    """

    stage = "dual"

    def __init__(
        self,
        potentials: DualPotentials,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        pairs: str = "all",
        skip_nonfinite: bool = False,
        objective: str = "dual",
        health_data=None,
        health_every: int = 0,
        lr_schedule: str = "constant",
    ) -> None:
        super().__init__(lr, skip_nonfinite, betas=tuple(betas), weight_decay=weight_decay)
        if objective not in OBJECTIVES:
            raise ValueError(f"dual.objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
        if objective == "logmeanexp":
            _kl_lam(potentials, "dual.objective=logmeanexp")
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"dual.lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
        self.potentials, self.pairs, self.objective = potentials, pairs, objective
        self.health_data, self.health_every, self.lr_schedule = health_data, int(health_every), lr_schedule

    def loss(self, batch):
        x, y = batch
        j, mean_h = dual_objective(self.potentials, x, y, self.pairs, self.objective)
        return -j, {"train/dual": j, "train/mean_H": mean_h}

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.health_data is not None and self.health_every > 0 and (self.global_step + 1) % self.health_every == 0:
            h = self.health()
            self.log("train/health", h["violation"])
            self.log("train/health_noise", h["noise"])
        return loss

    def health(self) -> dict:
        """:func:`~scones.ot.health.marginal_violation` of the current potentials on ``health_data``."""
        if callable(self.health_data):
            self.health_data = self.health_data()
        x, y = (t.to(self.device) for t in self.health_data)
        return marginal_violation(self.potentials, x, y)

    def configure_optimizers(self):
        opt = super().configure_optimizers()
        if self.lr_schedule == "constant":
            return opt
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, int(self.trainer.max_steps)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
