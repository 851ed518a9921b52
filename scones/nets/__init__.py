from scones.nets.ema import EMA
from scones.nets.image import FCSampler, ImageMLPPotential, ResidualSampler
from scones.nets.mlp import MLP, NoiseConditionalScoreMLP, Potential
from scones.nets.ncsn import NCSN, NCSNv2

__all__ = [
    "EMA", "FCSampler", "ImageMLPPotential", "MLP", "NCSN", "NCSNv2", "NoiseConditionalScoreMLP", "Potential",
    "ResidualSampler",
]
