"""Benchmark: RNODE regularisation of flowforge's CNF, and flowforge's CNF against zuko's.

What it measures
----------------
On each 2-D toy set (default: moons and 8gaussians), three continuous normalizing flows with the
same velocity network size (MLP on ``[x, time]``, hidden widths ``--hidden``, SiLU) are trained with
the same budget by the shared training loop (``benchmarks/common.py``):

1. ``ff-mle``: flowforge's ``CNF`` by maximum likelihood;
2. ``ff-rnode``: flowforge's ``CNF`` with the RNODE loss (Finlay et al. 2020)
   ``-(log_prob - lambda_k * kinetic - lambda_j * jacobian).mean()``;
3. ``zuko-mle``: zuko's ``CNF`` by maximum likelihood.

Shared settings: exact trace, dopri5 at ``atol = rtol = --tol`` (1e-5), Adam (lr 1e-3) with cosine
decay to 0, gradient-norm clipping at 10, the same minibatch indices (``--steps`` x ``--batch``)
and ``torch.manual_seed(seed)`` right before each model is built. Train data
``toy_dataset(name, 20_000, seed)``; test data the first ``--test-size`` (5,000) points of
``toy_dataset(name, 10_000, seed + 1000)``.

Recorded per set and model, after training (``eval`` mode, no grad):

* test NLL: mean ``-log_prob`` over the test points, in nats (the regularised model is evaluated
  by its plain ``log_prob``, without the regularisation terms);
* NFE: velocity-network evaluations of that one log_prob solve (data -> noise, over the whole test
  batch at once, so it is also the NFE per sample) and of one sampling solve of ``--test-size``
  points (noise -> data). flowforge reports ``flow.last_nfe``; for zuko the velocity network's
  ``forward`` is wrapped with a counter;
* the median wall time of one training step (forward, backward, clipping, optimizer, scheduler).

Goal checks, per set: regularised log_prob NFE <= 0.5 x unregularised; regularised test NLL within
0.05 nats of unregularised; flowforge (unregularised) median step time below zuko's.

Differences that remain between the libraries: zuko embeds time as ``cos/sin(k pi t)``, k = 1..3
(6 inputs instead of 1, so a slightly larger first layer: both parameter counts are printed); zuko
backpropagates with its adaptive checkpoint adjoint (the backward pass re-runs the solver steps),
flowforge through the solver's operations (``adjoint=False``); zuko scales the log-det state by
1e-2 inside the solver, which loosens its error control on that state.

PyTorch runs with ``--threads`` threads (default 1): these networks are tiny, and on a small shared
machine more threads mostly spin against each other and make the timings erratic.

The table is printed and also written as JSON to ``benchmarks/results/cnf_regularisation.json``.

How to run
----------
Needs the ``bench`` extra (``pip install -e .[bench]``, for zuko)::

    python benchmarks/cnf_regularisation.py
    python benchmarks/cnf_regularisation.py --steps 1000 --datasets moons --lambda-k 0.05 --lambda-j 0.05

The defaults (2 sets x 3 models x 600 steps) take about 5 minutes on a 2-core CPU machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import zuko
from torch import Tensor, nn

from common import (
    N_TRAIN,
    LogProb,
    batch_indices,
    parameter_count,
    test_nll,
    toy_split,
    train,
    training_setup,
    write_results,
)
from flowforge.data import TOY_DATASETS
from flowforge.flows import CNF

FEATURES = 2
NFE_RATIO_GOAL = 0.5  # regularised NFE <= NFE_RATIO_GOAL x unregularised NFE
NLL_TOLERANCE = 0.05  # nats: regularised NLL <= unregularised NLL + NLL_TOLERANCE
MODELS = ("ff-mle", "ff-rnode", "zuko-mle")
RESULTS = Path(__file__).resolve().parent / "results" / "cnf_regularisation.json"


class Model:
    """A trained-or-to-train CNF behind one interface: parameters, training objective, evaluation."""

    module: nn.Module
    objective: LogProb  # what the training loop maximises (mean over the batch)

    def log_prob(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def sample(self, n: int) -> Tensor:
        raise NotImplementedError

    def nfe(self) -> int:
        """Velocity evaluations of the most recent solve."""
        raise NotImplementedError


class FlowforgeModel(Model):
    def __init__(self, args: argparse.Namespace, regularise: bool) -> None:
        self.module = self.flow = CNF(
            features=FEATURES,
            context=0,
            hidden=tuple(args.hidden),
            trace="exact",
            method="dopri5",
            atol=args.tol,
            rtol=args.tol,
            adjoint=False,
        )
        lambda_k, lambda_j = args.lambda_k, args.lambda_j

        def regularised(x: Tensor) -> Tensor:
            log_prob, kinetic, jacobian = self.flow.log_prob_and_regularization(x)
            return log_prob - lambda_k * kinetic - lambda_j * jacobian

        self.objective = regularised if regularise else self.flow.log_prob

    def log_prob(self, x: Tensor) -> Tensor:
        return self.flow.log_prob(x)

    def sample(self, n: int) -> Tensor:
        return self.flow.sample(n)

    def nfe(self) -> int:
        return self.flow.last_nfe


class ZukoModel(Model):
    def __init__(self, args: argparse.Namespace) -> None:
        self.module = self.flow = zuko.flows.CNF(
            features=FEATURES,
            context=0,
            hidden_features=tuple(args.hidden),
            activation=nn.SiLU,
            exact=True,
            atol=args.tol,
            rtol=args.tol,
        )
        self.calls = 0
        velocity = self.flow.transform.ode
        forward = velocity.forward

        def counted(*inputs: Tensor) -> Tensor:
            self.calls += 1
            return forward(*inputs)

        velocity.forward = counted
        self.objective = self.log_prob

    def log_prob(self, x: Tensor) -> Tensor:
        self.calls = 0
        return self.flow().log_prob(x)

    def sample(self, n: int) -> Tensor:
        self.calls = 0
        return self.flow().sample((n,))

    def nfe(self) -> int:
        return self.calls


BUILDERS: dict[str, Callable[[argparse.Namespace], Model]] = {
    "ff-mle": lambda args: FlowforgeModel(args, regularise=False),
    "ff-rnode": lambda args: FlowforgeModel(args, regularise=True),
    "zuko-mle": ZukoModel,
}


@dataclass
class RunResult:
    dataset: str
    model: str
    parameters: int
    test_nll: float
    nfe_log_prob: int
    nfe_sample: int
    median_step_s: float
    final_train_loss: float
    wall_s: float


def run(dataset: str, name: str, args: argparse.Namespace) -> RunResult:
    start = time.perf_counter()
    train_x, test_x = toy_split(dataset, args.seed)
    test_x = test_x[: args.test_size]
    indices = batch_indices(N_TRAIN, args.steps, args.batch, args.seed)
    torch.manual_seed(args.seed)
    model = BUILDERS[name](args)
    model.module.train()
    times, last_loss = train(list(model.module.parameters()), model.objective, train_x, indices)
    model.module.eval()
    nll = test_nll(model.log_prob, test_x)
    nfe_log_prob = model.nfe()
    with torch.no_grad():
        model.sample(args.test_size)
    nfe_sample = model.nfe()
    return RunResult(
        dataset,
        name,
        parameter_count(model.module),
        nll,
        nfe_log_prob,
        nfe_sample,
        statistics.median(times),
        last_loss,
        time.perf_counter() - start,
    )


def goal_checks(results: list[RunResult]) -> dict[str, dict[str, float | bool]]:
    by_key = {(r.dataset, r.model): r for r in results}
    checks: dict[str, dict[str, float | bool]] = {}
    for dataset in dict.fromkeys(r.dataset for r in results):
        mle, reg, zk = (by_key[dataset, m] for m in MODELS)
        nfe_ratio = reg.nfe_log_prob / max(mle.nfe_log_prob, 1)
        nll_diff = reg.test_nll - mle.test_nll
        step_ratio = mle.median_step_s / zk.median_step_s
        checks[dataset] = {
            "nfe_ratio": nfe_ratio,
            "nfe_pass": nfe_ratio <= NFE_RATIO_GOAL,
            "nll_difference": nll_diff,
            "nll_pass": nll_diff <= NLL_TOLERANCE,
            "step_time_ratio": step_ratio,
            "step_time_pass": step_ratio < 1.0,
        }
    return checks


def print_table(results: list[RunResult], checks: dict[str, dict[str, float | bool]]) -> None:
    print(
        f"{'dataset':<11}  {'model':<8}  {'params':>6}  {'test NLL':>8}  {'NFE lp':>6}  {'NFE smp':>7}  "
        f"{'ms/step':>8}  {'train s':>7}"
    )
    for r in results:
        print(
            f"{r.dataset:<11}  {r.model:<8}  {r.parameters:>6}  {r.test_nll:>8.4f}  {r.nfe_log_prob:>6}  "
            f"{r.nfe_sample:>7}  {r.median_step_s * 1e3:>8.2f}  {r.wall_s:>7.0f}"
        )

    def verdict(ok: float | bool) -> str:
        return "PASS" if ok else "FAIL"

    for dataset, c in checks.items():
        print(
            f"{dataset}: NFE rnode/mle {c['nfe_ratio']:.2f} -> {verdict(c['nfe_pass'])} (goal <= {NFE_RATIO_GOAL}); "
            f"NLL rnode - mle {c['nll_difference']:+.4f} -> {verdict(c['nll_pass'])} (goal <= {NLL_TOLERANCE}); "
            f"step time ff/zuko {c['step_time_ratio']:.2f} -> {verdict(c['step_time_pass'])} (goal < 1)"
        )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps (default 600)")
    parser.add_argument("--batch", type=int, default=256, help="minibatch size (default 256)")
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 64], help="hidden widths (default 64 64)")
    parser.add_argument("--tol", type=float, default=1e-5, help="dopri5 atol = rtol (default 1e-5)")
    parser.add_argument("--lambda-k", type=float, default=0.01, help="kinetic-energy weight (default 0.01)")
    parser.add_argument("--lambda-j", type=float, default=0.01, help="Jacobian-norm weight (default 0.01)")
    parser.add_argument("--test-size", type=int, default=5000, help="test points (default 5000)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--datasets", nargs="+", default=["moons", "8gaussians"], choices=sorted(TOY_DATASETS), help="2-D data sets"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"CNF on {', '.join(args.datasets)}: hidden={tuple(args.hidden)}, exact trace, dopri5 tol={args.tol}, "
        f"steps={args.steps}, batch={args.batch}, lambda_k={args.lambda_k}, lambda_j={args.lambda_j}, "
        f"seed={args.seed}, torch threads={torch.get_num_threads()}"
    )
    start = time.perf_counter()
    results: list[RunResult] = []
    for dataset in args.datasets:
        for name in MODELS:
            result = run(dataset, name, args)
            results.append(result)
            print(
                f"  {dataset} {name:<8} test NLL {result.test_nll:.4f}, NFE {result.nfe_log_prob} "
                f"({result.wall_s:.0f} s)",
                flush=True,
            )
    checks = goal_checks(results)
    print_table(results, checks)
    total = time.perf_counter() - start
    print(f"total wall time {total:.0f} s")

    payload = {
        "config": {
            "datasets": list(args.datasets),
            "features": FEATURES,
            "hidden": list(args.hidden),
            "trace": "exact",
            "method": "dopri5",
            "tol": args.tol,
            "steps": args.steps,
            "batch": args.batch,
            "lambda_k": args.lambda_k,
            "lambda_j": args.lambda_j,
            "seed": args.seed,
            **training_setup(args.test_size),
        },
        "runs": [asdict(r) for r in results],
        "checks": checks,
        "total_wall_s": total,
    }
    write_results(RESULTS, payload)


if __name__ == "__main__":
    main()
