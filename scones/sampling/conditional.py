r"""The SCONES conditional score ∇_y log π(y | x) = ∇_y log q(y) + ∇_y log H(x, y), and the configured sampler.

A sampler is described by typed settings (:mod:`scones.sampling.settings`: ``ULA`` or ``Annealed``; a mapping
such as the ``sampler`` config node is validated into them), which own the rules of their sampler: the σ schedule
and the level → σ map of a learned score (``noise_levels``), the chain-start noise incl. skipped levels
(``start_noise``), the step count (``steps_per_chain``) and the chains themselves (``run``). Here they are
composed with the compatibility term: :meth:`LearnedPriorScore.for_sampler`, :func:`initial_chains`,
:func:`sample_conditional`. :class:`scones.coupling.Coupling` composes these; the evaluate stage samples through a
``Coupling``, so there is one sampling path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from scones.ot.dual import grad_log_compatibility
from scones.sampling.langevin import Callback
from scones.sampling.settings import SamplerSettings, validate_sampler


class ConditionalScore:
    """Callable ``(y, level) -> prior_score(y, level) + ∇_y log H(x, y)`` for a fixed batch of sources ``x``.

    ``prior_score(y, level)`` is the target score (exact, or a learned noise-conditional model at σ_level).
    The compatibility term is not annealed with σ (SCONES pitfall P5). ``guidance`` scales it (1 = the method).
    ``potentials=None`` drops it: ``prior_score`` is then the whole conditional score (oracle studies).
    """

    def __init__(
        self, prior_score: Callable[[Tensor, int], Tensor], potentials, x: Tensor, guidance: float = 1.0
    ):
        self.prior_score, self.potentials, self.x, self.guidance = prior_score, potentials, x, guidance

    def __call__(self, y: Tensor, level: int) -> Tensor:
        if self.potentials is None:
            return self.prior_score(y, level)
        return self.prior_score(y, level) + self.guidance * grad_log_compatibility(self.potentials, self.x, y)


class LearnedPriorScore:
    """``prior_score(y, level)`` of a trained :class:`~scones.models.score.ScoreModule`.

    ``levels`` (optional) maps the sampler's level index to the σ the network is evaluated at (the annealed
    sampler's own schedule); without it the index goes to the module's training schedule. ``.to(device)``
    moves the module in place, so the samplers can run the chains on a GPU.
    """

    def __init__(self, module, levels: list[float] | None = None) -> None:
        self.module, self.levels = module, levels

    @classmethod
    def for_sampler(cls, module, sampler: SamplerSettings | Mapping) -> LearnedPriorScore:
        """The prior score as ``sampler`` calls it: the annealed sampler's level i is σ_i of its own schedule
        (``noise_levels``, which may differ from the training one for σ-agnostic nets); ULA passes level 0, the
        first training level."""
        return cls(module, validate_sampler(sampler).noise_levels())

    def __call__(self, y: Tensor, level: int) -> Tensor:
        return self.module.score(y, level if self.levels is None else self.levels[level])

    def to(self, device) -> LearnedPriorScore:
        self.module.to(device)
        return self


class ExactPriorScore:
    """``prior_score(y, level) = target.score(y)``: an exact target score ignores the noise level. The project's
    distributions cast their constants to ``y``'s device, so ``.to`` has nothing to move."""

    def __init__(self, target) -> None:
        self.target = target

    def __call__(self, y: Tensor, level: int) -> Tensor:
        return self.target.score(y)

    def to(self, device) -> ExactPriorScore:
        return self


