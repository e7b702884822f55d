"""Bijections with tractable log-determinants, one family per module."""

from flowforge.transforms.autoregressive import MaskedAutoregressive
from flowforge.transforms.base import Compose, Invert, Permutation, Transform
from flowforge.transforms.continuous import ContinuousFlowTransform
from flowforge.transforms.coupling import AdditiveCoupling, AffineCoupling, Coupling, ImageAffineCoupling
from flowforge.transforms.elementwise import (
    AdditiveElementwise,
    AffineElementwise,
    ElementwiseTransformer,
    soft_clamp,
)
from flowforge.transforms.linear import InvertibleConv1x1, LULinear, Standardize
from flowforge.transforms.multiscale import Split, Squeeze
from flowforge.transforms.normalization import ActNorm, BatchNorm
from flowforge.transforms.residual import LipschitzLinear, LipschitzMLP, LipSwish, ResidualBlock
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
    "ImageAffineCoupling",
    "Invert",
    "InvertibleConv1x1",
    "LULinear",
    "LipSwish",
    "LipschitzLinear",
    "LipschitzMLP",
    "MaskedAutoregressive",
    "Permutation",
    "RationalQuadraticSpline",
    "ResidualBlock",
    "Split",
    "Squeeze",
    "Standardize",
    "Transform",
    "rational_quadratic_spline",
    "soft_clamp",
]
