"""Bijections with tractable log-determinants, one family per module."""

from flowforge.transforms.base import Compose, Invert, Permutation, Transform
from flowforge.transforms.coupling import AdditiveCoupling, AffineCoupling, Coupling
from flowforge.transforms.elementwise import (
    AdditiveElementwise,
    AffineElementwise,
    ElementwiseTransformer,
    soft_clamp,
)

__all__ = [
    "AdditiveCoupling",
    "AdditiveElementwise",
    "AffineCoupling",
    "AffineElementwise",
    "Compose",
    "Coupling",
    "ElementwiseTransformer",
    "Invert",
    "Permutation",
    "Transform",
    "soft_clamp",
]
