r"""Entropic-OT pairs with a known plan: Gaussian source, Gaussian-mixture potential.

Construction of Gushchin et al. (NeurIPS 2023 Datasets & Benchmarks, "Building the Bridge of Schrödinger:
A Continuous Entropic Optimal Transport Benchmark", repo ``ngushchin/EntropicOTBenchmark``), re-implemented.

**These are OUR seeded instances, not the official benchmark files** (those ship only in a Google-Drive zip
that is not reachable here): numbers obtained on them are comparable to the paper's only qualitatively.

Conventions
-----------
The benchmark's ε is the weight of the entropy with the *half* squared cost,

    min_π E_π[½‖x − y‖²] + ε·KL(π ‖ P0 ⊗ P1)            (benchmark / static Schrödinger bridge)

Multiplying by 2 gives the project's convention (``SquaredEuclidean(reduction="sum")``, ``KL(lam)``, POT
``ot.sinkhorn(a, b, ot.dist(x, y), reg=lam)``, the SCONES λ) with the *same* optimal plan:

    min_π E_π‖x − y‖² + λ·KL(π ‖ P0 ⊗ P1),     **λ = 2ε**.

Construction
------------
Source P0 = N(a, A). Potential g(y) = Σ_k q_k N(y; m_k, S_k). Define the conditional law

    π*(y | x) = exp(−‖x − y‖² / (2ε)) g(y) / Z(x),     Z(x) = ∫ exp(−‖x − y′‖² / (2ε)) g(y′) dy′,

and the target P1 = law of y when x ~ P0, y ~ π*(· | x). The joint P0(x) π*(y | x) has the Schrödinger form
exp((φ̃(x) + ψ̃(y) − ½‖x − y‖²)/ε) (ψ̃ = ε log g, φ̃ = ε log(p0 / Z)), so it is *the* entropic OT plan between
P0 and P1. In the project's dual convention (plan density exp((φ + ψ − ‖x−y‖²)/λ) w.r.t. P0 ⊗ P1) this means
φ(x) = −λ log Z(x) and ψ(y) = λ (log g(y) − log p1(y)), up to opposite constants. Completing squares:

    π*(y | x) = Σ_k w_k(x) N(y; μ_k(x), Σ_k),
    Σ_k   = (I/ε + S_k⁻¹)⁻¹                     (independent of x),
    μ_k(x) = Σ_k (S_k⁻¹ m_k + x/ε)               (affine in x),
    w_k(x) ∝ q_k N(x; m_k, S_k + εI)            (softmax over k).

Exact conditional moments: with m(x) = E[y | x] = Σ_k w_k μ_k,
Cov[y | x] = Σ_k w_k Σ_k + Σ_k w_k (μ_k − m(x))(μ_k − m(x))ᵀ.
The target P1 has **no closed-form density or score** (Z(x) sits in a denominator inside the x-integral): the
target distribution has ``has_score = False`` and a SCONES run must learn its score. For diagnostics,
:meth:`EOTMixtureBenchmark.target_score_estimate` gives a consistent Monte-Carlo estimate of ∇ log p1.
Mean and covariance of P1 (and of the joint plan) are Rao–Blackwellised Monte-Carlo integrals over x of the
exact conditional moments (antithetic x ↔ 2a − x, fixed seed), so they are deterministic per instance.

Seeded instances (ours)
-----------------------
Following the benchmark's generator draft (``notebooks/GaussianMixtureDraft.ipynb``, commit 438dcb9) and its
released figures (unimodal Gaussian source): a = 0, A = source_std² I (0.5² by default); K = ``n_components``
weights q ~ U(0, 1) normalised; centres m_k such that for every coordinate d, (m_1d, …, m_Kd) is a random
permutation of linspace(−2, 2, K) (K = 5: {−2, −1, 0, 1, 2}); S_k = potential_std² I with, by default,
potential_std = ½ c(D, ε) from the draft's table (c = 0.5 / 1 / 8 / 8 for D = 2 / 16 / 64 / 128 at ε = 0.1
and 0.5 / 1 / 2 / 2 at ε ∈ {1, 10}), linearly interpolated in log₂ D and clamped outside [2, 128]; the ε = 0.1
column is used for ε < √0.1. Weights and centres depend on (seed, dim, n_components) only, so an ε sweep
shares them. Everything is computed in float64; samples are float32 (the ``Distribution`` protocol).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import Tensor

from scones.data.distributions import Distribution, Gaussian

# Draft generator's potential scale c(D), S_k = (c/2)² I: columns for ε = 0.1 and for ε ∈ {1, 10}.
_DRAFT_DIMS = (2.0, 16.0, 64.0, 128.0)
_DRAFT_C_SMALL_EPS = (0.5, 1.0, 8.0, 8.0)
_DRAFT_C_LARGE_EPS = (0.5, 1.0, 2.0, 2.0)


def default_potential_std(dim: int, eps: float) -> float:
    """Default potential component std s (S_k = s² I) of our seeded instances; see the module docstring."""
    column = _DRAFT_C_SMALL_EPS if eps < math.sqrt(0.1) else _DRAFT_C_LARGE_EPS
    c = np.interp(math.log2(dim), np.log2(_DRAFT_DIMS), column)
    return 0.5 * float(c)


def _as_f64(x: ArrayLike | Tensor) -> Tensor:
    """float64 CPU tensor (the ground truth lives on the CPU; model samples may come from a GPU)."""
    return torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).to("cpu", torch.float64)


@dataclass(frozen=True)
class PlanMoments:
    """Moments of the ground-truth plan: x ~ P0 (exact), y ~ P1 (Rao–Blackwellised MC), float64 NumPy."""

    mean_x: np.ndarray  # (D,)
    cov_x: np.ndarray  # (D, D)
    mean_y: np.ndarray  # (D,)
    cov_y: np.ndarray  # (D, D)
    cov_xy: np.ndarray  # (D, D), Cov(X, Y)

    @property
    def target_variance(self) -> float:
        """Var(P1) = tr Cov(P1), the cBW-UVP normaliser (``y_var`` of the benchmark)."""
        return float(np.trace(self.cov_y))

    @property
    def joint_mean(self) -> np.ndarray:
        return np.concatenate([self.mean_x, self.mean_y])

    @property
    def joint_cov(self) -> np.ndarray:
        """Covariance ``(2D, 2D)`` of the plan, [[Cov X, Cov(X, Y)], [Cov(Y, X), Cov Y]]."""
        return np.block([[self.cov_x, self.cov_xy], [self.cov_xy.T, self.cov_y]])


class EOTMixtureBenchmark:
    """Ground-truth entropic OT plan between P0 = N(a, A) and P1, with potential g = Σ_k q_k N(m_k, S_k).

    Args:
        eps: benchmark ε (½-cost convention); the project's λ is ``2 * eps`` (attribute ``lam``).
        source_mean, source_cov: a ``(D,)``, A ``(D, D)``.
        weights, means, covs: q ``(K,)`` (normalised here), m ``(K, D)``, S ``(K, D, D)``.
        moment_samples: number of x's (antithetic pairs included) of the Monte-Carlo integrals for the
            moments of P1 and of the plan.
        moment_seed: seed of those integrals and of :meth:`test_inputs`.

    Shapes: x is ``(m, D)``; per-x quantities carry a leading ``m``. Inputs may be tensors or arrays.
    """

    def __init__(
        self,
        eps: float,
        source_mean: ArrayLike,
        source_cov: ArrayLike,
        weights: ArrayLike,
        means: ArrayLike,
        covs: ArrayLike,
        moment_samples: int = 2**16,
        moment_seed: int = 0,
    ) -> None:
        eps = float(eps)
        if not math.isfinite(eps) or eps <= 0:
            raise ValueError(f"eps must be a finite number > 0, got {eps}")
        self.eps, self.lam = eps, 2.0 * eps
        self.source = Gaussian(mean=np.asarray(source_mean, np.float64), cov=np.asarray(source_cov, np.float64))
        self.dim = d = self.source.dim
        q = _as_f64(weights)
        m = _as_f64(means)
        S = _as_f64(covs)
        k = q.shape[0]
        if q.ndim != 1 or (q <= 0).any():
            raise ValueError(f"weights must be a positive vector (K,), got shape {tuple(q.shape)}")
        if m.shape != (k, d):
            raise ValueError(f"means has shape {tuple(m.shape)}, expected (K, D) = ({k}, {d})")
        if S.shape != (k, d, d):
            raise ValueError(f"covs has shape {tuple(S.shape)}, expected (K, D, D) = ({k}, {d}, {d})")
        self.n_components = k
        self.log_q = torch.log(q / q.sum())
        self.pot_means, self.pot_covs = m, S
        self.pot_precs = torch.linalg.inv(S)
        eye = torch.eye(d, dtype=torch.float64)
        # Conditional components: precision I/ε + S⁻¹, covariance Σ_k, μ_k(x) = bias_k + (Σ_k/ε) x.
        self.cond_precs = eye / eps + self.pot_precs
        self.cond_covs = torch.linalg.inv(self.cond_precs)
        self.cond_covs = 0.5 * (self.cond_covs + self.cond_covs.transpose(-1, -2))
        self.cond_chols = torch.linalg.cholesky(self.cond_covs)
        self._cond_chol_is_diag = [bool(torch.equal(c, torch.diag(torch.diagonal(c)))) for c in self.cond_chols]
        self.cond_bias = torch.einsum("kij,kjl,kl->ki", self.cond_covs, self.pot_precs, m)
        self.cond_slope = self.cond_covs / eps
        # Component weights: w_k(x) ∝ q_k N(x; m_k, S_k + εI).
        wcov = S + eps * eye
        self.weight_precs = torch.linalg.inv(wcov)
        self.weight_logdets = torch.logdet(wcov)
        self.moment_samples, self.moment_seed = int(moment_samples), int(moment_seed)

    # ------------------------------------------------------------------ conditional plan π*(y | x)
    def component_log_weights(self, x: ArrayLike | Tensor) -> Tensor:
        """log w_k(x), ``(m, K)``, normalised over k."""
        logits = self.log_q[None] - 0.5 * (self._maha(_as_f64(x), self.weight_precs) + self.weight_logdets[None])
        return torch.log_softmax(logits, dim=1)

    def _maha(self, x: Tensor, precs: Tensor) -> Tensor:
        """(x − m_k)ᵀ P_k (x − m_k), ``(n, K)``, for x ``(n, D)``, potential centres m_k and precisions P_k."""
        diff = x[None] - self.pot_means[:, None, :]  # (K, n, D)
        return ((diff @ precs) * diff).sum(-1).T

    def component_means(self, x: ArrayLike | Tensor) -> Tensor:
        """μ_k(x), ``(m, K, D)``."""
        x = _as_f64(x)
        return self.cond_bias[None] + torch.einsum("kij,nj->nki", self.cond_slope, x)

    def conditional_mean(self, x: ArrayLike | Tensor) -> Tensor:
        """E[y | x] ``(m, D)`` float64 (= the exact barycentric projection)."""
        w = self.component_log_weights(x).exp()
        return torch.einsum("nk,nki->ni", w, self.component_means(x))

    def conditional_moments(self, x: ArrayLike | Tensor) -> tuple[Tensor, Tensor]:
        """Exact (E[y | x] ``(m, D)``, Cov[y | x] ``(m, D, D)``), float64."""
        w = self.component_log_weights(x).exp()
        mu = self.component_means(x)
        mean = torch.einsum("nk,nki->ni", w, mu)
        dev = w.sqrt()[..., None] * (mu - mean[:, None, :])
        within = (w @ self.cond_covs.reshape(self.n_components, -1)).reshape(-1, self.dim, self.dim)
        cov = within + dev.transpose(1, 2) @ dev
        return mean, cov

    def sample_conditional(
        self, x: ArrayLike | Tensor, n_per_x: int, generator: torch.Generator | None = None
    ) -> Tensor:
        """Exact samples y ~ π*(· | x_i), ``(m, n_per_x, D)`` float32: k ~ w(x_i), y ~ N(μ_k(x_i), Σ_k).

        Processed in chunks of x (about 2²³ numbers of working memory each).
        """
        x = _as_f64(x)
        n_per_x = int(n_per_x)
        out = torch.empty(x.shape[0], n_per_x, self.dim, dtype=torch.float32)
        step = max(1, 2**23 // (self.dim * (self.n_components + n_per_x)))
        for start in range(0, x.shape[0], step):
            out[start : start + step] = self._sample_conditional_chunk(x[start : start + step], n_per_x, generator)
        return out

    def _sample_conditional_chunk(self, x: Tensor, n_per_x: int, generator: torch.Generator | None) -> Tensor:
        mu = self.component_means(x)
        comp = torch.multinomial(self.component_log_weights(x).exp(), n_per_x, replacement=True, generator=generator)
        out = torch.empty(x.shape[0], n_per_x, self.dim, dtype=torch.float32)
        for k in range(self.n_components):  # loop over the K components, vectorised over samples
            rows, cols = torch.nonzero(comp == k, as_tuple=True)
            if rows.numel() == 0:
                continue
            z = torch.randn(rows.numel(), self.dim, generator=generator)  # float32, like the returned samples
            chol = self.cond_chols[k]
            noise = z * torch.diagonal(chol).float() if self._cond_chol_is_diag[k] else z @ chol.T.float()
            out[rows, cols] = mu[rows, k].float() + noise
        return out

    def _conditional_component_logpdf(self, x: Tensor, y: Tensor) -> Tensor:
        """log w_k(x) + log N(y; μ_k(x), Σ_k), ``(n, K)`` for paired rows of x and y."""
        diff = y[:, None, :] - self.component_means(x)
        maha = torch.einsum("nki,kij,nkj->nk", diff, self.cond_precs, diff)
        logdet = torch.logdet(self.cond_covs)
        log_n = -0.5 * (maha + logdet[None] + self.dim * math.log(2 * math.pi))
        return self.component_log_weights(x) + log_n

    def conditional_log_prob(self, x: ArrayLike | Tensor, y: ArrayLike | Tensor) -> Tensor:
        """log π*(y_i | x_i) for paired rows ``(n, D)``, ``(n,)`` float64."""
        return torch.logsumexp(self._conditional_component_logpdf(_as_f64(x), _as_f64(y)), dim=1)

    def conditional_score(self, x: ArrayLike | Tensor, y: ArrayLike | Tensor) -> Tensor:
        """∇_y log π*(y_i | x_i) = Σ_k r_k (−Σ_k⁻¹ (y − μ_k(x))) for paired rows, ``(n, D)`` float64.

        This is what SCONES' ∇ log p1(y) + ∇_y log H(x, y) should equal.
        """
        x, y = _as_f64(x), _as_f64(y)
        resp = torch.softmax(self._conditional_component_logpdf(x, y), dim=1)
        diff = y[:, None, :] - self.component_means(x)
        return -torch.einsum("nk,kij,nkj->ni", resp, self.cond_precs, diff)

    # ------------------------------------------------------------------ marginals
    def sample_source(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """x ~ P0, ``(n, D)`` float32."""
        return self.source.sample(n, generator=generator)

    def sample_target(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """y ~ P1, ``(n, D)`` float32 (x ~ P0, then y ~ π*(· | x))."""
        x = self.sample_source(n, generator=generator)
        return self.sample_conditional(x, 1, generator=generator)[:, 0]

    def sample_plan(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(x, y) ~ π*, both ``(n, D)`` float32."""
        x = self.sample_source(n, generator=generator)
        return x, self.sample_conditional(x, 1, generator=generator)[:, 0]

    def test_inputs(self, n: int = 1000) -> Tensor:
        """Fixed test points x ~ P0 ``(n, D)`` float32 (deterministic per instance; benchmark uses 1000)."""
        gen = torch.Generator().manual_seed(self.moment_seed + 1)
        return self.sample_source(n, generator=gen)

    @functools.cached_property
    def moments(self) -> PlanMoments:
        """Mean/covariance of P1 and Cov(X, Y), integrated over x ~ P0 with the exact conditional moments."""
        gen = torch.Generator().manual_seed(self.moment_seed)
        a, chol = self.source.mean64, torch.linalg.cholesky(self.source.cov64)
        half = max(self.moment_samples // 2, 1)
        chunk = max(1, min(half, 2**22 // (self.dim * self.n_components)))
        s_m = torch.zeros(self.dim, dtype=torch.float64)
        s_mm = torch.zeros(self.dim, self.dim, dtype=torch.float64)
        s_xm = torch.zeros(self.dim, self.dim, dtype=torch.float64)
        s_w = torch.zeros(self.n_components, dtype=torch.float64)
        done = 0
        while done < half:
            b = min(chunk, half - done)
            dx = torch.randn(b, self.dim, generator=gen, dtype=torch.float64) @ chol.T
            dx = torch.cat([dx, -dx])  # antithetic pairs: the sample mean of x is exactly a
            x = a + dx
            w = self.component_log_weights(x).exp()
            mu = self.component_means(x)
            cond_mean = torch.einsum("nk,nki->ni", w, mu)
            s_w += w.sum(0)
            s_m += cond_mean.sum(0)
            root_w_mu = (w.sqrt()[..., None] * mu).reshape(-1, self.dim)
            s_mm += root_w_mu.T @ root_w_mu  # Σ_n Σ_k w_k μ_k μ_kᵀ: the E[μ μᵀ] part of E[y yᵀ]
            s_xm += dx.T @ cond_mean
            done += b
        n = 2 * half
        mean_y = s_m / n
        second = torch.einsum("k,kij->ij", s_w / n, self.cond_covs) + s_mm / n
        cov_y = second - torch.outer(mean_y, mean_y)
        return PlanMoments(
            mean_x=a.numpy().copy(),
            cov_x=self.source.cov64.numpy().copy(),
            mean_y=mean_y.numpy(),
            cov_y=(0.5 * (cov_y + cov_y.T)).numpy(),
            cov_xy=(s_xm / n).numpy(),
        )

    @property
    def target_variance(self) -> float:
        """Var(P1) = tr Cov(P1) (cBW-UVP normaliser)."""
        return self.moments.target_variance

    # ------------------------------------------------------------------ target score (Monte-Carlo only)
    def potential_score(self, y: ArrayLike | Tensor) -> Tensor:
        """∇ log g(y) ``(n, D)`` for the Gaussian-mixture potential g."""
        y = _as_f64(y)
        maha = self._maha(y, self.pot_precs)
        resp = torch.softmax(self.log_q[None] - 0.5 * (maha + torch.logdet(self.pot_covs)[None]), dim=1)
        diff = y[None] - self.pot_means[:, None, :]  # (K, n, D)
        return -torch.einsum("nk,knj->nj", resp, diff @ self.pot_precs)

    def target_score_estimate(
        self, y: ArrayLike | Tensor, n_mc: int = 256, generator: torch.Generator | None = None
    ) -> Tensor:
        """Self-normalised importance-sampling estimate of ∇ log p1(y), ``(n, D)`` float64.

        ∇ log p1(y) = ∇ log g(y) + E_r[(x − y)/ε],  r(x | y) ∝ p0(x) exp(−‖x − y‖²/(2ε)) / Z(x).
        The Gaussian part of r is sampled exactly, N(R(A⁻¹a + y/ε), R) with R = (A⁻¹ + I/ε)⁻¹, and
        weighted by 1/Z(x). Consistent, with O(1/n_mc) bias: not an exact score (P1 has none in closed
        form); meant for diagnostics such as the error of a learned score. Memory ``n * n_mc * D`` doubles.
        """
        y = _as_f64(y)
        n = y.shape[0]
        eye = torch.eye(self.dim, dtype=torch.float64)
        prec0 = torch.linalg.inv(self.source.cov64)
        R = torch.linalg.inv(prec0 + eye / self.eps)
        R = 0.5 * (R + R.T)
        centre = (prec0 @ self.source.mean64 + y / self.eps) @ R  # R symmetric
        z = torch.randn(n, int(n_mc), self.dim, generator=generator, dtype=torch.float64)
        x = centre[:, None, :] + z @ torch.linalg.cholesky(R).T
        maha = self._maha(x.reshape(-1, self.dim), self.weight_precs)
        log_z = torch.logsumexp(self.log_q[None] - 0.5 * (maha + self.weight_logdets[None]), dim=1)
        v = torch.softmax(-log_z.reshape(n, int(n_mc)), dim=1)
        drift = torch.einsum("nj,nji->ni", v, x - y[:, None, :]) / self.eps
        return self.potential_score(y) + drift


def seeded_instance_parameters(
    dim: int,
    eps: float,
    seed: int = 0,
    n_components: int = 5,
    source_std: float = 0.5,
    potential_std: float | None = None,
) -> dict:
    """Parameters of OUR seeded instance (see the module docstring), as ``EOTMixtureBenchmark`` kwargs."""
    dim, n_components = int(dim), int(n_components)
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    if n_components < 1:
        raise ValueError(f"n_components must be >= 1, got {n_components}")
    if not source_std > 0:
        raise ValueError(f"source_std must be > 0, got {source_std}")
    s = default_potential_std(dim, float(eps)) if potential_std is None else float(potential_std)
    if not s > 0:
        raise ValueError(f"potential_std must be > 0 (or null for the default rule), got {potential_std}")
    rng = np.random.default_rng([int(seed), dim, n_components])
    weights = rng.uniform(0.0, 1.0, size=n_components)
    levels = np.linspace(-2.0, 2.0, n_components) if n_components > 1 else np.zeros(1)
    means = np.stack([rng.permutation(levels) for _ in range(dim)], axis=1)  # (K, D)
    eye = np.eye(dim)
    return dict(
        eps=float(eps),
        source_mean=np.zeros(dim),
        source_cov=float(source_std) ** 2 * eye,
        weights=weights / weights.sum(),
        means=means,
        covs=np.broadcast_to(s**2 * eye, (n_components, dim, dim)).copy(),
    )


@functools.lru_cache(maxsize=32)
def _cached_instance(
    dim: int, eps: float, seed: int, n_components: int, source_std: float, potential_std: float | None
) -> EOTMixtureBenchmark:
    params = seeded_instance_parameters(dim, eps, seed, n_components, source_std, potential_std)
    return EOTMixtureBenchmark(**params, moment_seed=int(seed))


def eot_mixture_benchmark(
    dim: int,
    eps: float,
    seed: int = 0,
    n_components: int = 5,
    source_std: float = 0.5,
    potential_std: float | None = None,
) -> EOTMixtureBenchmark:
    """The cached seeded instance for these arguments (shared by source, target and the evaluation stage)."""
    return _cached_instance(
        int(dim),
        float(eps),
        int(seed),
        int(n_components),
        float(source_std),
        None if potential_std is None else float(potential_std),
    )


class EOTBenchmarkSource(Gaussian):
    """Source P0 = N(0, source_std² I) of the seeded mixture benchmark (exact score).

    Hydra-friendly scalars; ``options`` are the other arguments of :func:`eot_mixture_benchmark`
    (``n_components``, ``source_std``, ``potential_std``).
    """

    def __init__(self, dim: int, eps: float, seed: int = 0, **options: float | None) -> None:
        self.benchmark = eot_mixture_benchmark(dim, eps, seed, **options)
        super().__init__(mean=self.benchmark.source.mean_np, cov=self.benchmark.source.cov_np)


class EOTBenchmarkTarget(Distribution):
    """Target P1 of the seeded mixture benchmark: ``sample`` draws x ~ P0 then y ~ π*(· | x).

    ``has_score`` is False: P1 has no closed-form score (see the module docstring); the pipeline learns one.
    The ground truth for evaluation is ``self.benchmark`` (:class:`EOTMixtureBenchmark`). Arguments as
    :class:`EOTBenchmarkSource`; equal arguments share one cached instance.
    """

    def __init__(self, dim: int, eps: float, seed: int = 0, **options: float | None) -> None:
        self.benchmark = eot_mixture_benchmark(dim, eps, seed, **options)
        self.dim = self.benchmark.dim

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.benchmark.sample_target(n, generator=generator)
