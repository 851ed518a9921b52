"""Test-only distributions, importable by Hydra as ``tests.helpers.<name>``."""

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
