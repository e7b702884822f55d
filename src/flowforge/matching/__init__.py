"""Flow matching: probability paths, couplings, time samplers, the FlowMatcher, reflow and shortcut models."""

from flowforge.matching.couplings import Coupling, ExactOTCoupling, IndependentCoupling, SinkhornCoupling
from flowforge.matching.functional import Integration, flow_matching_loss, integrate
from flowforge.matching.matcher import FlowMatcher
from flowforge.matching.paths import (
    AffinePath,
    CosinePath,
    LinearPath,
    StochasticInterpolantPath,
    VariancePreservingPath,
)
from flowforge.matching.reflow import reflow_pairs, straightness
from flowforge.matching.shortcut import ShortcutMatcher
from flowforge.matching.time import LogitNormalTime, ShiftedBetaTime, TimeSampler, UniformTime

__all__ = [
    "AffinePath",
    "CosinePath",
    "Coupling",
    "ExactOTCoupling",
    "FlowMatcher",
    "IndependentCoupling",
    "Integration",
    "LinearPath",
    "LogitNormalTime",
    "ShiftedBetaTime",
    "ShortcutMatcher",
    "SinkhornCoupling",
    "StochasticInterpolantPath",
    "TimeSampler",
    "UniformTime",
    "VariancePreservingPath",
    "flow_matching_loss",
    "integrate",
    "reflow_pairs",
    "straightness",
]
