r"""Closed-form entropic OT between Gaussians (ground truth for the Gaussian experiments).

Problem:  min_π E_π‖x − y‖² + λ·KL(π ‖ N(m_a, A) ⊗ N(m_b, B)),  cost summed over coordinates (no ½).
This is Janati et al. (2020) with 2σ² = λ, POT ``ot.sinkhorn(a, b, ot.dist(x, y), reg=λ)`` and the
SCONES λ. The optimal plan is Gaussian:

    D_σ = (4 A^{1/2} B A^{1/2} + σ⁴ I)^{1/2},   C = ½ A^{1/2} D_σ A^{-1/2} − (σ²/2) I,
    π* = N((m_a, m_b), [[A, C], [Cᵀ, B]]).

All functions take and return float64 NumPy arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike


def sqrtm_psd(m: ArrayLike) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (eigh-based)."""
    m = np.asarray(m, dtype=np.float64)
    m = 0.5 * (m + m.T)
    w, v = np.linalg.eigh(m)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _inv_sqrtm_pd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(0.5 * (m + m.T))
    return (v / np.sqrt(w)) @ v.T


def entropic_cross_covariance(A: ArrayLike, B: ArrayLike, lam: float) -> np.ndarray:
    """Cov(X, Y) = C under the entropic plan between N(·, A) and N(·, B), cost ‖x−y‖², λ·KL."""
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    if lam <= 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    s2 = lam / 2.0
    d = A.shape[0]
    a_half = sqrtm_psd(A)
    d_sig = sqrtm_psd(4.0 * a_half @ B @ a_half + s2**2 * np.eye(d))
    return 0.5 * a_half @ d_sig @ _inv_sqrtm_pd(A) - 0.5 * s2 * np.eye(d)


def entropic_joint_covariance(A: ArrayLike, B: ArrayLike, lam: float) -> np.ndarray:
    """Covariance ``(2d, 2d)`` of the optimal entropic plan, [[A, C], [Cᵀ, B]]."""
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    C = entropic_cross_covariance(A, B, lam)
    return np.block([[A, C], [C.T, B]])


@dataclass(frozen=True)
class GaussianConditional:
    """π*(y | x) = N(m_b + M (x − m_a), S), with M = Cᵀ A⁻¹ and S = B − Cᵀ A⁻¹ C."""

    M: np.ndarray
    S: np.ndarray
    mean_a: np.ndarray
    mean_b: np.ndarray

    def mean(self, x: ArrayLike) -> np.ndarray:
        """Conditional means E[Y | X = x] for x of shape ``(n, d)`` (= the exact barycentric projection)."""
        x = np.asarray(x, dtype=np.float64)
        return self.mean_b + (x - self.mean_a) @ self.M.T

    def sample(self, x: ArrayLike, rng: np.random.Generator | None = None) -> np.ndarray:
        """One exact sample y ~ π*(· | x_i) per row of ``x``."""
        rng = np.random.default_rng() if rng is None else rng
        x = np.asarray(x, dtype=np.float64)
        L = np.linalg.cholesky(self.S + 1e-12 * np.eye(len(self.S)))
        return self.mean(x) + rng.standard_normal(x.shape) @ L.T

    def score(self, x: ArrayLike, y: ArrayLike) -> np.ndarray:
        """∇_y log π*(y | x) = −S⁻¹ (y − E[Y | x])."""
        y = np.asarray(y, dtype=np.float64)
        return -np.linalg.solve(self.S, (y - self.mean(x)).T).T


def entropic_conditional(
    A: ArrayLike, B: ArrayLike, lam: float, mean_a: ArrayLike | None = None, mean_b: ArrayLike | None = None
) -> GaussianConditional:
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    d = A.shape[0]
    C = entropic_cross_covariance(A, B, lam)
    M = np.linalg.solve(A, C).T  # Cᵀ A⁻¹ (A symmetric)
    S = B - M @ C
    S = 0.5 * (S + S.T)
    ma = np.zeros(d) if mean_a is None else np.asarray(mean_a, dtype=np.float64)
    mb = np.zeros(d) if mean_b is None else np.asarray(mean_b, dtype=np.float64)
    return GaussianConditional(M=M, S=S, mean_a=ma, mean_b=mb)


def entropic_potentials(A: ArrayLike, B: ArrayLike, lam: float):
    """Quadratic dual potentials (KL convention, cost ‖x−y‖², zero means), up to (f + k, g − k).

    Returns ``(Qf, Qg)`` with f(x) = xᵀ Qf x and g(y) = yᵀ Qg y, from the joint precision P = Σ⁻¹:
    Qf = I − (λ/2)(P11 − A⁻¹), Qg = I − (λ/2)(P22 − B⁻¹). Hence ∇g(y) = 2 Qg y.
    """
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    d = A.shape[0]
    P = np.linalg.inv(entropic_joint_covariance(A, B, lam))
    Qf = np.eye(d) - 0.5 * lam * (P[:d, :d] - np.linalg.inv(A))
    Qg = np.eye(d) - 0.5 * lam * (P[d:, d:] - np.linalg.inv(B))
    return 0.5 * (Qf + Qf.T), 0.5 * (Qg + Qg.T)


