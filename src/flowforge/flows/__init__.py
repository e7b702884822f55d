"""Flows: a base distribution and a transform, and ready-made recipes."""

from flowforge.flows.base import Flow, FlowDistribution
from flowforge.flows.continuous import CNF, ContinuousFlowTransform
from flowforge.flows.recipes import IAF, MAF, NICE, NSF, RealNVP

__all__ = ["CNF", "IAF", "MAF", "NICE", "NSF", "ContinuousFlowTransform", "Flow", "FlowDistribution", "RealNVP"]
