"""Fully connected networks for low-dimensional potentials, scores and barycentric maps."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

ACTIVATIONS = {
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "softplus": nn.Softplus,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
}


def _activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None


class MLP(nn.Module):
    """``in_dim → hidden[0] → … → hidden[-1] → out_dim`` with an activation after every hidden layer.

    Inputs of any trailing shape are flattened to ``(n, in_dim)``. ``batchnorm=True`` adds BatchNorm1d after
    each hidden activation (the SCONES BP/score nets use it).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden: Sequence[int] = (256, 256),
        activation: str = "silu",
        batchnorm: bool = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_dim
        for width in hidden:
            layers += [nn.Linear(prev, int(width)), _activation(activation)]
            if batchnorm:
                layers.append(nn.BatchNorm1d(int(width)))
            prev = int(width)
        layers.append(nn.Linear(prev, out_dim))
        self.net = nn.Sequential(*layers)
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.reshape(x.shape[0], -1))


class Potential(MLP):
    """Scalar potential φ: R^d → R, output shape ``(n,)``.

    ``quadratic=True`` adds a learnable quadratic form xᵀQx (Q symmetric, initialised at 0) to the MLP output.
    For the squared cost the dual potentials are ‖x‖² minus a convex (Brenier-like) function, so their bulk is
    quadratic; the skip term learns it directly and leaves the MLP the non-quadratic rest (for Gaussian pairs the
    exact potentials are quadratic, so the MLP part is then only noise to average out). d² extra parameters,
    stored as W with Q = ``quadratic_scale``·(W + Wᵀ)/2: Adam moves every parameter by ~lr per step whatever its
    scale, and Q's entries are O(1) while the MLP's weights are O(1/√width), so Q gets a ``quadratic_scale``× larger
    effective step.
    """

    def __init__(
        self, dim: int, hidden: Sequence[int] = (256, 256), activation: str = "silu", quadratic: bool = False,
        quadratic_scale: float = 10.0,
    ) -> None:
        super().__init__(dim, 1, hidden, activation)
        self.quad = nn.Parameter(torch.zeros(dim, dim)) if quadratic else None
        self.quadratic_scale = float(quadratic_scale)

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x).squeeze(-1)
        if self.quad is not None:
            z = x.reshape(x.shape[0], -1)
            out = out + ((z @ (0.5 * self.quadratic_scale * (self.quad + self.quad.T))) * z).sum(1)
        return out


class NoiseConditionalScoreMLP(nn.Module):
    """Noise-conditional score s(y, σ) ≈ ∇_y log q_σ(y) for low-dimensional targets.

    s(y, σ) = net([y, Fourier features of y, log σ features]) / σ, i.e. the network predicts −z for y = y₀ + σz
    (noise-level-agnostic output scaling as in NCSNv2; the σ embedding lets one net cover all levels).

    ``fourier_features = m > 0`` adds random Fourier features sin(Bᵀy), cos(Bᵀy) with a fixed B ``(dim, m)`` of
    N(0, ``fourier_scale``²) entries (Tancik et al. 2020; seeded by ``fourier_seed``, stored as a buffer): an MLP on
    raw coordinates fits thin, curved supports (the Swiss roll) slowly, the features give it the curve's
    frequencies (``fourier_scale`` ≈ 1 / the length scale of the support's bends). 0 = off.
    """

    def __init__(
        self, dim: int, hidden: Sequence[int] = (256, 256, 256), activation: str = "silu", n_freq: int = 8,
        fourier_features: int = 0, fourier_scale: float = 1.0, fourier_seed: int = 0,
    ) -> None:
        super().__init__()
        if fourier_features < 0 or not fourier_scale > 0:
            raise ValueError(f"fourier_features must be >= 0 and fourier_scale > 0, got {fourier_features}, "
                             f"{fourier_scale}")
        self.dim, self.n_freq = dim, n_freq
        g = torch.Generator().manual_seed(int(fourier_seed))
        b = float(fourier_scale) * torch.randn(dim, int(fourier_features), generator=g) if fourier_features else None
        self.register_buffer("fourier", b)  # None when off: state dicts of nets without features are unchanged
        self.net = MLP(dim + 2 * int(fourier_features) + 2 * n_freq, dim, hidden, activation)

    def _embed(self, sigma: Tensor) -> Tensor:
        freqs = torch.arange(1, self.n_freq + 1, device=sigma.device, dtype=sigma.dtype) * (math.pi / 4)
        arg = torch.log(sigma)[:, None] * freqs[None]
        return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)

    def forward(self, y: Tensor, sigma: Tensor) -> Tensor:
        sigma = sigma.reshape(-1).to(y).expand(y.shape[0])
        parts = [y]
        if self.fourier is not None:
            proj = y @ self.fourier.to(y)
            parts += [torch.sin(proj), torch.cos(proj)]
        h = torch.cat(parts + [self._embed(sigma)], dim=1)
        return self.net(h) / sigma[:, None]
