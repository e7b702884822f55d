"""Flows: a base distribution and a transform, and ready-made recipes."""

from flowforge.flows.base import Flow, FlowDistribution
from flowforge.flows.continuous import CNF, ContinuousFlowTransform
from flowforge.flows.dequantization import Dequantized
from flowforge.flows.recipes import IAF, MAF, NICE, NSF, Glow, MultiscaleRealNVP, RealNVP, ResidualFlow

__all__ = [
    "CNF",
    "IAF",
    "MAF",
    "NICE",
    "NSF",
    "ContinuousFlowTransform",
    "Dequantized",
    "Flow",
    "FlowDistribution",
    "Glow",
    "MultiscaleRealNVP",
    "RealNVP",
    "ResidualFlow",
]
