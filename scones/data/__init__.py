from scones.data.distributions import (
    Distribution,
    FullGaussianMixture,
    Gaussian,
    GaussianMixture,
    RandomGaussian,
    StandardGaussian,
    SwissRoll,
)
from scones.data.images import CelebAImages, DatasetNotFoundError, DigitsImages, MNISTImages, USPSImages

__all__ = [
    "CelebAImages", "DatasetNotFoundError", "DigitsImages", "Distribution", "FullGaussianMixture", "Gaussian",
    "GaussianMixture", "MNISTImages", "RandomGaussian", "StandardGaussian", "SwissRoll", "USPSImages",
]
