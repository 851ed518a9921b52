"""Transport costs.

Convention: a cost is evaluated *diagonally* on paired batches, ``cost(x, y)[i] = c(x_i, y_i)``, and
*pairwise* with ``cost.pairwise(x, y)[i, j] = c(x_i, y_j)``. Inputs of any trailing shape are
flattened, so images ``(n, C, H, W)`` work as ``(n, C*H*W)``.
"""

from __future__ import annotations

from typing import Literal, get_args

from torch import Tensor


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


Reduction = Literal["sum", "mean"]
"""Sum over coordinates, or mean (÷ D, images: per pixel)."""
REDUCTIONS: tuple[str, ...] = get_args(Reduction)


class SquaredEuclidean:
    """Squared Euclidean cost.

    ``reduction="sum"``:  c(x, y) = ‖x − y‖² = Σ_k (x_k − y_k)²   (synthetic experiments; no ½, no /d).
    ``reduction="mean"``: c(x, y) = ‖x − y‖² / D, D = number of coordinates (images: mean over C·H·W pixels).

    With ``reduction="sum"`` and regulariser λ·KL this is POT's ``ot.dist`` with ``reg = λ`` and the
    Janati et al. closed form with σ² = λ/2.
    """

    def __init__(self, reduction: Reduction = "sum") -> None:
        if reduction not in REDUCTIONS:
            raise ValueError(f"cost.reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
        self.reduction = reduction

    def scale(self, x: Tensor) -> float:
        """Factor s with c(x, y) = s·‖x − y‖² for inputs shaped like ``x`` (1 or 1/D)."""
        return 1.0 if self.reduction == "sum" else 1.0 / _flat(x).shape[1]

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        """Diagonal cost, shape ``(n,)``."""
        return self.scale(x) * (_flat(x) - _flat(y)).pow(2).sum(1)

    def pairwise(self, x: Tensor, y: Tensor) -> Tensor:
        """Cost matrix, shape ``(n, m)``; computed with the expanded square (no (n, m, d) tensor)."""
        xf, yf = _flat(x), _flat(y)
        sq = xf.pow(2).sum(1)[:, None] + yf.pow(2).sum(1)[None, :] - 2.0 * xf @ yf.T
        return self.scale(x) * sq.clamp_min(0.0)

    def grad_y(self, x: Tensor, y: Tensor) -> Tensor:
        """∇_y c(x, y) = 2 s (y − x), same shape as ``y``."""
        return 2.0 * self.scale(y) * (y - x)

    def __repr__(self) -> str:
        return f"SquaredEuclidean(reduction={self.reduction!r})"


__all__ = ["SquaredEuclidean"]
