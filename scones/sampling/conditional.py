r"""The SCONES conditional score ∇_y log π(y | x) = ∇_y log q(y) + ∇_y log H(x, y), and the configured sampler.

:func:`initial_chains` and :func:`sample_conditional` turn a ``sampler`` config node (any mapping) into
conditional samples; the pipeline's evaluate stage and :class:`scones.coupling.Coupling` both use them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from scones.ot.dual import grad_log_compatibility
from scones.sampling.langevin import annealed_langevin, ula
from scones.sampling.schedules import geometric_sigmas
from scones.sampling.settings import INITS, SAMPLER_KINDS


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
    ``bp_noise`` (T(x) + s·z, the image code) or ``noise`` (s·z), with s = ``sigma_max`` for the annealed
    sampler and ``init_noise`` (default 1) for ULA. ``y_bp`` = T(x) is needed only by the ``bp*`` inits.
    """
    init = sampler["init"]
    if init not in INITS:
        raise ValueError(f"sampler.init must be one of {', '.join(INITS)}; got {init!r}")
    if init == "source":
        return x.clone()
    if init.startswith("bp") and y_bp is None:
        raise ValueError(f"sampler.init={init} needs the barycentric projection T(x); none was given")
    kind = sampler.get("kind")
    scale = float(sampler.get("sigma_max", 1.0) if kind == "annealed" else sampler.get("init_noise", 1.0))
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
) -> Tensor:
    """One SCONES sample y ~ π(· | x_i) per row of ``x``, chains started at ``y0`` (shapes ``(n, *shape)``).

    Runs the sampler described by the mapping ``sampler`` (the ``sampler`` config node) on the conditional
    score :class:`ConditionalScore`, ``batch_size`` chains at a time:

    - ``kind="ula"``: :func:`~scones.sampling.langevin.ula` with ``step_size``, ``n_steps``;
    - ``kind="annealed"``: :func:`~scones.sampling.langevin.annealed_langevin` with the geometric schedule
      ``sigma_max → sigma_min`` over ``n_levels``, ``step_lr``, ``n_steps_each``, ``denoise``, ``skip_levels``.

    ``guidance`` (default 1) scales ∇_y log H.
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
            yb = ula(model, yb, float(sampler["step_size"]), int(sampler["n_steps"]), generator=generator)
        else:
            sigmas = geometric_sigmas(sampler["sigma_max"], sampler["sigma_min"], sampler["n_levels"])
            yb = annealed_langevin(
                model, yb, sigmas, float(sampler["step_lr"]), int(sampler["n_steps_each"]),
                denoise=bool(sampler.get("denoise", True)), skip_levels=int(sampler.get("skip_levels", 0)),
                generator=generator,
            )
        out.append(yb)
    return torch.cat(out)
