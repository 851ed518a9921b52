"""Distributions on R^d used as SCONES source/target measures.

Protocol (all a SCONES stage needs; plug your own class in with Hydra ``_target_``):

- ``dim``: int, or ``shape``: tuple for images (``dim`` = product of ``shape``);
- ``sample(n, generator=None) -> Tensor (n, *shape)``, float32;
- optional ``score(y) -> Tensor``: exact ∇ log density (used instead of a learned score);
- optional ``log_prob(y) -> Tensor (n,)``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import Tensor

from scones.ot.gaussian import covariance_pair


class Distribution:
    """Base class of a sampleable distribution on R^dim."""

    dim: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.dim,)

    @property
    def has_score(self) -> bool:
        return type(self).score is not Distribution.score

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError

    def score(self, y: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no exact score; train a score model")


class Gaussian(Distribution):
    """N(mean, cov) with exact score −cov⁻¹ (y − mean) and log-density."""

    def __init__(self, mean: ArrayLike | None = None, cov: ArrayLike | None = None, dim: int | None = None) -> None:
        if cov is None:
            if dim is None:
                raise ValueError("Gaussian needs `cov` or `dim`")
            cov = np.eye(dim)
        cov = torch.as_tensor(np.asarray(cov, dtype=np.float64))
        if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
            raise ValueError(f"Gaussian.cov must be a square matrix, got shape {tuple(cov.shape)}")
        self.dim = cov.shape[0]
        mean = np.zeros(self.dim) if mean is None else mean
        mean = torch.as_tensor(np.asarray(mean, dtype=np.float64))
        if mean.shape != (self.dim,):
            raise ValueError(f"Gaussian.mean has shape {tuple(mean.shape)}, expected ({self.dim},)")
        self.mean64, self.cov64 = mean, cov
        self._chol = torch.linalg.cholesky(cov)
        self._prec = torch.linalg.inv(cov)
        self._logdet = float(torch.logdet(cov))

    @property
    def mean_np(self) -> np.ndarray:
        return self.mean64.numpy()

    @property
    def cov_np(self) -> np.ndarray:
        return self.cov64.numpy()

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.mean64 + z @ self._chol.T).float()

    def _score_constants(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """(Σ⁻¹, m Σ⁻¹) in ``like``'s dtype/device, cast once per (dtype, device) and cached (samplers call
        ``score`` thousands of times; converting the float64 matrices every call dominated small-d steps)."""
        cache = self.__dict__.setdefault("_score_cache", {})
        key = (like.dtype, like.device)
        if key not in cache:
            cache[key] = (self._prec.to(like), (self.mean64 @ self._prec).to(like))
        return cache[key]

    def score(self, y: Tensor) -> Tensor:
        """−Σ⁻¹(y − m) for a batch ``(n, d)``, computed as m Σ⁻¹ − y Σ⁻¹ in one ``addmm`` (Σ⁻¹ symmetric)."""
        prec, shift = self._score_constants(y)
        return torch.addmm(shift, y, prec, alpha=-1.0)

    def log_prob(self, y: Tensor) -> Tensor:
        diff = y.double() - self.mean64
        maha = ((diff @ self._prec) * diff).sum(1)
        return (-0.5 * (maha + self._logdet + self.dim * math.log(2 * math.pi))).to(y.dtype)


class StandardGaussian(Gaussian):
    """N(0, I_dim)."""

    def __init__(self, dim: int = 2) -> None:
        super().__init__(dim=dim)


class RandomGaussian(Gaussian):
    """Zero-mean Gaussian with a seeded random covariance (eigenvalues in [1, 10], random rotation).

    ``role="source"`` / ``"target"`` picks one side of the ``pair``-th covariance pair for ``dim``,
    see :func:`scones.ot.gaussian.covariance_pair`.
    """

    def __init__(self, dim: int, pair: int = 0, role: str = "source", seed: int = 2039) -> None:
        if role not in ("source", "target"):
            raise ValueError(f"RandomGaussian.role must be 'source' or 'target', got {role!r}")
        a, b = covariance_pair(int(dim), int(pair), int(seed))
        super().__init__(cov=a if role == "source" else b)
        self.pair, self.role = int(pair), role


class GaussianMixture(Distribution):
    """Σ_k w_k N(m_k, diag(s_k²)) with exact score (isotropic or diagonal components)."""

    def __init__(self, means: ArrayLike, stds: ArrayLike = 1.0, weights: ArrayLike | None = None) -> None:
        self.means = torch.as_tensor(np.asarray(means, dtype=np.float32))
        k, self.dim = self.means.shape
        stds = torch.as_tensor(np.asarray(stds, dtype=np.float32))
        self.stds = stds.expand(k, self.dim).clone() if stds.ndim < 2 else stds.reshape(k, self.dim)
        w = torch.ones(k) if weights is None else torch.as_tensor(np.asarray(weights, dtype=np.float32))
        self.weights = w / w.sum()

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        idx = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator)
        return self.means[idx] + self.stds[idx] * z

    def _log_comp(self, y: Tensor) -> Tensor:
        """log w_k + log N(y; m_k, diag s_k²) ``(n, k)``, through matrix products: no ``(n, k, d)`` tensor, so a
        mixture of thousands of images scores a batch at once. The squared Mahalanobis distance
        Σ_d (y_d − m_kd)²/s_kd² = y² · p_k − 2 y · (m_k p_k) + m_k² · p_k (p = 1/s²) is expanded in float64, which
        keeps the cancellation of its large terms (p = 10⁴ at σ = 0.01) well below the logits' scale."""
        y64, m, p = y.double(), self.means.to(y.device, torch.float64), self.stds.to(y.device, torch.float64).pow(-2)
        maha = y64.pow(2) @ p.T - 2.0 * (y64 @ (m * p).T) + (m.pow(2) * p).sum(-1)[None]
        norm = torch.log(self.weights.to(y.device, torch.float64)) + 0.5 * torch.log(p).sum(-1)
        return (norm[None] - 0.5 * maha.clamp_min(0.0) - 0.5 * self.dim * math.log(2 * math.pi)).to(y.dtype)

    def log_prob(self, y: Tensor) -> Tensor:
        return torch.logsumexp(self._log_comp(y), dim=1)

    def score(self, y: Tensor) -> Tensor:
        """Σ_k r_k(y) (m_k − y)/s_k² with responsibilities r = softmax(log-components) ``(n, k)``: two matrix
        products, r (m/s²) − y ⊙ (r (1/s²))."""
        resp = torch.softmax(self._log_comp(y), dim=1)
        m, p = self.means.to(y), self.stds.to(y).pow(-2)
        return resp @ (m * p) - y * (resp @ p)


