"""Neural networks used inside flows: conditioners, embeddings and velocity fields."""

from flowforge.nn.mlp import MLP

__all__ = ["MLP"]
