"""Cached, resumable training stages.

Every stage lives in ``<paths.cache_dir>/<stage>-<key>/`` where ``key`` hashes the resolved config sections
the stage depends on (and the keys of the stages it reads). Layout of a stage directory::

    stage.json              key of the config that owns the directory (checked before resuming)
    checkpoints/last.ckpt   Lightning checkpoint (resume point while the stage is unfinished)
    logs/                   CSV training curves
    final.pt                weights only (``torch.load(weights_only=True)``), written atomically at the end
    done.json               marker: key, config, wall time, steps — written last, atomically

Rerunning the same config finds ``done.json`` and loads ``final.pt`` instead of retraining; a run killed
mid-stage resumes from ``checkpoints/last.ckpt``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from experiments.atomic import atomic_torch_save, atomic_write_json
from experiments.distributed import is_rank_zero
from experiments.logging_utils import Tracker, progress_bar, stage_csv_logger
from experiments.stage_runtime import (
    AtomicCheckpointIO,
    StageRuntime,
    checkpoint_step,
    remove_stale_temporaries,
    stage_lock,
    submodule_path,
)
from experiments.startup import StageSpec, TrainingSpec
from scones.data.streams import SampleStream

log = logging.getLogger(__name__)


class StageError(RuntimeError):
    """A stage directory exists but does not belong to this config (or is corrupt)."""


def config_key(*parts: Any) -> str:
    """Stable short hash of resolved config sections (plain containers) and upstream keys."""
    blob = json.dumps(list(parts), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass
class Stage:
    name: str
    key: str
    dir: Path
    config: Any = None
    cached: bool = False
    seconds: float = 0.0
    info: dict = field(default_factory=dict)

    @property
    def done_file(self) -> Path:
        return self.dir / "done.json"

    @property
    def weights_file(self) -> Path:
        return self.dir / "final.pt"

    @property
    def last_ckpt(self) -> Path:
        return self.dir / "checkpoints" / "last.ckpt"

    @property
    def owner_file(self) -> Path:
        return self.dir / "stage.json"

    def check_owner(self) -> None:
        """Refuse to resume from checkpoints another config wrote into this directory (``stage.json`` key)."""
        if not self.owner_file.exists():
            return
        try:
            key = json.loads(self.owner_file.read_text()).get("key")
        except (ValueError, AttributeError, UnicodeDecodeError):
            key = "<unreadable>"
        if key != self.key:
            raise StageError(
                f"{self.dir} holds checkpoints of another config (stage.json key {key} != {self.key}); move it "
                "away or set paths.cache_dir to another directory"
            )

    def is_done(self) -> bool:
        if not self.done_file.exists():
            return False
        try:
            meta = json.loads(self.done_file.read_text())
            if not isinstance(meta, dict) or "key" not in meta:
                raise ValueError("not a stage marker: expected a JSON object with a 'key'")
            seconds = float(meta.get("seconds", 0.0))
        except (ValueError, TypeError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            raise StageError(
                f"{self.done_file} is corrupt ({' '.join(str(e).split())}); delete {self.dir} to retrain "
                f"stage '{self.name}'"
            ) from e
        if meta.get("key") != self.key:
            raise StageError(
                f"{self.dir} holds stage '{self.name}' of another config (key {meta.get('key')} != {self.key}); "
                f"move it away or set paths.cache_dir to another directory"
            )
        self.info = meta.get("info", {})
        self.seconds = seconds
        return True

    def load_state(self) -> Any:
        """The saved ``final.pt`` (tensors only: ``weights_only=True``, never arbitrary unpickling)."""
        return load_checkpoint(self.weights_file, f"stage '{self.name}' (marked done)", self.dir)

    def load_weights(self, module: torch.nn.Module) -> None:
        state = self.load_state()
        if not isinstance(state, dict):
            raise StageError(f"{self.weights_file} holds a {type(state).__name__}, not a state dict; delete "
                             f"{self.dir} to retrain stage '{self.name}'")
        try:
            missing, unexpected = module.load_state_dict(state, strict=False)
        except RuntimeError as e:  # size mismatch
            raise StageError(f"{self.weights_file} does not match the networks of this config "
                             f"({' '.join(str(e).split())[:300]}); delete {self.dir} to retrain stage "
                             f"'{self.name}'") from e
        if missing or unexpected:
            raise StageError(
                f"{self.weights_file} does not match the networks of this config (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}); delete {self.dir} to retrain stage '{self.name}'"
            )
        self.cached = True

    def finish(self, module: torch.nn.Module | None, seconds: float, info: dict | None = None) -> None:
        self.seconds, self.info = seconds, dict(info or {})
        if module is not None:
            atomic_torch_save(module.state_dict(), self.weights_file)
        atomic_write_json(
            self.done_file,
            {
                "stage": self.name,
                "key": self.key,
                "seconds": seconds,
                "info": self.info,
                "config": self.config,
            },
        )


def load_checkpoint(path: Path, what: str, stage_dir: Path, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` with one-line :class:`StageError` for missing/corrupt/unsafe files.

    ``weights_only=True`` restricts unpickling to tensors and plain containers: a file carrying code (a pickled
    object with ``__reduce__``) is refused, not executed.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError as e:
        raise StageError(f"{what}: {path} is missing; delete {stage_dir} to retrain it") from e
    except Exception as e:  # noqa: BLE001 - zip/pickle/EOF errors all mean the same: unusable file
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise StageError(
            f"{what}: {path} is corrupt or not a weights-only checkpoint ({type(e).__name__}: {reason}); "
            f"delete it (or {stage_dir}) to retrain"
        ) from e


def make_stage(training: TrainingSpec, spec: StageSpec, *upstream: str) -> Stage:
    """The stage ``<training.cache_dir>/<name>-<key>``: the key hashes the stage's resolved config section, the
    keys of the stages it reads (``upstream``) and the sections it depends on (:class:`StageSpec`)."""
    key = config_key(spec.name, spec.section, *upstream, *spec.inputs)
    return Stage(name=spec.name, key=key, dir=training.cache_dir / f"{spec.name}-{key}", config=spec.section)


def build_trainer(
    training: TrainingSpec,
    stage: Stage,
    max_steps: int,
    extra_loggers: list | None = None,
    runtime: StageRuntime | None = None,
    resume_step: int | None = None,
    unused_parameters: bool = False,
) -> pl.Trainer:
    """The stage's Lightning trainer. ``unused_parameters``: the module's loss leaves some parameters out of the
    graph (e.g. φ's output bias under ``dual.estimator=langevin``), so DDP must look for them."""
    t = training.trainer
    strategy = t.strategy
    if unused_parameters and strategy in ("ddp", "ddp_spawn"):
        strategy = f"{strategy}_find_unused_parameters_true"
    ckpt_every = int(training.checkpoint_every or max(1, max_steps // 5))
    callbacks = [
        ModelCheckpoint(
            dirpath=stage.dir / "checkpoints",
            filename="step{step}",
            auto_insert_metric_name=False,
            save_last=True,
            save_top_k=1,
            every_n_train_steps=ckpt_every,
            enable_version_counter=False,
        ),
        progress_bar(stage.name, max_steps),
        *([runtime] if runtime is not None else []),
    ]
    csv_logger = stage_csv_logger(str(stage.dir), resume_step)
    loggers = [csv_logger] + list(extra_loggers or [])
    return pl.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=strategy,
        precision=t.precision,
        num_nodes=t.num_nodes,
        max_steps=max_steps,
        max_epochs=-1,
        log_every_n_steps=int(t.log_every_n_steps),
        gradient_clip_val=t.gradient_clip_val,
        logger=loggers,
        callbacks=callbacks,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=t.deterministic,
        use_distributed_sampler=False,
        sync_batchnorm=bool(getattr(t, "sync_batchnorm", False)),
        plugins=[AtomicCheckpointIO()],  # a kill while saving never leaves a truncated checkpoint
        default_root_dir=str(stage.dir),  # Lightning's own scratch files stay inside the stage
    )


def resume_point(stage: Stage) -> tuple[Path | None, int]:
    """Newest loadable checkpoint of an unfinished stage and its ``global_step`` (``(None, 0)``: start fresh).

    ``last.ckpt`` first, then the ``step*.ckpt`` kept next to it; an unreadable file is skipped with a warning
    (checkpoints are written atomically, so this only happens to files damaged by something else). If every
    checkpoint is unreadable the stage fails with a one-line error instead of silently restarting.
    """
    ckpt_dir = stage.dir / "checkpoints"
    candidates = [stage.last_ckpt] + sorted(ckpt_dir.glob("step*.ckpt"), key=checkpoint_step, reverse=True)
    candidates = [c for c in candidates if c.is_file()]
    if not candidates:
        return None, 0
    stage.check_owner()
    errors = []
    for path in candidates:
        try:
            meta = load_checkpoint(path, f"stage '{stage.name}' (resume point)", stage.dir, mmap=True)
            return path, int(meta["global_step"])
        except (StageError, KeyError, TypeError) as e:
            errors.append(str(e))
            log.warning("stage %s: skipping unusable checkpoint %s", stage.name, path)
    raise StageError(errors[0])


def run_training_stage(
    training: TrainingSpec,
    stage: Stage,
    module: pl.LightningModule,
    train_loader,
    max_steps: int,
    save_module: torch.nn.Module,
    tracker: Tracker | None = None,
) -> Stage:
    """Train ``module`` for ``max_steps`` unless the stage is cached; always leaves ``save_module`` trained.

    Works for one process and for DDP (``trainer.strategy`` ``ddp`` or ``ddp_spawn``): the weights are always
    taken from the ``final.pt`` that rank 0 writes inside the training process(es) (see
    :class:`experiments.stage_runtime.StageRuntime`), because ``ddp_spawn`` workers never hand theirs back.
    The launching process holds an exclusive lock on the stage while training, so concurrent runs needing the
    same stage train it once. The batch stream's ``batch_size`` is the global batch (split across ranks).
    """
    if stage.is_done():
        stage.load_weights(save_module)
        log.info("stage %s: reusing %s (trained in %.0f s)", stage.name, stage.dir, stage.seconds)
        return stage
    launcher = is_rank_zero()  # ranks > 0 of a `ddp` launch join rank 0's fit and never take the lock
    with stage_lock(stage.dir, stage.name) if launcher else contextlib.nullcontext():
        if stage.is_done():  # another process trained it while we waited for the lock
            stage.load_weights(save_module)
            log.info("stage %s: reusing %s (trained meanwhile by another process)", stage.name, stage.dir)
            return stage
        stage.dir.mkdir(parents=True, exist_ok=True)
        if launcher:
            remove_stale_temporaries(stage.dir)
        ckpt, start_step = resume_point(stage)
        if ckpt is not None:
            log.info("stage %s: resuming from %s (step %d/%d)", stage.name, ckpt, start_step, max_steps)
        else:
            log.info("stage %s: training %d steps into %s", stage.name, max_steps, stage.dir)
        if launcher:
            atomic_write_json(stage.owner_file, {"stage": stage.name, "key": stage.key})
        stream = getattr(train_loader, "dataset", None)
        if not isinstance(stream, SampleStream):
            stream = None
        elif stream.name == "batch_size":
            stream.name = f"{stage.name}.batch_size"
        runtime = StageRuntime(
            stage, submodule_path(module, save_module), max_steps, stream, start_step, training.num_threads
        )
        loggers = tracker.stage_loggers(stage.name) if tracker is not None else []  # + the CSV logger
        trainer = build_trainer(training, stage, max_steps, loggers, runtime, resume_step=start_step if ckpt else None,
                                unused_parameters=bool(getattr(module, "unused_parameters", False)))
        if stream is not None and stream.batch_size % max(1, trainer.world_size):
            raise StageError(
                f"{stream.name}={stream.batch_size} is the GLOBAL batch size and must be divisible by the "
                f"{trainer.world_size} training processes (trainer.devices × trainer.num_nodes)"
            )
        trainer.fit(module, train_dataloaders=train_loader, ckpt_path=str(ckpt) if ckpt else None, weights_only=True)
    if not stage.is_done():  # rank 0 writes done.json in the training process once max_steps is reached
        raise StageError(
            f"stage '{stage.name}' stopped before step {max_steps} (at {trainer.global_step} in this process); "
            f"rerun the same command to resume from {stage.dir / 'checkpoints'}"
        )
    stage.load_weights(save_module)
    stage.cached = False
    return stage
