"""Infinite batch streams for Lightning: fresh independent samples from each distribution at every step.

Global-batch semantics (DDP): ``batch_size`` is the GLOBAL batch of one optimisation step. Batch number ``k`` is
drawn from a generator seeded by ``(seed, k)`` — the same global batch on every rank — and rank ``r`` of ``W``
keeps rows ``[r·b, (r+1)·b)`` with ``b = batch_size / W``. A W-process run therefore sees exactly the batches
of a single-process run with the same ``batch_size``, and DDP's gradient average equals the single-process
gradient for losses that are batch means (e.g. the diagonal-pair dual and BP estimators). Cost: every rank
draws the whole global batch (cheap for synthetic samplers and in-memory image sets).

Resuming: ``start_step`` is the number of batches already consumed, so a resumed stream continues with the
batches the interrupted run would have drawn next.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

_MASK64 = (1 << 64) - 1


def mix_seed(*parts: int) -> int:
    """Deterministic 63-bit seed from integers (splitmix64 chain); distinct inputs give unrelated seeds."""
    z = 0x9E3779B97F4A7C15
    for p in parts:
        z = (z + (int(p) & _MASK64) + 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z ^= z >> 31
    return z >> 1


def batch_seed(seed: int, step: int) -> int:
    """Seed of global batch number ``step`` of the stream with seed ``seed``."""
    return mix_seed(seed, step)


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class SampleStream(IterableDataset):
    """Yields ``tuple(d.sample(b) for d in distributions)`` forever, one tuple per training step.

    Args:
        distributions: objects with ``sample(n, generator=None)``.
        batch_size: GLOBAL batch size (divided by the world size per rank; see the module docstring).
        seed: stream seed; batch ``k`` uses ``batch_seed(seed, k)``.
        name: config key of ``batch_size``, for error messages.

    ``rank``/``world_size`` are taken from the initialised process group unless set explicitly (the
    training stage sets them in every rank before the loader starts); ``start_step`` skips batches already
    used. With ``W`` dataloader workers, worker ``w`` yields batches ``start_step + w + i·W``, which the
    DataLoader interleaves back into step order.
    """

    def __init__(self, distributions, batch_size: int, seed: int = 0, name: str = "batch_size") -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"{name} must be >= 1, got {batch_size}")
        self.distributions, self.batch_size, self.seed = list(distributions), int(batch_size), int(seed)
        self.name = name
        self.start_step = 0
        self.rank: int | None = None
        self.world_size: int | None = None

    def shard(self) -> tuple[int, int, int]:
        """``(rank, world_size, local batch size)``; raises if the global batch does not split evenly."""
        rank, world = _rank_world() if self.world_size is None else (int(self.rank or 0), int(self.world_size))
        if self.batch_size % world:
            raise ValueError(
                f"{self.name}={self.batch_size} is the GLOBAL batch size and must be divisible by the number of "
                f"processes ({world} = trainer.devices × trainer.num_nodes); set {self.name} to a multiple of {world}"
            )
        return rank, world, self.batch_size // world

    def __iter__(self):
        rank, _, local = self.shard()
        info = get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        lo = rank * local
        step = int(self.start_step) + worker
        while True:
            g = torch.Generator().manual_seed(batch_seed(self.seed, step))
            batch = tuple(d.sample(self.batch_size, generator=g) for d in self.distributions)
            yield batch if local == self.batch_size else tuple(t[lo : lo + local] for t in batch)
            step += n_workers


def stream_loader(
    distributions, batch_size: int, seed: int = 0, num_workers: int = 0, name: str = "batch_size"
) -> DataLoader:
    return DataLoader(
        SampleStream(distributions, batch_size, seed, name=name),
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )
