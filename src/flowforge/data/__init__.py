"""Data: built-in 2-D sets and unnormalized 2-D targets for reverse-KL training."""

from flowforge.data.targets import TARGETS, Target, target
from flowforge.data.toy import TOY_DATASETS, toy_dataset

__all__ = ["TARGETS", "TOY_DATASETS", "Target", "target", "toy_dataset"]
