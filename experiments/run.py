"""Entry point: ``python -m experiments.run [+experiment=NAME] [key=value ...]``.

Runs the SCONES stages dual -> score -> bp -> evaluate (see experiments/pipeline.py); finished stages are
reused from ``paths.cache_dir``. Bad configuration ends with one line naming the key and the fix.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger("scones")


def _mul(*args):
    out = 1
    for a in args:
        out *= a
    return out


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("mul"):
        OmegaConf.register_new_resolver("mul", _mul)


register_resolvers()


def compose_config(overrides=(), config_dir: Path | None = None) -> DictConfig:
    """The job config composed from ``configs/`` (or ``config_dir``) with Hydra ``overrides``, as a run would get
    it before start-up (scripts, benchmarks and tests build their configs with this one function)."""
    from hydra import compose, initialize_config_dir

    from experiments.validation import CONFIG_DIR

    with initialize_config_dir(config_dir=str(config_dir or CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _prepare_tracking(cfg: DictConfig) -> None:
    """In a multirun, group the W&B runs of one sweep under the sweep directory's name."""
    from hydra.types import RunMode

    hc = HydraConfig.get()
    if OmegaConf.select(cfg, "logger.wandb") is None or hc.mode != RunMode.MULTIRUN:
        return
    with open_dict(cfg):
        if cfg.logger.wandb.get("group") is None:
            cfg.logger.wandb.group = Path(hc.sweep.dir).name
        if cfg.logger.wandb.get("name") is None:
            cfg.logger.wandb.name = f"{cfg.get('name', 'run')}-{Path(hc.sweep.dir).name}-{hc.job.num}"


def check_multirun_strategy(cfg: DictConfig) -> None:
    """Refuse ``trainer.strategy=ddp`` with several local processes inside a multirun.

    Lightning's ``ddp`` relaunches the command line once per extra process; in a multirun that command line
    is the whole sweep, so every rank > 0 would run its own copy of the sweep. Processes started by SLURM
    (``hydra/launcher=slurm``) or torchrun are not relaunched and are fine.
    """
    from experiments.validation import ConfigError

    t = cfg.trainer
    devices, nodes = t.get("devices", 1), int(t.get("num_nodes", 1) or 1)
    single = devices == 1 or (OmegaConf.is_list(devices) and len(devices) == 1)
    external = any(k in os.environ for k in ("SLURM_NTASKS", "TORCHELASTIC_RUN_ID"))
    if t.get("strategy") == "ddp" and not (single and nodes == 1) and not external:
        raise ConfigError(
            f"trainer.strategy=ddp with trainer.devices={devices} would relaunch the whole sweep once per extra "
            "process; in a local multirun use trainer.strategy=ddp_spawn (or one device per cell), on a cluster "
            "hydra/launcher=slurm"
        )


def _worst_value() -> float:
    """+inf, or -inf when the sweeper maximises (``hydra.sweeper.direction``)."""
    direction = OmegaConf.select(HydraConfig.get(), "sweeper.direction", default=None)
    return float("-inf") if str(direction).lower().endswith("maximize") else float("inf")


def objective(cfg: DictConfig, metrics: dict) -> float:
    """The number a sweeper optimises: ``optimized_metric`` (dotted key of metrics.json) if set, else SCONES'
    BW-UVP where a closed form exists and its target sliced-W2 otherwise."""
    from experiments.sweeps import select_metric

    key = cfg.get("optimized_metric")
    if key:
        return select_metric(metrics, str(key))
    scones = metrics["methods"]["scones"]
    return float(scones.get("bw_uvp", scones.get("target_sliced_w2")))


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> float | None:
    os.environ.setdefault("WANDB_SILENT", "true")
    from hydra.types import RunMode

    from experiments.stages import StageError
    from experiments.sweeps import ERROR_FILE, MetricError
    from experiments.validation import ConfigError
    from scones.models.base import NonFiniteLossError
    from scones.sampling.langevin import NonFiniteSampleError

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        from experiments.pipeline import run

        if multirun:
            check_multirun_strategy(cfg)
        _prepare_tracking(cfg)
        metrics = run(cfg, run_dir)
        value = None if metrics is None else objective(cfg, metrics)
    except (ConfigError, StageError, NonFiniteLossError, NonFiniteSampleError, MetricError) as e:
        message = str(e)
        if not multirun:
            fail(message)
        # a failed sweep cell must not stop the sweep: record it (the sweep summary shows it) and report the
        # worst possible value (Optuna refuses NaN; ±inf steers its sampler away from diverging settings)
        log.error("error: %s", message)
        (run_dir / ERROR_FILE).write_text(message + "\n")
        return _worst_value()
    if metrics is None:  # DDP rank > 0: rank 0 reports
        return None
    if multirun and value is not None and math.isnan(value):
        log.warning("optimized metric is NaN; reporting the worst value to the sweeper")
        value = _worst_value()
    log.info("run directory: %s", run_dir)
    scones = metrics["methods"]["scones"]
    summary = ", ".join(f"{k}={v:.4g}" for k, v in scones.items())
    log.info("SCONES: %s", summary)
    if cfg.get("optimized_metric"):
        log.info("optimized_metric %s = %.6g", cfg.optimized_metric, value)
    return value


if __name__ == "__main__":
    from experiments.validation import ConfigError, preflight

    try:  # bad options/keys/values/paths: one line, before Hydra composes or creates the run directory
        preflight(sys.argv[1:])
    except ConfigError as e:
        fail(str(e))
    main()
