"""Flows: a base distribution and a transform, and ready-made recipes."""

from flowforge.flows.base import Flow, FlowDistribution
from flowforge.flows.recipes import NICE, RealNVP

__all__ = ["NICE", "Flow", "FlowDistribution", "RealNVP"]
