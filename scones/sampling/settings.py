"""Settings of the conditional Langevin samplers (the ``sampler`` config group is validated against these).

- :class:`ULA` (``kind: ula``): y ← y + h·∇log π(y|x) + √(2h)·z with an exact (non-annealed) prior score;
- :class:`Annealed` (``kind: annealed``): annealed Langevin over the geometric schedule σ_max → σ_min
  (``n_levels``), step α_i = ``step_lr``·σ_i²/σ_L², ``n_steps_each`` steps per level, the first ``skip_levels``
  levels skipped, a final denoising step when ``denoise``.

Both start their chains per ``init`` (:data:`Init`) and scale the compatibility term by ``guidance`` (1 = SCONES).
A new sampler is a new model here, an entry in :data:`SAMPLERS` and its branch in
:mod:`scones.sampling.conditional`.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import model_validator

from scones.settings import Count, NonNegativeFloat, NonNegativeInt, PositiveFloat, Settings, by_kind, order_error

Init = Literal["source", "bp", "bp_noise", "noise"]
"""Chain start y₀: x, T(x), T(x) + s·z or s·z (s = σ of the first annealing level run, ``init_noise`` for ULA)."""
INITS: tuple[str, ...] = get_args(Init)


class SamplerSettings(Settings):
    """What every sampler has: its ``kind``, the chain start and the guidance scale of ∇_y log H."""

    kind: str
    init: Init
    guidance: NonNegativeFloat = 1.0


class ULA(SamplerSettings):
    kind: Literal["ula"] = "ula"
    step_size: PositiveFloat
    n_steps: Count
    init_noise: NonNegativeFloat = 1.0


class Annealed(SamplerSettings):
    kind: Literal["annealed"] = "annealed"
    sigma_max: PositiveFloat
    sigma_min: PositiveFloat
    n_levels: Count
    step_lr: PositiveFloat
    n_steps_each: Count
    skip_levels: NonNegativeInt = 0
    denoise: bool

    @model_validator(mode="after")
    def _schedule(self) -> Annealed:
        if self.sigma_max < self.sigma_min:
            raise order_error("sigma_max", self.sigma_max, ">=", "sigma_min", self.sigma_min)
        if self.skip_levels >= self.n_levels:
            raise order_error("skip_levels", self.skip_levels, "<", "n_levels", self.n_levels)
        return self


SAMPLERS: dict[str, type[SamplerSettings]] = {"ula": ULA, "annealed": Annealed}
SAMPLER_KINDS: tuple[str, ...] = tuple(SAMPLERS)
Sampler = by_kind(SAMPLERS)
"""A sampler's settings, chosen by ``kind`` (validate a mapping with ``pydantic.TypeAdapter(Sampler)``)."""

__all__ = ["INITS", "SAMPLERS", "SAMPLER_KINDS", "Annealed", "Init", "Sampler", "SamplerSettings", "ULA"]
