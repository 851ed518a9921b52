"""Infinite batch streams for Lightning: fresh independent samples from each distribution at every step."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info


def stream_seed(seed: int, rank: int = 0, worker: int = 0) -> int:
    """Distinct, reproducible seed per (seed, rank, worker)."""
    return (int(seed) * 1_000_003 + rank * 10_007 + worker * 101) % (2**63 - 1)


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


class SampleStream(IterableDataset):
    """Yields ``tuple(d.sample(batch_size) for d in distributions)`` forever.

    Seeded per DDP rank and dataloader worker, so ranks draw different batches (the global batch is
    ``batch_size × world_size``).
    """

    def __init__(self, distributions, batch_size: int, seed: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.distributions, self.batch_size, self.seed = list(distributions), int(batch_size), int(seed)

    def __iter__(self):
        info = get_worker_info()
        g = torch.Generator().manual_seed(stream_seed(self.seed, _rank(), 0 if info is None else info.id))
        while True:
            yield tuple(d.sample(self.batch_size, generator=g) for d in self.distributions)


def stream_loader(distributions, batch_size: int, seed: int = 0, num_workers: int = 0) -> DataLoader:
    return DataLoader(
        SampleStream(distributions, batch_size, seed),
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )
