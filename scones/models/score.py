r"""Denoising score matching (Vincent 2011; NCSN σ-weighting) for a noise-conditional score model.

For y ~ q, level i ~ U{0..L−1}, z ~ N(0, I):  ỹ = y + σ_i z,
    loss = E[ ½ σ_i² ‖s_θ(ỹ, σ_i) + z/σ_i‖² ]        (anneal power 2: every level weighted equally)
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from scones.models.dual import check_finite_loss


def dsm_loss(score_net: nn.Module, y: Tensor, sigmas: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """σ²-weighted DSM loss of ``score_net(ỹ, σ)`` on a batch ``y`` ``(n, ...)``; ``sigmas`` shape ``(L,)``."""
    idx = torch.randint(len(sigmas), (y.shape[0],), device=y.device, generator=generator)
    sig = sigmas.to(y)[idx].reshape(-1, *([1] * (y.dim() - 1)))
    z = torch.randn(y.shape, device=y.device, dtype=y.dtype, generator=generator)
    s = score_net(y + sig * z, sig.reshape(-1))
    return 0.5 * ((sig * s + z) ** 2).reshape(y.shape[0], -1).sum(1).mean()


class ScoreModule(pl.LightningModule):
    """Trains a noise-conditional score network ``net(y, sigma)`` on target samples by DSM."""

    def __init__(self, net: nn.Module, sigmas: Tensor, lr: float = 1e-3, skip_nonfinite: bool = False) -> None:
        super().__init__()
        self.net, self.lr, self.skip_nonfinite = net, lr, skip_nonfinite
        self.register_buffer("sigmas", torch.as_tensor(sigmas, dtype=torch.float32))

    def training_step(self, batch, batch_idx):
        y = batch[-1] if isinstance(batch, (tuple, list)) else batch
        loss = dsm_loss(self.net, y, self.sigmas)
        if not torch.isfinite(loss):
            if self.skip_nonfinite:
                return None
            check_finite_loss(loss, "score", self.global_step)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.net.parameters(), lr=self.lr)

    def score(self, y: Tensor, level: int) -> Tensor:
        """s_θ(y, σ_level) for a whole batch."""
        return self.net(y, self.sigmas[level].expand(y.shape[0]))
