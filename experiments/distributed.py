"""Process-rank helpers for multi-process (DDP) runs, safe to call before, during and after ``Trainer.fit``.

How the pipeline uses processes (``trainer=ddp`` / ``trainer=ddp_sim``, see docs/operations.md):

- ``strategy=ddp`` (GPUs; also SLURM/torchrun): every rank runs the whole pipeline. Lightning launches ranks
  1..W-1 at the first ``fit`` of rank 0, and the process group stays initialised after ``fit``, so the evaluate
  stage can shard its chains across ranks and gather them on rank 0 (:func:`gather_to_rank_zero`).
- ``strategy=ddp_spawn`` (CPU tests): only ``fit`` runs in W spawned workers; everything else runs in the parent,
  which is rank 0 with no process group.

Before a process group exists the rank is Lightning's guess from the environment (``RANK``, ``LOCAL_RANK``,
``SLURM_PROCID``), which is what the launchers set for every rank > 0.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from scones.data.streams import mix_seed  # noqa: F401  (re-exported: per-step / per-rank seeds)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def global_rank() -> int:
    """Rank of this process: the process group's rank if any, else the launcher's environment (0 if none)."""
    if is_distributed():
        return dist.get_rank()
    return int(getattr(rank_zero_only, "rank", 0) or 0)


def world_size() -> int:
    """Processes in the initialised process group (1 without one)."""
    return dist.get_world_size() if is_distributed() else 1


def is_rank_zero() -> bool:
    return global_rank() == 0


def gather_to_rank_zero(obj):
    """``[obj of rank 0, obj of rank 1, ...]`` on rank 0 and ``None`` elsewhere; ``[obj]`` without a process group.

    Objects are pickled (tensors should be on the CPU); works with gloo and NCCL (NCCL uses the current CUDA
    device, which Lightning sets for each rank).
    """
    if not is_distributed() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def evaluation_device(chosen: str | None = None, accelerator: str = "cpu") -> torch.device:
    """Device of the evaluate stage's networks and Langevin chains.

    ``chosen`` (``eval.device``) when set (``cpu``, ``cuda``, ``cuda:N``); else the trainer's: CUDA when
    ``accelerator`` (``trainer.accelerator``) is gpu/cuda/auto and a GPU is visible, CPU otherwise. Under DDP each
    rank takes its local GPU (``LOCAL_RANK``), so sharded chains run on every GPU at once.
    """
    import os

    if chosen is None:
        use_cuda = str(accelerator) in ("gpu", "cuda", "auto") and torch.cuda.is_available()
        chosen = "cuda" if use_cuda else "cpu"
    device = torch.device(chosen)
    if device.type == "cuda" and device.index is None:
        index = int(os.environ.get("LOCAL_RANK", 0)) if is_distributed() else torch.cuda.current_device()
        device = torch.device("cuda", index % torch.cuda.device_count())
    return device
