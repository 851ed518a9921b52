r"""Denoising score matching (Vincent 2011; NCSN σ-weighting) for a noise-conditional score model."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from scones.models.dual import check_finite_loss


def dsm_loss(
    net: nn.Module,
    y: Tensor,
    sigmas: Tensor | None = None,
    labels: Tensor | None = None,
    anneal_power: float = 2.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """σ-weighted denoising score-matching loss (Song & Ermon 2019, eq. 6; anneal_power 2 = λ(σ) = σ²).

        ℓ(θ) = mean_i ½ σ_i^p ‖s_θ(ỹ_i, σ_i) + z_i / σ_i‖²,   ỹ_i = y_i + σ_i z_i,   z_i ~ N(0, I),

    with σ_i = σ_{l_i}, ``p = anneal_power``, the squared norm summed over all pixels (not averaged), and
    noise-level indices ``l_i`` drawn uniformly in ``[0, L)`` unless ``labels`` is given. The minimiser is
    the score of the data convolved with N(0, σ²I); for data N(0, s²I) in D dims the minimum value at
    level σ is ``(D/2)·s²/(s²+σ²)`` (used in the tests).

    Args:
        net: callable ``net(ỹ, sigma)`` receiving the σ values ``(n,)`` (see module docstring).
        y: clean data ``(n, *shape)``.
        sigmas: ``(L,)`` schedule; defaults to ``net.sigmas``.
        labels: optional ``(n,)`` LongTensor of level indices.
        generator: optional torch generator for the levels and the noise (must live on ``y.device``).

    Returns:
        scalar loss (mean over the batch).
    """
    if sigmas is None:
        sigmas = getattr(net, "sigmas", None)
        if sigmas is None:
            raise ValueError("dsm_loss needs `sigmas` (the network has no `sigmas` buffer)")
    sigmas = sigmas.to(y)
    n = y.shape[0]
    if labels is None:
        labels = torch.randint(0, sigmas.numel(), (n,), device=y.device, generator=generator)
    sig = sigmas[labels]
    sig_b = sig.view(n, *([1] * (y.ndim - 1)))
    z = torch.randn(y.shape, device=y.device, dtype=y.dtype, generator=generator)
    scores = net(y + sig_b * z, sig)
    sq = (scores + z / sig_b).pow(2).reshape(n, -1).sum(1)
    return (0.5 * sq * sig.pow(anneal_power)).mean()


class ScoreModule(pl.LightningModule):
    """Trains a noise-conditional score network ``net(y, sigma)`` on target samples by DSM."""

    def __init__(
        self, net: nn.Module, sigmas: Tensor, lr: float = 1e-3, skip_nonfinite: bool = False
    ) -> None:
        super().__init__()
        self.net, self.lr, self.skip_nonfinite = net, lr, skip_nonfinite
        self.register_buffer("sigmas", torch.as_tensor(sigmas, dtype=torch.float32))

    def training_step(self, batch, batch_idx):
        y = batch[-1] if isinstance(batch, (tuple, list)) else batch
        loss = dsm_loss(self.net, y, self.sigmas)
        if not torch.isfinite(loss):
            if self.skip_nonfinite:
                self.log("train/skipped_nonfinite", 1.0, reduce_fx="sum")
                return None
            check_finite_loss(loss, "score", self.global_step)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.net.parameters(), lr=self.lr)

    def score(self, y: Tensor, level: int) -> Tensor:
        """s_θ(y, σ_level) for a whole batch."""
        return self.net(y, self.sigmas[level].expand(y.shape[0]))
