r"""The learned entropic plan as a library object: :class:`Coupling`.

SCONES learns dual potentials (φ, ψ) whose compatibility H defines the plan (spec §1)

    π̂(x, y) = H(x, y) · p(x) · q(y),    H = regularizer.density(V),   V = φ(x) + ψ(y) − c(x, y)

(KL: H = exp(V/λ); χ²: H = relu(V)/(2λ)). A :class:`Coupling` bundles the potentials with the source p, the
target q, the target score and the barycentric projection of a run, and answers the questions one asks of
a plan: conditional samples y ~ π̂(· | x) (the run's configured Langevin sampler), the (log-)density, the
barycentric projection T(x) ≈ E_π̂[y | x] and the settings (cost, regulariser, λ).

A finished ``python -m experiments.run`` run loads as one (the app's loader rebuilds it from the run directory)::

    from experiments.loading import load_coupling
    plan = load_coupling("outputs/density_gaussian_d2/runs/<date_time>")
    y = plan.sample(x, n=10)              # (len(x), 10, d)
    log_pi = plan.log_density(x, y[:, 0])  # (len(x),)

This module is pure library: it imports neither the app (:mod:`experiments`) nor Hydra nor Lightning.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from scones.data.streams import mix_seed
from scones.ot.dual import violation, violation_matrix
from scones.sampling.conditional import chains_per_input, initial_chains, resampled_chains, sample_conditional
from scones.sampling.langevin import Callback
from scones.sampling.settings import SamplerSettings, refine_fraction, validate_sampler

PriorScore = Callable[[Tensor, int], Tensor]


log = logging.getLogger(__name__)

class Coupling:
    """The plan π̂ = H·p⊗q of trained dual potentials, with its sampler.

    Args:
        potentials: object with ``phi(x) -> (n,)``, ``psi(y) -> (n,)``, ``cost`` and ``regularizer``
            (e.g. :class:`scones.ot.dual.DualPotentials`).
        source, target: the marginals p and q (:class:`scones.data.Distribution`; ``log_prob`` optional).
        prior_score: ``(y, level) -> ∇_y log q_σ(y)`` used by the sampler (the exact ``target.score`` or a
            learned noise-conditional model); needed only by :meth:`sample`.
        barycentric_map: network T with ``T(x) ≈ E_π[y | x]`` (the BP stage); needed by :meth:`barycentric`
            and by samplers initialised with ``init: bp`` / ``bp_noise``.
        sampler: the sampler's settings (:class:`scones.sampling.settings.ULA` or ``Annealed``, which hold every
            rule that turns them into chains), or a mapping with the same keys (e.g. the ``sampler`` config node).
        batch_size: chains (and network inputs) processed together; one chunk of chains (own noise seed).
        device: where tensors are evaluated; inputs are moved there.
        n_normalizer: source and target samples used for the Monte-Carlo normaliser Z = E_{p⊗q}[H]
            (all n² pairs).
        config, run_dir: where the plan comes from (set by :func:`experiments.loading.load_coupling`; shown in
            ``repr``, not used otherwise).
    """

    def __init__(
        self,
        potentials,
        source,
        target,
        prior_score: PriorScore | None = None,
        barycentric_map: Callable[[Tensor], Tensor] | None = None,
        sampler: SamplerSettings | Mapping | None = None,
        batch_size: int = 1000,
        device: str | torch.device = "cpu",
        n_normalizer: int = 2000,
        config: Any = None,
        run_dir: str | Path | None = None,
    ) -> None:
        self.potentials, self.source, self.target = potentials, source, target
        self.prior_score, self.barycentric_map = prior_score, barycentric_map
        self.sampler = validate_sampler(sampler) if sampler is not None else None
        if int(batch_size) < 1:
            raise ValueError(f"batch_size (eval.batch_size) must be >= 1, got {batch_size}")
        self.batch_size, self.device, self.n_normalizer = int(batch_size), torch.device(device), int(n_normalizer)
        self.config, self.run_dir = config, None if run_dir is None else Path(run_dir)
        self._log_z: float | None = None
        self._pool: Tensor | None = None

    # ------------------------------------------------------------------------------------------ settings

    @property
    def cost(self):
        """The transport cost c (e.g. ``SquaredEuclidean('sum')`` = ‖x − y‖²)."""
        return self.potentials.cost

    @property
    def regularizer(self):
        """The regulariser λ·D_f(π ‖ p⊗q) (``KL`` or ``ChiSquared``)."""
        return self.potentials.regularizer

    @property
    def lam(self) -> float:
        """λ, the weight of the divergence."""
        return float(self.regularizer.lam)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one target sample y."""
        return tuple(self.target.shape)

    @property
    def has_density(self) -> bool:
        """True when p and q both have ``log_prob``, so that π̂ has a density w.r.t. Lebesgue measure."""
        return callable(getattr(self.source, "log_prob", None)) and callable(getattr(self.target, "log_prob", None))

    def settings(self) -> dict:
        """Cost, regulariser, λ and sampler settings as a plain dict."""
        return {
            "cost": repr(self.cost),
            "regularizer": self.regularizer.name,
            "lam": self.lam,
            "sampler": None if self.sampler is None else self.sampler.model_dump(),
        }

    def __repr__(self) -> str:
        where = f", run_dir='{self.run_dir}'" if self.run_dir is not None else ""
        return (
            f"Coupling(source={type(self.source).__name__}, target={type(self.target).__name__}, "
            f"cost={self.cost!r}, regularizer={self.regularizer!r}{where})"
        )

    # ------------------------------------------------------------------------------------------ densities

    def _tensor(self, a) -> Tensor:
        return torch.as_tensor(a, dtype=torch.float32).to(self.device)

    def _log_h(self, v: Tensor) -> Tensor:
        # exact log H: V/λ for KL (no overflow); log(relu(V)/2λ) (−inf off the support) for χ². The χ²
        # regulariser's own log_density is the softplus-smoothed one used by the sampler, not the density.
        if self.regularizer.name == "kl":
            return self.regularizer.log_density(v)
        return torch.log(self.regularizer.density(v))

    @torch.no_grad()
    def log_compatibility(self, x, y, pairwise: bool = False) -> Tensor:
        """log H(x, y) = log dπ̂/d(p⊗q), not normalised (see :meth:`log_normalizer`).

        Diagonal pairs ``(n,)`` for x, y of shape ``(n, *shape)``; with ``pairwise=True`` all pairs,
        shape ``(n, m)``. Float32, on ``self.device``.
        """
        x, y = self._tensor(x), self._tensor(y)
        if pairwise:
            rows = [violation_matrix(self.potentials, x[i : i + self.batch_size], y)
                    for i in range(0, x.shape[0], self.batch_size)]
            return self._log_h(torch.cat(rows))
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y must hold the same number of points, got {x.shape[0]} and {y.shape[0]}")
        return self._log_h(violation(self.potentials, x, y))

    @torch.no_grad()
    def log_normalizer(self, generator: torch.Generator | None = None, refresh: bool = False) -> float:
        """log Z, Z = E_{p⊗q}[H] ≈ mean of H over all pairs of ``n_normalizer`` samples of p and of q.

        Z = 1 for the optimal potentials (the dual is stationary in an additive constant of φ); learned
        ones give Z ≈ 1 up to optimisation error. Cached after the first call (seed 0 unless ``generator``).
        """
        if self._log_z is None or refresh:
            g = generator if generator is not None else torch.Generator().manual_seed(0)
            n = self.n_normalizer
            log_h = self.log_compatibility(self.source.sample(n, generator=g), self.target.sample(n, generator=g),
                                           pairwise=True).double()
            self._log_z = float(torch.logsumexp(log_h.reshape(-1), 0) - math.log(log_h.numel()))
        return self._log_z

    @torch.no_grad()
    def log_density(self, x, y, normalized: bool = True) -> Tensor:
        """Log-density of the learned plan at the pairs (x_i, y_i), shape ``(n,)``, float64.

        If p and q have ``log_prob`` (:attr:`has_density`): log π̂(x, y) = log H + log p(x) + log q(y), a
        density w.r.t. Lebesgue measure on R^d × R^d. Otherwise log H, the density w.r.t. p⊗q (a warning
        says so). ``normalized=True`` subtracts log Z (:meth:`log_normalizer`) so that the density
        integrates to one; ``normalized=False`` is the paper's unnormalised π̂ = H p q.
        """
        x, y = self._tensor(x), self._tensor(y)
        out = self.log_compatibility(x, y).double()
        if self.has_density:
            log_p, log_q = self.source.log_prob(x.double().cpu()), self.target.log_prob(y.double().cpu())
            out = out + log_p.to(out) + log_q.to(out)
        else:
            warnings.warn(
                f"{type(self.source).__name__} or {type(self.target).__name__} has no log_prob: "
                "log_density returns log H, the log-density w.r.t. p⊗q", stacklevel=2,
            )
        return out - self.log_normalizer() if normalized else out

    # ------------------------------------------------------------------------------------------ sampling

    def _check_x(self, x) -> Tensor:
        x = self._tensor(x)
        if tuple(x.shape[1:]) != tuple(self.source.shape):
            raise ValueError(
                f"x must have shape (n, {', '.join(map(str, self.source.shape))}) for this source, "
                f"got {tuple(x.shape)}"
            )
        return x

    @torch.no_grad()
    def barycentric(self, x) -> Tensor:
        """T(x) ≈ E_π̂[y | x] from the barycentric-projection network, shape ``(n, *shape)``."""
        if self.barycentric_map is None:
            raise ValueError("this Coupling has no barycentric_map (the run's BP stage was not given/loaded)")
        x = self._check_x(x)
        out = [self.barycentric_map(x[i : i + self.batch_size]).reshape(-1, *self.shape)
               for i in range(0, x.shape[0], self.batch_size)]
        return torch.cat(out)

    def start_chains(self, x, y_bp: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Chain starts y₀ per ``sampler.init`` (:func:`scones.sampling.conditional.initial_chains`: source,
        T(x), T(x) + s·z or s·z with s the σ of the first annealing level run), one per row of ``x``, on
        :attr:`device`. ``y_bp`` = T(x) when already computed; else the BP network is run if the init needs it."""
        return self.start(x, y_bp, generator)[0]

    def start(self, x, y_bp: Tensor | None = None,
              generator: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
        """``(y0, fraction)``: the chain starts of :meth:`start_chains` and, with ``sampler.refine=ess``, the share
        of the Langevin schedule each chain runs (:func:`scones.sampling.settings.refine_fraction` of its input's
        resampling ESS and number of chains; else None: every chain runs it all). Pass both to :meth:`run_chains`."""
        self._check_sampler()
        x = self._check_x(x)
        if y_bp is None and self.sampler.init.startswith("bp"):
            y_bp = self.barycentric(x)
        if self.sampler.init == "resample":
            pool = self.resample_pool()
            y0, ess = resampled_chains(self.potentials, x, pool, generator)
            log.info("sampler.init=resample: effective sample size of the weights H(x, .) on %d pool samples: "
                     "median %.0f, min %.1f", pool.shape[0], float(ess.median()), float(ess.min()))
            if self.sampler.refine != "ess":
                return y0, None
            frac = refine_fraction(ess, chains_per_input(x))
            log.info("sampler.refine=ess: share of the Langevin schedule per chain: median %.3g, min %.3g, max %.3g",
                     float(frac.median()), float(frac.min()), float(frac.max()))
            return y0, frac
        return initial_chains(self.sampler, x, None if y_bp is None else self._tensor(y_bp), generator), None

    def resample_pool(self) -> Tensor:
        """The ``sampler.pool_size`` target samples that ``init: resample`` reweights, drawn once per Coupling
        (seed 0, so every call and every process resamples the same pool), on :attr:`device`."""
        if self._pool is None or self._pool.shape[0] != self.sampler.pool_size:
            pool = self.target.sample(self.sampler.pool_size, generator=torch.Generator().manual_seed(0))
            self._pool = self._tensor(pool)
        return self._pool

    def n_chunks(self, n: int) -> int:
        """Chunks of ``batch_size`` chains that :meth:`run_chains` splits ``n`` chains into."""
        return -(-int(n) // self.batch_size)

    def run_chains(self, x, y0, seed: int, chunks: Iterable[int] | None = None,
                   callback: Callback | None = None, fraction: Tensor | None = None) -> dict[int, Tensor]:
        """Langevin chains from ``y0`` on ∇_y log q + ∇_y log H(x_i, ·), in chunks of ``batch_size`` rows.

        Chunk c (rows c·batch_size …) draws its noise from its own generator on :attr:`device`, seeded with
        ``mix_seed(seed, c)``, so the samples do not depend on which process runs which chunk: a distributed
        caller runs a share of ``chunks`` per process and concatenates. Returns ``{c: samples of chunk c}``
        (on :attr:`device`) for the chunks asked (default all); ``callback`` sees every Langevin step.
        ``fraction``: the per-chain share of the schedule from :meth:`start` (None: all of it).
        """
        self._check_sampler()
        x, y0 = self._check_x(x), self._tensor(y0)
        bs = self.batch_size
        out = {}
        for c in range(self.n_chunks(x.shape[0])) if chunks is None else chunks:
            g = torch.Generator(device=self.device).manual_seed(mix_seed(int(seed), int(c)))
            rows = slice(c * bs, (c + 1) * bs)
            out[c] = sample_conditional(self.prior_score, self.potentials, x[rows], y0[rows], self.sampler, bs, g,
                                        callback=callback, fraction=None if fraction is None else fraction[rows])
        return out

    def sample(self, x, n: int = 1, generator: torch.Generator | None = None,
               callback: Callback | None = None) -> Tensor:
        """``n`` conditional samples y ~ π̂(· | x_i) for every row of ``x``: shape ``(len(x), n, *shape)``.

        The configured sampler (:attr:`sampler`) on ∇_y log q + ∇_y log H(x_i, ·): chains start as
        :meth:`start_chains` says and run in chunks (:meth:`run_chains`) whose seeds come from ``generator``'s
        state (CPU; the default generator without one), which makes the draw reproducible.
        """
        self._check_sampler()
        if int(n) < 1:
            raise ValueError(f"n (samples per source) must be >= 1, got {n}")
        xs = self._check_x(x).repeat_interleave(int(n), dim=0)
        y0, fraction = self.start(xs, generator=generator)
        parts = self.run_chains(xs, y0, chunk_seed(generator), callback=callback, fraction=fraction)
        return torch.cat([parts[c] for c in sorted(parts)]).reshape(xs.shape[0] // int(n), int(n), *self.shape)

    def _check_sampler(self) -> None:
        if self.prior_score is None or self.sampler is None:
            raise ValueError("sampling needs prior_score and sampler settings; build the Coupling with both "
                             "(experiments.loading.load_coupling does)")


def chunk_seed(generator: torch.Generator | None = None) -> int:
    """A seed for :meth:`Coupling.run_chains` read from ``generator``'s state without advancing it (the default
    generator, advanced, without one)."""
    if generator is None:
        return int(torch.randint(0, 2**62, (1,)))
    peek = torch.Generator().set_state(generator.get_state())
    return int(torch.randint(0, 2**62, (1,), generator=peek))


__all__ = ["Coupling", "chunk_seed"]
