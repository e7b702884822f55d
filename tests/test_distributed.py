"""Data-parallel training: two CPU processes under torchrun (gloo) match one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from flowforge.checkpoint import load_tensors
from flowforge.train import Trainer, TrainerConfig, distributed_world

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from flowforge.data import toy_dataset
    from flowforge.flows import RealNVP
    from flowforge.train import MaximumLikelihood, Trainer, TrainerConfig, init_distributed_from_environment

    torch.set_num_threads(1)
    world, rank = init_distributed_from_environment()
    torch.manual_seed(100 + rank)  # different initial weights per process: rank 0's are broadcast
    flow = RealNVP(2, transforms=2, hidden=(16,)).double()
    config = TrainerConfig(steps=40, batch_size=64, lr=3e-3, progress=False, log_every=10)
    data = toy_dataset("moons", 1000, seed=0).double()
    Trainer(flow, MaximumLikelihood(), config, data=data, directory=sys.argv[1]).fit()
    print(f"rank {rank} of {world} done")
    """
)


def test_two_process_torchrun_matches_one_process(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "one")], capture_output=True, text=True, env=env, timeout=300
    )
    assert single.returncode == 0, single.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    double = subprocess.run(
        [*torchrun, str(script), str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=300
    )
    assert double.returncode == 0, double.stderr[-3000:]
    assert "rank 0 of 2 done" in double.stdout and "rank 1 of 2 done" in double.stdout
    one, two = load_tensors(tmp_path / "one", "model"), load_tensors(tmp_path / "two", "model")
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-9, msg=name)
    # rank 0 alone wrote: one checkpoint, one metrics file
    assert len(list((tmp_path / "two").glob("model-*.safetensors"))) == 1


def test_without_a_process_group_training_is_single_process() -> None:
    assert distributed_world() == (1, 0)
    trainer = Trainer(torch.nn.Linear(2, 2), _Quadratic(), TrainerConfig(steps=2, batch_size=3))
    assert (trainer.world, trainer.rank) == (1, 0)


class _Quadratic:
    needs_data = False

    def loss(self, model, batch):
        return model.weight.square().sum()
