r"""Data-parallel training under ``torchrun``, and the minibatches of every process.

**Process group.** :func:`init_distributed_from_environment` joins the group ``torchrun``
describes (gloo on CPU, nccl on GPU); :func:`distributed_world` reports ``(world size, rank)``,
``(1, 0)`` without a group.

**Gradients.** :func:`data_parallel` wraps the model and the objective in
:class:`torch.nn.parallel.DistributedDataParallel`. Flows and matchers are trained through
``log_prob`` or ``loss``, not ``forward``, so the wrapped module is :class:`ObjectiveLoss`, whose
``forward(batch)`` *is* ``objective.loss(model, batch)``: DDP's hooks then see every parameter the
loss reaches, and the backward pass averages the gradients over processes,

.. math:: g = \frac1P \sum_{p=1}^{P} \nabla_\theta L_p(\theta),

in buckets that overlap with the rest of the backward pass. With equal per-process batches of
:math:`B/P` rows and a loss that is a mean over rows, :math:`g` is the gradient of the loss on the
global batch of :math:`B` rows. Choices (timed by ``benchmarks/ddp_step_time.py``):

* ``find_unused_parameters=False``: every step's loss must reach every trainable parameter, as it
  does for every flowforge model and objective (the test suite checks that gradients reach every
  parameter of every flow and policy; a FlowMatcher's null context enters through
  ``torch.where`` and so gets a gradient, zero on a step where no row was dropped). ``True``
  walks the autograd graph and all-reduces a map of the used parameters at every step, which
  cost about 10 % of a step on the benchmark's models (0-35 % over repeated runs on 2 CPU
  cores); a model whose loss skips parameters on some steps needs it, through
  :attr:`Trainer.find_unused_parameters <flowforge.train.Trainer>` (DDP's "expected to have
  finished reduction" error otherwise, which the Trainer explains).
* ``gradient_as_bucket_view=True``: the gradients are views into DDP's communication buckets,
  which saves copying them back after the all-reduce (a few percent of the benchmark's steps).
* ``forward_sync_buffers=False`` (``broadcast_buffers=False`` before torch 2.13): DDP copies rank
  0's parameters *and* buffers to every process when it wraps the model (at the start of
  :meth:`Trainer.fit <flowforge.train.Trainer.fit>`). After that the only buffers training changes
  are the running statistics of :class:`~flowforge.transforms.BatchNorm`, which every process
  updates from the same global batch statistics, so re-broadcasting all buffers (masks included)
  before every forward would only cost time.

**Minibatches.** :class:`ShardedBatches` feeds in-memory tensors (or dicts of them) through a
:class:`torch.utils.data.DataLoader` with a :class:`~torch.utils.data.DistributedSampler`. The
sampler shuffles the rows with a permutation :math:`\pi_e` seeded by ``seed + epoch`` (the same on
every process) and gives process :math:`r` of :math:`P` the rows :math:`\pi_e(r), \pi_e(r+P),
\pi_e(r+2P), \dots`; each step takes the next :math:`b = B/P` of them. The rows the :math:`P`
processes train on at step :math:`k` of an epoch are therefore
:math:`\{\pi_e(j) : kB \le j < (k+1)B\}`: exactly the batch one process (the same sampler with
``num_replicas=1``) takes at that step. That is what makes a run on :math:`P` processes follow the
single-process run, and a run resumed at step :math:`s` continue at epoch
:math:`\lfloor s / S\rfloor`, position :math:`s \bmod S` (:math:`S` steps per epoch).
"""

from __future__ import annotations

import array
import atexit
import itertools
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from flowforge.errors import ConfigError, DataError
from flowforge.train.objectives import Batch, Objective
from flowforge.validation import check_count


