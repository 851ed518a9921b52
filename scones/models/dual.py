"""The Lightning module that learns the dual potentials (φ, ψ) (SCONES Alg. 1); the maths is in
:mod:`scones.ot.dual`."""

from __future__ import annotations

import torch

from scones.models.base import StageModule
from scones.ot.dual import (
    DUAL_PAIRS,
    ESTIMATORS,
    OBJECTIVES,
    DualPotentials,
    _kl_lam,
    dual_objective,
    semidual_langevin_losses,
)
from scones.ot.health import marginal_violation
from scones.sampling.chains import ConditionalChains


class DualModule(StageModule):
    """Learns (φ, ψ) by maximising the regularised dual J on independent batches ``(x, y)``.

    Logs ``train/dual`` (J), ``train/loss`` (−J) and ``train/mean_H`` (E_{p⊗q}[H], → 1 at the optimum; with
    ``objective="logmeanexp"`` it is uncalibrated until :func:`calibrate_mass_` runs after training). With
    ``health_data=(x, y)`` (fixed held-out samples, or a zero-argument callable returning them, called at the first
    use) it also logs ``train/health`` and ``train/health_noise``, the marginal check of
    :func:`scones.ot.health.marginal_violation` (the violation → below 2× its noise at convergence; cheap: one
    n × m pass, no derivatives), every ``health_every`` steps. ``lr_schedule="cosine"`` decays the learning rate
    to 0 over the stage (the late, small steps average the heavy-tailed gradient noise of a sharp plan out).
    ``pairs="rows"`` (KL) trains ψ by the batch semi-dual, each source's row of weights normalised over the batch
    (:func:`~scones.ot.dual.dual_objective`), φ by ``objective`` with ψ fixed.

    ``estimator="langevin"`` (KL, squared cost; needs ``prior_score(y, level)``, the target's score, and ``chains``,
    a :class:`~scones.sampling.chains.ConditionalChains` pool of the batch size) replaces the weighted batch pairs by
    samples of the plan (:func:`~scones.ot.dual.semidual_langevin_losses`): each step refreshes and advances the
    chains with the current potentials, new chains start at x − ∇φ(x)/2s; logs ``train/gap`` (→ 0) and
    ``train/phi_fit`` instead of ``train/dual``.
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
        estimator: str = "pairs",
        prior_score=None,
        chains: ConditionalChains | None = None,
    ) -> None:
        super().__init__(lr, skip_nonfinite, lr_schedule, betas=tuple(betas), weight_decay=weight_decay)
        if objective not in OBJECTIVES:
            raise ValueError(f"dual.objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
        if objective == "logmeanexp":
            _kl_lam(potentials, "dual.objective=logmeanexp")
        if pairs not in DUAL_PAIRS:
            raise ValueError(f"dual.pairs must be one of {', '.join(DUAL_PAIRS)}, got {pairs!r}")
        if pairs == "rows":
            _kl_lam(potentials, "dual.pairs=rows")
        if estimator not in ESTIMATORS:
            raise ValueError(f"dual.estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
        if estimator == "langevin":
            _kl_lam(potentials, "dual.estimator=langevin")
            if prior_score is None or chains is None:
                raise ValueError("dual.estimator=langevin needs the target's score (prior_score) and the chains")
        self.potentials, self.pairs, self.objective = potentials, pairs, objective
        self.estimator, self.prior_score, self.chains = estimator, prior_score, chains
        self.unused_parameters = estimator == "langevin"  # φ's output bias is not in its losses (DDP must know)
        self.health_data, self.health_every = health_data, int(health_every)

    def loss(self, batch):
        x, y = batch
        if self.estimator == "langevin":
            return self._langevin_loss(x, y)
        j, mean_h = dual_objective(self.potentials, x, y, self.pairs, self.objective)
        return -j, {"train/dual": j, "train/mean_H": mean_h}

    def _chain_start(self, x):
        """x − ∇φ(x)/2s: the conditional mean implied by φ (a new chain starts at the plan's centre)."""
        s = float(self.potentials.cost.scale(x))
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.potentials.phi(xg).sum(), xg)
        return (x - g / (2.0 * s)).detach()

    def _langevin_loss(self, x, y):
        self.chains.reseed(self.global_rank, self.global_step)  # resumable; different noise on every process
        usable = self.chains.update(self.potentials, self.prior_score, x, self._chain_start)
        loss_psi, loss_phi, gap = semidual_langevin_losses(
            self.potentials, self.chains.x[usable], self.chains.y[usable], y
        )
        return loss_psi + loss_phi, {"train/gap": gap, "train/phi_fit": loss_phi.detach()}

    def setup(self, stage: str) -> None:
        """Under DDP each process owns ``dual.batch_size / world`` chains (its share of the global batch)."""
        world = self.trainer.world_size
        if self.chains is not None and world > 1 and int(self.chains.age.max()) < 0:
            if self.chains.n % world:
                raise ValueError(f"dual.batch_size={self.chains.n} must be divisible by the {world} processes "
                                 f"(the chain pool of dual.estimator=langevin is split between them)")
            self.chains.resize(self.chains.n // world)

    def on_save_checkpoint(self, checkpoint) -> None:
        """Under DDP the checkpoint (written by rank 0) holds every process's chains, gathered here (all ranks
        dump a checkpoint, so the gather is collective)."""
        if self.chains is not None and self.trainer.world_size > 1:
            checkpoint["chains_per_rank"] = {k: self.all_gather(getattr(self.chains, k)).cpu() for k in ("x", "y")}

    def on_load_checkpoint(self, checkpoint) -> None:
        if self.chains is None:
            return
        world = self.trainer.world_size
        per_rank = checkpoint.get("chains_per_rank")
        saved = 1 if per_rank is None else per_rank["x"].shape[0]
        if saved != world:
            raise ValueError(f"this dual stage was checkpointed by {saved} process(es) and is resumed by {world}: its "
                             f"Langevin chains are per process; resume with the same trainer.devices x num_nodes")
        if per_rank is not None:
            prefix = next(n for n, m in self.named_modules() if m is self.chains)
            for k, t in per_rank.items():
                checkpoint["state_dict"][f"{prefix}.{k}"] = t[self.global_rank]

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
