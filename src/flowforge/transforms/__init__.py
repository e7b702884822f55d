"""Bijections with tractable log-determinants, one family per module."""

from flowforge.transforms.autoregressive import MaskedAutoregressive
from flowforge.transforms.base import Compose, Invert, Permutation, Transform
from flowforge.transforms.continuous import ContinuousFlowTransform
from flowforge.transforms.coupling import AdditiveCoupling, AffineCoupling, Coupling
from flowforge.transforms.elementwise import (
    AdditiveElementwise,
    AffineElementwise,
    ElementwiseTransformer,
    soft_clamp,
)
from flowforge.transforms.linear import LULinear, Standardize
from flowforge.transforms.normalization import ActNorm, BatchNorm
from flowforge.transforms.splines import RationalQuadraticSpline, rational_quadratic_spline

__all__ = [
    "ActNorm",
    "AdditiveCoupling",
    "AdditiveElementwise",
    "AffineCoupling",
    "AffineElementwise",
    "BatchNorm",
    "Compose",
    "ContinuousFlowTransform",
    "Coupling",
    "ElementwiseTransformer",
    "Invert",
    "LULinear",
    "MaskedAutoregressive",
    "Permutation",
    "RationalQuadraticSpline",
    "Standardize",
    "Transform",
    "rational_quadratic_spline",
    "soft_clamp",
]
