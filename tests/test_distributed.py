"""Data-parallel training: two CPU processes under torchrun (gloo) match one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from flowforge.checkpoint import load_tensors
from flowforge.errors import ConfigError
from flowforge.train import Trainer, TrainerConfig, distributed_world, init_distributed_from_environment

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from flowforge.data import toy_dataset
    from flowforge.distributions import StandardNormal
    from flowforge.flows import MAF, Flow, RealNVP
    from flowforge.transforms import ActNorm, Compose
    from flowforge.train import MaximumLikelihood, Trainer, TrainerConfig, init_distributed_from_environment

    torch.set_num_threads(1)
    world, rank = init_distributed_from_environment()
    torch.manual_seed(100 + rank)  # different initial weights per process: rank 0's are broadcast
    if sys.argv[2] == "batch-norm":  # ActNorm's data-dependent start and BatchNorm's batch statistics
        maf = MAF(2, transforms=3, hidden=(16,), batch_norm=True)
        flow = Flow(StandardNormal(2), Compose(ActNorm(2), maf.transform)).double()
    else:
        flow = RealNVP(2, transforms=2, hidden=(16,)).double()
    config = TrainerConfig(steps=40, batch_size=64, lr=3e-3, progress=False, log_every=10)
    data = toy_dataset("moons", 1000, seed=0).double()
    Trainer(flow, MaximumLikelihood(), config, data=data, directory=sys.argv[1]).fit()
    print(f"rank {rank} of {world} done")
    """
)


def _train_one_and_two(tmp_path: Path, model: str) -> tuple[dict, dict]:
    """Train ``model`` in one process and in two under torchrun (gloo); return both final weights."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "one"), model],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    double = subprocess.run(
        [*torchrun, str(script), str(tmp_path / "two"), model], capture_output=True, text=True, env=env, timeout=300
    )
    assert double.returncode == 0, double.stderr[-3000:]
    assert "rank 0 of 2 done" in double.stdout and "rank 1 of 2 done" in double.stdout
    # rank 0 alone wrote: one checkpoint, one metrics file
    assert len(list((tmp_path / "two").glob("model-*.safetensors"))) == 1
    return load_tensors(tmp_path / "one", "model"), load_tensors(tmp_path / "two", "model")


def test_two_process_torchrun_matches_one_process(tmp_path: Path) -> None:
    one, two = _train_one_and_two(tmp_path, "realnvp")
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-9, msg=name)


def test_two_processes_with_batch_norm_match_one_process(tmp_path: Path) -> None:
    """The BatchNorm flow layer normalises with the statistics of the global batch under torchrun, and
    ActNorm starts from the global first batch, so two processes of 32 rows follow one of 64: the
    weights, and the running statistics too."""
    one, two = _train_one_and_two(tmp_path, "batch-norm")
    assert any(name.endswith("running_var") for name in one)
    # ActNorm's start differs from one process's by rounding alone (1e-16: the global moments are
    # averaged over processes); Adam turns rounding in near-zero gradients into steps of up to lr,
    # so after 40 steps the weights agree to about 2e-6. Per-process statistics differ by 0.2.
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5, msg=name)


def test_without_a_process_group_training_is_single_process() -> None:
    assert distributed_world() == (1, 0)
    trainer = Trainer(torch.nn.Linear(2, 2), _Quadratic(), TrainerConfig(steps=2, batch_size=3))
    assert (trainer.world, trainer.rank) == (1, 0)


@pytest.mark.parametrize("value", ["two", "1.5", "0", "-1", ""])
def test_a_world_size_that_is_not_a_process_count_is_refused_naming_it(value: str, monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", value)
    with pytest.raises(ConfigError, match=f"WORLD_SIZE = {value!r}: expected .* integer >= 1"):
        init_distributed_from_environment()
    assert distributed_world() == (1, 0)


class _Quadratic:
    needs_data = False

    def loss(self, model, batch):
        return model.weight.square().sum()
