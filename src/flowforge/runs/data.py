r"""The data of a run: a fixed train/test split held in both the model's units and the data's own.

A run trains on standardised columns when asked (``[data] standardize``), but people read samples,
metrics and plots in the data's own units. :class:`RunData` keeps both views of each split, made
once when the split is drawn, so nothing downstream converts back and forth.

Data sets:

* built-in 2-D sets (``moons``, ``checkerboard``, ...): ``size`` training points and 5,000 test points
  from independent seeds;
* scikit-learn's bundled tables (``iris``, ``wine``, ``breast_cancer``, ``diabetes``) and user files
  (CSV, NPY, NPZ, Parquet), split by ``test_fraction``;
* ``digits`` (64 pixel counts per row) and ``digits-images`` (the same as ``(1, 8, 8)`` images):
  integers 0..16 (:attr:`RunData.levels` = 17). They stay integers; a flow dequantizes them with
  fresh noise in every batch (:class:`~flowforge.flows.Dequantized`), a flow-matching model sees
  them in its own continuous units (below). ``[data] conditional = true`` (``digits-images`` only)
  adds each image's class as its context: a one-hot row of 10 (:attr:`RunData.train_context`,
  :attr:`RunData.test_context`).

**Pixel counts and flow-matching models: the one scaling.** A flow-matching model (any of
``MATCHING_MODELS``) on pixel counts :math:`k \in \{0, \dots, L-1\}` (:math:`L` = ``levels`` = 17)
works in :math:`[-1, 1)`, where its Gaussian noise lives, on uniformly dequantized values

.. math:: y = \frac{2\,(k + u)}{L} - 1, \qquad u \sim U[0, 1) \text{ per pixel},

with a fresh :math:`u` every time a training (or validation) batch is drawn
(:func:`counts_to_model_units`, called by the run's objective). Its samples go back to counts by the
inverse map's floor, :math:`k = \lfloor L\,(y + 1)/2 \rfloor` clamped to :math:`0 \dots L-1`
(:func:`model_units_to_counts`), the same rule as :meth:`flowforge.flows.Dequantized.sample`: every
sample that leaves a run (``draw_samples``, sample files, plots, the classifier's metrics) is in
counts. A model density :math:`p(y)` is the density :math:`p(y)\,(2/L)^D` of :math:`k + u`, so
(Theis et al. 2016) :math:`-\log P(k) \le -\mathbb E_u \log p(y) - D \log(2/L)`, in bits per
dimension that over :math:`D \log 2`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from flowforge.config import check_choice, check_flag, check_integer, check_range, check_seed, plain_numbers
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
#: Sets with class labels a run can condition on (``[data] conditional = true``): name -> classes.
LABELLED_DATASETS = {"digits-images": 10}
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
        conditional: give every row its class as context, a one-hot row (``digits-images`` only);
            the model is then class-conditional (a flow-matching model, sampled per class).
    """

    name: str | None = None
    path: str | None = None
    size: int = 20_000
    test_fraction: float = 0.2
    standardize: bool | None = None
    seed: int = 0
    conditional: bool = False

    def __post_init__(self) -> None:
        plain_numbers(self)
        if self.name is not None:
            check_choice("name", self.name, DATASETS)
        if self.path is not None and not self.path.strip():
            raise ConfigError(f"path = {self.path!r}: give a data file (.csv, .npy, .npz, .parquet)")
        if self.name is not None and self.path is not None:
            raise ConfigError(
                f"name = {self.name!r} and path = {self.path!r}: give exactly one of name (a built-in set) or path"
            )
        check_integer("size", self.size, low=2, note=" (points drawn for training)")
        check_range("test_fraction", self.test_fraction, low=0, high=1, low_open=True, high_open=True)
        check_seed("seed", self.seed)
        check_flag("standardize", self.standardize, optional=True)
        check_flag("conditional", self.conditional)
        if self.name in COUNT_DATASETS and self.standardize:
            raise ConfigError(f"standardize = true: {self.name} are pixel counts, dequantized by the model instead")
        if self.conditional and self.name not in LABELLED_DATASETS:
            source = f"name = {self.name!r}" if self.name is not None else f"path = {self.path!r}"
            raise ConfigError(
                f"conditional = true: {source} has no class labels to condition on; "
                f"conditional runs take name = {' or '.join(map(repr, LABELLED_DATASETS))}"
            )


@dataclass
class RunData:
    """A run's split. ``train``/``test``: what the model sees (standardised when asked; pixel counts
    stay counts, dequantized per batch by the model or the run's objective);
    ``train_units``/``test_units``: the same rows in the data's own units. ``levels``: for integer
    data, the number of values of each entry, else ``None``. ``train_context``/``test_context``: for a
    conditional run, each row's class as a one-hot row (float32), else ``None``."""

    train: Tensor
    test: Tensor
    train_units: Tensor
    test_units: Tensor
    standardizer: Standardizer | None = None
    levels: int | None = None
    train_context: Tensor | None = None
    test_context: Tensor | None = None

    @property
    def event_shape(self) -> tuple[int, ...]:
        return tuple(self.train.shape[1:])

    @property
    def context_features(self) -> int:
        """Size of each row's context (the number of classes of a conditional run; 0 without one)."""
        return 0 if self.train_context is None else int(self.train_context.shape[1])


