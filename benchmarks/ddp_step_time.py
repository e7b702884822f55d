"""Benchmark: the Trainer's data-parallel step (DistributedDataParallel) against the flat all-reduce it replaced.

What it measures
----------------
Two (by default) CPU processes under ``torchrun`` (gloo, one torch thread each) train the same
model on the same global batch with :class:`flowforge.train.Trainer`, maximum likelihood, Adam,
gradient clipping at 10. Per model, three ways of averaging the gradients over the processes:

* ``flat``: the reference, the hand-written step the Trainer used before DDP (kept here only):
  after ``loss.backward()``, every gradient is copied into one flat tensor, all-reduced in one
  call, divided by the number of processes and copied back;
* ``ddp``: the Trainer's step as shipped: the loss runs inside the ``forward`` of a
  ``DistributedDataParallel`` module (``find_unused_parameters=False``, gradients as views into
  the buckets), whose hooks all-reduce gradient buckets while the backward pass is still running;
* ``ddp-unused``: the same with ``find_unused_parameters=True`` (``Trainer.find_unused_parameters``:
  a walk of the autograd graph and an all-reduce of the used-parameter map at every step), to show
  what that option costs.

All three read their batches from the Trainer's data loader and all-reduce the loss for logging,
so they differ only in the gradient averaging. One step is timed from fetching the batch to the
end of the optimizer step, on rank 0; after ``--warmup`` untimed steps the three are timed in
interleaved rounds of ``--steps`` steps (a barrier before each round), the median step of each
round is kept, and the table reports the median over ``--repeats`` rounds and the ratios
ddp / flat and ddp-unused / flat of those medians (below 1: faster than the flat all-reduce).
``loader ms`` is the median time the ``ddp`` steps spent fetching their batch from the Trainer's
DataLoader (DistributedSampler, batched indexing), measured inside the loop (where the caches are
cold after each step: a few times the time of fetching batches back to back), and ``loader %``
that as a share of the ``ddp`` step.

Models: ``RealNVP(2, transforms=8, hidden=(64, 64))`` on the moons (the size of the other
benchmarks' toy runs) and ``MAF(16, transforms=5, hidden=(256, 256))`` on 16-D Gaussian data
(about 0.4 M parameters, where the size of the gradient all-reduce starts to matter).

The table is printed by rank 0 and also written as JSON to ``benchmarks/results/ddp_step_time.json``.

How to run
----------
::

    python benchmarks/ddp_step_time.py                 # starts torchrun with 2 processes itself
    torchrun --standalone --nproc_per_node 2 benchmarks/ddp_step_time.py --repeats 5

The defaults take about a minute on 2 idle CPU cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from common import RESULTS_DIR, nonnegative_int, parameter_count, positive_int, write_results
from flowforge.data import toy_dataset
from flowforge.flows import MAF, RealNVP
from flowforge.train import MaximumLikelihood, Trainer, TrainerConfig, init_distributed_from_environment
from flowforge.train.distributed import ShardedBatches, data_parallel
from flowforge.train.objectives import Batch

RESULTS = RESULTS_DIR / "ddp_step_time.json"
PATHS = ("flat", "ddp", "ddp-unused")


def realnvp_moons(rows: int) -> tuple[nn.Module, torch.Tensor]:
    return RealNVP(2, transforms=8, hidden=(64, 64)), toy_dataset("moons", rows, seed=0)


def maf_gaussian(rows: int) -> tuple[nn.Module, torch.Tensor]:
    data = torch.randn(rows, 16, generator=torch.Generator().manual_seed(0))
    return MAF(16, transforms=5, hidden=(256, 256)), data


MODELS: dict[str, tuple[str, Callable[[int], tuple[nn.Module, torch.Tensor]]]] = {
    "realnvp": ("RealNVP 2-D, 8 x (64, 64)", realnvp_moons),
    "maf": ("MAF 16-D, 5 x (256, 256)", maf_gaussian),
}


def flat_all_reduce_step(trainer: Trainer) -> torch.Tensor:
    """The Trainer's step before DDP (reference only): backward, then one flat all-reduce of every gradient."""
    world = trainer.world
    batch = trainer.batches.next()
    loss = trainer.objective.loss(trainer.model, batch)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss is {loss.item()}")
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    parameters = [p for p in trainer.model.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for p in parameters:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n
    loss = loss.detach().clone()
    torch.distributed.all_reduce(loss)
    loss /= world
    torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), trainer.config.max_grad_norm)
    trainer.optimizer.step()
    trainer.scheduler.step()
    return loss


@dataclass
class Row:
    model: str
    parameters: int
    batch: int
    world: int
    flat_ms: float
    ddp_ms: float
    ddp_unused_ms: float
    ratio: float
    unused_ratio: float
    loader_ms: float
    loader_share: float


