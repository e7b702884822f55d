"""Flows: a base distribution and a transform, and ready-made recipes."""

from flowforge.flows.base import Flow, FlowDistribution
from flowforge.flows.continuous import CNF, ContinuousFlowTransform
from flowforge.flows.dequantization import Dequantized
from flowforge.flows.recipes import IAF, MAF, NICE, NSF, Glow, MultiscaleRealNVP, RealNVP, ResidualFlow
from flowforge.flows.vae import VAE

__all__ = [
    "CNF",
    "IAF",
    "MAF",
    "NICE",
    "NSF",
    "VAE",
    "ContinuousFlowTransform",
    "Dequantized",
    "Flow",
    "FlowDistribution",
    "Glow",
    "MultiscaleRealNVP",
    "RealNVP",
    "ResidualFlow",
]
