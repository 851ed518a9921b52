"""Image networks of the SCONES image experiments (scones.md §2, §4): MLP potential and BP samplers.

All take images ``(n, C, H, W)`` in [0, 1].

Constructor convention (the pipeline's, shared with :mod:`scones.nets.mlp`): potentials receive the flat data
dimension ``dim = C·H·W``, barycentric-projection nets ``in_dim`` and ``out_dim``; each may also be given as an
image shape ``(C, H, W)``. Convolutional nets additionally take ``channels`` (configs: ``${data.channels}``)
and check it against the flat dimensions they receive.

* :class:`ImageMLPPotential` — the critic used for φ and ψ ("FCImageCritic"):
  ``Linear(D→h_0) → [Linear(h_{k−1}→h_k), ReLU] × (K−2) → Linear(h_{K−2}→h_{K−1}) → ReLU → Linear(h_{K−1}→1)``
  for ``hidden = [h_0, …, h_{K−1}]`` (D = C·H·W). As in the official code there is *no* non-linearity
  between the input projection and the first hidden Linear (scones.md P7); with one hidden width
  the body is ``Linear(D→h_0) → ReLU → Linear(h_0→1)``. Paper: [1024, 1024] (USPS→MNIST), [2048]×8 (CelebA).
* :class:`FCSampler` — barycentric-projection MLP (USPS→MNIST, hidden [2048]×4): same body with a
  ``C'·H'·W'``-dimensional head, input ``2x − 1``, output ``(tanh + 1)/2`` ∈ (0, 1).
* :class:`ResidualSampler` — CelebA barycentric projection: the unconditional NCSNv2 RefineNet body
  (InstanceNorm++, ELU, ``ngf`` 48 in the paper) on ``2x − 1`` with a sigmoid output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from scones.nets.mlp import ACTIVATIONS
from scones.nets.ncsn import RefineNet, check_flat_dim


def _numel(shape: Sequence[int] | int) -> int:
    return int(shape) if isinstance(shape, int) else math.prod(int(s) for s in shape)


def critic_mlp(
    in_dim: int, hidden: Sequence[int], out_dim: int, bias: bool = True, activation: str = "relu"
) -> nn.Sequential:
    """The SCONES critic body: input projection, MLP over ``hidden`` (no activation after the
    projection), activation, output projection. See the module docstring for the exact layer list.
    ``activation`` is ReLU in the paper; a smooth one (``silu``) gives a smooth ∇ψ for Langevin."""
    hidden = [int(h) for h in hidden]
    if not hidden or min(hidden) < 1:
        raise ValueError(f"hidden must be a non-empty list of positive widths, got {hidden}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
    act = ACTIVATIONS[activation]
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden[0], bias=bias)]
    for k in range(1, len(hidden)):
        layers.append(nn.Linear(hidden[k - 1], hidden[k], bias=bias))
        if k < len(hidden) - 1:
            layers.append(act())
    layers += [act(), nn.Linear(hidden[-1], out_dim, bias=bias)]
    return nn.Sequential(*layers)


class ImageMLPPotential(nn.Module):
    """Scalar potential on flattened images: ``forward(x) -> (n,)``.

    Args:
        dim: flat input dimension D = C·H·W, or the image shape ``(C, H, W)`` (flattened).
        hidden: hidden widths ``[h_0, …]``.
        activation: non-linearity of the body (paper: ``relu``).
    """

    def __init__(
        self,
        dim: Sequence[int] | int,
        hidden: Sequence[int] = (1024, 1024),
        bias: bool = True,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.in_dim = _numel(dim)
        self.net = critic_mlp(self.in_dim, hidden, 1, bias=bias, activation=activation)

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], -1)
        if x.shape[1] != self.in_dim:
            raise ValueError(
                f"ImageMLPPotential expects {self.in_dim} input values per sample, got {x.shape[1]}"
            )
        return self.net(x).squeeze(-1)


class FCSampler(nn.Module):
    """MLP barycentric projection T(x) = ½(tanh(MLP(2x − 1)) + 1), reshaped to ``out_dim``.

    Args:
        in_dim: flat source dimension, or the source image shape ``(C, H, W)``.
        out_dim: flat target dimension (output ``(n, out_dim)``) or target image shape (output
            ``(n, *out_dim)``); defaults to ``in_dim``.
        hidden: hidden widths (paper: [2048]×4).
        activation: non-linearity of the body (paper: ``relu``).
    """

    def __init__(
        self,
        in_dim: Sequence[int] | int,
        out_dim: Sequence[int] | int | None = None,
        hidden: Sequence[int] = (2048, 2048, 2048, 2048),
        activation: str = "relu",
    ) -> None:
        super().__init__()
        out_dim = in_dim if out_dim is None else out_dim
        self.out_shape = (int(out_dim),) if isinstance(out_dim, int) else tuple(int(s) for s in out_dim)
        self.net = critic_mlp(_numel(in_dim), hidden, math.prod(self.out_shape), activation=activation)

    def forward(self, x: Tensor) -> Tensor:
        h = self.net((2.0 * x - 1.0).reshape(x.shape[0], -1))
        return 0.5 * (torch.tanh(h) + 1.0).reshape(x.shape[0], *self.out_shape)


class ResidualSampler(nn.Module):
    """Convolutional barycentric projection T(x) = sigmoid(RefineNet(2x − 1)), same shape in and out.

    Args:
        channels: image channels C (input and output).
        ngf: base width of the RefineNet (paper: 48 for CelebA 64 px).
        in_dim, out_dim: flat dimensions passed by the pipeline; only checked (equal, divisible by
            ``channels``) since the convolutional net works at any even H, W.
    """

    def __init__(
        self, channels: int = 3, ngf: int = 48, in_dim: int | None = None, out_dim: int | None = None
    ) -> None:
        super().__init__()
        if in_dim is not None and out_dim is not None and _numel(in_dim) != _numel(out_dim):
            raise ValueError(f"ResidualSampler maps images to images of the same size; got in_dim={in_dim}, "
                             f"out_dim={out_dim}")
        for d in (in_dim, out_dim):
            check_flat_dim(type(self).__name__, d, channels)
        self.body = RefineNet(channels, ngf, num_classes=None)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.body(2.0 * x - 1.0))


__all__ = ["FCSampler", "ImageMLPPotential", "ResidualSampler", "critic_mlp"]
