"""The parts of flowforge.train: the package's names, and the data loader's sharding and positioning.

(That each part imports alone, with no circle, is checked for every module by tests/test_layout.py.)
"""

from __future__ import annotations

import pytest
import torch

import flowforge.train
from flowforge.train.distributed import ShardedBatches, TensorRows


def test_the_package_exports_what_it_always_did() -> None:
    assert set(flowforge.train.__all__) == {
        "AdversarialML",
        "ExponentialMovingAverage",
        "FlowMatchingObjective",
        "MaximumLikelihood",
        "NegativeELBO",
        "Objective",
        "PolicyDistillation",
        "PolicyObjective",
        "ReverseKL",
        "Trainer",
        "TrainerConfig",
        "TrainingInterrupted",
        "TrainingState",
        "distributed_world",
        "fit_maximum_likelihood",
        "init_distributed_from_environment",
        "learning_rate_factor",
    }
    for name in flowforge.train.__all__:
        assert getattr(flowforge.train, name) is not None


def _rows(batch) -> list[int]:
    x, context = batch
    assert torch.equal(context[:, 0], x[:, 0])  # context rows travel with their data rows
    return sorted(int(v) for v in x[:, 0])


@pytest.mark.parametrize("rows", [1000, 997, 20])
def test_two_shards_together_take_the_single_process_batch_at_every_step(rows: int) -> None:
    """The union of the per-process batches of a step is the one-process batch of that step,
    through several epochs (and for data smaller than a batch, repeated to fill one)."""
    data = torch.arange(rows, dtype=torch.float64).unsqueeze(1).repeat(1, 2)
    context = data[:, :1].clone()
    one = ShardedBatches(data, context, 64, world=1, rank=0, seed=3)
    shards = [ShardedBatches(data, context, 64, world=2, rank=r, seed=3) for r in range(2)]
    assert one.steps_per_epoch == shards[0].steps_per_epoch == max(rows // 64, 1)
    seen = []
    for _ in range(3 * one.steps_per_epoch + 1):
        batch = _rows(one.next())
        parts = [_rows(s.next()) for s in shards]
        assert len(parts[0]) == len(parts[1]) == 32
        assert sorted(parts[0] + parts[1]) == batch
        seen.append(batch)
    if rows >= 64:  # no row twice in an epoch
        first_epoch = [r for b in seen[: one.steps_per_epoch] for r in b]
        assert len(set(first_epoch)) == len(first_epoch)
    assert seen[0] != seen[one.steps_per_epoch]  # a new shuffle every epoch


def test_seeking_a_step_continues_exactly_where_the_stream_was() -> None:
    data = {"a": torch.arange(300).unsqueeze(1), "b": torch.arange(300, dtype=torch.float32)}
    stream = ShardedBatches(data, None, 32, world=1, rank=0, seed=0)
    expected = [stream.next()[0]["a"] for _ in range(25)]  # 9 steps per epoch: crosses two epoch ends
    for step in (0, 5, 9, 13, 24):
        resumed = ShardedBatches(data, None, 32, world=1, rank=0, seed=0)
        resumed.seek(step)
        assert torch.equal(resumed.next()[0]["a"], expected[step]), step


def test_the_loader_leaves_the_global_random_state_alone() -> None:
    stream = ShardedBatches(torch.randn(100, 2), None, 16, world=1, rank=0, seed=0)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    for _ in range(20):  # three epochs: three new loader iterators
        stream.next()
    stream.seek(7)
    assert torch.equal(torch.get_rng_state(), before)


def test_rows_are_fetched_a_batch_at_a_time() -> None:
    rows = TensorRows({"x": torch.arange(6).view(3, 2)}, torch.arange(3.0).unsqueeze(1))
    x, context = rows.__getitems__([2, 0])
    assert torch.equal(x["x"], torch.tensor([[4, 5], [0, 1]])) and torch.equal(context, torch.tensor([[2.0], [0.0]]))
    x, context = rows[1]  # one row, as a map-style dataset gives it
    assert torch.equal(x["x"], torch.tensor([2, 3])) and torch.equal(context, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="same number of rows"):
        TensorRows({"x": torch.zeros(3, 1), "y": torch.zeros(4)})
