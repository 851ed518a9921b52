r"""Persistent conditional Langevin chains y ~ π_ψ(· | x): the samples of the learned plan that the dual's
``langevin`` estimator (:func:`scones.ot.dual.semidual_langevin_losses`) averages over.

A pool of ``n`` pairs (x_i, y_i), each y_i an unadjusted Langevin chain on the SCONES conditional score
∇_y log q(y) + ∇_y log H(x_i, y) of the *current* potentials (:class:`~scones.sampling.conditional.ConditionalScore`),
advanced ``steps_per_update`` steps per training step. Round robin, the oldest chains get fresh sources x, started
at ``init(x)`` (called with autograd on; e.g. the conditional mean x − ∇φ(x)/2s implied by φ), so that over the
stage the pool sees a stream of fresh sources; a chain counts (``usable``) once it has run ``burn_in`` steps, and
each lives ``lifetime = 3·burn_in`` steps. The first update fills the pool and runs ``burn_in`` steps on all of it.
Deterministic given the seed: the chains draw their noise from their own generator, which an owner reseeds per
training step (:meth:`ConditionalChains.reseed`, e.g. with (rank, step)) so that a resumed run draws the same noise
as an uninterrupted one and the processes of a DDP run draw different noise; the pool lives in buffers (checkpointed
with the owner). Under DDP each process owns its own pool of ``n / world`` chains (:meth:`ConditionalChains.resize`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from scones.data.streams import mix_seed
from scones.sampling.conditional import ConditionalScore


class ConditionalChains(nn.Module):
    """``n`` persistent ULA chains of the conditional plan, step ``step_size``; buffers ``x``, ``y``, ``age``
    (steps run, −1 = empty), so a module that owns them checkpoints them."""

    LIFETIME_FACTOR = 3

    def __init__(self, n: int, shape: tuple[int, ...], step_size: float, steps_per_update: int, burn_in: int,
                 seed: int = 0) -> None:
        super().__init__()
        if steps_per_update < 1 or burn_in < 1 or not step_size > 0:
            raise ValueError(f"chains need steps_per_update, burn_in >= 1 and step_size > 0; got {steps_per_update}, "
                             f"{burn_in}, {step_size}")
        self.step_size, self.k, self.burn_in = float(step_size), int(steps_per_update), int(burn_in)
        self.lifetime = self.LIFETIME_FACTOR * self.burn_in
        self.shape, self.seed = tuple(shape), int(seed)
        self.register_buffer("cursor", torch.zeros((), dtype=torch.long))
        self._allocate(n)
        self.generator = torch.Generator().manual_seed(self.seed)

    def resize(self, n: int) -> None:
        """Make the (empty) pool ``n`` chains; a DDP process owns ``n_global / world`` of them."""
        if int(self.age.max()) >= 0:
            raise RuntimeError("the chain pool can only be resized before its first update")
        self._allocate(n)

    def _allocate(self, n: int) -> None:
        if int(n) < 1:
            raise ValueError(f"chains need n >= 1, got {n}")
        self.n = int(n)
        device = self.cursor.device
        self.register_buffer("x", torch.zeros(self.n, *self.shape, device=device))
        self.register_buffer("y", torch.zeros(self.n, *self.shape, device=device))
        self.register_buffer("age", torch.full((self.n,), -1, dtype=torch.long, device=device))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # a loaded pool replaces this one whatever its size (e.g. a DDP worker's n / world chains)
        saved = state_dict.get(prefix + "x")
        if saved is not None and saved.shape[0] != self.n:
            self._allocate(saved.shape[0])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __getstate__(self):
        # a torch.Generator does not survive torch.multiprocessing's pickler (ddp_spawn): rebuilt from the seed
        state = super().__getstate__().copy()
        state.pop("generator", None)
        return state

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self.generator = torch.Generator().manual_seed(self.seed)

    def reseed(self, *parts: int) -> None:
        """Reseed the chains' noise from ``(seed, *parts)`` (e.g. the process rank and the training step)."""
        self.generator.manual_seed(mix_seed(self.seed, *parts))

    @property
    def refresh_per_update(self) -> int:
        """Chains given fresh sources per update: n·steps_per_update/lifetime (each lives ``lifetime`` steps)."""
        return max(1, math.ceil(self.n * self.k / self.lifetime))

    @staticmethod
    def _start(init: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        with torch.enable_grad():  # init may differentiate a potential (x − ∇φ(x)/2s)
            return init(x).detach()

    def _advance(self, score: ConditionalScore, y: Tensor, steps: int) -> Tensor:
        h = self.step_size
        for _ in range(steps):
            noise = torch.randn(y.shape, generator=self.generator, dtype=y.dtype).to(y.device)
            y = (y + h * score(y, 0) + math.sqrt(2.0 * h) * noise).detach()
        return y

    @torch.no_grad()
    def update(self, potentials, prior_score: Callable[[Tensor, int], Tensor], x_new: Tensor,
               init: Callable[[Tensor], Tensor]) -> Tensor:
        """Refresh the oldest chains with sources from ``x_new`` (the whole pool on the first call: ``x_new`` must
        then hold ≥ n rows), advance every chain, and return the mask of the usable ones (age ≥ burn_in)."""
        if int(self.age[0]) < 0:  # first call: fill and burn in
            if x_new.shape[0] < self.n:
                raise ValueError(f"the first chain update needs {self.n} sources, got {x_new.shape[0]}")
            self.x.copy_(x_new[: self.n])
            self.y.copy_(self._start(init, self.x))
            self.y.copy_(self._advance(ConditionalScore(prior_score, potentials, self.x), self.y, self.burn_in))
            self.age.fill_(self.burn_in)
        else:
            r = min(self.refresh_per_update, x_new.shape[0], self.n)
            idx = (int(self.cursor) + torch.arange(r, device=self.age.device)) % self.n
            self.x[idx] = x_new[:r]
            self.y[idx] = self._start(init, x_new[:r])
            self.age[idx] = 0
            self.cursor.fill_((int(self.cursor) + r) % self.n)
        self.y.copy_(self._advance(ConditionalScore(prior_score, potentials, self.x), self.y, self.k))
        self.age += self.k
        return self.age >= self.burn_in
