"""Data: built-in 2-D sets, scikit-learn's bundled sets, user files, 2-D targets for reverse-KL training, and
robot demonstration folders (:class:`EpisodeDataset`)."""

from flowforge.data.episodes import EpisodeDataset
from flowforge.data.tabular import (
    DIGIT_LEVELS,
    SKLEARN_DATASETS,
    DataError,
    Standardizer,
    dequantize_digits,
    digits_bits_per_dim,
    digits_images,
    load_table,
    sklearn_dataset,
)
from flowforge.data.targets import TARGETS, Target, target
from flowforge.data.toy import TOY_DATASETS, toy_dataset

__all__ = [
    "DIGIT_LEVELS",
    "SKLEARN_DATASETS",
    "TARGETS",
    "TOY_DATASETS",
    "DataError",
    "EpisodeDataset",
    "Standardizer",
    "Target",
    "dequantize_digits",
    "digits_bits_per_dim",
    "digits_images",
    "load_table",
    "sklearn_dataset",
    "target",
    "toy_dataset",
]