# ---------------------------------------------------------------- the process group
def distributed_world() -> tuple[int, int]:
    """``(world size, rank)`` of the torch.distributed process group, ``(1, 0)`` when there is none."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def init_distributed_from_environment() -> tuple[int, int]:
    """Join the process group ``torchrun`` describes in the environment (gloo on CPU, nccl on GPU).

    Does nothing outside ``torchrun`` (no ``WORLD_SIZE``) or when a group already exists; refuses a
    ``WORLD_SIZE`` that is not a positive integer with a :class:`ConfigError`. The group
    it creates is destroyed when the interpreter exits: left to C++ static destruction, gloo's
    threads are torn down while still joinable, and about one two-process launch in six ended in
    an abort (``terminate called without an active exception``) after its work was done.
    """
    world = _world_size_from_environment()
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
        atexit.register(_destroy_process_group)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return distributed_world()


def _world_size_from_environment() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when unset); a :class:`ConfigError` naming it otherwise."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        world = int(value)
    except ValueError:
        world = 0
    if world < 1:
        raise ConfigError(
            f"environment variable WORLD_SIZE = {value!r}: expected the number of processes, an integer >= 1"
        )
    return world


def _destroy_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------- gradients
class ObjectiveLoss(nn.Module):
    """``forward(batch) = objective.loss(model, batch)``: the loss as a module's output, for DDP.

    The objective is a plain attribute, not a submodule: what it owns (AdversarialML's
    discriminator) is neither wrapped nor synchronised.
    """

    def __init__(self, model: nn.Module, objective: Objective) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: Batch | None) -> Tensor:
        return self.objective.loss(self.model, batch)


def data_parallel(model: nn.Module, objective: Objective, *, find_unused_parameters: bool = False) -> nn.Module:
    """``DistributedDataParallel(ObjectiveLoss(model, objective))`` (see the module notes for the options).

    Wrapping broadcasts rank 0's parameters and buffers to every process. The model's parameters
    are shared, not copied: optimizers, EMA and checkpoints keep using ``model``.
    """
    return nn.parallel.DistributedDataParallel(
        ObjectiveLoss(model, objective),
        find_unused_parameters=find_unused_parameters,
        gradient_as_bucket_view=True,
        forward_sync_buffers=False,
    )


def mean_over_processes(value: Tensor, world: int) -> Tensor:
    """The mean of a (detached) tensor over the processes; ``value`` itself on one process."""
    if world == 1:
        return value
    total = value.detach().clone()
    torch.distributed.all_reduce(total)
    return total / world


def from_rank_zero(value: float, world: int) -> float:
    """Rank 0's ``value`` on every process (decisions such as early stopping must agree)."""
    if world == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_rank_zero(value: Any, world: int, rank: int) -> list[Any] | None:
    """Every process's ``value`` as a list on rank 0 (``None`` elsewhere); ``[value]`` on one process."""
    if world == 1:
        return [value]
    values: list[Any] | None = [None] * world if rank == 0 else None
    torch.distributed.gather_object(value, values, dst=0)
    return values


# ---------------------------------------------------------------- minibatches
def rows_of(data: Tensor | dict[str, Tensor] | Dataset) -> int:
    """Number of rows of a tensor, or of the tensors of a dict (which must agree), or of a data set."""
    if isinstance(data, Dataset):
        return len(data)
    if isinstance(data, dict):
        if not data:
            raise DataError("data is an empty dict; give at least one tensor")
        rows = {int(v.shape[0]) for v in data.values()}
        if len(rows) != 1:
            raise DataError(f"every tensor of a data dict needs the same number of rows, got {sorted(rows)}")
        return rows.pop()
    return int(data.shape[0])


class TensorRows(Dataset):
    """The rows of in-memory ``data`` (a tensor, or a dict of tensors) and ``context``, fetched a
    whole batch at a time.

    The loader hands :meth:`__getitems__` the batch's indices; it indexes every tensor once with one
    index tensor on the data's device and returns the batch ``(x, context)`` as is (no collation),
    so a step costs a handful of tensor operations whatever the batch size. With ``repeat = k``
    the set lists every row ``k`` times (index ``i`` is row ``i mod rows``).

    >>> rows = TensorRows(torch.arange(6.0).view(3, 2), repeat=2)
    >>> len(rows), rows.__getitems__([0, 4])
    (6, (tensor([[0., 1.],
            [2., 3.]]), None))
    """

    def __init__(self, data: Tensor | dict[str, Tensor], context: Tensor | None = None, repeat: int = 1) -> None:
        self.data, self.context = data, context
        self.rows = rows_of(data)
        self.repeat = int(repeat)
        first = next(iter(data.values())) if isinstance(data, dict) else data
        self.device = first.device

    def __len__(self) -> int:
        return self.rows * self.repeat

    def __getitem__(self, i: int) -> Batch:
        x, context = self._take(torch.tensor([i % self.rows], device=self.device))
        x = {k: v[0] for k, v in x.items()} if isinstance(x, dict) else x[0]
        return x, None if context is None else context[0]

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        # The sampler hands over Python ints: packing them into an int64 buffer is 3x faster than
        # torch.tensor(list), and this runs once per step.
        index = torch.frombuffer(array.array("q", indices), dtype=torch.int64) if indices else torch.zeros(0).long()
        if self.repeat > 1:
            index = index.remainder_(self.rows)
        return self._take(index if self.device.type == "cpu" else index.to(self.device, non_blocking=True))

    def _take(self, index: Tensor) -> Batch:
        data, context = self.data, self.context
        if isinstance(data, dict):
            x = {k: v.index_select(0, index) for k, v in data.items()}
        else:
            x = data.index_select(0, index)
        return x, None if context is None else context.index_select(0, index)


def _as_is(batch: Batch) -> Batch:
    """The collate function: :meth:`TensorRows.__getitems__` already returns the batch."""
    return batch


class RepeatedRows(Dataset):
    """A data set with batched reads (``__getitems__``) listed ``repeat`` times (index ``i`` is row ``i mod rows``)."""

    def __init__(self, dataset: Dataset, repeat: int) -> None:
        self.dataset, self.rows, self.repeat = dataset, len(dataset), int(repeat)

    def __len__(self) -> int:
        return self.rows * self.repeat

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        return self.dataset.__getitems__([i % self.rows for i in indices])


