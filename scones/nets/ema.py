"""Exponential moving average (EMA) of model weights, as used for NCSNv2 (decay 0.999): torch's own
:class:`~torch.optim.swa_utils.AveragedModel` with :func:`~torch.optim.swa_utils.get_ema_multi_avg_fn`.

Update rule, applied to every parameter after each optimiser step (:meth:`EMA.update_parameters`):

    shadow ← decay · shadow + (1 − decay) · θ,

the first call copying θ, so after k further updates with fixed θ, ``shadow = θ + decay^k (shadow_0 − θ)``.
Buffers are not averaged (``use_buffers=False``); :meth:`EMA.averaged` hands out the averaged network with the
live model's current buffers.

:class:`EMA` only adds what the project needs on top: it pickles (``get_ema_multi_avg_fn`` returns a closure, which
``ddp_spawn`` could not pickle; it is rebuilt from ``decay`` on unpickling), and it reads and writes the plain
``{"decay", "shadow"}`` state that :class:`scones.models.score.ScoreModule` keeps in its ``state_dict``
(``_extra_state``), so weights-only checkpoints and ``final.pt`` files written before the switch still load.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel) else model


class EMA(AveragedModel):
    """EMA of ``model``'s parameters (``decay`` μ in ``shadow ← μ·shadow + (1 − μ)·θ``; 0 copies θ each update).

    The averaged copy is ``self.module``; nothing is averaged until the first :meth:`update_parameters` (which
    copies the weights), as torch's ``AveragedModel`` does. Models wrapped in DDP/DataParallel are unwrapped.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        decay = float(decay)
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        super().__init__(_unwrap(model), multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)
        self.decay = decay
        self.requires_grad_(False)

    @property
    def started(self) -> bool:
        """True once the average holds weights (after the first update or a restored state)."""
        return int(self.n_averaged) > 0

    def update_parameters(self, model: nn.Module) -> None:
        super().update_parameters(_unwrap(model))

    @torch.no_grad()
    def averaged(self, model: nn.Module) -> nn.Module:
        """The averaged network (eval mode) with ``model``'s current buffers (e.g. noise schedules)."""
        for mine, theirs in zip(self.module.buffers(), _unwrap(model).buffers(), strict=True):
            if mine.shape == theirs.shape:
                mine.copy_(theirs)
            else:  # a buffer sized when a state_dict was loaded (e.g. a score net's data statistics)
                mine.data = theirs.detach().clone()
        return self.module.eval()

    def shadow(self) -> dict[str, Tensor]:
        """The averaged parameters by name."""
        return {name: p.detach() for name, p in self.module.named_parameters()}

    def ema_state(self) -> dict[str, Any]:
        """``{"decay", "shadow"}``: the averaged parameters by name (the format of ``_extra_state["ema"]``)."""
        return {"decay": self.decay, "shadow": {k: v.clone() for k, v in self.shadow().items()}}

    @torch.no_grad()
    def load_ema_state(self, state: dict[str, Any]) -> None:
        if set(state) != {"decay", "shadow"}:
            raise KeyError(f"EMA state must have keys 'decay' and 'shadow', got {sorted(state)}")
        params = dict(self.module.named_parameters())
        if set(params) != set(state["shadow"]):
            raise KeyError(f"EMA state does not fit the model: {sorted(set(params) ^ set(state['shadow']))[:5]}")
        for name, p in params.items():
            p.copy_(state["shadow"][name])
        self.n_averaged.fill_(1)
        self.decay = float(state["decay"])
        self.multi_avg_fn = get_ema_multi_avg_fn(self.decay)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("multi_avg_fn", None)  # a closure: rebuilt from decay in __setstate__
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.multi_avg_fn = get_ema_multi_avg_fn(self.decay)


__all__ = ["EMA"]
