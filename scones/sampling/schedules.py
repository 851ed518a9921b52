"""Noise schedules for annealed Langevin dynamics and denoising score matching."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def geometric_sigmas(sigma_max: float, sigma_min: float, n_levels: int) -> Tensor:
    """σ_1 = sigma_max > … > σ_L = sigma_min, geometrically spaced (NCSN), shape ``(L,)``, float32."""
    if not (sigma_max > 0 and sigma_min > 0):
        raise ValueError(f"sigmas must be > 0, got sigma_max={sigma_max}, sigma_min={sigma_min}")
    if sigma_max < sigma_min:
        raise ValueError(f"sigma_max ({sigma_max}) must be >= sigma_min ({sigma_min})")
    if n_levels < 1:
        raise ValueError(f"n_levels must be >= 1, got {n_levels}")
    return torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), n_levels))


def langevin_step_sizes(sigmas: Tensor, step_lr: float) -> Tensor:
    """α_i = ε σ_i² / σ_L² (NCSN / SCONES code), shape ``(L,)``."""
    if step_lr <= 0:
        raise ValueError(f"sampler.step_lr must be > 0, got {step_lr}")
    return step_lr * (sigmas / sigmas[-1]) ** 2
