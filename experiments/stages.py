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

import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger

log = logging.getLogger(__name__)


class StageError(RuntimeError):
    """A stage directory exists but does not belong to this config (or is corrupt)."""


def config_key(*parts: Any) -> str:
    """Stable short hash of config sections (DictConfigs are resolved first) and upstream keys."""

    def plain(p: Any) -> Any:
        if isinstance(p, DictConfig) or OmegaConf.is_config(p):
            return OmegaConf.to_container(p, resolve=True)
        return p

    blob = json.dumps([plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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
                "config": OmegaConf.to_container(self.config, resolve=True) if OmegaConf.is_config(self.config)
                else self.config,
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


def make_stage(cfg: DictConfig, name: str, *parts: Any) -> Stage:
    key = config_key(name, *parts)
    stage_dir = Path(cfg.paths.cache_dir) / f"{name}-{key}"
    return Stage(name=name, key=key, dir=stage_dir, config=parts[0] if parts else None)


def build_trainer(
    cfg: DictConfig,
    stage: Stage,
    max_steps: int,
    extra_loggers: list | None = None,
    runtime: StageRuntime | None = None,
    resume_step: int | None = None,
) -> pl.Trainer:
    tcfg = cfg.trainer
    ckpt_every = int(cfg.get("checkpoint_every", 0) or max(1, max_steps // 5))
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
    csv_logger = ResumableCSVLogger(save_dir=str(stage.dir), name="logs", version=0, resume_step=resume_step)
    loggers = [csv_logger] + list(extra_loggers or [])
    return pl.Trainer(
        accelerator=tcfg.accelerator,
        devices=tcfg.devices,
        strategy=tcfg.strategy,
        precision=tcfg.precision,
        num_nodes=tcfg.get("num_nodes", 1),
        max_steps=max_steps,
        max_epochs=-1,
        log_every_n_steps=int(tcfg.get("log_every_n_steps", 25)),
        gradient_clip_val=tcfg.get("gradient_clip_val"),
        logger=loggers,
        callbacks=callbacks,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=bool(tcfg.get("deterministic", False)),
        use_distributed_sampler=False,
        sync_batchnorm=bool(tcfg.get("sync_batchnorm", False)),
        plugins=[AtomicCheckpointIO()],  # a kill while saving never leaves a truncated checkpoint
        default_root_dir=str(stage.dir),  # Lightning's own scratch files stay inside the stage
    )


def run_training_stage(
    cfg: DictConfig,
    stage: Stage,
    module: pl.LightningModule,
    train_loader,
    max_steps: int,
    save_module: torch.nn.Module,
    extra_loggers: list | None = None,
) -> Stage:
    """Train ``module`` for ``max_steps`` unless the stage is cached; always leaves ``save_module`` trained."""
    if stage.is_done():
        stage.load_weights(save_module)
        log.info("stage %s: reusing %s (trained in %.0f s)", stage.name, stage.dir, stage.seconds)
        return stage
    stage.dir.mkdir(parents=True, exist_ok=True)
    ckpt = stage.last_ckpt if stage.last_ckpt.exists() else None
    if ckpt is not None:
        stage.check_owner()
        load_checkpoint(ckpt, f"stage '{stage.name}' (resume point)", stage.dir, mmap=True)  # fail clearly
        log.info("stage %s: resuming from %s", stage.name, ckpt)
    else:
        log.info("stage %s: training %d steps into %s", stage.name, max_steps, stage.dir)
    atomic_write_json(stage.owner_file, {"stage": stage.name, "key": stage.key})
    trainer = build_trainer(cfg, stage, max_steps, extra_loggers)
    t0 = time.perf_counter()
    trainer.fit(module, train_dataloaders=train_loader, ckpt_path=str(ckpt) if ckpt else None, weights_only=True)
    seconds = time.perf_counter() - t0
    if trainer.global_step < max_steps:
        raise StageError(f"stage '{stage.name}' stopped at step {trainer.global_step} < {max_steps}; rerun to resume")
    if trainer.is_global_zero:
        stage.finish(save_module, seconds, {"steps": max_steps, "resumed": ckpt is not None})
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return stage
