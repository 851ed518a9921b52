"""The image sampler's last level and final denoising step, checked with an exact Gaussian-mixture score.

A tiny 1×4×4 "image" distribution: a mixture of K Gaussians whose means have exact zeros on a background mask,
with spread ``s`` on the foreground pixels only (so every clean image has an exactly black background). Its score
convolved with N(0, σ²I) is closed-form at every σ, so the annealed sampler of the `digits` experiment can be run
exactly as configured (``sampler`` node, through :func:`scones.sampling.conditional.sample_conditional`) with a
perfect score model. On the background pixels every mixture component is N(0, σ²) at level σ, so the chains there
are Ornstein–Uhlenbeck recursions with a closed-form stationary law:

* without the denoising step the background pixels end N(0, v) with v = σ_L² / (1 − a/2), a = ε/σ_L² (the
  ULA bias of step α_L = ε at level σ_L): mean |y| = sqrt(2v/π). A sampler that skips the last level ends at
  σ_{L−1} = 1.67 σ_L instead;
* the Tweedie step y + σ_L² s(y, σ_L) maps the background exactly to 0, so it stays far below σ_L with it.
"""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from scones.ot import KL, SquaredEuclidean
from scones.ot.dual import DualPotentials
from scones.sampling.conditional import sample_conditional
from scones.sampling.langevin import annealed_langevin
from scones.sampling.schedules import geometric_sigmas
from tests.helpers import make_cfg


class MaskedGMM:
    """Mixture of K Gaussians N(μ_k, diag(s² · fg)) on (1, 4, 4) images; μ_k = 0 and zero variance off ``fg``."""

    def __init__(self, k: int = 3, s: float = 0.05, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.fg = torch.zeros(1, 4, 4, dtype=torch.bool)
        self.fg[:, 1:, 1:3] = True  # 6 foreground pixels; the other 10 are background in every image
        self.means = torch.where(self.fg, 0.3 + 0.6 * torch.rand(k, 1, 4, 4, generator=g), torch.zeros(()))
        self.s = s

    def var(self, sigma: float) -> Tensor:
        return torch.where(self.fg, torch.tensor(self.s**2 + sigma**2), torch.tensor(sigma**2))

    def score(self, y: Tensor, sigma: float) -> Tensor:
        """∇ log (q ∗ N(0, σ²I))(y), ``y (n, 1, 4, 4)``."""
        var = self.var(sigma)
        diff = self.means[None] - y[:, None]  # (n, K, 1, 4, 4)
        logw = -0.5 * (diff.pow(2) / var).flatten(2).sum(2)  # equal weights, equal covariances
        r = torch.softmax(logw, dim=1).view(*logw.shape, 1, 1, 1)
        return (r * diff / var).sum(1)

    def sample(self, n: int, g: torch.Generator) -> Tensor:
        k = torch.randint(0, self.means.shape[0], (n,), generator=g)
        return self.means[k] + self.s * self.fg * torch.randn(n, 1, 4, 4, generator=g)


class CostTo(nn.Module):
    """ψ(y) = c(x₀, y): with every source equal to x₀, ∇_y log H = (∇ψ − ∇_y c(x₀, y))/λ = 0 exactly."""

    def __init__(self, cost, x0: Tensor) -> None:
        super().__init__()
        self.cost, self.x0 = cost, x0

    def forward(self, y: Tensor) -> Tensor:
        return self.cost(self.x0.expand_as(y), y)


@pytest.fixture(scope="module")
def digits_sampler(tmp_path_factory) -> dict:
    cfg = make_cfg(tmp_path_factory.mktemp("cfg"), ["+experiment=digits"])
    return OmegaConf.to_container(cfg.sampler, resolve=True)


def _sample(sampler: dict, n: int = 2000, seed: int = 0) -> tuple[Tensor, MaskedGMM, Tensor]:
    gmm = MaskedGMM()
    sigmas = geometric_sigmas(sampler["sigma_max"], sampler["sigma_min"], sampler["n_levels"])
    cost = SquaredEuclidean("mean")
    x = torch.zeros(n, 1, 4, 4)
    pot = DualPotentials(lambda v: torch.zeros(v.shape[0]), CostTo(cost, x[:1]), cost, KL(1e-3))
    g = torch.Generator().manual_seed(seed)
    first = float(sigmas[int(sampler.get("skip_levels", 0))])
    y0 = gmm.sample(n, g) + first * torch.randn(n, 1, 4, 4, generator=g)  # init bp_noise, BP ≈ a clean image

    def prior(y: Tensor, level: int) -> Tensor:
        return gmm.score(y, float(sigmas[level]))

    return sample_conditional(prior, pot, x, y0, sampler, n, g), gmm, sigmas


def _background_abs(y: Tensor, gmm: MaskedGMM) -> float:
    return float(y[:, ~gmm.fg].abs().mean())


def test_digits_sampler_ends_at_the_last_level_and_denoises_the_background(digits_sampler):
    s = digits_sampler
    assert s["kind"] == "annealed" and s["denoise"] is True
    y, gmm, sigmas = _sample(s)
    sigma_l, eps = float(sigmas[-1]), float(s["step_lr"])
    a = eps / sigma_l**2  # per-step contraction of the background OU recursion at the last level
    expected = math.sqrt(2 / math.pi) * sigma_l / math.sqrt(1 - a / 2)
    # with the denoising step: background exactly 0 up to float error (far below sigma_L)
    assert _background_abs(y, gmm) < 0.01 * sigma_l
    # ... and the foreground within the clean spread s of a mixture mean
    d = (y[:, None] - gmm.means[None]).pow(2)[:, :, gmm.fg].sum(2).min(1).values.div(int(gmm.fg.sum())).sqrt()
    assert float(d.mean()) < 1.5 * gmm.s
    # without it: the stationary law of the last level (σ_L, not σ_{L-1} = 1.67 σ_L); 20 000 pixels: SE ≈ 0.5 %
    y_raw, _, _ = _sample({**s, "denoise": False})
    assert _background_abs(y_raw, gmm) == pytest.approx(expected, rel=0.05)


def test_dropping_the_last_level_or_the_denoise_step_is_detected():
    """The statistic of the test above separates the correct sampler from the two broken ones."""
    gmm = MaskedGMM()
    sigmas = geometric_sigmas(1.0, 0.01, 10)
    eps, n = 5e-5, 2000
    g = torch.Generator().manual_seed(1)
    y0 = gmm.sample(n, g) + float(sigmas[6]) * torch.randn(n, 1, 4, 4, generator=g)

    def run(sig: Tensor, lr: float, denoise: bool) -> float:
        y = annealed_langevin(lambda y, i: gmm.score(y, float(sig[i])), y0, sig, lr, 10, denoise=denoise,
                              skip_levels=6, disable=True, generator=torch.Generator().manual_seed(2))
        return _background_abs(y, gmm)

    full, no_denoise = run(sigmas, eps, True), run(sigmas, eps, False)
    # last level dropped (same step sizes α_i = ε σ_i²/σ_L² on the remaining levels), no denoising step
    ratio = float(sigmas[-2] / sigmas[-1]) ** 2
    dropped = run(sigmas[:-1], eps * ratio, False)
    assert full < 0.01 * float(sigmas[-1]) < no_denoise
    assert dropped > 1.4 * no_denoise  # σ_{L-1}/σ_L = 1.67 (minus the smaller ULA bias at the same ε)