@torch.no_grad()
def resampled_chains(
    potentials, x: Tensor, pool: Tensor, generator: torch.Generator | None = None, block_elems: int = 2**24
) -> tuple[Tensor, Tensor]:
    """Chain starts drawn from the learned plan itself: y₀ = pool_j with j ~ H(x, pool_j) / Σ_l H(x, pool_l).

    The plan is π(y | x) = H(x, y) q(y), so resampling target samples ``pool`` ~ q with the weights H(x, ·)
    (sampling-importance-resampling) gives starts whose law tends to the learned π(· | x) as the pool grows: the
    weights of well-separated modes of the conditional are right from the start, which Langevin alone cannot fix
    once the barriers between modes are high. Done once per distinct row of ``x`` (protocols repeat each input).

    Returns ``(y0, ess)``: starts shaped like ``x`` and, per row, the effective sample size 1/Σ_j w_j² of its
    weights; an ESS near 1 means the pool is too small for this λ and dimension (the starts repeat one sample and
    only the Langevin steps spread them).
    """
    n = x.shape[0]
    uniq, inverse = torch.unique(x.reshape(n, -1), dim=0, return_inverse=True)
    counts = torch.bincount(inverse, minlength=uniq.shape[0]).tolist()
    order = torch.argsort(inverse, stable=True)  # chains grouped by distinct source, in input order
    y0 = torch.empty((n, *pool.shape[1:]), dtype=pool.dtype, device=pool.device)
    ess = torch.empty(n, dtype=pool.dtype, device=pool.device)
    step = max(1, block_elems // max(1, pool.shape[0]))
    psi_pool = potentials.psi(pool)  # once, not per block of sources: V = φ(x) + ψ(y) − c(x, y)
    done = 0
    for start in range(0, uniq.shape[0], step):
        xb = uniq[start : start + step].reshape(-1, *x.shape[1:])
        v = potentials.phi(xb)[:, None] + psi_pool[None, :] - potentials.cost.pairwise(xb, pool)
        w = torch.softmax(potentials.regularizer.log_density(v), dim=1)
        if not torch.isfinite(w).all():
            raise ValueError("sampler.init=resample: H(x, ·) is zero or not finite on the whole pool for some x")
        cb = counts[start : start + step]
        idx = torch.multinomial(w.cpu(), max(cb), replacement=True, generator=generator).to(pool.device)
        for r, c in enumerate(cb):
            rows = order[done : done + c]
            y0[rows] = pool[idx[r, :c]]
            ess[rows] = 1.0 / (w[r] ** 2).sum()
            done += c
    return y0, ess


def initial_chains(
    sampler: SamplerSettings | Mapping,
    x: Tensor,
    y_bp: Tensor | None = None,
    generator: torch.Generator | None = None,
    potentials=None,
    pool: Tensor | None = None,
) -> Tensor:
    """Starting points y₀ of the conditional chains, one per row of ``x`` (same shape as ``x``).

    ``sampler.init``: ``source`` (y₀ = x, the Swiss-roll code), ``bp`` (y₀ = T(x), the Gaussian code),
    ``bp_noise`` (T(x) + s·z, the image code), ``noise`` (s·z), s = ``sampler.start_noise`` (annealed: the σ of
    the first level run; ULA: ``init_noise``), or ``resample`` (target samples ``pool`` resampled with the weights
    H(x, ·) of ``potentials``: :func:`resampled_chains`). ``y_bp`` = T(x) is needed only by the ``bp*`` inits,
    ``potentials`` and ``pool`` only by ``resample``. The noise is drawn on the CPU from ``generator`` and moved to
    ``x``'s device.
    """
    sampler = validate_sampler(sampler)
    init = sampler.init
    if init == "source":
        return x.clone()
    if init == "resample":
        if potentials is None or pool is None:
            raise ValueError("sampler.init=resample needs the dual potentials and a pool of target samples")
        return resampled_chains(potentials, x, pool.to(x.device, x.dtype), generator)[0]
    if init.startswith("bp") and y_bp is None:
        raise ValueError(f"sampler.init={init} needs the barycentric projection T(x); none was given")
    if init == "bp":
        return y_bp.clone()
    noise = sampler.start_noise * torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    return y_bp + noise if init == "bp_noise" else noise


def sample_conditional(
    prior_score: Callable[[Tensor, int], Tensor],
    potentials,
    x: Tensor,
    y0: Tensor,
    sampler: SamplerSettings | Mapping,
    batch_size: int,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    fraction: Tensor | None = None,
) -> Tensor:
    """One SCONES sample y ~ π(· | x_i) per row of ``x``, chains started at ``y0`` (shapes ``(n, *shape)``).

    Runs ``sampler`` (``ULA`` or ``Annealed``, :meth:`~scones.sampling.settings.SamplerSettings.run`) on the
    conditional score :class:`ConditionalScore` with ``sampler.guidance``, ``batch_size`` chains at a time;
    ``callback`` receives every Langevin step (progress reports). ``fraction`` (``(n,)``, optional): the share
    of the schedule each chain runs (``sampler.refine=ess``, :func:`~scones.sampling.settings.refine_fraction`).
    """
    sampler = validate_sampler(sampler)
    if int(batch_size) < 1:
        raise ValueError(f"sampling batch size (eval.batch_size) must be >= 1, got {batch_size}")
    out = []
    for i in range(0, x.shape[0], int(batch_size)):
        xb, yb = x[i : i + int(batch_size)], y0[i : i + int(batch_size)]
        model = ConditionalScore(prior_score, potentials, xb, guidance=sampler.guidance)
        fb = None if fraction is None else fraction[i : i + int(batch_size)]
        out.append(sampler.run(model, yb, generator, callback, fraction=fb))
    return torch.cat(out)


def chains_per_input(x: Tensor) -> Tensor:
    """For each row of ``x``, how many rows of ``x`` equal it (protocols repeat each input k times), ``(n,)``."""
    _, inverse, counts = torch.unique(x.reshape(x.shape[0], -1), dim=0, return_inverse=True, return_counts=True)
    return counts[inverse]