def counts_to_model_units(counts: Tensor, levels: int, noise: Tensor | None = None) -> Tensor:
    """Pixel counts ``0..levels-1`` as a flow-matching model sees them: ``2 (k + u) / levels - 1`` in
    ``[-1, 1)``, with ``u`` = ``noise`` (same shape, values in [0, 1)) or a fresh ``U[0, 1)`` draw.

    >>> counts_to_model_units(torch.tensor([0.0, 16.0]), 17, noise=torch.tensor([0.0, 0.5]))
    tensor([-1.0000,  0.9412])
    """
    if noise is None:
        noise = torch.rand_like(counts, dtype=counts.dtype if counts.is_floating_point() else torch.float32)
    return 2.0 * (counts + noise) / levels - 1.0


def model_units_to_counts(y: Tensor, levels: int) -> Tensor:
    """A flow-matching model's values back to pixel counts: ``floor(levels (y + 1) / 2)`` clamped to
    ``0..levels-1`` (whole numbers, in ``y``'s floating dtype); the inverse of
    :func:`counts_to_model_units` for any ``u`` in [0, 1).

    >>> model_units_to_counts(torch.tensor([-1.5, -1.0, 0.0, 0.9412, 3.0]), 17)
    tensor([ 0.,  0.,  8., 16., 16.])
    """
    return torch.floor(levels * (y + 1.0) / 2.0).clamp(0, levels - 1)


def standardizes(config: DataConfig) -> bool:
    """Whether a run on this data standardises it: 2-D sets only when asked, tables unless told not to,
    pixel counts never (the model dequantizes them), and a run without data (reverse KL) never."""
    if config.name is None and config.path is None:
        return False
    if config.name in TOY_DATASETS:
        return bool(config.standardize)
    if config.name in COUNT_DATASETS:
        return False
    return True if config.standardize is None else config.standardize


def dataset_event_shape(config: DataConfig) -> tuple[int, ...] | None:
    """The shape of one point of a built-in data set; ``None`` for data read from a file.

    >>> dataset_event_shape(DataConfig(name="wine")), dataset_event_shape(DataConfig(name="digits-images"))
    ((13,), (1, 8, 8))
    """
    if config.name is None:
        return None
    if config.name in TOY_DATASETS:
        return (2,)
    if config.name == "digits-images":
        return (1, 8, 8)
    return tuple(sklearn_dataset(config.name).shape[1:])


def load_data(config: DataConfig) -> RunData:
    """Draw or read the data ``config`` names and split it (the same split for the same config)."""
    if config.name is None and config.path is None:
        raise ConfigError("[data] needs name (a built-in set: flowforge list) or path (a data file)")
    if config.name in TOY_DATASETS:
        train = toy_dataset(config.name, config.size, seed=config.seed)
        test = toy_dataset(config.name, TOY_TEST_POINTS, seed=config.seed + 1)
        return _standardized(train, test, standardizes(config))
    if config.name == "digits-images":
        train, train_labels = digits_images("train", config.test_fraction, config.seed)
        test, test_labels = digits_images("test", config.test_fraction, config.seed)
        contexts = (None, None)
        if config.conditional:
            classes = LABELLED_DATASETS[config.name]
            contexts = tuple(one_hot(labels, classes) for labels in (train_labels, test_labels))
        return RunData(train, test, train, test, None, COUNT_DATASETS[config.name], *contexts)
    table = sklearn_dataset(config.name) if config.name is not None else load_table(config.path)
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(table.shape[0], generator=generator)
    n_test = max(2, round(config.test_fraction * table.shape[0]))  # the sample metrics compare >= 2 rows
    if table.shape[0] - n_test < 2:
        raise DataError(
            f"{config.path or config.name}: {table.shape[0]} rows leave too few to train on (test_fraction = "
            f"{config.test_fraction} holds out {n_test}, at least 2 for the test metrics; at least 2 must train)"
        )
    test, train = table[order[:n_test]], table[order[n_test:]]
    if config.name in COUNT_DATASETS:
        return RunData(train, test, train, test, None, COUNT_DATASETS[config.name])
    return _standardized(train, test, standardizes(config))


def one_hot(labels: Tensor, classes: int) -> Tensor:
    """Class numbers ``(n,)`` as one-hot rows ``(n, classes)`` (float32): the context of a conditional run.

    >>> one_hot(torch.tensor([2, 0]), 3)
    tensor([[0., 0., 1.],
            [1., 0., 0.]])
    """
    return torch.nn.functional.one_hot(labels.long(), classes).float()


def _standardized(train: Tensor, test: Tensor, standardize: bool) -> RunData:
    if not standardize:
        return RunData(train, test, train, test)
    standardizer = Standardizer.fit(train)
    return RunData(standardizer.transform(train), standardizer.transform(test), train, test, standardizer)


__all__ = [
    "COUNT_DATASETS",
    "DATASETS",
    "LABELLED_DATASETS",
    "DataConfig",
    "RunData",
    "counts_to_model_units",
    "dataset_event_shape",
    "load_data",
    "model_units_to_counts",
    "one_hot",
    "standardizes",
]