def entropic_ot_value(A: ArrayLike, B: ArrayLike, lam: float, mean_a=None, mean_b=None) -> float:
    """OT_λ = ‖m_a − m_b‖² + tr A + tr B − 2 tr C + (λ/2) log(det A det B / det Σ)."""
    A = np.asarray(A, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    d = A.shape[0]
    ma = np.zeros(d) if mean_a is None else np.asarray(mean_a, dtype=np.float64)
    mb = np.zeros(d) if mean_b is None else np.asarray(mean_b, dtype=np.float64)
    sigma = entropic_joint_covariance(A, B, lam)
    C = sigma[:d, d:]
    logdet = np.linalg.slogdet(A)[1] + np.linalg.slogdet(B)[1] - np.linalg.slogdet(sigma)[1]
    return float(np.sum((ma - mb) ** 2) + np.trace(A) + np.trace(B) - 2 * np.trace(C) + 0.5 * lam * logdet)


def random_covariance(dim: int, rng: np.random.Generator, low: float = 1.0, high: float = 10.0) -> np.ndarray:
    """SPD matrix with eigenvalues uniform in [low, high] and a Haar-random rotation."""
    eig = rng.uniform(low, high, size=dim)
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    q = q * np.sign(np.diag(r))
    return (q * eig) @ q.T


def covariance_pair(dim: int, pair: int, seed: int = 2039) -> tuple[np.ndarray, np.ndarray]:
    """The ``pair``-th (source, target) covariance pair for dimension ``dim``; deterministic in (dim, pair, seed)."""
    rng = np.random.default_rng([seed, dim, pair])
    return random_covariance(dim, rng), random_covariance(dim, rng)


class QuadraticPotential:
    """Torch callable x ↦ xᵀ Q x, shape ``(n,)`` (float32 in, float32 out)."""

    def __init__(self, Q: ArrayLike) -> None:
        import torch

        self.Q = torch.as_tensor(np.asarray(Q), dtype=torch.float32)

    def __call__(self, x):
        Q = self.Q.to(x)
        return ((x @ Q) * x).sum(1)


def exact_gaussian_potentials(A: ArrayLike, B: ArrayLike, lam: float):
    """(φ, ψ) of the closed-form entropic plan as torch callables (see :func:`entropic_potentials`).

    Additive constants are dropped, so E_{p⊗q}[H] ≠ 1, but ∇_y log H (all the sampler needs) is exact.
    """
    Qf, Qg = entropic_potentials(A, B, lam)
    return QuadraticPotential(Qf), QuadraticPotential(Qg)


class ExactGaussianPotentials:
    """Oracle dual potentials of the closed-form plan between N(0, A) and N(0, B) (KL, cost ‖x − y‖²), with the
    interface of :class:`scones.ot.dual.DualPotentials` (``phi``, ``psi``, ``cost``, ``regularizer``), so they
    drop into the samplers, the BP estimators and :func:`scones.ot.health.dual_health` in place of learned ones.

    φ, ψ are the quadratics of :func:`entropic_potentials` with φ's constant fixed so that E_{p⊗q}[H] = 1 exactly
    (H = dπ*/d(p⊗q) in closed form), hence ∇_y log H = (2 Q_g y − 2 (y − x))/λ = −S⁻¹(y − Mx) + B⁻¹y
    (spec acceptance check 2).
    """

    def __init__(self, A: ArrayLike, B: ArrayLike, lam: float) -> None:
        from scones.ot.costs import SquaredEuclidean
        from scones.ot.regularizers import KL

        A, B = np.asarray(A, dtype=np.float64), np.asarray(B, dtype=np.float64)
        Qf, Qg = entropic_potentials(A, B, lam)
        d = A.shape[0]
        # log H(x, y) = log π*(x, y) − log p(x) − log q(y) = (φ + ψ − c)/λ: match the constant at (0, 0)
        sigma = entropic_joint_covariance(A, B, lam)
        const = 0.5 * (np.linalg.slogdet(A)[1] + np.linalg.slogdet(B)[1] - np.linalg.slogdet(sigma)[1])
        self.A, self.B, self.lam, self.dim = A, B, float(lam), d
        self.phi_quadratic, self.psi_quadratic = QuadraticPotential(Qf), QuadraticPotential(Qg)
        self.constant = float(lam * const)
        self.cost, self.regularizer = SquaredEuclidean("sum"), KL(lam)
        self.conditional = entropic_conditional(A, B, lam)

    def phi(self, x):
        return self.phi_quadratic(x) + self.constant

    def psi(self, y):
        return self.psi_quadratic(y)

    def barycentric(self, x):
        """The exact barycentric map E[y | x] = M x (torch in, torch out)."""
        import torch

        return torch.as_tensor(self.conditional.mean(x.double().cpu().numpy()), dtype=x.dtype, device=x.device)

    def to(self, device):  # the quadratics cast their matrices to the input's device on the fly
        return self
