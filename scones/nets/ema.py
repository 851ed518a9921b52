"""Exponential moving average (EMA) of model weights, as used for NCSNv2 (decay 0.999).

Update rule, applied to every floating-point parameter that requires grad:

    shadow ← decay · shadow + (1 − decay) · θ,

so after k updates with fixed θ, ``shadow = θ + decay^k (shadow_0 − θ)``. Buffers (e.g. the ``sigmas``
schedule) are not averaged.

The class is a plain Python object (a float and a dict of tensors, no closures), so it pickles and works
under ``ddp_spawn``; :class:`scones.models.score.ScoreModule` keeps it in its ``state_dict`` (``_extra_state``),
hence in Lightning checkpoints and the stage's ``final.pt``. Models wrapped in
``DistributedDataParallel``/``DataParallel`` are unwrapped.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel) else model


def _tracked(model: nn.Module) -> dict[str, Tensor]:
    return {
        name: p
        for name, p in _unwrap(model).named_parameters()
        if p.requires_grad and torch.is_floating_point(p)
    }


class EMA:
    """EMA of a model's trainable parameters.

    Args:
        model: optional model to register immediately (its current weights become the shadow).
        decay: μ in ``shadow ← μ·shadow + (1 − μ)·θ``; 0 copies the weights at every update.
    """

    def __init__(self, model: nn.Module | None = None, decay: float = 0.999) -> None:
        decay = float(decay)
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.shadow: dict[str, Tensor] = {}
        if model is not None:
            self.register(model)

    def register(self, model: nn.Module) -> None:
        """Start averaging from the model's current weights."""
        self.shadow = {name: p.detach().clone() for name, p in _tracked(model).items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards the model's current weights (registers the model on first use)."""
        if not self.shadow:
            self.register(model)
            return
        for name, p in _tracked(model).items():
            if name not in self.shadow:
                raise KeyError(f"EMA has no shadow for parameter {name!r}; call `register(model)` first")
            s = self.shadow[name]
            if s.device != p.device:
                s = self.shadow[name] = s.to(p.device)
            s.lerp_(p.detach(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's tracked parameters with the averaged ones."""
        params = _tracked(model)
        missing = set(params) - set(self.shadow)
        if missing:
            raise KeyError(
                f"EMA shadow lacks parameters {sorted(missing)[:5]}; was it registered on this model?"
            )
        for name, p in params.items():
            p.copy_(self.shadow[name].to(p.device))

    def averaged_copy(self, model: nn.Module) -> nn.Module:
        """A deep copy of ``model`` (unwrapped) carrying the averaged weights; ``model`` is untouched."""
        clone = copy.deepcopy(_unwrap(model))
        self.copy_to(clone)
        return clone

    def to(self, device: torch.device | str) -> EMA:
        self.shadow = {k: v.to(device) for k, v in self.shadow.items()}
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": {k: v.detach().clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"decay", "shadow"}:
            raise KeyError(f"EMA state must have keys 'decay' and 'shadow', got {sorted(state)}")
        self.decay = float(state["decay"])
        self.shadow = {k: v.detach().clone() for k, v in state["shadow"].items()}

    def __repr__(self) -> str:
        return f"EMA(decay={self.decay}, tensors={len(self.shadow)})"


__all__ = ["EMA"]
