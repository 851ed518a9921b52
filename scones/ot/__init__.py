from scones.ot.costs import SquaredEuclidean
from scones.ot.regularizers import KL, ChiSquared, Regularizer

__all__ = ["KL", "ChiSquared", "Regularizer", "SquaredEuclidean"]
