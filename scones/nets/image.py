"""Image networks of the SCONES image experiments (scones.md §2, §4): MLP potential and BP samplers.

All take images ``(n, C, H, W)`` in [0, 1].

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

from scones.nets.ncsn import RefineNet


def critic_mlp(in_dim: int, hidden: Sequence[int], out_dim: int, bias: bool = True) -> nn.Sequential:
    """The SCONES critic body: input projection, ReLU MLP over ``hidden`` (no activation after the
    projection), ReLU, output projection. See the module docstring for the exact layer list."""
    hidden = [int(h) for h in hidden]
    if not hidden or min(hidden) < 1:
        raise ValueError(f"hidden must be a non-empty list of positive widths, got {hidden}")
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden[0], bias=bias)]
    for k in range(1, len(hidden)):
        layers.append(nn.Linear(hidden[k - 1], hidden[k], bias=bias))
        if k < len(hidden) - 1:
            layers.append(nn.ReLU())
    layers += [nn.ReLU(), nn.Linear(hidden[-1], out_dim, bias=bias)]
    return nn.Sequential(*layers)


class ImageMLPPotential(nn.Module):
    """Scalar potential on flattened images: ``forward(x) -> (n,)``.

    Args:
        shape: image shape ``(C, H, W)`` (or any shape; it is flattened) or the flat dimension.
        hidden: hidden widths ``[h_0, …]``.
    """

    def __init__(
        self, shape: Sequence[int] | int, hidden: Sequence[int] = (1024, 1024), bias: bool = True
    ) -> None:
        super().__init__()
        self.in_dim = int(shape) if isinstance(shape, int) else math.prod(int(s) for s in shape)
        self.net = critic_mlp(self.in_dim, hidden, 1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], -1)
        if x.shape[1] != self.in_dim:
            raise ValueError(
                f"ImageMLPPotential expects {self.in_dim} input values per sample, got {x.shape[1]}"
            )
        return self.net(x).squeeze(-1)


class FCSampler(nn.Module):
    """MLP barycentric projection T(x) = ½(tanh(MLP(2x − 1)) + 1), reshaped to ``out_shape``.

    Args:
        in_shape: source image shape ``(C, H, W)``.
        out_shape: target image shape (defaults to ``in_shape``).
        hidden: hidden widths (paper: [2048]×4).
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int] | None = None,
        hidden: Sequence[int] = (2048, 2048, 2048, 2048),
    ) -> None:
        super().__init__()
        self.in_shape = tuple(int(s) for s in in_shape)
        self.out_shape = self.in_shape if out_shape is None else tuple(int(s) for s in out_shape)
        self.net = critic_mlp(math.prod(self.in_shape), hidden, math.prod(self.out_shape))

    def forward(self, x: Tensor) -> Tensor:
        h = self.net((2.0 * x - 1.0).reshape(x.shape[0], -1))
        return 0.5 * (torch.tanh(h) + 1.0).reshape(x.shape[0], *self.out_shape)


class ResidualSampler(nn.Module):
    """Convolutional barycentric projection T(x) = sigmoid(RefineNet(2x − 1)), same shape in and out.

    Args:
        channels: image channels C (input and output).
        ngf: base width of the RefineNet (paper: 48 for CelebA 64 px).
    """

    def __init__(self, channels: int = 3, ngf: int = 48) -> None:
        super().__init__()
        self.body = RefineNet(channels, ngf, num_classes=None)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.body(2.0 * x - 1.0))


__all__ = ["FCSampler", "ImageMLPPotential", "ResidualSampler", "critic_mlp"]
