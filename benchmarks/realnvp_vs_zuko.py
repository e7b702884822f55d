"""Benchmark: flowforge's RealNVP against zuko's RealNVP on a 2-D toy data set.

What it measures
----------------
For each seed, both libraries' RealNVP (same number of coupling transforms, same conditioner
hidden sizes) are trained by one shared training loop (``benchmarks/common.py``) with identical
settings:

* train data: ``toy_dataset(name, 20_000, seed=s)``; test data: ``toy_dataset(name, 10_000,
  seed=s + 1000)``;
* Adam (lr 1e-3), cosine learning-rate decay to 0 over the run, gradient-norm clipping at 10;
* the same minibatch indices, drawn up front from a generator seeded with ``s``;
* ``torch.manual_seed(s)`` right before each model is built.

Recorded per seed and library: the test NLL (mean ``-log_prob`` over the test set, in nats) and
the median wall time of one training step (forward, backward, clipping, optimizer and scheduler
step). The summary compares the median test NLL over seeds against the goal
``flowforge <= zuko + 0.02`` and gives the ratio of median step times (flowforge / zuko).

The table is printed and also written as JSON to ``benchmarks/results/realnvp_vs_zuko.json``.

How to run
----------
Needs the ``bench`` extra (``pip install -e .[bench]``, for zuko)::

    python benchmarks/realnvp_vs_zuko.py
    python benchmarks/realnvp_vs_zuko.py --steps 1000 --seeds 0 --dataset 8gaussians

The defaults (3 seeds x 2 libraries x 3000 steps) take a few minutes on a small CPU machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import zuko
from torch import nn

from common import (
    N_TRAIN,
    RESULTS_DIR,
    LogProb,
    batch_indices,
    positive_int,
    seed_int,
    test_nll,
    toy_split,
    train,
    training_setup,
    write_results,
)
from flowforge.data import TOY_DATASETS
from flowforge.flows import RealNVP

Builder = Callable[[int, Sequence[int]], tuple[nn.Module, LogProb]]

FEATURES = 2
TOLERANCE = 0.02  # nats: the goal is flowforge <= zuko + TOLERANCE
RESULTS = RESULTS_DIR / "realnvp_vs_zuko.json"


def build_flowforge(transforms: int, hidden: Sequence[int]) -> tuple[nn.Module, LogProb]:
    flow = RealNVP(features=FEATURES, context=0, transforms=transforms, hidden=tuple(hidden))
    return flow, flow.log_prob


def build_zuko(transforms: int, hidden: Sequence[int]) -> tuple[nn.Module, LogProb]:
    flow = zuko.flows.RealNVP(features=FEATURES, context=0, transforms=transforms, hidden_features=tuple(hidden))
    return flow, lambda x: flow().log_prob(x)


LIBRARIES: dict[str, Builder] = {"flowforge": build_flowforge, "zuko": build_zuko}


@dataclass
class RunResult:
    library: str
    seed: int
    test_nll: float
    median_step_s: float
    final_train_loss: float


def run(library: str, seed: int, args: argparse.Namespace) -> RunResult:
    train_x, test_x = toy_split(args.dataset, seed)
    indices = batch_indices(N_TRAIN, args.steps, args.batch, seed)
    torch.manual_seed(seed)
    model, log_prob = LIBRARIES[library](args.transforms, args.hidden)
    model.train()
    times, last_loss = train(list(model.parameters()), log_prob, train_x, indices)
    model.eval()
    return RunResult(library, seed, test_nll(log_prob, test_x), statistics.median(times), last_loss)


def summarize(results: list[RunResult]) -> dict[str, float | bool]:
    def median_of(library: str, field: str) -> float:
        return statistics.median(getattr(r, field) for r in results if r.library == library)

    ff_nll, zk_nll = median_of("flowforge", "test_nll"), median_of("zuko", "test_nll")
    ff_step, zk_step = median_of("flowforge", "median_step_s"), median_of("zuko", "median_step_s")
    return {
        "flowforge_median_nll": ff_nll,
        "zuko_median_nll": zk_nll,
        "difference": ff_nll - zk_nll,
        "tolerance": TOLERANCE,
        "pass": ff_nll <= zk_nll + TOLERANCE,
        "flowforge_median_step_s": ff_step,
        "zuko_median_step_s": zk_step,
        "step_time_ratio": ff_step / zk_step,
    }


def print_table(results: list[RunResult], summary: dict[str, float | bool]) -> None:
    by_key = {(r.library, r.seed): r for r in results}
    seeds = sorted({r.seed for r in results})
    print(f"{'seed':>4}  {'flowforge NLL':>13}  {'zuko NLL':>9}  {'diff':>8}  {'ff ms/step':>10}  {'zuko ms/step':>12}")
    for s in seeds:
        ff, zk = by_key["flowforge", s], by_key["zuko", s]
        diff = ff.test_nll - zk.test_nll
        print(
            f"{s:>4}  {ff.test_nll:>13.4f}  {zk.test_nll:>9.4f}  {diff:>+8.4f}  "
            f"{ff.median_step_s * 1e3:>10.2f}  {zk.median_step_s * 1e3:>12.2f}"
        )
    verdict = "PASS" if summary["pass"] else "FAIL"
    print(
        f"median NLL: flowforge {summary['flowforge_median_nll']:.4f}, "
        f"zuko {summary['zuko_median_nll']:.4f}, "
        f"diff (flowforge - zuko) {summary['difference']:+.4f} -> {verdict} "
        f"(goal: flowforge <= zuko + {TOLERANCE}); "
        f"step time ratio (flowforge / zuko) {summary['step_time_ratio']:.2f}"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=positive_int, default=3000, help="training steps (default 3000)")
    parser.add_argument("--batch", type=positive_int, default=256, help="minibatch size (default 256)")
    parser.add_argument("--transforms", type=positive_int, default=8, help="coupling layers (default 8)")
    parser.add_argument(
        "--hidden", type=positive_int, nargs="+", default=[64, 64], help="hidden widths (default 64 64)"
    )
    parser.add_argument("--seeds", type=seed_int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    parser.add_argument("--dataset", default="moons", choices=sorted(TOY_DATASETS), help="2-D data set")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    print(
        f"RealNVP on {args.dataset}: transforms={args.transforms}, hidden={tuple(args.hidden)}, "
        f"steps={args.steps}, batch={args.batch}, seeds={args.seeds}, "
        f"torch threads={torch.get_num_threads()}"
    )
    results: list[RunResult] = []
    for seed in args.seeds:
        for library in LIBRARIES:
            start = time.perf_counter()
            result = run(library, seed, args)
            results.append(result)
            print(
                f"  seed {seed} {library:<9} test NLL {result.test_nll:.4f} ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    summary = summarize(results)
    print_table(results, summary)

    payload = {
        "config": {
            "dataset": args.dataset,
            "features": FEATURES,
            "transforms": args.transforms,
            "hidden": list(args.hidden),
            "steps": args.steps,
            "batch": args.batch,
            "seeds": list(args.seeds),
            **training_setup(),
        },
        "runs": [asdict(r) for r in results],
        "summary": summary,
    }
    write_results(RESULTS, payload)


if __name__ == "__main__":
    main()
