"""The data of a run: a fixed train/test split held in both the model's units and the data's own.

A run trains on standardised columns when asked (``[data] standardize``), but people read samples,
metrics and plots in the data's own units. :class:`RunData` keeps both views of each split, made
once when the split is drawn, so nothing downstream converts back and forth.

Data sets:

* built-in 2-D sets (``moons``, ``checkerboard``, ...): ``size`` training points and 5,000 test points
  from independent seeds;
* scikit-learn's bundled tables (``iris``, ``wine``, ``breast_cancer``, ``diabetes``) and user files
  (CSV, NPY, NPZ, Parquet), split by ``test_fraction``;
* ``digits`` (64 pixel counts per row) and ``digits-images`` (the same as ``(1, 8, 8)`` images):
  integers 0..16 (:attr:`RunData.levels` = 17). They stay integers; the run's model dequantizes them
  with fresh noise in every batch (:class:`~flowforge.flows.Dequantized`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flowforge.config import check_choice, check_range
from flowforge.data import (
    DIGIT_LEVELS,
    SKLEARN_DATASETS,
    TOY_DATASETS,
    Standardizer,
    digits_images,
    load_table,
    sklearn_dataset,
    toy_dataset,
)
from flowforge.errors import ConfigError, DataError

#: Integer-valued sets: name -> number of levels of each entry.
COUNT_DATASETS = {"digits": DIGIT_LEVELS, "digits-images": DIGIT_LEVELS}
DATASETS = (*TOY_DATASETS, *(s for s in SKLEARN_DATASETS if s != "digits"), *COUNT_DATASETS)
TOY_TEST_POINTS = 5000


@dataclass
class DataConfig:
    """The ``[data]`` table of a run config.

    Arguments:
        name: a built-in set (``flowforge list``), or
        path: a CSV/NPY/NPZ/Parquet file (exactly one of the two, unless the objective needs no data).
        size: points drawn from a 2-D set for training (at least 2).
        test_fraction: share held out from a table, in (0, 1).
        standardize: scale columns to zero mean and unit variance with the training split's statistics
            (``None``: yes for tables and files, no for 2-D sets and digits; never for digits).
        seed: seeds the 2-D draws and the split (>= 0).
    """

    name: str | None = None
    path: str | None = None
    size: int = 20_000
    test_fraction: float = 0.2
    standardize: bool | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name is not None:
            check_choice("name", self.name, DATASETS)
        if self.name is not None and self.path is not None:
            raise ConfigError(
                f"name = {self.name!r} and path = {self.path!r}: give exactly one of name (a built-in set) or path"
            )
        if self.size < 2:
            raise ConfigError(f"size = {self.size}: expected an integer >= 2 (points drawn for training)")
        check_range("test_fraction", self.test_fraction, low=0, high=1, low_open=True, high_open=True)
        if self.seed < 0:
            raise ConfigError(f"seed = {self.seed}: expected an integer >= 0")
        if self.name in COUNT_DATASETS and self.standardize:
            raise ConfigError(f"standardize = true: {self.name} are pixel counts, dequantized by the model instead")


@dataclass
class RunData:
    """A run's split. ``train``/``test``: what the model sees (standardised when asked);
    ``train_units``/``test_units``: the same rows in the data's own units. ``levels``: for integer
    data, the number of values of each entry (the model dequantizes), else ``None``."""

    train: Tensor
    test: Tensor
    train_units: Tensor
    test_units: Tensor
    standardizer: Standardizer | None = None
    levels: int | None = None

    @property
    def event_shape(self) -> tuple[int, ...]:
        return tuple(self.train.shape[1:])


def load_data(config: DataConfig) -> RunData:
    """Draw or read the data ``config`` names and split it (the same split for the same config)."""
    if config.name is None and config.path is None:
        raise ConfigError("[data] needs name (a built-in set: flowforge list) or path (a data file)")
    if config.name in TOY_DATASETS:
        train = toy_dataset(config.name, config.size, seed=config.seed)
        test = toy_dataset(config.name, TOY_TEST_POINTS, seed=config.seed + 1)
        return _standardized(train, test, bool(config.standardize))
    if config.name == "digits-images":
        generator_seed = config.seed
        train, _ = digits_images("train", config.test_fraction, generator_seed)
        test, _ = digits_images("test", config.test_fraction, generator_seed)
        return RunData(train, test, train, test, None, COUNT_DATASETS[config.name])
    table = sklearn_dataset(config.name) if config.name is not None else load_table(config.path)
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(table.shape[0], generator=generator)
    n_test = max(1, round(config.test_fraction * table.shape[0]))
    if table.shape[0] - n_test < 2:
        raise DataError(f"{config.path or config.name}: {table.shape[0]} rows leave too few to train on")
    test, train = table[order[:n_test]], table[order[n_test:]]
    if config.name in COUNT_DATASETS:
        return RunData(train, test, train, test, None, COUNT_DATASETS[config.name])
    return _standardized(train, test, True if config.standardize is None else config.standardize)


def _standardized(train: Tensor, test: Tensor, standardize: bool) -> RunData:
    if not standardize:
        return RunData(train, test, train, test)
    standardizer = Standardizer.fit(train)
    return RunData(standardizer.transform(train), standardizer.transform(test), train, test, standardizer)


__all__ = ["COUNT_DATASETS", "DATASETS", "DataConfig", "RunData", "load_data"]