def trainer_for(path: str, model_key: str, args: argparse.Namespace, world: int) -> Trainer:
    torch.manual_seed(0)
    model, data = MODELS[model_key][1](args.rows)
    steps = args.warmup + args.repeats * args.steps + 1
    config = TrainerConfig(steps=steps, batch_size=args.batch, lr=1e-4, schedule="constant", progress=False)
    trainer = Trainer(model, MaximumLikelihood(), config, data=data)
    if path != "flat":  # the wrapper fit() makes
        unused = path == "ddp-unused"
        trainer.parallel = data_parallel(trainer.model, trainer.objective, find_unused_parameters=unused)
    trainer.batches.seek(0)
    trainer.model.train()
    return trainer


def step_function(path: str, trainer: Trainer) -> Callable[[], torch.Tensor]:
    return (lambda: flat_all_reduce_step(trainer)) if path == "flat" else trainer._step


def time_steps(step: Callable[[], torch.Tensor], count: int) -> list[float]:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


class TimedBatches:
    """The Trainer's batch stream, timing every fetch (inside the loop, where caches are cold)."""

    def __init__(self, batches: ShardedBatches) -> None:
        self.batches, self.times = batches, []

    def next(self) -> Batch:
        start = time.perf_counter()
        batch = self.batches.next()
        self.times.append(time.perf_counter() - start)
        return batch


def measure(model_key: str, args: argparse.Namespace, world: int, rank: int) -> Row:
    trainers = {path: trainer_for(path, model_key, args, world) for path in PATHS}
    steps = {path: step_function(path, trainer) for path, trainer in trainers.items()}
    for path in PATHS:
        time_steps(steps[path], args.warmup)
    fetches = TimedBatches(trainers["ddp"].batches)
    trainers["ddp"].batches = fetches
    rounds: dict[str, list[float]] = {path: [] for path in PATHS}
    for r in range(args.repeats):
        order = PATHS[r % len(PATHS) :] + PATHS[: r % len(PATHS)]  # rotate: drift hits every path alike
        for path in order:
            torch.distributed.barrier()
            rounds[path].append(statistics.median(time_steps(steps[path], args.steps)))
    loader = statistics.median(fetches.times)
    median = {path: statistics.median(values) * 1e3 for path, values in rounds.items()}
    return Row(
        model=MODELS[model_key][0],
        parameters=parameter_count(trainers["ddp"].model),
        batch=args.batch,
        world=world,
        flat_ms=median["flat"],
        ddp_ms=median["ddp"],
        ddp_unused_ms=median["ddp-unused"],
        ratio=median["ddp"] / median["flat"],
        unused_ratio=median["ddp-unused"] / median["flat"],
        loader_ms=loader * 1e3,
        loader_share=loader * 1e3 / median["ddp"],
    )


def print_table(rows: Sequence[Row]) -> None:
    header = (
        f"{'model':<26} {'params':>8} {'batch':>5} {'flat ms':>8} {'ddp ms':>8} {'ddp/flat':>8} "
        f"{'unused ms':>9} {'unused/flat':>11} {'loader ms':>9} {'loader %':>8}"
    )
    print(header)
    for r in rows:
        print(
            f"{r.model:<26} {r.parameters:>8} {r.batch:>5} {r.flat_ms:>8.2f} {r.ddp_ms:>8.2f} {r.ratio:>8.2f} "
            f"{r.ddp_unused_ms:>9.2f} {r.unused_ratio:>11.2f} {r.loader_ms:>9.3f} {100 * r.loader_share:>7.1f}%"
        )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="models to time")
    parser.add_argument("--batch", type=positive_int, default=256, help="global batch (default 256)")
    parser.add_argument("--rows", type=positive_int, default=20_000, help="training rows (default 20000)")
    parser.add_argument("--steps", type=positive_int, default=30, help="timed steps per round (default 30)")
    parser.add_argument("--repeats", type=positive_int, default=7, help="rounds per path (default 7)")
    parser.add_argument("--warmup", type=nonnegative_int, default=10, help="untimed steps per path (default 10)")
    parser.add_argument("--processes", type=positive_int, default=2, help="processes when started without torchrun")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if "WORLD_SIZE" not in os.environ:  # start ourselves under torchrun, one thread per process
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += [f"--nproc_per_node={args.processes}", __file__, *(sys.argv[1:] if argv is None else argv)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        raise SystemExit(subprocess.run(command, env=env).returncode)
    torch.set_num_threads(1)
    world, rank = init_distributed_from_environment()
    if world < 2:
        raise SystemExit("run with at least 2 processes: the benchmark times gradient averaging")
    if rank == 0:
        print(f"{world} processes (gloo), 1 torch thread each, batch {args.batch} (per process {args.batch // world})")
    rows = []
    for key in args.models:
        row = measure(key, args, world, rank)
        rows.append(row)
        if rank == 0:
            print(f"  {row.model}: flat {row.flat_ms:.2f} ms, ddp {row.ddp_ms:.2f} ms", flush=True)
    if rank == 0:
        print_table(rows)
        payload = {
            "config": {**vars(args), "world": world, "torch": torch.__version__, "torch_threads": 1},
            "rows": [asdict(r) for r in rows],
        }
        write_results(RESULTS, payload)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
