"""Settings of the conditional Langevin samplers: the typed object the samplers take (the ``sampler`` config
group is validated against these, so the config and the code share one declaration).

- :class:`ULA` (``kind: ula``): y ← y + h·∇log π(y|x) + √(2h)·z with an exact (non-annealed) prior score;
- :class:`Annealed` (``kind: annealed``): annealed Langevin over the geometric schedule σ_max → σ_min
  (``n_levels``), step α_i = ``step_lr``·σ_i²/σ_L², ``n_steps_each`` steps per level, the first ``skip_levels``
  levels skipped, a final denoising step when ``denoise``.

Both start their chains per ``init`` (:data:`Init`) with noise scale :attr:`SamplerSettings.start_noise` and
scale the compatibility term by ``guidance`` (1 = SCONES). ``refine: ess`` (with ``init: resample``) gives each chain
the share :func:`refine_fraction` of the steps, from the effective sample size of its resampled start. A new
sampler is one model here (its settings and its :meth:`~SamplerSettings.run`) and its entry in :data:`SAMPLERS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, get_args

import torch
from pydantic import TypeAdapter, model_validator
from torch import Tensor

from scones.sampling.langevin import Callback, ScoreFn, annealed_langevin, ula
from scones.sampling.schedules import geometric_sigmas
from scones.settings import Auto, Count, NonNegativeFloat, NonNegativeInt, PositiveFloat, Settings, by_kind, order_error

Init = Literal["source", "bp", "bp_noise", "noise", "resample"]
"""Chain start y₀: x, T(x), T(x) + s·z or s·z with s = :attr:`SamplerSettings.start_noise`, or ``resample``:
``pool_size`` target samples resampled with the weights H(x, ·)
(:func:`scones.sampling.conditional.resampled_chains`)."""
INITS: tuple[str, ...] = get_args(Init)
Refine = Literal["all", "ess"]
"""How many Langevin steps each chain takes: ``all`` (every chain the sampler's full schedule) or ``ess`` (chains
resampled from a pool take the share of the schedule that :func:`refine_fraction` gives from the effective sample
size of their input's weights: starts that already are (nearly) independent draws of the learned plan are
refined less)."""
ESS_MIN = 100
"""``refine: ess``: below this many effective pool samples a resampled start is not trusted as a draw of the plan
(the refinement runs in full whatever the number of chains per input)."""


def refine_fraction(ess: Tensor, chains_per_input: Tensor) -> Tensor:
    r"""Share of the Langevin schedule each chain runs under ``refine: ess``: min(1, max(k, ESS_MIN) / ESS) for a
    chain whose input has k chains and weights of effective sample size ESS on the pool.

    k draws from weights of effective sample size ESS repeat one another with a frequency ≈ k / (2 ESS), and a
    single draw carries a bias O(1/ESS) of self-normalised importance sampling: with ESS ≫ max(k, ESS_MIN) the
    starts are already (nearly) independent draws of the learned plan H·q, which the learned conditional score
    can only move away from it (docs/results.md, error budgets at D = 64: 1.24 % for the starts, 2.63 % after the
    full refinement, at ε = 10); with ESS ≲ k the refinement does the work (ε = 0.1: starts 101 %, refined 12 %).
    """
    k = chains_per_input.to(ess).clamp(min=float(ESS_MIN))
    return (k / ess.clamp(min=1.0)).clamp(max=1.0)


class SamplerSettings(Settings):
    """What every sampler has: its ``kind``, the chain start and the guidance scale of ∇_y log H."""

    kind: str
    init: Init
    guidance: NonNegativeFloat = 1.0
    pool_size: Count = 10000  # target samples resampled by ``init: resample``
    refine: Refine | Auto = "all"  # ``ess``: Langevin steps per chain from the resampling ESS (init: resample)

    @model_validator(mode="after")
    def _refine(self) -> SamplerSettings:
        if self.refine == "ess" and self.init != "resample":
            raise ValueError(f"sampler.refine=ess scales the Langevin steps by the effective sample size of the "
                             f"resampled starts: it needs sampler.init=resample (got init={self.init}); "
                             "use sampler.refine=all")
        return self

    @property
    def start_noise(self) -> float:
        """Scale s of the noise in the ``bp_noise`` / ``noise`` chain starts."""
        raise NotImplementedError

    @property
    def steps_per_chain(self) -> int:
        """Langevin steps per chain, each one score evaluation (the annealed final denoising step not counted)."""
        raise NotImplementedError

    def noise_levels(self) -> list[float] | None:
        """σ of each level index the sampler passes to the prior score, or None when it passes no level (ULA)."""
        return None

    def levels_run(self) -> list[float] | None:
        """σ of the levels the chains actually visit (after skipped ones), or None (ULA)."""
        return None

    def run(
        self, score: ScoreFn, y: Tensor, generator: torch.Generator | None = None, callback: Callback | None = None,
        fraction: Tensor | None = None,
    ) -> Tensor:
        """The chains ``y`` after the sampler's steps on ``score(y, level)``; ``callback`` sees every step.
        ``fraction`` (``(n,)`` in (0, 1], optional): chain j runs ⌈fraction_j · steps⌉ of each level's steps
        (:func:`refine_fraction`)."""
        raise NotImplementedError

    @staticmethod
    def _chain_steps(fraction: Tensor | None, n: int) -> Tensor | None:
        if fraction is None:
            return None
        return torch.ceil(fraction.double() * n - 1e-9).long().clamp(1, n)


class ULA(SamplerSettings):
    kind: Literal["ula"] = "ula"
    step_size: PositiveFloat | Auto  # auto: scones.autoconfig rules (resolved before sampling)
    n_steps: Count | Auto
    init_noise: NonNegativeFloat = 1.0

    @property
    def start_noise(self) -> float:
        return self.init_noise

    @property
    def steps_per_chain(self) -> int:
        return self.n_steps

    def run(
        self, score: ScoreFn, y: Tensor, generator: torch.Generator | None = None, callback: Callback | None = None,
        fraction: Tensor | None = None,
    ) -> Tensor:
        return ula(score, y, self.step_size, self.n_steps, callback=callback, generator=generator,
                   chain_steps=self._chain_steps(fraction, self.n_steps))


class Annealed(SamplerSettings):
    kind: Literal["annealed"] = "annealed"
    sigma_max: PositiveFloat
    sigma_min: PositiveFloat
    n_levels: Count
    step_lr: PositiveFloat
    n_steps_each: Count
    skip_levels: NonNegativeInt = 0
    denoise: bool = True

    @model_validator(mode="after")
    def _schedule(self) -> Annealed:
        if self.sigma_max < self.sigma_min:
            raise order_error("sigma_max", self.sigma_max, ">=", "sigma_min", self.sigma_min)
        if self.skip_levels >= self.n_levels:
            raise order_error("skip_levels", self.skip_levels, "<", "n_levels", self.n_levels)
        return self

    def sigmas(self) -> Tensor:
        """The whole schedule σ_1 = sigma_max > … > σ_L = sigma_min, shape ``(n_levels,)``."""
        return geometric_sigmas(self.sigma_max, self.sigma_min, self.n_levels)

    @property
    def start_noise(self) -> float:
        """σ of the first level actually run: with ``skip_levels`` = k the chains start at T(x) + σ_{k+1}·z
        (spec §3b; USPS→MNIST: σ_4 ≈ 0.215), not at ``sigma_max``."""
        return float(self.sigmas()[self.skip_levels]) if self.skip_levels else self.sigma_max

    @property
    def steps_per_chain(self) -> int:
        return (self.n_levels - self.skip_levels) * self.n_steps_each

    def noise_levels(self) -> list[float]:
        return [float(s) for s in self.sigmas()]

    def levels_run(self) -> list[float]:
        return self.noise_levels()[self.skip_levels :]

    def run(
        self, score: ScoreFn, y: Tensor, generator: torch.Generator | None = None, callback: Callback | None = None,
        fraction: Tensor | None = None,
    ) -> Tensor:
        return annealed_langevin(score, y, self.sigmas(), self.step_lr, self.n_steps_each, denoise=self.denoise,
                                 skip_levels=self.skip_levels, callback=callback, generator=generator,
                                 chain_steps=self._chain_steps(fraction, self.n_steps_each))  # fmt: skip


SAMPLERS: dict[str, type[SamplerSettings]] = {"ula": ULA, "annealed": Annealed}
SAMPLER_KINDS: tuple[str, ...] = tuple(SAMPLERS)
Sampler = by_kind(SAMPLERS)
"""A sampler's settings, chosen by ``kind``."""
_SAMPLER = TypeAdapter(Sampler)


def validate_sampler(sampler: SamplerSettings | Mapping[str, Any]) -> SamplerSettings:
    """``sampler`` as typed settings: settings are returned as they are, a mapping (e.g. the ``sampler`` config
    node) is validated (:class:`pydantic.ValidationError`, a ``ValueError``, when it does not fit)."""
    if isinstance(sampler, SamplerSettings):
        return sampler
    return _SAMPLER.validate_python({str(k): v for k, v in sampler.items()})


__all__ = [
    "ESS_MIN", "INITS", "SAMPLERS", "SAMPLER_KINDS", "Annealed", "Init", "Refine", "Sampler", "SamplerSettings", "ULA",
    "refine_fraction", "validate_sampler",
]  # fmt: skip
