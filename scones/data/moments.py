r"""Gaussians fitted to the first two moments of an image dataset (the paper's "densities" setting, spec §5e).

The SCONES code's density experiments transport N(0, I₇₈₄) to N(μ, Σ + 0.1·I), μ and Σ the pixel mean and
covariance of MNIST in [0, 1] (files ``MNIST-Mean-01.npy``, ``MNIST-Cov-01-add_0.1_noise.npy``; the ridge
reading of "add 0.1 noise" is ours — the raw covariance is singular: border pixels never change). Both sides
then have exact scores and log-densities, and the entropic plan between them is known in closed form, so
the learned density π̂ = H·p⊗q can be compared with the truth in high dimension.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from scones.data.distributions import Gaussian

DATASETS = ("digits", "mnist")


def image_moments(dataset: str = "digits", root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pixel mean ``(D,)`` and covariance ``(D, D)`` (unbiased, float64) of an image set in [0, 1].

    ``digits``: scikit-learn's 1 797 real 8×8 digits (D = 64, offline). ``mnist``: the 60 000 MNIST
    training images at 28×28 (D = 784) from ``root/MNIST/raw`` (see :class:`scones.data.MNISTImages`).
    """
    if dataset == "digits":
        from scones.data.images import load_digits_tensors

        images, _ = load_digits_tensors(8)
    elif dataset == "mnist":
        from scones.data.images import MNISTImages

        images = MNISTImages(root=root, train=True, size=28).images
    else:
        raise ValueError(f"MomentGaussian.dataset must be one of {DATASETS}, got {dataset!r}")
    flat = images.reshape(images.shape[0], -1).double().numpy()
    return flat.mean(0), np.cov(flat, rowvar=False)


class MomentGaussian(Gaussian):
    """N(μ, Σ + ridge·I) with μ, Σ the pixel moments of ``dataset`` (flattened images, pixels in [0, 1]).

    Samples are vectors ``(n, D)``; ``image_shape`` is the image layout for display. Exact ``score`` and
    ``log_prob`` (inherited from :class:`~scones.data.distributions.Gaussian`).

    Args:
        dataset: ``"digits"`` (D = 64) or ``"mnist"`` (D = 784, needs the files under ``root``).
        ridge: added to the covariance diagonal (0.1 in the SCONES configs); must be > 0 since the raw
            pixel covariance is singular.
        root: data root for MNIST (default ``$SCONES_DATA`` or ``./data``).
    """

    def __init__(self, dataset: str = "digits", ridge: float = 0.1, root: str | os.PathLike | None = None) -> None:
        ridge = float(ridge)
        if not ridge > 0:
            raise ValueError(f"MomentGaussian.ridge must be > 0 (the pixel covariance is singular), got {ridge}")
        mean, cov = image_moments(dataset, root)
        super().__init__(mean=mean, cov=cov + ridge * np.eye(cov.shape[0]))
        self.dataset, self.ridge = dataset, ridge
        side = int(round(np.sqrt(self.dim)))
        self.image_shape = (1, side, side)

    def images(self, y: torch.Tensor) -> torch.Tensor:
        """Samples ``(n, D)`` viewed as images ``(n, 1, side, side)``, clamped to [0, 1] for display."""
        return y.reshape(-1, *self.image_shape).clamp(0.0, 1.0)

    def __repr__(self) -> str:
        return f"MomentGaussian(dataset={self.dataset!r}, dim={self.dim}, ridge={self.ridge})"
