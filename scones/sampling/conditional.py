r"""The SCONES conditional score ∇_y log π(y | x) = ∇_y log q(y) + ∇_y log H(x, y), and the configured sampler.

A sampler is described by a mapping (the ``sampler`` config node): ``kind`` (``ula`` | ``annealed``), its step
sizes and ``init``. Every rule that turns those settings into chains lives here — the σ schedule
(:func:`sampler_sigmas`), the level → σ map of a learned score (:meth:`LearnedPriorScore.for_sampler`), the chain
start incl. skipped levels (:func:`initial_chains`), the step count (:func:`sampler_steps`) and the chains
themselves (:func:`sample_conditional`). :class:`scones.coupling.Coupling` composes them; the evaluate stage
samples through a ``Coupling``, so there is one sampling path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from scones.ot.dual import grad_log_compatibility
from scones.sampling.langevin import Callback, annealed_langevin, ula
from scones.sampling.schedules import geometric_sigmas
from scones.sampling.settings import INITS, SAMPLER_KINDS


def sampler_sigmas(sampler: Mapping) -> Tensor:
    """The annealed sampler's schedule σ_1 = ``sigma_max`` > … > σ_L = ``sigma_min`` (``n_levels``, geometric)."""
    return geometric_sigmas(sampler["sigma_max"], sampler["sigma_min"], sampler["n_levels"])


def skipped_levels(sampler: Mapping) -> int:
    """Levels of the annealed schedule that are not run (``skip_levels``; 0 for ULA)."""
    return int(sampler.get("skip_levels", 0) or 0) if sampler.get("kind") == "annealed" else 0


def sampler_steps(sampler: Mapping) -> int:
    """Langevin steps per chain (each one score evaluation; the annealed sampler's final denoising step not counted)."""
    if sampler.get("kind") == "ula":
        return int(sampler["n_steps"])
    return (int(sampler["n_levels"]) - skipped_levels(sampler)) * int(sampler["n_steps_each"])


def init_noise_scale(sampler: Mapping) -> float:
    """s of the noise inits (``bp_noise``, ``noise``): ULA ``init_noise`` (default 1); annealed σ of the first level
    actually run, ``sigma_max`` or, with ``skip_levels`` = k > 0, σ_{k+1} (spec §3b; USPS→MNIST: σ_4 ≈ 0.215)."""
    if sampler.get("kind") != "annealed":
        return float(sampler.get("init_noise", 1.0))
    skip = skipped_levels(sampler)
    return float(sampler_sigmas(sampler)[skip]) if skip > 0 else float(sampler.get("sigma_max", 1.0))


class ConditionalScore:
    """Callable ``(y, level) -> prior_score(y, level) + ∇_y log H(x, y)`` for a fixed batch of sources ``x``.

    ``prior_score(y, level)`` is the target score (exact, or a learned noise-conditional model at σ_level).
    The compatibility term is not annealed with σ (SCONES pitfall P5). ``guidance`` scales it (1 = the method).
    """

    def __init__(
        self, prior_score: Callable[[Tensor, int], Tensor], potentials, x: Tensor, guidance: float = 1.0
    ):
        self.prior_score, self.potentials, self.x, self.guidance = prior_score, potentials, x, guidance

    def __call__(self, y: Tensor, level: int) -> Tensor:
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
    def for_sampler(cls, module, sampler: Mapping) -> LearnedPriorScore:
        """The prior score as ``sampler`` calls it: the annealed sampler's level i is σ_i of its own schedule
        (:func:`sampler_sigmas`, which may differ from the training one for σ-agnostic nets); ULA passes level 0,
        the first training level."""
        if sampler.get("kind") != "annealed":
            return cls(module)
        return cls(module, [float(v) for v in sampler_sigmas(sampler)])

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


def initial_chains(
    sampler: Mapping, x: Tensor, y_bp: Tensor | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """Starting points y₀ of the conditional chains, one per row of ``x`` (same shape as ``x``).

    ``sampler["init"]``: ``source`` (y₀ = x, the Swiss-roll code), ``bp`` (y₀ = T(x), the Gaussian code),
    ``bp_noise`` (T(x) + s·z, the image code) or ``noise`` (s·z), s = :func:`init_noise_scale` (the σ of the
    first annealing level run). ``y_bp`` = T(x) is needed only by the ``bp*`` inits. The noise is drawn on the CPU
    from ``generator`` and moved to ``x``'s device.
    """
    init = sampler["init"]
    if init not in INITS:
        raise ValueError(f"sampler.init must be one of {', '.join(INITS)}; got {init!r}")
    if init == "source":
        return x.clone()
    if init.startswith("bp") and y_bp is None:
        raise ValueError(f"sampler.init={init} needs the barycentric projection T(x); none was given")
    scale = init_noise_scale(sampler)
    if init == "bp":
        return y_bp.clone()
    noise = scale * torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    return y_bp + noise if init == "bp_noise" else noise


def sample_conditional(
    prior_score: Callable[[Tensor, int], Tensor],
    potentials,
    x: Tensor,
    y0: Tensor,
    sampler: Mapping,
    batch_size: int,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """One SCONES sample y ~ π(· | x_i) per row of ``x``, chains started at ``y0`` (shapes ``(n, *shape)``).

    Runs the sampler described by the mapping ``sampler`` (the ``sampler`` config node) on the conditional
    score :class:`ConditionalScore`, ``batch_size`` chains at a time:

    - ``kind="ula"``: :func:`~scones.sampling.langevin.ula` with ``step_size``, ``n_steps``;
    - ``kind="annealed"``: :func:`~scones.sampling.langevin.annealed_langevin` with the geometric schedule
      ``sigma_max → sigma_min`` over ``n_levels``, ``step_lr``, ``n_steps_each``, ``denoise``, ``skip_levels``.

    ``guidance`` (default 1) scales ∇_y log H; ``callback`` receives every Langevin step (progress reports).
    """
    kind = sampler.get("kind")
    if kind not in SAMPLER_KINDS:
        raise ValueError(f"sampler.kind must be one of {', '.join(SAMPLER_KINDS)}; got {kind!r}")
    if int(batch_size) < 1:
        raise ValueError(f"sampling batch size (eval.batch_size) must be >= 1, got {batch_size}")
    out = []
    for i in range(0, x.shape[0], int(batch_size)):
        xb, yb = x[i : i + int(batch_size)], y0[i : i + int(batch_size)]
        model = ConditionalScore(prior_score, potentials, xb, guidance=float(sampler.get("guidance", 1.0)))
        if kind == "ula":
            yb = ula(model, yb, float(sampler["step_size"]), int(sampler["n_steps"]), callback=callback,
                     generator=generator)
        else:
            yb = annealed_langevin(
                model, yb, sampler_sigmas(sampler), float(sampler["step_lr"]), int(sampler["n_steps_each"]),
                denoise=bool(sampler.get("denoise", True)), skip_levels=skipped_levels(sampler), callback=callback,
                generator=generator,
            )
        out.append(yb)
    return torch.cat(out)
