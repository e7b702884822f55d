"""Neural networks used inside flows: conditioners, embeddings and velocity fields."""

from flowforge.nn.made import MADE, MaskedLinear, MaskedResidualBlock
from flowforge.nn.mlp import MLP

__all__ = ["MADE", "MLP", "MaskedLinear", "MaskedResidualBlock"]
