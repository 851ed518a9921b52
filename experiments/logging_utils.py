"""Logging for the pipeline: resumable CSV curves, optional W&B tracking, and progress that suits log files.

- :func:`stage_csv_logger`: Lightning's ``CSVLogger``, every row flushed at once; on a resume the rows of the
  interrupted session up to the resumed checkpoint's step are kept and the new ones appended after them.
- :class:`Tracker`: one W&B run per pipeline run (``logger=wandb``; rank 0 only): the resolved config, the
  training losses of every stage as ``<stage>-train/...`` (Lightning's ``WandbLogger``, each against the
  stage's own ``trainer/global_step``), the
  evaluation metrics (summary + a per-method table), the run's PNGs as images, and ``samples.npz`` /
  ``metrics.json`` / each stage's ``final.pt`` as artifacts. Without ``logger.wandb`` every method is a no-op,
  and ``wandb`` is not imported. The mode comes from ``WANDB_MODE`` (online | offline | disabled).
- :func:`progress_bar` / :class:`SamplingProgress`: a tqdm bar on a terminal; in non-interactive logs (SLURM
  files, CI, Hydra's job log) one plain line per 10 % (at most every ``interval_s`` seconds apart otherwise)
  with rate, elapsed time and ETA instead of carriage-return updates.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.callbacks.progress.progress_bar import ProgressBar
from pytorch_lightning.loggers import CSVLogger, Logger

from experiments.atomic import atomic_file
from experiments.distributed import is_rank_zero
from experiments.sweeps import flatten_metrics

log = logging.getLogger("scones")


def is_interactive() -> bool:
    """True when progress goes to a terminal (stderr is a TTY)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _emit(message: str) -> None:
    # spawned DDP workers have no logging configuration: print there instead of losing the line
    if logging.getLogger().handlers or log.handlers:
        log.info(message)
    else:
        print(message, file=sys.stderr, flush=True)


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# --------------------------------------------------------------------------------------------- progress


class ProgressLine:
    """Prints ``desc: done/total unit (pct) | rate | elapsed | ETA | extra`` at each 10 % and every ``interval_s``."""

    def __init__(self, desc: str, total: int, unit: str = "steps", interval_s: float = 60.0, start: int = 0):
        self.desc, self.total, self.unit, self.interval_s = desc, max(1, int(total)), unit, float(interval_s)
        self.start = int(start)
        self._t0 = self._last_t = time.perf_counter()
        self._last_decile = int(10 * start / self.total)

    def update(self, done: int, extra: str = "", force: bool = False) -> None:
        now = time.perf_counter()
        decile = int(10 * min(done, self.total) / self.total)
        if not (force or decile > self._last_decile or now - self._last_t >= self.interval_s):
            return
        self._last_decile, self._last_t = decile, now
        elapsed = now - self._t0
        rate = (done - self.start) / elapsed if elapsed > 0 else float("nan")
        eta = (self.total - done) / rate if rate and rate > 0 else float("nan")
        pct = 100.0 * done / self.total
        msg = (
            f"{self.desc}: {done}/{self.total} {self.unit} ({pct:.0f}%) | {rate:.3g} {self.unit}/s | "
            f"elapsed {_hms(elapsed)} | ETA {_hms(eta)}"
        )
        _emit(msg + (f" | {extra}" if extra else ""))