class FullGaussianMixture(Distribution):
    """Σ_k w_k N(m_k, C_k) with full covariances, exact score and log-density, and :meth:`convolved` (the mixture
    plus N(0, σ²I) noise, i.e. the data law at noise level σ of a score model fitted by :meth:`fit`).

    Each C_k is held as its eigendecomposition U_k diag(λ_k) U_kᵀ (float64), so adding σ²I only shifts λ_k:
    the convolved mixture of any σ costs no new factorisation. Memory k·d² floats (d = 256, k = 20: 10 MB).
    """

    def __init__(self, means: ArrayLike, covs: ArrayLike, weights: ArrayLike | None = None,
                 _eig: tuple[Tensor, Tensor] | None = None) -> None:
        self.means64 = torch.as_tensor(np.asarray(means, dtype=np.float64))
        if self.means64.ndim != 2:
            raise ValueError(f"FullGaussianMixture.means must be (k, d), got shape {tuple(self.means64.shape)}")
        k, self.dim = self.means64.shape
        if _eig is None:
            covs = torch.as_tensor(np.asarray(covs, dtype=np.float64))
            if covs.shape != (k, self.dim, self.dim):
                raise ValueError(f"FullGaussianMixture.covs must be (k, d, d) = {(k, self.dim, self.dim)}, "
                                 f"got {tuple(covs.shape)}")
            evals, evecs = torch.linalg.eigh(0.5 * (covs + covs.transpose(1, 2)))
            if float(evals.min()) <= 0.0:
                raise ValueError(f"FullGaussianMixture: covariances must be positive definite (smallest eigenvalue "
                                 f"{float(evals.min()):.3g}); add a ridge (fit's reg_covar)")
            _eig = (evals, evecs)
        self.evals, self.evecs = _eig
        w = torch.ones(k) if weights is None else torch.as_tensor(np.asarray(weights, dtype=np.float64))
        self.weights64 = (w / w.sum()).double()

    @classmethod
    def fit(cls, x: Tensor, n_components: int, reg_covar: float = 1e-2, seed: int = 0,
            max_iter: int = 200) -> FullGaussianMixture:
        """Maximum-likelihood fit to samples ``x (n, *shape)`` (flattened) by EM (scikit-learn's
        ``GaussianMixture(covariance_type="full")``, k-means start); ``reg_covar`` is added to every covariance's
        diagonal, which also keeps it invertible where the data never varies (a black image border)."""
        from sklearn.mixture import GaussianMixture as SkGaussianMixture

        flat = x.detach().reshape(x.shape[0], -1).double().cpu().numpy()
        if flat.shape[0] < n_components:
            raise ValueError(f"FullGaussianMixture.fit: {flat.shape[0]} samples for {n_components} components")
        gm = SkGaussianMixture(n_components, covariance_type="full", reg_covar=reg_covar, random_state=seed,
                               max_iter=max_iter).fit(flat)
        return cls(gm.means_, gm.covariances_, gm.weights_)

    def convolved(self, sigma: float) -> FullGaussianMixture:
        """The law of y + σz, z ~ N(0, I): every C_k + σ²I (same eigenvectors)."""
        return FullGaussianMixture(self.means64, None, self.weights64,
                                   _eig=(self.evals + float(sigma) ** 2, self.evecs))

    def to(self, device) -> FullGaussianMixture:
        """The same mixture with its tensors on ``device`` (scores are computed where ``y`` lives)."""
        return FullGaussianMixture(self.means64.to(device), None, self.weights64.to(device),
                                   _eig=(self.evals.to(device), self.evecs.to(device)))

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        w, evals, evecs, means = (t.cpu() for t in (self.weights64, self.evals, self.evecs, self.means64))
        idx = torch.multinomial(w, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64) * evals[idx].sqrt()
        out = torch.empty(n, self.dim, dtype=torch.float64)
        for k in idx.unique().tolist():  # a loop over the few components, each a matrix product over its samples
            rows = idx == k
            out[rows] = means[k] + z[rows] @ evecs[k].T
        return out.float()

    def _components(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """(log w_k + log N(y; m_k, C_k) ``(n, k)``, U_kᵀ(y − m_k)/λ_k ``(k, n, d)``), in float64."""
        y64 = y.reshape(y.shape[0], -1).to(torch.float64)
        evecs, evals, means = (t.to(y64.device) for t in (self.evecs, self.evals, self.means64))  # no-op if there
        proj = y64 @ evecs - (means[:, None, :] @ evecs)  # (k, n, d): U_kᵀ(y − m_k), batched matrix products
        scaled = proj / evals[:, None, :]
        maha = (proj * scaled).sum(-1).T
        norm = torch.log(self.weights64.to(y64.device)) - 0.5 * evals.log().sum(-1)
        return norm[None] - 0.5 * maha - 0.5 * self.dim * math.log(2 * math.pi), scaled

    def log_prob(self, y: Tensor) -> Tensor:
        return torch.logsumexp(self._components(y)[0], dim=1).to(y.dtype)

    def score(self, y: Tensor) -> Tensor:
        """−Σ_k r_k(y) C_k⁻¹(y − m_k), responsibilities r = softmax(log-components); ``y (n, d)`` or any
        ``(n, *shape)`` with d elements per sample (returned in ``y``'s shape)."""
        logc, scaled = self._components(y)
        resp = torch.softmax(logc, dim=1)
        s = -((resp.T[:, :, None] * scaled) @ self.evecs.to(scaled.device).transpose(1, 2)).sum(0)
        return s.to(y.dtype).reshape(y.shape)


class SwissRoll(Distribution):
    """2-D Swiss roll: sklearn ``make_swiss_roll(noise)`` coordinates (x, z), as in the SCONES paper (Fig. 4).

    Sampled with torch (same law as sklearn: t = 1.5π(1 + 2u), (t cos t, t sin t) + noise·N(0, I)).
    """

    dim = 2

    def __init__(self, noise: float = 0.25, scale: float = 1.0) -> None:
        self.noise, self.scale = float(noise), float(scale)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=generator))
        pts = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1)
        pts = pts + self.noise * torch.randn(n, 2, generator=generator)
        return self.scale * pts


