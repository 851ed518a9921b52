r"""Bures–Wasserstein unexplained variance percentage (Korotin et al. 2021).

    BW²(Σ̂, Σ) = ½ tr(Σ̂ + Σ − 2 (Σ^{1/2} Σ̂ Σ^{1/2})^{1/2})     (½-cost convention)
    BW-UVP(Σ̂; Σ) = BW²(Σ̂, Σ) / (½ tr Σ)   (+ ½‖μ̂ − μ‖² / (½ tr Σ) when means are given)

Returned as a *fraction* (multiply by 100 for %), like the SCONES code.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from scones.ot.gaussian import sqrtm_psd


def bures_wasserstein_sq(cov_hat: ArrayLike, cov: ArrayLike) -> float:
    """½-convention squared Bures distance between two covariance matrices."""
    cov_hat = np.asarray(cov_hat, dtype=np.float64)
    cov = np.asarray(cov, dtype=np.float64)
    root = sqrtm_psd(cov)
    cross = sqrtm_psd(root @ cov_hat @ root)
    return float(max(0.5 * (np.trace(cov_hat) + np.trace(cov) - 2.0 * np.trace(cross)), 0.0))


def bw_uvp(
    cov_hat: ArrayLike, cov: ArrayLike, mean_hat: ArrayLike | None = None, mean: ArrayLike | None = None
) -> float:
    """BW-UVP of a fitted Gaussian (mean_hat, cov_hat) against the truth (mean, cov), as a fraction."""
    cov = np.asarray(cov, dtype=np.float64)
    num = bures_wasserstein_sq(cov_hat, cov)
    if mean_hat is not None and mean is not None:
        num += 0.5 * float(np.sum((np.asarray(mean_hat) - np.asarray(mean)) ** 2))
    return num / (0.5 * float(np.trace(cov)))


def bw_uvp_samples(samples: ArrayLike, cov: ArrayLike, mean: ArrayLike | None = None) -> float:
    """BW-UVP of the empirical mean/covariance of ``samples`` ``(n, D)`` against N(mean, cov).

    With ``mean=None`` the mean term is dropped (the SCONES convention for zero-mean Gaussians).
    """
    s = np.asarray(samples, dtype=np.float64)
    cov_hat = np.cov(s, rowvar=False)
    if mean is None:
        return bw_uvp(cov_hat, cov)
    return bw_uvp(cov_hat, cov, s.mean(0), mean)
