"""Benchmark: test NLL of flowforge's MAF and NSF against zuko's on the built-in 2-D data sets.

What it measures
----------------
On each data set (default: moons, 8gaussians, checkerboard, pinwheel, spirals, rings) and seed,
four flows are trained with the same budget by one shared training loop (``benchmarks/common.py``):
flowforge's ``MAF`` and ``NSF`` and zuko's ``MAF`` and ``NSF``, all with ``transforms``
autoregressive layers, MADE conditioners of hidden widths ``hidden`` and, for NSF, ``bins`` bins on
``[-5, 5]`` (zuko's fixed interval; the data lie roughly within ``[-4, 4]^2``). Settings shared by all:

* train data: ``toy_dataset(name, 20_000, seed=s)``; test data: ``toy_dataset(name, 10_000,
  seed=s + 1000)``;
* ``steps`` Adam steps (lr 1e-3) of ``batch`` points, cosine learning-rate decay to 0 over the run,
  gradient-norm clipping at 10;
* the same minibatch indices, drawn up front from a generator seeded with ``s``;
* ``torch.manual_seed(s)`` right before each model is built.

Recorded per data set, seed and model: the test NLL (mean ``-log_prob`` over the test set, in nats),
the median wall time of one training step and the last training loss. The table gives the median
test NLL over seeds, and the check ``flowforge NSF <= zuko NSF + 0.02`` nats on every data set
(the MAF columns are for information).

The tables are printed and also written as JSON to ``benchmarks/results/density_quality_2d.json``.

How to run
----------
Needs the ``bench`` extra (``pip install -e .[bench]``, for zuko)::

    python benchmarks/density_quality_2d.py
    python benchmarks/density_quality_2d.py --steps 5000 --seeds 0 1 2 --datasets checkerboard rings

The defaults (6 data sets x 4 models x 2000 steps, one seed) take about 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import zuko
from torch import nn

from common import (
    CLIP_NORM,
    LR,
    N_TEST,
    N_TRAIN,
    RESULTS_DIR,
    LogProb,
    batch_indices,
    parameter_count,
    positive_int,
    seed_int,
    test_nll,
    toy_split,
    train,
    training_setup,
    write_results,
)
from flowforge.data import TOY_DATASETS
from flowforge.flows import MAF, NSF

FEATURES = 2
DATASETS = ("moons", "8gaussians", "checkerboard", "pinwheel", "spirals", "rings")
MODELS = (("flowforge", "MAF"), ("zuko", "MAF"), ("flowforge", "NSF"), ("zuko", "NSF"))
TOLERANCE = 0.02  # nats: the goal is flowforge NSF <= zuko NSF + TOLERANCE on every data set
RESULTS = RESULTS_DIR / "density_quality_2d.json"


def build(library: str, model: str, args: argparse.Namespace) -> tuple[nn.Module, LogProb]:
    hidden = tuple(args.hidden)
    if library == "flowforge":
        if model == "MAF":
            flow = MAF(FEATURES, transforms=args.transforms, hidden=hidden)
        else:
            flow = NSF(FEATURES, transforms=args.transforms, hidden=hidden, bins=args.bins, bound=5.0)
        return flow, flow.log_prob
    if model == "MAF":
        zflow = zuko.flows.MAF(FEATURES, transforms=args.transforms, hidden_features=hidden)
    else:
        zflow = zuko.flows.NSF(FEATURES, bins=args.bins, transforms=args.transforms, hidden_features=hidden)
    return zflow, lambda x: zflow().log_prob(x)


@dataclass
class RunResult:
    dataset: str
    library: str
    model: str
    seed: int
    params: int
    test_nll: float
    median_step_s: float
    final_train_loss: float
    wall_s: float

    @property
    def name(self) -> str:
        return f"{self.library} {self.model}"


def run(dataset: str, library: str, model: str, seed: int, args: argparse.Namespace) -> RunResult:
    start = time.perf_counter()
    train_x, test_x = toy_split(dataset, seed)
    indices = batch_indices(N_TRAIN, args.steps, args.batch, seed)
    torch.manual_seed(seed)
    flow, log_prob = build(library, model, args)
    flow.train()
    times, last_loss = train(list(flow.parameters()), log_prob, train_x, indices)
    flow.eval()
    nll = test_nll(log_prob, test_x)
    return RunResult(
        dataset,
        library,
        model,
        seed,
        parameter_count(flow),
        nll,
        statistics.median(times),
        last_loss,
        time.perf_counter() - start,
    )


def median_nll(results: list[RunResult], dataset: str, name: str) -> float:
    return statistics.median(r.test_nll for r in results if r.dataset == dataset and r.name == name)


def summarize(results: list[RunResult], datasets: Sequence[str]) -> dict[str, object]:
    per_dataset = {}
    for d in datasets:
        nll = {f"{lib} {model}": median_nll(results, d, f"{lib} {model}") for lib, model in MODELS}
        diff = nll["flowforge NSF"] - nll["zuko NSF"]
        per_dataset[d] = {"median_nll": nll, "nsf_difference": diff, "pass": diff <= TOLERANCE}
    step_ms = {
        f"{lib} {model}": statistics.median(r.median_step_s for r in results if r.name == f"{lib} {model}") * 1e3
        for lib, model in MODELS
    }
    return {
        "per_dataset": per_dataset,
        "median_step_ms": step_ms,
        "tolerance": TOLERANCE,
        "pass": all(v["pass"] for v in per_dataset.values()),
    }


def print_table(results: list[RunResult], summary: dict[str, object], args: argparse.Namespace) -> None:
    names = [f"{lib} {model}" for lib, model in MODELS]
    seeds = "median over seeds " + " ".join(map(str, args.seeds)) if len(args.seeds) > 1 else f"seed {args.seeds[0]}"
    print(f"\ntest NLL, nats ({seeds}; lower is better)")
    print(f"{'dataset':<13}" + "".join(f"  {n:>13}" for n in names) + f"  {'NSF ff - zuko':>13}  check")
    per_dataset = summary["per_dataset"]
    for d, row in per_dataset.items():
        cells = "".join(f"  {row['median_nll'][n]:>13.4f}" for n in names)
        verdict = "PASS" if row["pass"] else "FAIL"
        print(f"{d:<13}" + cells + f"  {row['nsf_difference']:>+13.4f}  {verdict}")
    print(f"{'ms/step':<13}" + "".join(f"  {summary['median_step_ms'][n]:>13.2f}" for n in names))
    params = {r.name: r.params for r in results}
    print(f"{'parameters':<13}" + "".join(f"  {params[n]:>13}" for n in names))
    failed = [d for d, row in per_dataset.items() if not row["pass"]]
    verdict = "PASS" if summary["pass"] else f"FAIL ({', '.join(failed)})"
    print(f"check flowforge NSF <= zuko NSF + {TOLERANCE} nats on each data set: {verdict}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=positive_int, default=2000, help="training steps per model (default 2000)")
    parser.add_argument("--batch", type=positive_int, default=256, help="minibatch size (default 256)")
    parser.add_argument("--transforms", type=positive_int, default=5, help="autoregressive layers (default 5)")
    parser.add_argument(
        "--hidden", type=positive_int, nargs="+", default=[64, 64], help="MADE hidden widths (default 64 64)"
    )
    parser.add_argument("--bins", type=positive_int, default=8, help="spline bins for NSF (default 8)")
    parser.add_argument("--seeds", type=seed_int, nargs="+", default=[0], help="seeds (default 0)")
    parser.add_argument(
        "--datasets", nargs="+", default=list(DATASETS), choices=sorted(TOY_DATASETS), help="2-D data sets"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    epochs = args.steps * args.batch / N_TRAIN
    print(
        f"MAF and NSF, flowforge vs zuko: transforms={args.transforms}, hidden={tuple(args.hidden)}, "
        f"bins={args.bins}, seeds={args.seeds}, torch threads={torch.get_num_threads()}\n"
        f"budget per model, data set and seed: {args.steps} steps x batch {args.batch} "
        f"({epochs:.1f} epochs of {N_TRAIN:,} points), Adam lr {LR:g} with cosine decay to 0, "
        f"gradient clipping at {CLIP_NORM:g}; test set {N_TEST:,} points"
    )
    start = time.perf_counter()
    results: list[RunResult] = []
    for dataset in args.datasets:
        for seed in args.seeds:
            for library, model in MODELS:
                r = run(dataset, library, model, seed, args)
                results.append(r)
                print(
                    f"  {dataset:<12} seed {seed} {r.name:<13} test NLL {r.test_nll:.4f} "
                    f"({r.median_step_s * 1e3:.1f} ms/step, {r.wall_s:.0f} s)",
                    flush=True,
                )
    summary = summarize(results, args.datasets)
    print_table(results, summary, args)
    total = time.perf_counter() - start
    print(f"total wall time {total / 60:.1f} min")

    payload = {
        "config": {
            "datasets": list(args.datasets),
            "features": FEATURES,
            "transforms": args.transforms,
            "hidden": list(args.hidden),
            "bins": args.bins,
            "steps": args.steps,
            "batch": args.batch,
            "seeds": list(args.seeds),
            **training_setup(),
            "total_wall_s": total,
        },
        "runs": [asdict(r) for r in results],
        "summary": summary,
    }
    write_results(RESULTS, payload)


if __name__ == "__main__":
    main()
