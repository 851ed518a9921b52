"""Entry point: ``python -m experiments.run [+experiment=NAME] [key=value ...]``.

Runs the SCONES stages dual -> score -> bp -> evaluate (see experiments/pipeline.py); finished stages are
reused from ``paths.cache_dir``. Bad configuration ends with one line naming the key and the fix.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

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


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> float | None:
    os.environ.setdefault("WANDB_SILENT", "true")
    from experiments.stages import StageError
    from experiments.validation import ConfigError
    from scones.models.dual import NonFiniteLossError
    from scones.sampling.langevin import NonFiniteSampleError

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        from experiments.pipeline import run

        metrics = run(cfg, run_dir)
    except (ConfigError, StageError, NonFiniteLossError, NonFiniteSampleError) as e:
        fail(str(e))
    log.info("run directory: %s", run_dir)
    scones = metrics["methods"]["scones"]
    summary = ", ".join(f"{k}={v:.4g}" for k, v in scones.items())
    log.info("SCONES: %s", summary)
    return scones.get("bw_uvp", scones.get("target_sliced_w2"))


if __name__ == "__main__":
    from experiments.validation import ConfigError, preflight

    try:  # bad options/keys/values/paths: one line, before Hydra composes or creates the run directory
        preflight(sys.argv[1:])
    except ConfigError as e:
        fail(str(e))
    main()
