"""Flows: a base distribution and a transform, and ready-made recipes."""

from flowforge.flows.base import Flow, FlowDistribution
from flowforge.flows.recipes import IAF, MAF, NICE, NSF, RealNVP

__all__ = ["IAF", "MAF", "NICE", "NSF", "Flow", "FlowDistribution", "RealNVP"]
