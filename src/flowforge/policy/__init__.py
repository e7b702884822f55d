"""pi0-style flow-matching action policies, their baselines, training data and rollouts."""

from flowforge.policy.baselines import DiffusionPolicy, RegressionPolicy
from flowforge.policy.core import ChunkPolicy, ChunkResult, PolicyConfig, Sampling
from flowforge.policy.execution import ChunkExecutor
from flowforge.policy.flow_policy import FlowPolicy, HierarchicalFlowPolicy
from flowforge.registry import lookup, names

#: The registered policy kinds (``policy.kind`` in a config), in :mod:`flowforge.registry`.
POLICY_KINDS = names("policy")


def build_policy(config: PolicyConfig) -> ChunkPolicy:
    """The policy registered as ``config.kind``, built from ``config``."""
    return lookup("policy", config.kind)(config)


__all__ = [
    "POLICY_KINDS",
    "ChunkExecutor",
    "ChunkPolicy",
    "ChunkResult",
    "DiffusionPolicy",
    "FlowPolicy",
    "HierarchicalFlowPolicy",
    "PolicyConfig",
    "RegressionPolicy",
    "Sampling",
    "build_policy",
]
