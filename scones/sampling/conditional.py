r"""The SCONES conditional score: ∇_y log π(y | x) = ∇_y log q(y) + ∇_y log H(x, y)."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from scones.models.dual import grad_log_compatibility


class ConditionalScore:
    """Callable ``(y, level) -> prior_score(y, level) + ∇_y log H(x, y)`` for a fixed batch of sources ``x``.

    ``prior_score(y, level)`` is the target score (exact, or a learned noise-conditional model at σ_level).
    The compatibility term is not annealed with σ (SCONES pitfall P5). ``guidance`` scales it (1 = the method).
    """

    def __init__(
        self, prior_score: Callable[[Tensor, int], Tensor], potentials, x: Tensor, guidance: float = 1.0
    ):
        self.prior_score, self.potentials, self.x, self.guidance = prior_score, potentials, x, guidance

    def __call__(self, y: Tensor, level: int) -> Tensor:
        return self.prior_score(y, level) + self.guidance * grad_log_compatibility(self.potentials, self.x, y)
