"""pi0-style flow-matching action policies as parts: encoder, action expert, heads, executor."""

from flowforge.policy.config import PolicyConfig
from flowforge.policy.core import ChunkPolicy, ChunkResult
from flowforge.policy.encoders import ObservationEncoder
from flowforge.policy.execution import ChunkExecutor
from flowforge.policy.expert import ActionExpert, ExpertCache
from flowforge.policy.heads import (
    HEAD_CATEGORY,
    DiffusionHead,
    FlowHead,
    HierarchicalFlowHead,
    PolicyHead,
    RegressionHead,
    Sampling,
)
from flowforge.registry import names

#: The registered heads (``policy.kind`` in a config), in :mod:`flowforge.registry`.
POLICY_KINDS = names(HEAD_CATEGORY)


def build_policy(config: PolicyConfig) -> ChunkPolicy:
    """The policy that ``config`` describes (its head chosen by ``config.kind``)."""
    return ChunkPolicy(config)


__all__ = [
    "POLICY_KINDS",
    "ActionExpert",
    "ChunkExecutor",
    "ChunkPolicy",
    "ChunkResult",
    "DiffusionHead",
    "ExpertCache",
    "FlowHead",
    "HierarchicalFlowHead",
    "ObservationEncoder",
    "PolicyConfig",
    "PolicyHead",
    "RegressionHead",
    "Sampling",
    "build_policy",
]