def _one_thread(worker: int) -> None:
    """DataLoader workers decode with one thread each: the cores belong to the training process."""
    torch.set_num_threads(1)


class _FromPosition(Sampler[int]):
    """A sampler's indices from the ``start``-th on (resuming in the middle of an epoch)."""

    def __init__(self, sampler: DistributedSampler) -> None:
        self.sampler, self.start = sampler, 0

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.sampler), self.start, None)

    def __len__(self) -> int:
        return len(self.sampler) - self.start


class ShardedBatches:
    """This process's minibatches of in-memory data, epoch after epoch, positioned by the step.

    Arguments:
        data: rows ``(N, ...)``, a dict of tensors with ``N`` rows each, or a data set of batches.
        context: ``(N, c)`` or ``None``.
        batch_size: the global batch (over all processes); each process gets ``batch_size // world``.
        world, rank: the process group.
        seed: seeds the shuffle of every epoch (``seed + epoch``, as in ``DistributedSampler``).

    ``data`` may also be a :class:`~torch.utils.data.Dataset` whose ``__getitems__(indices)`` returns
    a whole batch ``(x, context)`` (images read from disk, for example); ``workers`` DataLoader
    processes then prepare the next batches while the model trains (0: in this process). The data
    order is the sampler's either way, so workers change no batch of a data set that draws no
    random numbers. One that does (augmentation while reading) draws from each worker's own stream,
    which a resumed run starts afresh: such a run resumes exactly with ``workers = 0`` only (the
    policies' data sets draw none; their augmentation runs in the model, on the training process).

    Every epoch is a shuffle of the rows cut into ``steps_per_epoch`` global batches; the last
    ``N mod batch_size`` rows of each shuffle are left out of that epoch (``drop_last``), so every
    step sees a full batch. Data with fewer rows than one batch is listed ``ceil(batch_size / N)``
    times, so that an epoch holds at least one batch (rows then recur within a batch, as when
    sampling with replacement).

    >>> batches = ShardedBatches(torch.arange(10.0).view(5, 2), None, batch_size=2, world=1, rank=0, seed=0)
    >>> batches.steps_per_epoch, batches.next()[0].shape
    (2, torch.Size([2, 2]))
    """

    def __init__(
        self,
        data: Tensor | dict[str, Tensor],
        context: Tensor | None,
        batch_size: int,
        *,
        world: int = 1,
        rank: int = 0,
        seed: int = 0,
        workers: int = 0,
    ) -> None:
        workers = check_count("workers (DataLoader processes)", workers, low=0)
        rows = rows_of(data)
        if rows == 0:
            raise DataError("data has no rows to train on")
        self.per_process = batch_size // world
        repeat = math.ceil(batch_size / rows) if rows < batch_size else 1
        if isinstance(data, Dataset):
            if context is not None:
                raise ValueError("a Dataset returns its own context with each batch: pass context=None")
            if not hasattr(data, "__getitems__"):
                raise TypeError(f"{type(data).__name__} needs __getitems__(indices) returning a whole batch")
            self.dataset = data if repeat == 1 else RepeatedRows(data, repeat)
        else:
            self.dataset = TensorRows(data, context, repeat=repeat)
        self.sampler = DistributedSampler(
            self.dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self._positioned = _FromPosition(self.sampler)
        # The loader's own generator: creating an iterator draws a seed from it, which must not
        # shift the global torch RNG (the model's noise) when an epoch starts or a run resumes.
        self.loader = DataLoader(
            self.dataset,
            batch_size=self.per_process,
            sampler=self._positioned,
            drop_last=True,
            collate_fn=_as_is,
            generator=torch.Generator(),
            num_workers=workers,
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
            worker_init_fn=_one_thread if workers > 0 else None,
        )
        self.steps_per_epoch = len(self.sampler) // self.per_process
        self.epoch = 0
        self._iterator: Iterator[Batch] | None = None

    def seek(self, step: int) -> None:
        """Position the stream so that :meth:`next` returns the batch of global step ``step`` (from 0)."""
        self.epoch, position = divmod(step, self.steps_per_epoch)
        self._open(position)

    def _open(self, position: int) -> None:
        self.sampler.set_epoch(self.epoch)
        self._positioned.start = position * self.per_process
        self._iterator = iter(self.loader)

    def next(self) -> Batch:
        """This process's next minibatch ``(x, context)``."""
        if self._iterator is None:
            self.seek(0)
        try:
            return next(self._iterator)
        except StopIteration:
            self.epoch += 1
            self._open(0)
            return next(self._iterator)


__all__ = [
    "ObjectiveLoss",
    "RepeatedRows",
    "ShardedBatches",
    "TensorRows",
    "data_parallel",
    "distributed_world",
    "from_rank_zero",
    "gather_to_rank_zero",
    "init_distributed_from_environment",
    "mean_over_processes",
    "rows_of",
]
