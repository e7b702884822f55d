"""Benchmark: RNODE regularisation of flowforge's CNF, and flowforge's CNF against zuko's.

What it measures
----------------
On each 2-D toy set (default: pinwheel and checkerboard), three continuous normalizing flows with the
same velocity network size (MLP on ``[x, time]``, hidden widths ``--hidden``, SiLU) are trained with
the same budget by the shared training loop (``benchmarks/common.py``):

1. ``ff-mle``: flowforge's ``CNF`` by maximum likelihood;
2. ``ff-rnode``: flowforge's ``CNF`` with the RNODE loss (Finlay et al. 2020)
   ``-(log_prob - lambda_k * kinetic - lambda_j * jacobian).mean()``, ``--lambda-k = --lambda-j =
   0.05``; as in RNODE its training solves use a fixed-step solver (``--rnode-train-method rk4``,
   ``--rnode-train-steps 4``; ``dopri5`` trains it like the others), its evaluation does not;
3. ``zuko-mle``: zuko's ``CNF`` by maximum likelihood.

Shared settings: exact trace, dopri5 at ``atol = rtol = --tol`` (1e-5; for every training solve except
ff-rnode's and for every evaluation), Adam (lr 1e-3) with cosine
decay to 0, gradient-norm clipping at 10, the same minibatch indices (``--steps`` x ``--batch``)
and ``torch.manual_seed(seed)`` right before each model is built. Train data
``toy_dataset(name, 20_000, seed)``; test data the first ``--test-size`` (5,000) points of
``toy_dataset(name, 10_000, seed + 1000)``.

Recorded per set and model, after training (``eval`` mode, no grad):

* test NLL: mean ``-log_prob`` over the test points, in nats (the regularised model is evaluated
  by its plain ``log_prob``, without the regularisation terms);
* NFE: velocity-network evaluations of that one log_prob solve (data -> noise, over the whole test
  batch at once, so it is also the NFE per sample) and of one sampling solve of ``--test-size``
  points (noise -> data; ``sample`` integrates the trajectory alone, without the trace, in both
  libraries, so the solver's step control sees only x). flowforge reports ``flow.last_nfe``; for
  zuko the velocity network's ``forward`` is wrapped with a counter;
* the median wall time of one training step (forward, backward, clipping, optimizer, scheduler).

Goal checks, per set: regularised log_prob NFE <= 0.5 x unregularised; regularised test NLL within
0.05 nats of unregularised; flowforge (unregularised) median step time below zuko's. Next to them
the script measures dopri5's floor at the same tolerance: the NFE of both solves for a translation
(``Translation``), on which the error estimate is zero. When the floor exceeds half the
unregularised NFE the halving is out of reach of any regulariser, and the check says so.

Why these sets: RNODE's NFE savings are reported where the unregularised dynamics are hard to solve.
On moons and 8gaussians (still selectable with ``--datasets``) the unregularised model needs only
3-4 dopri5 steps, so there is little to save; pinwheel and checkerboard have more structure. Even
there the unregularised model needs 26-32 log_prob NFE after 1,000 steps and 50-68 after 5,000
(pinwheel, spirals; checkerboard stays at 32), while dopri5 at 1e-5 spends 20 on a translation (3
steps of 6 evaluations plus 2 to choose the first step; torchdiffeq's first step is small by
design and grows at most tenfold per step). The regularised models sit at 20-32: on checkerboard
at the floor itself. With the defaults the NLL goal holds on both sets and the NFE goal on neither
(ratios 1.00 and 0.77; the floor is above half of both unregularised figures). After 5,000 steps
on spirals the ratio reaches 0.47 at weights 0.01 and above, but at +0.26 nats or more.

Differences that remain between the libraries: zuko embeds time as ``cos/sin(k pi t)``, k = 1..3
(6 inputs instead of 1, so a slightly larger first layer: both parameter counts are printed); zuko
backpropagates with its adaptive checkpoint adjoint (the backward pass re-runs the solver steps),
flowforge through the solver's operations (``adjoint=False``); zuko scales the log-det state by
1e-2 inside the solver, which loosens its error control on that state.

PyTorch runs with ``--threads`` threads (default 1): these networks are tiny, and on a small shared
machine more threads mostly spin against each other and make the timings erratic.

The table is printed and also written as JSON to ``benchmarks/results/cnf_regularisation.json`` (``--results``).

How to run
----------
Needs the ``bench`` extra (``pip install -e .[bench]``, for zuko)::

    python benchmarks/cnf_regularisation.py
    python benchmarks/cnf_regularisation.py --steps 600 --datasets moons 8gaussians --lambda-k 0.01 --lambda-j 0.01
    python benchmarks/cnf_regularisation.py --models ff-mle ff-rnode --rnode-train-method dopri5

The defaults (2 sets x 3 models x 1000 steps, hidden 64 64) take about 8 minutes on a shared 2-core
CPU machine (one torch thread).
The README's longer runs add ``--steps 5000 --datasets pinwheel spirals --models ff-mle ff-rnode
--lambda-k 0.1 --lambda-j 0.1`` (about 30 minutes).
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
    RESULTS_DIR,
    LogProb,
    batch_indices,
    nonnegative_float,
    parameter_count,
    positive_float,
    positive_int,
    seed_int,
    test_nll,
    toy_split,
    train,
    training_setup,
    write_results,
)
from flowforge.data import TOY_DATASETS
from flowforge.flows import CNF
from flowforge.ode import TABLEAUS
from flowforge.transforms.continuous import ContinuousFlowTransform

FEATURES = 2
NFE_RATIO_GOAL = 0.5  # regularised NFE <= NFE_RATIO_GOAL x unregularised NFE
NLL_TOLERANCE = 0.05  # nats: regularised NLL <= unregularised NLL + NLL_TOLERANCE
MODELS = ("ff-mle", "ff-rnode", "zuko-mle")
RESULTS = RESULTS_DIR / "cnf_regularisation.json"


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
        transform = self.flow.transform
        # RNODE may train with a fixed-step solver (steps, no tolerance); evaluation always uses
        # dopri5 at --tol (tolerances, no step count).
        fixed = args.rnode_train_method in TABLEAUS
        training = (
            (args.rnode_train_method, args.rnode_train_steps, None, None)
            if fixed
            else ("dopri5", None, args.tol, args.tol)
        )
        evaluation = (transform.method, transform.steps, transform.atol, transform.rtol)

        def regularised(x: Tensor) -> Tensor:
            transform.set_solver(*training)
            try:
                log_prob, kinetic, jacobian = self.flow.log_prob_and_regularization(x)
            finally:
                transform.set_solver(*evaluation)
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


class Translation(nn.Module):
    """``v(x, t) = c`` everywhere: straight constant-speed paths and zero divergence.

    dopri5's error estimate is exactly zero on it, so its NFE is what the step control spends on
    the easiest field there is: the start-up steps and the tenfold growth limit alone. (The first
    step depends weakly on the speed, so a model's own floor can differ by one step.)
    """

    def __init__(self, velocity: Tensor) -> None:
        super().__init__()
        self.register_buffer("velocity", velocity)

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None) -> Tensor:
        return x * 0 + self.velocity  # depends on x (with zero derivative) so the trace has a graph


def solver_floor(test_x: Tensor, tol: float) -> tuple[int, int]:
    """dopri5's NFE at ``tol`` for a translation by one standard deviation of the data per unit
    time: ``(log_prob solve, sampling solve)``, the same two solves the models are measured on."""
    transform = ContinuousFlowTransform(Translation(test_x.std(0)), FEATURES, atol=tol, rtol=tol)
    with torch.no_grad():  # the models' NFE is measured without a graph too
        transform.forward(test_x)
        log_prob_nfe = transform.last_nfe
        transform.inverse_without_logdet(torch.randn_like(test_x))
    return log_prob_nfe, transform.last_nfe


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


def goal_checks(results: list[RunResult], floors: dict[str, tuple[int, int]]) -> dict[str, dict[str, float | bool]]:
    by_key = {(r.dataset, r.model): r for r in results}
    checks: dict[str, dict[str, float | bool]] = {}
    for dataset in dict.fromkeys(r.dataset for r in results):
        mle, reg, zk = (by_key.get((dataset, m)) for m in MODELS)
        floor_log_prob, floor_sample = floors[dataset]
        check: dict[str, float | bool] = {"nfe_floor_log_prob": floor_log_prob, "nfe_floor_sample": floor_sample}
        if mle is not None and reg is not None:
            nfe_ratio = reg.nfe_log_prob / max(mle.nfe_log_prob, 1)
            nll_diff = reg.test_nll - mle.test_nll
            check |= {
                "nfe_ratio": nfe_ratio,
                "nfe_sample_ratio": reg.nfe_sample / max(mle.nfe_sample, 1),
                # Out of reach of any regulariser when even a translation costs more.
                "nfe_goal_reachable": floor_log_prob <= NFE_RATIO_GOAL * mle.nfe_log_prob,
                "nfe_pass": nfe_ratio <= NFE_RATIO_GOAL,
                "nll_difference": nll_diff,
                "nll_pass": nll_diff <= NLL_TOLERANCE,
            }
        if mle is not None and zk is not None:
            step_ratio = mle.median_step_s / zk.median_step_s
            check |= {"step_time_ratio": step_ratio, "step_time_pass": step_ratio < 1.0}
        checks[dataset] = check
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
        parts = []
        if "nfe_ratio" in c:
            floor = c["nfe_floor_log_prob"]
            reachable = "" if c["nfe_goal_reachable"] else f", out of reach: a translation needs {floor}"
            parts += [
                f"NFE rnode/mle {c['nfe_ratio']:.2f} -> {verdict(c['nfe_pass'])} (goal <= {NFE_RATIO_GOAL}{reachable})",
                f"sampling NFE rnode/mle {c['nfe_sample_ratio']:.2f}",
                f"NLL rnode - mle {c['nll_difference']:+.4f} -> {verdict(c['nll_pass'])} (goal <= {NLL_TOLERANCE})",
            ]
        if "step_time_ratio" in c:
            parts.append(f"step time ff/zuko {c['step_time_ratio']:.2f} -> {verdict(c['step_time_pass'])} (goal < 1)")
        if parts:
            print(f"{dataset}: " + "; ".join(parts))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=positive_int, default=1000, help="training steps (default 1000)")
    parser.add_argument("--batch", type=positive_int, default=256, help="minibatch size (default 256)")
    parser.add_argument(
        "--hidden", type=positive_int, nargs="+", default=[64, 64], help="hidden widths (default 64 64)"
    )
    parser.add_argument("--tol", type=positive_float, default=1e-5, help="dopri5 atol = rtol (default 1e-5)")
    parser.add_argument("--lambda-k", type=nonnegative_float, default=0.05, help="kinetic-energy weight (default 0.05)")
    parser.add_argument("--lambda-j", type=nonnegative_float, default=0.05, help="Jacobian-norm weight (default 0.05)")
    parser.add_argument(
        "--rnode-train-method",
        default="rk4",
        choices=["dopri5", *TABLEAUS],
        help="solver of ff-rnode's training solves (default rk4; dopri5 means at --tol); evaluation: dopri5 at --tol",
    )
    parser.add_argument(
        "--rnode-train-steps",
        type=positive_int,
        default=4,
        help="steps of a fixed-step --rnode-train-method (default 4)",
    )
    parser.add_argument("--test-size", type=positive_int, default=5000, help="test points (default 5000)")
    parser.add_argument("--seed", type=seed_int, default=0, help="seed (default 0)")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=["pinwheel", "checkerboard"],
        choices=sorted(TOY_DATASETS),
        help="2-D data sets",
    )
    parser.add_argument(
        "--models", nargs="+", default=list(MODELS), choices=MODELS, help="models to train (default: all three)"
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"JSON written at the end (default {RESULTS})")
    args = parser.parse_args(argv)
    if args.results.is_dir() or not args.results.name:
        parser.error(f"--results {args.results}: give a file name")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"CNF on {', '.join(args.datasets)}: hidden={tuple(args.hidden)}, exact trace, dopri5 tol={args.tol}, "
        f"steps={args.steps}, batch={args.batch}, lambda_k={args.lambda_k}, lambda_j={args.lambda_j}, "
        f"ff-rnode trains with {args.rnode_train_method}"
        f"{f' x {args.rnode_train_steps} steps' if args.rnode_train_method != 'dopri5' else ''}, "
        f"seed={args.seed}, torch threads={torch.get_num_threads()}"
    )
    start = time.perf_counter()
    results: list[RunResult] = []
    floors: dict[str, tuple[int, int]] = {}
    for dataset in args.datasets:
        torch.manual_seed(args.seed)
        floor_log_prob, floor_sample = floors[dataset] = solver_floor(
            toy_split(dataset, args.seed)[1][: args.test_size], args.tol
        )
        print(f"  {dataset}: dopri5 floor (a translation) {floor_log_prob} NFE log_prob, {floor_sample} sampling")
        for name in (m for m in MODELS if m in args.models):
            result = run(dataset, name, args)
            results.append(result)
            print(
                f"  {dataset} {name:<8} test NLL {result.test_nll:.4f}, NFE {result.nfe_log_prob} "
                f"({result.wall_s:.0f} s)",
                flush=True,
            )
    checks = goal_checks(results, floors)
    print_table(results, checks)
    total = time.perf_counter() - start
    print(f"total wall time {total:.0f} s")

    payload = {
        "config": {
            "datasets": list(args.datasets),
            "models": [m for m in MODELS if m in args.models],
            "features": FEATURES,
            "hidden": list(args.hidden),
            "trace": "exact",
            "method": "dopri5",
            "tol": args.tol,
            "steps": args.steps,
            "batch": args.batch,
            "lambda_k": args.lambda_k,
            "lambda_j": args.lambda_j,
            "rnode_train_method": args.rnode_train_method,
            "rnode_train_steps": args.rnode_train_steps if args.rnode_train_method != "dopri5" else None,
            "seed": args.seed,
            **training_setup(args.test_size),
        },
        "runs": [asdict(r) for r in results],
        "checks": checks,
        "total_wall_s": total,
    }
    write_results(args.results, payload)


if __name__ == "__main__":
    main()
