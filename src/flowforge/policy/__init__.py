"""pi0-style flow-matching action policies, their baselines, training data and rollouts."""

from flowforge.policy.baselines import DiffusionPolicy, RegressionPolicy
from flowforge.policy.core import ChunkPolicy, PolicyConfig
from flowforge.policy.flow_policy import FlowPolicy, HierarchicalFlowPolicy

POLICY_KINDS = {
    "flow": FlowPolicy,
    "hierarchical": HierarchicalFlowPolicy,
    "mse": RegressionPolicy,
    "ddpm": DiffusionPolicy,
}


def build_policy(config: PolicyConfig) -> ChunkPolicy:
    """The policy class for ``config.kind``, built from ``config``."""
    return POLICY_KINDS[config.kind](config)


__all__ = [
    "POLICY_KINDS",
    "ChunkPolicy",
    "DiffusionPolicy",
    "FlowPolicy",
    "HierarchicalFlowPolicy",
    "PolicyConfig",
    "RegressionPolicy",
    "build_policy",
]
