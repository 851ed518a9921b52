"""Distances between two sample sets (e.g. joint samples (x, y) of two couplings)."""

from __future__ import annotations

import numpy as np
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


def _sum_other_sources(a: Tensor, b: Tensor, n: int, block: int = 2**24) -> Tensor:
    """Σ ‖a_p − b_q‖ over rows p of source i and q of source j ≠ i; ``a`` ``(n·ka, D)``, ``b`` ``(n·kb, D)``,
    rows grouped by source (source i owns rows i·k … i·k + k − 1). Row blocks keep memory under ``block`` distances."""
    ka, kb = a.shape[0] // n, b.shape[0] // n
    step = max(1, block // (ka * b.shape[0]))
    total = a.new_zeros(())
    for i0 in range(0, n, step):
        i1 = min(n, i0 + step)
        d = torch.cdist(a[i0 * ka : i1 * ka], b).view(i1 - i0, ka, n, kb)
        same = d[torch.arange(i1 - i0), :, torch.arange(i0, i1), :]  # (i1 − i0, ka, kb): pairs of one source
        total = total + d.sum() - same.sum()
    return total


def paired_energy_distance(x: Tensor, y: Tensor, y_ref: Tensor) -> float:
    r"""Energy distance between pairs (x_i, y_i) and reference pairs (x_i, y_ref[i, r]) that share their sources x_i.

    ``x`` ``(n, …)``, ``y`` ``(n, …)``: one draw per source of the coupling under test; ``y_ref`` ``(n, k, …)``: k
    reference draws per source. With z_i = (x_i, y_i), z'_ir = (x_i, y'_ir) the U-statistic

        E = 2·mean_{i≠j, r} ‖z_i − z'_jr‖ − mean_{i≠j} ‖z_i − z_j‖ − mean_{i≠j, r, s} ‖z'_ir − z'_js‖

    uses only pairs of *different* sources, which are independent draws of the two joint laws, so it is unbiased for
    E(P, Q) (:func:`energy_distance` on such data is not: a pair (x_i, y_i), (x_i, y'_i) is closer than two
    independent draws, which pulls the cross term down by ~1/n). Sharing the sources removes their sampling noise:
    only the conditionals y | x differ. Costs one O((n(1 + k))²) pass in row blocks; raw coordinates.
    """
    n = x.shape[0]
    if n < 2:
        raise ValueError("paired_energy_distance needs at least 2 sources")
    if y.shape[0] != n or y_ref.shape[0] != n or y_ref.ndim < 2:
        raise ValueError(f"x, y and y_ref must share their first dimension n = {n} (y_ref: (n, k, ...)); got "
                         f"{tuple(y.shape)} and {tuple(y_ref.shape)}")
    k = y_ref.shape[1]
    xf = x.reshape(n, -1).double()
    z = torch.cat([xf, y.reshape(n, -1).double()], 1)
    zr = torch.cat([xf.repeat_interleave(k, 0), y_ref.reshape(n * k, -1).double()], 1)
    pairs = n * (n - 1)
    ab = _sum_other_sources(z, zr, n) / (pairs * k)
    aa = _sum_other_sources(z, z, n) / pairs
    bb = _sum_other_sources(zr, zr, n) / (pairs * k * k)
    return float(2 * ab - aa - bb)


def sorted_projections(z, projections: np.ndarray) -> np.ndarray:
    """The samples ``z`` ``(n, …)`` (flattened, float64) projected on the columns of ``projections`` ``(D, P)`` and
    sorted per projection: ``(n, P)``, the empirical quantile functions :func:`sliced_w2_sorted` compares."""
    z = np.asarray(z.detach().cpu().double() if isinstance(z, Tensor) else z, dtype=np.float64)
    return np.sort(z.reshape(z.shape[0], -1) @ projections, axis=0)


def sliced_w2_sorted(a: np.ndarray, b: np.ndarray) -> float:
    r"""Sliced Wasserstein-2 between two equal-size sample sets given as :func:`sorted_projections` on the same
    projections θ_1 … θ_P: SW₂ = (mean_p W₂²(θ_pᵀA, θ_pᵀB))^{1/2}, W₂² between n-point empirical laws on the line
    being the mean squared difference of their order statistics. Equals
    ``ot.sliced_wasserstein_distance(A, B, projections=θ)`` (tests/test_metrics.py), without re-projecting a set
    for every pair it is compared in."""
    if a.shape != b.shape:
        raise ValueError(f"sliced_w2_sorted compares equal-size sets on the same projections; got {a.shape} and "
                         f"{b.shape}")
    return float(np.sqrt(np.mean((a - b) ** 2)))