class LogProgressBar(ProgressBar):
    """Lightning progress "bar" for non-TTY output: :class:`ProgressLine` lines with the logged losses."""

    def __init__(self, desc: str, total_steps: int, interval_s: float = 60.0) -> None:
        super().__init__()
        self.desc, self.total_steps, self.interval_s = desc, int(total_steps), float(interval_s)
        self._enabled = True
        self._line: ProgressLine | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._enabled and trainer.is_global_zero:
            self._line = ProgressLine(self.desc, self.total_steps, "steps", self.interval_s, trainer.global_step)
            _emit(f"{self.desc}: starting at step {trainer.global_step}/{self.total_steps}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._line is None:
            return
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        extra = " ".join(f"{k}={float(v):.4g}" if isinstance(v, (int, float)) else f"{k}={v}"
                         for k, v in metrics.items())
        self._line.update(trainer.global_step, extra, force=trainer.global_step >= self.total_steps)

    def on_train_end(self, trainer, pl_module) -> None:
        self._line = None


def progress_bar(desc: str, total_steps: int) -> ProgressBar:
    """tqdm on a terminal (refreshed ~200 times per stage), log lines otherwise."""
    if is_interactive():
        return TQDMProgressBar(refresh_rate=max(1, total_steps // 200))
    return LogProgressBar(desc, total_steps, interval_s=float(os.environ.get("SCONES_PROGRESS_INTERVAL", 60)))


class SamplingProgress:
    """Langevin progress in non-TTY logs: a sampler ``callback`` (called once per Langevin step) that prints a
    :class:`ProgressLine`. On a terminal it does nothing (the samplers draw their own tqdm bars)."""

    def __init__(self, total_steps: int, desc: str = "sampling", enabled: bool | None = None):
        self.steps = 0
        enabled = (not is_interactive()) if enabled is None else enabled
        self.line = ProgressLine(desc, total_steps, "steps",
                                 float(os.environ.get("SCONES_PROGRESS_INTERVAL", 60))) if enabled else None

    def __call__(self, info: dict) -> None:
        self.steps += 1
        if self.line is not None:
            self.line.update(min(self.steps, self.line.total), force=self.steps == self.line.total)


# --------------------------------------------------------------------------------------------- CSV


def stage_csv_logger(save_dir, resume_step: int | None = None, name: str = "logs", version: int = 0) -> CSVLogger:
    """Lightning's ``CSVLogger`` for a stage's curves (``<save_dir>/<name>/version_<version>/metrics.csv``).

    Every logged row is written at once (``flush_logs_every_n_steps=1``), so a kill loses no row. Lightning starts a
    fresh ``metrics.csv`` when it opens the directory (a fresh start drops a dead attempt's curve); on a resume from
    the checkpoint at global step ``resume_step`` the interrupted session's rows with ``step < resume_step`` are
    read first and written back under their header, and the resumed rows follow them.
    """
    logger = CSVLogger(save_dir, name=name, version=version, flush_logs_every_n_steps=1)
    path = Path(logger.log_dir) / "metrics.csv"
    kept = None
    if resume_step is not None and is_rank_zero() and path.is_file():
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            kept = list(reader.fieldnames or []), [
                r for r in reader if r.get("step") not in (None, "") and int(float(r["step"])) < resume_step
            ]
    with warnings.catch_warnings():  # "... will be deleted": the rows to keep are in hand
        warnings.filterwarnings("ignore", message="Experiment logs directory")
        writer = logger.experiment  # opens the directory: Lightning removes the old metrics.csv
    if kept is not None:
        keys, rows = kept
        with atomic_file(path, "w") as f:
            out = csv.DictWriter(f, fieldnames=keys)
            out.writeheader()
            out.writerows(rows)
        writer.metrics_keys = keys  # later rows are appended under this header
    return logger


# --------------------------------------------------------------------------------------------- W&B


class Tracker:
    """Run-level tracking (see module docstring). Build with :meth:`from_config`; always call :meth:`finish`."""

    def __init__(self, run=None, options: dict | None = None) -> None:
        self.run, self.options = run, dict(options or {})

    @property
    def enabled(self) -> bool:
        return self.run is not None

    @classmethod
    def from_config(cls, cfg: DictConfig, run_dir: Path) -> Tracker:
        wcfg = OmegaConf.select(cfg, "logger.wandb")
        if not wcfg or not is_rank_zero():
            return cls(None)
        import wandb

        opts = OmegaConf.to_container(wcfg, resolve=True)
        save_dir = Path(opts.get("save_dir") or run_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        init = {
            "project": opts.get("project") or "scones",
            "entity": opts.get("entity"),
            "group": opts.get("group"),
            "job_type": opts.get("job_type"),
            "tags": list(opts.get("tags") or []),
            "notes": opts.get("notes"),
            "name": opts.get("name") or f"{cfg.get('name', 'run')}-{Path(run_dir).name}",
            "dir": str(save_dir),
            "config": OmegaConf.to_container(cfg, resolve=True),
        }
        if opts.get("offline"):
            init["mode"] = "offline"  # prefer WANDB_MODE=offline: this flag overrides WANDB_MODE=disabled
        run = wandb.init(**{k: v for k, v in init.items() if v is not None})
        return cls(run, opts)

    def stage_loggers(self, stage: str) -> list[Logger]:
        """Lightning's ``WandbLogger`` on this run, keys prefixed ``<stage>-`` (``dual-train/loss``), plotted against
        the stage's own ``trainer/global_step`` (stages restart at 0); under ``ddp_spawn`` Lightning re-attaches the
        workers to the run."""
        if not self.enabled:
            return []
        from pytorch_lightning.loggers import WandbLogger

        self.run.define_metric("trainer/global_step")
        self.run.define_metric(f"{stage}-*", step_metric="trainer/global_step")
        return [WandbLogger(experiment=self.run, prefix=stage)]

    def log_results(self, metrics: dict, run_dir: Path, stages: dict) -> None:
        """Evaluation metrics (summary + ``eval/`` history + ``eval/methods`` table), PNGs and artifacts."""
        if not self.enabled or not metrics:
            return
        import wandb

        run_dir = Path(run_dir)
        flat = flatten_metrics(metrics)
        self.run.summary.update(flat)
        self.run.log({f"eval/{k}": v for k, v in flat.items()})
        methods = metrics.get("methods", {})
        columns = sorted({k for m in methods.values() for k in m})
        if methods:
            rows = [[name] + [methods[name].get(c) for c in columns] for name in methods]
            self.run.log({"eval/methods": wandb.Table(columns=["method", *columns], data=rows)})
        images = {f"plots/{p.stem}": wandb.Image(str(p)) for p in sorted(run_dir.glob("*.png"))}
        if images:
            self.run.log(images)
        if self.options.get("log_artifacts", True):
            art = wandb.Artifact(f"samples-{self.run.id}", type="samples", metadata={"run_dir": str(run_dir)})
            for name in ("samples.npz", "metrics.json", "config.yaml"):
                if (run_dir / name).is_file():
                    art.add_file(str(run_dir / name))
            self.run.log_artifact(art)
        if self.options.get("log_checkpoints", True):
            for name, st in stages.items():
                if st is None or not st.weights_file.is_file():
                    continue
                art = wandb.Artifact(f"{name}-{st.key}", type="checkpoint",
                                     metadata={"stage": name, "key": st.key, "dir": str(st.dir), **st.info})
                art.add_file(str(st.weights_file))
                if st.done_file.is_file():
                    art.add_file(str(st.done_file))
                self.run.log_artifact(art)

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            run, self.run = self.run, None
            run.finish(exit_code=exit_code)
