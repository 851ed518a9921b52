r"""Conditional Bures–Wasserstein UVP (cBW₂²-UVP, Gushchin et al. 2023) and the BW-UVP of a joint plan.

For test inputs x_1, …, x_m with exact conditional moments (m_i, C_i) = (E[y | x_i], Cov[y | x_i]) and n model
samples per x_i, with m̂_i, Ĉ_i their sample mean and *unbiased* sample covariance (``np.cov``, ddof = 1):

    cBW-UVP = mean_i [ ½‖m̂_i − m_i‖² + BW²(Ĉ_i, C_i) ] / (½ Var(P1)),
    BW²(Ĉ, C) = ½ tr Ĉ + ½ tr C − tr (C^{1/2} Ĉ C^{1/2})^{1/2}   (½-cost convention, as in ``bw_uvp.py``),
    Var(P1) = tr Cov(P1)   (the target's total variance; the benchmark's ``y_var``).

This is ``calculate_cond_bw`` of ``ngushchin/EntropicOTBenchmark`` (``benchmark/metrics.py``; the released
version divides by ½ y_var): only the Gaussian fit of the model samples enters, the truth side uses exact
moments. Protocol of the paper: 1000 fixed test x ~ P0, 1000 samples per x, reported ×100 (%). Like
``bw_uvp.py`` the functions here return *fractions*. A constant predictor y ≡ E[Y] scores 1 (100 %) in
expectation over x (law of total variance); exact samples score a finite-sample floor decreasing like 1/n.

Computation is batched over x: the cross term uses tr (C^{1/2} Ĉ C^{1/2})^{1/2} = Σ_j √λ_j(Lᵀ Ĉ L) for the
Cholesky factor C = L Lᵀ (Lᵀ Ĉ L is similar to C^{1/2} Ĉ C^{1/2}), i.e. one batched Cholesky and one batched
``eigvalsh``, with no matrix square root. The true C_i must be positive definite.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import ArrayLike

from scones.metrics.bw_uvp import bw_uvp_samples


def _to_f64(a: ArrayLike | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(a if isinstance(a, torch.Tensor) else np.asarray(a)).detach().cpu().to(torch.float64)


def gaussian_fit(samples: ArrayLike | torch.Tensor, chunk_elems: int = 2**24) -> tuple[np.ndarray, np.ndarray]:
    """Per-x sample mean ``(m, D)`` and unbiased covariance ``(m, D, D)``, float64, of ``samples`` ``(m, n, D)``.

    Processed in chunks of about ``chunk_elems`` numbers, so a ``(1000, 1000, 128)`` float32 tensor is fine.
    """
    m, n, d = samples.shape
    if n < 2:
        raise ValueError(f"gaussian_fit needs at least 2 samples per x, got samples.shape = {tuple(samples.shape)}")
    step = max(1, chunk_elems // (n * d))
    means = torch.empty(m, d, dtype=torch.float64)
    covs = torch.empty(m, d, d, dtype=torch.float64)
    for start in range(0, m, step):  # chunks of x, each fully vectorised
        s = _to_f64(samples[start : start + step])
        mu = s.mean(1)
        dev = s - mu[:, None, :]
        means[start : start + step] = mu
        covs[start : start + step] = dev.transpose(1, 2) @ dev / (n - 1)
    return means.numpy(), covs.numpy()


def bures_wasserstein_sq_batched(cov_hat: ArrayLike, cov: ArrayLike) -> np.ndarray:
    """BW²(Ĉ_i, C_i) = ½ tr Ĉ_i + ½ tr C_i − tr (C_i^{1/2} Ĉ_i C_i^{1/2})^{1/2}, ``(m,)``; C_i must be PD.

    Batched counterpart of :func:`scones.metrics.bw_uvp.bures_wasserstein_sq` (same value, clipped at 0).
    """
    cov_hat = _to_f64(cov_hat)
    cov = _to_f64(cov)
    if cov_hat.shape != cov.shape or cov.ndim != 3 or cov.shape[1] != cov.shape[2]:
        raise ValueError(
            f"expected cov_hat and cov of equal shape (m, D, D), got {tuple(cov_hat.shape)} and {tuple(cov.shape)}"
        )
    L, info = torch.linalg.cholesky_ex(0.5 * (cov + cov.transpose(1, 2)))
    if (info != 0).any():
        bad = torch.nonzero(info).flatten()[:5].tolist()
        raise ValueError(f"the true conditional covariances `cov` must be positive definite; not at indices {bad}")
    inner = L.transpose(1, 2) @ cov_hat @ L
    eig = torch.linalg.eigvalsh(0.5 * (inner + inner.transpose(1, 2)))
    cross = eig.clamp_min(0.0).sqrt().sum(-1)
    tr = torch.diagonal(cov_hat, dim1=1, dim2=2).sum(-1) + torch.diagonal(cov, dim1=1, dim2=2).sum(-1)
    return (0.5 * tr - cross).clamp_min(0.0).numpy()


def cbw_uvp_from_moments(
    mean_hat: ArrayLike,
    cov_hat: ArrayLike,
    mean: ArrayLike,
    cov: ArrayLike,
    target_variance: float,
    per_x: bool = False,
) -> float | np.ndarray:
    """cBW-UVP (fraction) of fitted moments (``(m, D)``, ``(m, D, D)``) against the exact ones.

    ``per_x=True`` returns the ``(m,)`` per-x terms (their mean is the metric).
    """
    if not target_variance > 0:
        raise ValueError(f"target_variance must be > 0 (Var(P1) = tr Cov(P1)), got {target_variance}")
    mean_hat, mean = _to_f64(mean_hat).numpy(), _to_f64(mean).numpy()
    per = 0.5 * ((mean_hat - mean) ** 2).sum(-1) + bures_wasserstein_sq_batched(cov_hat, cov)
    per = per / (0.5 * float(target_variance))
    return per if per_x else float(per.mean())


def cbw_uvp(
    samples: ArrayLike | torch.Tensor,
    mean: ArrayLike,
    cov: ArrayLike,
    target_variance: float,
    per_x: bool = False,
) -> float | np.ndarray:
    """cBW-UVP (fraction; ×100 for the paper's %) of model samples ``(m, n, D)`` drawn given x_1..x_m.

    Args:
        samples: n model samples of y | x_i for each of the m test inputs.
        mean, cov: exact conditional moments ``(m, D)``, ``(m, D, D)`` at the same x_i
            (e.g. ``EOTMixtureBenchmark.conditional_moments(x)``).
        target_variance: Var(P1) = tr Cov(P1) (e.g. ``EOTMixtureBenchmark.target_variance``).
    """
    mean = _to_f64(mean)
    if samples.ndim != 3 or samples.shape[0] != mean.shape[0] or samples.shape[-1] != mean.shape[-1]:
        raise ValueError(
            f"samples has shape {tuple(samples.shape)} but the true moments are for {mean.shape[0]} inputs "
            f"of dimension {mean.shape[-1]}: expected samples of shape (m, n, D) = "
            f"({mean.shape[0]}, n, {mean.shape[-1]})"
        )
    mean_hat, cov_hat = gaussian_fit(samples)
    return cbw_uvp_from_moments(mean_hat, cov_hat, mean, cov, target_variance, per_x=per_x)


def plan_bw_uvp(
    x: ArrayLike | torch.Tensor, y: ArrayLike | torch.Tensor, joint_mean: ArrayLike, joint_cov: ArrayLike
) -> float:
    """BW-UVP (fraction) of a plan: Gaussian fit of pairs (x_i, y_i), each ``(n, D)``, vs N(joint_mean, joint_cov).

    :func:`scones.metrics.bw_uvp.bw_uvp_samples` on the ``(n, 2D)`` concatenation (normaliser ½ tr joint_cov).
    For the target-only BW-UVP call ``bw_uvp_samples(y, cov_y, mean_y)`` directly.
    """
    xy = torch.cat([_to_f64(x), _to_f64(y)], dim=1).numpy()
    return bw_uvp_samples(xy, joint_cov, joint_mean)
