from scones.data.distributions import (
    Distribution,
    Gaussian,
    GaussianMixture,
    RandomGaussian,
    StandardGaussian,
    SwissRoll,
)

__all__ = ["Distribution", "Gaussian", "GaussianMixture", "RandomGaussian", "StandardGaussian", "SwissRoll"]
