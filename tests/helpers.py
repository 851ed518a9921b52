"""Test-only distributions, importable by Hydra as ``tests.helpers.<name>``, and the tests' config composer."""

from pathlib import Path

import torch

from scones.data import StandardGaussian


class NaNAfter(StandardGaussian):
    """N(0, I) whose samples turn NaN after ``good_calls`` calls of ``sample`` (simulates a numerical fault)."""

    def __init__(self, dim: int = 2, good_calls: int = 5) -> None:
        super().__init__(dim)
        self.good_calls, self.calls = good_calls, 0

    def sample(self, n, generator=None):
        self.calls += 1
        out = super().sample(n, generator)
        return out if self.calls <= self.good_calls else torch.full_like(out, float("nan"))


CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def make_cfg(tmp_path, overrides, confine: bool = False):
    """The job config composed from ``configs/`` with ``overrides`` and outputs under ``tmp_path``; with ``confine``
    also ``paths.allowed_roots=[tmp_path]`` (the tmp dir as the only extra allowed root)."""
    from experiments.run import compose_config

    extra = [f"paths.output_root={tmp_path}"] + ([f"paths.allowed_roots=[{tmp_path}]"] if confine else [])
    return compose_config([*overrides, *extra], CONFIG_DIR)
