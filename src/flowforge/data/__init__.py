"""Data sets: built-in 2-D sets (more kinds arrive with the training issue)."""

from flowforge.data.toy import TOY_DATASETS, toy_dataset

__all__ = ["TOY_DATASETS", "toy_dataset"]
