"""Distances between two sample sets (e.g. joint samples (x, y) of two couplings)."""

from __future__ import annotations

import torch
from torch import Tensor


def energy_distance(a: Tensor, b: Tensor) -> float:
    r"""Energy distance (Székely & Rizzo) between the empirical laws of ``a`` ``(n, D)`` and ``b`` ``(m, D)``:

        E(P, Q) = 2 E‖X − Y‖ − E‖X − X'‖ − E‖Y − Y'‖,   X, X' ~ P,  Y, Y' ~ Q,

    with U-statistics for the within-set terms (unbiased; can be slightly negative when P = Q). E = 0 iff P = Q
    (it is the MMD² of the distance kernel), it costs one O((n + m)²) pass and has no regularisation parameter.
    """
    a, b = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    n, m = a.shape[0], b.shape[0]
    if n < 2 or m < 2:
        raise ValueError("energy_distance needs at least 2 samples per set")
    ab = torch.cdist(a, b).mean()
    aa = torch.cdist(a, a).sum() / (n * (n - 1))
    bb = torch.cdist(b, b).sum() / (m * (m - 1))
    return float(2 * ab - aa - bb)
