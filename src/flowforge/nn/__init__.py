"""Neural networks used inside flows: conditioners, embeddings and velocity fields (MLPs, a U-Net)."""

from flowforge.nn.conv import ConvConditioner
from flowforge.nn.made import MADE, MaskedLinear, MaskedResidualBlock
from flowforge.nn.mlp import MLP
from flowforge.nn.unet import UNetVelocity
from flowforge.nn.velocity import ResidualVelocityMLP, SinusoidalTimeEmbedding, VelocityMLP

__all__ = [
    "MADE",
    "MLP",
    "ConvConditioner",
    "MaskedLinear",
    "MaskedResidualBlock",
    "ResidualVelocityMLP",
    "SinusoidalTimeEmbedding",
    "UNetVelocity",
    "VelocityMLP",
]
