r"""Langevin samplers, k-diffusion style: one short pure function per sampler, the model is a callable.

``score(y, i)`` returns ∇_y log p_{σ_i}(y) at noise level index ``i`` (an int; exact scores may ignore it).
For SCONES the "model" is :class:`scones.sampling.conditional.ConditionalScore`, i.e.
s_θ(y, σ_i) + ∇_y log H(x, y). All chains are updated at once (``y`` is a batch).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import trange

from scones.sampling.schedules import langevin_step_sizes

ScoreFn = Callable[[Tensor, int], Tensor]
Callback = Callable[[dict], None]


class NonFiniteSampleError(RuntimeError):
    """Raised when Langevin chains produce NaN/Inf."""


def _check_finite(y: Tensor, where: str) -> None:
    if not torch.isfinite(y).all():
        bad = int((~torch.isfinite(y.reshape(y.shape[0], -1))).any(1).sum())
        raise NonFiniteSampleError(
            f"Langevin chains diverged at {where}: {bad}/{y.shape[0]} chains are NaN/Inf. "
            "Lower sampler.step_lr (or sampler.step_size), or check the trained potentials (mean of H ≈ 1?)."
        )


def _chain_steps(chain_steps: Tensor | None, y: Tensor, n_max: int) -> tuple[Tensor, int] | None:
    """``(steps, max(steps))`` of per-chain step counts (validated, on ``y``'s device), or None (all chains take
    every step)."""
    if chain_steps is None:
        return None
    steps = torch.as_tensor(chain_steps, device=y.device).long().reshape(-1)
    if steps.shape[0] != y.shape[0] or bool((steps < 0).any()) or bool((steps > n_max).any()):
        raise ValueError(f"chain_steps must be {y.shape[0]} integers in [0, {n_max}], got shape "
                         f"{tuple(steps.shape)}, range [{int(steps.min())}, {int(steps.max())}]")
    return steps, int(steps.max())


def _masked(y: Tensor, y_new: Tensor, steps: tuple[Tensor, int] | None, k: int) -> Tensor:
    """``y_new`` for the chains whose step count exceeds ``k`` (all of them without ``steps``), ``y`` for the rest."""
    if steps is None:
        return y_new
    keep = (steps[0] <= k).reshape(-1, *([1] * (y.ndim - 1)))
    return torch.where(keep, y, y_new)


@torch.no_grad()
def annealed_langevin(
    score: ScoreFn,
    y: Tensor,
    sigmas: Tensor,
    step_lr: float,
    n_steps_each: int,
    denoise: bool = True,
    skip_levels: int = 0,
    callback: Callback | None = None,
    disable: bool | None = None,
    generator: torch.Generator | None = None,
    check_every: int = 50,
    chain_steps: Tensor | None = None,
) -> Tensor:
    """Annealed Langevin dynamics (Song & Ermon 2019; SCONES Alg. 2 as coded).

    For i = skip_levels..L−1, α_i = ε σ_i²/σ_L², repeat T = ``n_steps_each`` times:
        y ← y + α_i · score(y, i) + sqrt(2 α_i) · z,   z ~ N(0, I).
    Optional final denoising (Tweedie) step: y ← y + σ_L² · score(y, L−1).

    ``chain_steps`` (``(n,)`` ints ≤ ``n_steps_each``, optional): chain j takes only the first ``chain_steps[j]``
    steps of every level and stays put for the rest (:func:`_masked`); every chain draws the same noise as
    without it, so a chain with all ``n_steps_each`` steps follows exactly the path it would follow alone, and
    steps no chain takes are skipped.
    """
    alphas = langevin_step_sizes(sigmas, step_lr).tolist()
    levels = range(skip_levels, len(alphas))
    total = len(levels) * n_steps_each
    steps = _chain_steps(chain_steps, y, n_steps_each)
    for k in trange(total, desc="annealed Langevin", disable=disable, mininterval=5.0, leave=False):
        i = levels[k // n_steps_each]
        if steps is not None and k % n_steps_each >= steps[1]:  # no chain takes the rest of this level
            continue
        a = alphas[i]
        z = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
        y = _masked(y, y + a * score(y, i) + math.sqrt(2.0 * a) * z, steps, k % n_steps_each)
        if check_every and (k + 1) % check_every == 0:
            _check_finite(y, f"level {i}, step {k + 1}/{total}")
        if callback is not None:
            callback({"step": k, "level": i, "y": y})
    if denoise:
        y = y + float(sigmas[-1]) ** 2 * score(y, len(alphas) - 1)
    _check_finite(y, "the end of sampling")
    return y


@torch.no_grad()
def ula(
    score: ScoreFn,
    y: Tensor,
    step_size: float,
    n_steps: int,
    callback: Callback | None = None,
    disable: bool | None = None,
    generator: torch.Generator | None = None,
    check_every: int = 50,
    chain_steps: Tensor | None = None,
) -> Tensor:
    """Unadjusted Langevin algorithm: y ← y + h · score(y) + sqrt(2h) · z  (step h = ``step_size``).

    The SCONES Gaussian sampler writes it as y ← y + (ε/2) score + sqrt(ε) z, i.e. h = ε/2.
    Stationary law ≈ the target with O(h) bias; mixing needs n_steps · h ≫ the largest target variance.
    ``chain_steps``: per-chain step counts ≤ ``n_steps``, as in :func:`annealed_langevin`.
    """
    if step_size <= 0:
        raise ValueError(f"sampler.step_size must be > 0, got {step_size}")
    noise = math.sqrt(2.0 * step_size)
    steps = _chain_steps(chain_steps, y, n_steps)
    n_run = n_steps if steps is None else steps[1]
    for k in trange(n_run, desc="ULA", disable=disable, mininterval=5.0, leave=False):
        z = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
        y = _masked(y, y + step_size * score(y, 0) + noise * z, steps, k)
        if check_every and (k + 1) % check_every == 0:
            _check_finite(y, f"step {k + 1}/{n_steps}")
        if callback is not None:
            callback({"step": k, "y": y})
    _check_finite(y, "the end of sampling")
    return y
