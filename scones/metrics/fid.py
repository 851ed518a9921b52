"""Fréchet Inception Distance (Heusel et al. 2017) through torchmetrics, usable offline.

    FID = ‖μ_r − μ_f‖² + tr(Σ_r + Σ_f − 2 (Σ_r Σ_f)^{1/2}),

with (μ, Σ) the mean and (unbiased) covariance of the features of real / generated images.

Images are float tensors ``(n, C, H, W)`` in [0, 1]; grey images (C = 1) are repeated to 3 channels.

* Default features: the 2048-d pool features of the FID Inception-v3 (torch-fidelity's port of the
  TF graph, as torchmetrics uses). Images are converted to uint8 and resized to 299×299 by the extractor
  itself (bilinear, antialiased), so 16×16 digits and 64×64 faces both work. The weights file
  ``weights-inception-2015-12-05-6726825d.pth`` is looked up, in order, at ``weights_path``, at
  ``$FID_INCEPTION_WEIGHTS``, and in the torch hub cache (``$TORCH_HOME/hub/checkpoints``); nothing is
  downloaded. Requires the ``torch-fidelity`` package.
* ``feature_extractor``: any ``nn.Module`` mapping ``(n, 3, H, W)`` float images in [0, 1] to features
  ``(n, F)``; fully offline (tests use a tiny random conv net). Give it a ``num_features`` attribute or pass
  ``input_size`` so the feature dimension can be probed.

FID values are only comparable when computed with the same extractor and the same number of samples.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILE
)


class FIDWeightsNotFoundError(FileNotFoundError):
    """The Inception-v3 FID weights file could not be found locally."""


def resolve_inception_weights(weights_path: str | os.PathLike | None = None) -> Path:
    """Path of the FID Inception weights: ``weights_path`` → ``$FID_INCEPTION_WEIGHTS`` → torch hub cache."""
    candidates: list[tuple[str, Path]] = []
    if weights_path is not None:
        candidates.append(("weights_path argument", Path(weights_path).expanduser()))
    env = os.environ.get("FID_INCEPTION_WEIGHTS")
    if env:
        candidates.append(("$FID_INCEPTION_WEIGHTS", Path(env).expanduser()))
    hub = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    candidates.append(("torch hub cache", hub))
    for _, path in candidates:
        if path.is_file():
            return path
    tried = "\n".join(f"  - {where}: {path}" for where, path in candidates)
    raise FIDWeightsNotFoundError(
        f"FID Inception-v3 weights '{INCEPTION_WEIGHTS_FILE}' not found. Looked at:\n{tried}\n"
        f"Download them on a machine with internet ({INCEPTION_WEIGHTS_URL}) and either set "
        f"FID_INCEPTION_WEIGHTS=/path/to/{INCEPTION_WEIGHTS_FILE}, pass weights_path=..., or copy the file "
        f"to {hub.parent}/. For offline tests pass feature_extractor=<nn.Module> instead."
    )


def to_rgb(images: Tensor) -> Tensor:
    """``(n, 1|3, H, W)`` in [0, 1] → ``(n, 3, H, W)`` float in [0, 1] (grey repeated, values clamped)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"FID expects images (n, 1 or 3, H, W), got shape {tuple(images.shape)}")
    images = images.float().clamp(0.0, 1.0)
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


class _Features(nn.Module):
    """Wraps a user feature extractor: flattens its output to ``(n, F)`` and exposes ``num_features``."""

    def __init__(self, extractor: nn.Module, num_features: int) -> None:
        super().__init__()
        self.extractor, self.num_features = extractor, int(num_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.extractor(x).reshape(x.shape[0], -1)


class FID:
    """Streaming FID: ``update(images, real=...)`` any number of times, then ``compute()``.

    Args:
        feature_extractor: custom ``nn.Module`` (see module docstring); ``None`` = FID Inception-v3.
        weights_path: Inception weights file (see :func:`resolve_inception_weights`).
        input_size: ``(3, H, W)`` used to probe a custom extractor lacking ``num_features``.
        device: where features are computed.
        batch_size: images per forward pass in :meth:`update`.
    """

    def __init__(
        self,
        feature_extractor: nn.Module | None = None,
        weights_path: str | os.PathLike | None = None,
        input_size: tuple[int, int, int] = (3, 299, 299),
        device: torch.device | str = "cpu",
        batch_size: int = 250,
    ) -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.device, self.batch_size = torch.device(device), int(batch_size)
        if feature_extractor is None:
            path = resolve_inception_weights(weights_path)
            try:
                import torch_fidelity  # noqa: F401
            except ModuleNotFoundError as err:
                raise ModuleNotFoundError(
                    "FID with the Inception-v3 extractor needs `pip install torch-fidelity` "
                    "(or pass feature_extractor=<nn.Module>)"
                ) from err
            self.metric = FrechetInceptionDistance(
                feature=2048, normalize=True, feature_extractor_weights_path=str(path)
            )
        else:
            num = getattr(feature_extractor, "num_features", None)
            if num is None:
                param = next(feature_extractor.parameters(), None)
                probe = torch.rand(2, *input_size, device=param.device if param is not None else "cpu")
                with torch.no_grad():
                    num = feature_extractor.eval()(probe).reshape(2, -1).shape[1]
            self.metric = FrechetInceptionDistance(
                feature=_Features(feature_extractor.eval(), int(num)), normalize=True
            )
        self.metric = self.metric.to(self.device)

    @torch.no_grad()
    def update(self, images: Tensor, real: bool) -> None:
        """Add images ``(n, 1|3, H, W)`` in [0, 1] to the real or generated statistics."""
        for chunk in to_rgb(images).split(self.batch_size):
            self.metric.update(chunk.to(self.device), real=real)

    def compute(self) -> float:
        return float(self.metric.compute())

    def reset(self, real: bool = True) -> None:
        """Forget the generated statistics (and the real ones too if ``real``)."""
        self.metric.reset_real_features = bool(real)
        self.metric.reset()


def fid(
    real: Tensor,
    fake: Tensor,
    feature_extractor: nn.Module | None = None,
    weights_path: str | os.PathLike | None = None,
    **kwargs,
) -> float:
    """FID between two image batches ``(n, 1|3, H, W)`` in [0, 1] (see :class:`FID` for the arguments)."""
    metric = FID(feature_extractor, weights_path, **kwargs)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return metric.compute()


__all__ = ["FID", "FIDWeightsNotFoundError", "fid", "resolve_inception_weights", "to_rgb"]
