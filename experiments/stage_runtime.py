"""What a training stage needs to survive kills, resumes and multiple processes.

- :class:`AtomicCheckpointIO`: checkpoints are written to a temporary file in the same directory, fsynced and
  renamed over the old one, so a SIGKILL while saving never leaves a truncated ``last.ckpt``.
- :func:`stage_lock`: an exclusive ``flock`` on ``<stage>/.lock`` while one process trains the stage, so two
  runs (or two parallel sweep cells) that need the same cached stage train it once; the other waits and then
  loads the result. The kernel drops the lock when the holder dies, even on ``kill -9``.
- :class:`StageRuntime`: a Lightning callback that runs in every training process (also in ``ddp_spawn``
  workers, whose state never returns to the parent): it shards the batch stream per rank, continues the
  stream where a resumed run stopped, reseeds torch's global RNG per (stage, rank, step) — so a resumed run
  draws the same random numbers as an uninterrupted one — and, on rank 0, writes the stage's ``final.pt`` and
  ``done.json`` when ``max_steps`` is reached. The parent then loads ``final.pt``.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import re
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.plugins.io import TorchCheckpointIO

from experiments.atomic import atomic_torch_save
from scones.data.streams import SampleStream, mix_seed

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to ``.<name>.tmp<pid>`` next to the target, fsync, then ``os.replace`` (atomic on POSIX)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not support storage_options")
        atomic_torch_save(checkpoint, path)


def checkpoint_step(path: Path) -> int:
    """Step in a ``step<N>.ckpt`` file name (-1 if none), for ordering checkpoints newest first."""
    m = re.search(r"step(\d+)", Path(path).stem)
    return int(m.group(1)) if m else -1


def remove_stale_temporaries(stage_dir: Path) -> None:
    """Delete ``.*.tmp<pid>`` files left by writers that were killed mid-write."""
    for p in list(Path(stage_dir).glob(".*.tmp*")) + list(Path(stage_dir).glob("checkpoints/.*.tmp*")):
        with contextlib.suppress(OSError):
            p.unlink()


@contextlib.contextmanager
def stage_lock(stage_dir: Path, stage_name: str):
    """Exclusive lock on ``<stage_dir>/.lock`` for the duration of the block (blocks while another holds it)."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    with open(stage_dir / ".lock", "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("stage %s: another process is training %s; waiting for it", stage_name, stage_dir)
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def submodule_path(root: torch.nn.Module, target: torch.nn.Module) -> str:
    """Dotted name of ``target`` inside ``root`` ("" for ``root`` itself); survives pickling to workers."""
    for name, mod in root.named_modules():
        if mod is target:
            return name
    raise ValueError(f"{type(target).__name__} is not a submodule of {type(root).__name__}")


class StageRuntime(Callback):
    """Per-process bookkeeping of one training stage (see the module docstring).

    Args:
        stage: the :class:`experiments.stages.Stage` (its ``finish`` writes ``final.pt`` + ``done.json``).
        save_path: dotted submodule path (:func:`submodule_path`) of the weights to save in ``final.pt``.
        max_steps: steps of the stage; ``final.pt`` is only written when they are all done.
        stream: the training :class:`~scones.data.streams.SampleStream` (sharded and fast-forwarded here).
        start_step: ``global_step`` of the checkpoint being resumed (0 for a fresh start).
        num_threads: torch intra-op threads for this process (``None``: leave as is).
    """

    def __init__(
        self,
        stage,
        save_path: str,
        max_steps: int,
        stream: SampleStream | None,
        start_step: int = 0,
        num_threads: int | None = None,
    ) -> None:
        self.stage, self.save_path, self.max_steps = stage, save_path, int(max_steps)
        self.stream, self.start_step, self.num_threads = stream, int(start_step), num_threads
        self.seed = int(stage.key, 16)
        self.elapsed_before = 0.0
        self._t0: float | None = None

    @property
    def state_key(self) -> str:
        return f"StageRuntime[{self.stage.name}]"

    # --- checkpointed state: training time accumulated over interrupted sessions
    def state_dict(self) -> dict[str, Any]:
        now = 0.0 if self._t0 is None else time.perf_counter() - self._t0
        return {"elapsed": self.elapsed_before + now}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.elapsed_before = float(state_dict.get("elapsed", 0.0))

    # --- hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.num_threads:
            torch.set_num_threads(int(self.num_threads))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.stream is not None:
            self.stream.rank, self.stream.world_size = trainer.global_rank, trainer.world_size
            self.stream.start_step = self.start_step
            self.stream.shard()  # fails early, naming the batch-size key, if it does not divide evenly
        self._t0 = time.perf_counter()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.stream is not None:
            used = getattr(trainer.train_dataloader, "dataset", None)
            if used is not None and used is not self.stream:
                log.warning("stage %s: the trainer iterates a copy of the batch stream; sharding may be off",
                            self.stage.name)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx) -> None:
        # noise drawn inside training_step (e.g. DSM levels and perturbations): fresh per rank, replayable per step
        torch.manual_seed(mix_seed(self.seed, trainer.global_rank, trainer.global_step))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step < self.max_steps:
            return
        if trainer.is_global_zero:
            module = pl_module.get_submodule(self.save_path) if self.save_path else pl_module
            elapsed = self.state_dict()["elapsed"]
            self.stage.finish(
                module,
                elapsed,
                {
                    "steps": self.max_steps,
                    "resumed": self.start_step > 0,
                    "resumed_from_step": self.start_step,
                    "world_size": trainer.world_size,
                },
            )
        trainer.strategy.barrier("stage_finished")
