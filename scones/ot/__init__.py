from scones.ot.costs import SquaredEuclidean
from scones.ot.regularizers import KL, REGULARIZERS, ChiSquared, Regularizer

__all__ = ["KL", "REGULARIZERS", "ChiSquared", "Regularizer", "SquaredEuclidean"]
