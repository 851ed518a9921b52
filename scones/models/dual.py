"""The Lightning module that learns the dual potentials (φ, ψ) (SCONES Alg. 1); the maths is in
:mod:`scones.ot.dual`."""

from __future__ import annotations

from scones.models.base import StageModule
from scones.ot.dual import OBJECTIVES, DualPotentials, _kl_lam, dual_objective


class DualModule(StageModule):
    """Learns (φ, ψ) by maximising the regularised dual J on independent batches ``(x, y)``.

    Logs ``train/dual`` (J), ``train/loss`` (−J) and ``train/mean_H`` (E_{p⊗q}[H], → 1 at the optimum; with
    ``objective="logmeanexp"`` it is uncalibrated until :func:`calibrate_mass_` runs after training).
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
    ) -> None:
        super().__init__(lr, skip_nonfinite, betas=tuple(betas), weight_decay=weight_decay)
        if objective not in OBJECTIVES:
            raise ValueError(f"dual.objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
        if objective == "logmeanexp":
            _kl_lam(potentials, "dual.objective=logmeanexp")
        self.potentials, self.pairs, self.objective = potentials, pairs, objective

    def loss(self, batch):
        x, y = batch
        j, mean_h = dual_objective(self.potentials, x, y, self.pairs, self.objective)
        return -j, {"train/dual": j, "train/mean_H": mean_h}
