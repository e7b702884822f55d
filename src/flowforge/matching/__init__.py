"""Flow matching: probability paths, couplings, time samplers, the FlowMatcher, reflow, and the few-step
families: shortcut models, MeanFlow and consistency models."""

from flowforge.matching.consistency import ConsistencyMatcher
from flowforge.matching.couplings import Coupling, ExactOTCoupling, IndependentCoupling, SinkhornCoupling
from flowforge.matching.functional import Integration, data_prediction_loss, flow_matching_loss, integrate
from flowforge.matching.matcher import FlowMatcher
from flowforge.matching.meanflow import MeanFlowMatcher
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
    "ConsistencyMatcher",
    "CosinePath",
    "Coupling",
    "ExactOTCoupling",
    "FlowMatcher",
    "IndependentCoupling",
    "Integration",
    "LinearPath",
    "LogitNormalTime",
    "MeanFlowMatcher",
    "ShiftedBetaTime",
    "ShortcutMatcher",
    "SinkhornCoupling",
    "StochasticInterpolantPath",
    "TimeSampler",
    "UniformTime",
    "VariancePreservingPath",
    "data_prediction_loss",
    "flow_matching_loss",
    "integrate",
    "reflow_pairs",
    "straightness",
]
