"""Benchmark: speed of flowforge's autoregressive flows (MAF, NSF) against zuko, normflows and nflows.

What it measures
----------------
For every model (MAF: affine MADE transforms; NSF: autoregressive rational-quadratic splines) and
feature count, each library builds the same architecture: ``transforms`` autoregressive layers whose
MADE conditioner has the hidden widths ``hidden`` (ReLU, no batch norm, no residual blocks, no
dropout), the feature order reversed between consecutive layers, a fixed N(0, I) base, and for NSF
``bins`` bins on ``[-5, 5]`` with linear (identity) tails outside. Built per library:

* flowforge: ``flowforge.flows.MAF`` / ``flowforge.flows.NSF``;
* zuko: ``zuko.flows.MAF`` / ``zuko.flows.NSF`` (alternating orders, ``hidden_features=hidden``);
* normflows: ``MaskedAffineAutoregressive`` / ``MaskedPiecewiseRationalQuadraticAutoregressive``
  layers with a reversing ``Permute`` between them. normflows runs density evaluation through each
  layer's ``inverse``, and ``MaskedAffineAutoregressive.inverse`` is the sequential pass (used as is
  it is an IAF), so both kinds of layer are wrapped in ``normflows.flows.Reverse`` to make the
  density pass the parallel one; that is also all its ``AutoregressiveRationalQuadraticSpline``
  wrapper does, but that wrapper forces residual blocks, hence the layer underneath;
* nflows: ``MaskedAffineAutoregressiveTransform`` / ``MaskedPiecewiseRationalQuadraticAutoregressive
  Transform`` with ``ReversePermutation`` between them.

The MADE of normflows and nflows has one width (``hidden_features``) and ``num_blocks`` blocks after
its first layer, so ``hidden=(64, 64)`` is ``hidden_features=64, num_blocks=1``: the same weight
shapes and parameter count as the others, but its first layer has no activation after it (one ReLU
where zuko has two). Every side's trainable-parameter count is printed.

Two timings per (model, features, library), in milliseconds:

* ``train``: one training step, ``-log_prob(x).mean()`` on a fixed batch of ``batch`` standard
  normal points and ``backward()`` (gradients set to None before each step, outside the timer; no
  optimizer step);
* ``sample``: drawing ``samples`` points under ``torch.no_grad()``.

After ``warmup`` untimed calls each, the libraries are timed in interleaved rounds (one call per
library per round, the order rotating) so that load changes on a shared machine hit all of them
alike; the table reports the median over the rounds, and the ratios flowforge / peer of those
medians. Goal checks: the flowforge training step at least 1.3x faster than the fastest peer for
every (model, features), and flowforge's MAF sampling with 32 features at least 2x faster than zuko's.
flowforge's NaN/inf input scan stays on (as users get it) unless ``--no-finite-checks``.

The tables are printed and also written as JSON to ``benchmarks/results/autoregressive_speed.json``.

How to run
----------
Needs the ``bench`` extra (``pip install -e .[bench]``, for zuko, normflows and nflows)::

    python benchmarks/autoregressive_speed.py
    python benchmarks/autoregressive_speed.py --models MAF --features 32 --train-repeats 31

The defaults take 2-3 minutes on 2 idle CPU cores, most of it the peers' NSF sampling with 32 features.
"""

from __future__ import annotations

import argparse
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

import torch
from torch import Tensor, nn

import flowforge.validation
from common import RESULTS_DIR, nonnegative_int, parameter_count, positive_int, seed_int, write_results

MODELS = ("MAF", "NSF")
LIBRARIES = ("flowforge", "zuko", "normflows", "nflows")
PEERS = LIBRARIES[1:]
METRICS = ("train", "sample")
BOUND = 5.0  # spline interval [-BOUND, BOUND]: zuko's NSF fixes it at 5
TRAIN_SPEEDUP = 1.3  # goal: flowforge training step <= fastest peer / TRAIN_SPEEDUP
SAMPLE_SPEEDUP = 2.0  # goal: flowforge MAF sampling (32 features) <= zuko / SAMPLE_SPEEDUP
SAMPLE_GOAL_FEATURES = 32
RESULTS = RESULTS_DIR / "autoregressive_speed.json"


@dataclass
class Built:
    """One library's flow and the two calls that are timed."""

    module: nn.Module
    log_prob: Callable[[Tensor], Tensor]
    sample: Callable[[int], Tensor]


@dataclass
class Config:
    model: str
    features: int
    transforms: int
    hidden: tuple[int, ...]
    bins: int


# -- builders ---------------------------------------------------------------------------------


def build_flowforge(cfg: Config) -> Built:
    from flowforge.flows import MAF, NSF

    if cfg.model == "MAF":
        flow = MAF(cfg.features, transforms=cfg.transforms, hidden=cfg.hidden)
    else:
        flow = NSF(cfg.features, transforms=cfg.transforms, hidden=cfg.hidden, bins=cfg.bins, bound=BOUND)
    return Built(flow, flow.log_prob, flow.sample)


def build_zuko(cfg: Config) -> Built:
    import zuko

    if cfg.model == "MAF":
        flow = zuko.flows.MAF(cfg.features, transforms=cfg.transforms, hidden_features=cfg.hidden)
    else:
        flow = zuko.flows.NSF(cfg.features, bins=cfg.bins, transforms=cfg.transforms, hidden_features=cfg.hidden)
    return Built(flow, lambda x: flow().log_prob(x), lambda n: flow().sample((n,)))


def made_size(cfg: Config, library: str) -> tuple[int, int]:
    """(hidden_features, num_blocks) of a feedforward nflows-style MADE with ``cfg.hidden``."""
    if len(cfg.hidden) < 2 or len(set(cfg.hidden)) != 1:
        raise ValueError(
            f"{library}'s MADE takes one hidden width and no activation after its first layer; "
            f"hidden={cfg.hidden} needs at least two equal widths"
        )
    return cfg.hidden[0], len(cfg.hidden) - 1


def build_normflows(cfg: Config) -> Built:
    import normflows as nf
    from normflows.flows.neural_spline.autoregressive import MaskedPiecewiseRationalQuadraticAutoregressive

    width, blocks = made_size(cfg, "normflows")
    reverse = torch.arange(cfg.features - 1, -1, -1)
    layers: list[nn.Module] = []
    for i in range(cfg.transforms):
        if i > 0:
            permute = nf.flows.Permute(cfg.features, mode="shuffle")
            permute.perm, permute.inv_perm = reverse.clone(), reverse.clone()
            layers.append(permute)
        if cfg.model == "MAF":
            layer = nf.flows.MaskedAffineAutoregressive(
                cfg.features, width, num_blocks=blocks, use_residual_blocks=False, use_batch_norm=False
            )
        else:
            layer = MaskedPiecewiseRationalQuadraticAutoregressive(
                cfg.features,
                width,
                num_bins=cfg.bins,
                tails="linear",
                tail_bound=BOUND,
                num_blocks=blocks,
                use_residual_blocks=False,
                use_batch_norm=False,
            )
        # normflows' log_prob calls inverse(): Reverse makes that the parallel (density) pass.
        layers.append(nf.flows.Reverse(layer))
    flow = nf.NormalizingFlow(nf.distributions.DiagGaussian(cfg.features, trainable=False), layers)
    return Built(flow, flow.log_prob, lambda n: flow.sample(n)[0])


def build_nflows(cfg: Config) -> Built:
    from nflows.distributions.normal import StandardNormal
    from nflows.flows.base import Flow
    from nflows.transforms import (
        CompositeTransform,
        MaskedAffineAutoregressiveTransform,
        MaskedPiecewiseRationalQuadraticAutoregressiveTransform,
        ReversePermutation,
    )

    width, blocks = made_size(cfg, "nflows")
    layers: list[nn.Module] = []
    for i in range(cfg.transforms):
        if i > 0:
            layers.append(ReversePermutation(cfg.features))
        if cfg.model == "MAF":
            layer = MaskedAffineAutoregressiveTransform(
                cfg.features, width, num_blocks=blocks, use_residual_blocks=False, use_batch_norm=False
            )
        else:
            layer = MaskedPiecewiseRationalQuadraticAutoregressiveTransform(
                cfg.features,
                width,
                num_bins=cfg.bins,
                tails="linear",
                tail_bound=BOUND,
                num_blocks=blocks,
                use_residual_blocks=False,
                use_batch_norm=False,
            )
        layers.append(layer)
    flow = Flow(CompositeTransform(layers), StandardNormal([cfg.features]))
    return Built(flow, flow.log_prob, flow.sample)


BUILDERS: dict[str, Callable[[Config], Built]] = {
    "flowforge": build_flowforge,
    "zuko": build_zuko,
    "normflows": build_normflows,
    "nflows": build_nflows,
}


def build_checked(library: str, cfg: Config, x: Tensor, seed: int) -> Built:
    """Build ``library``'s flow and check the shapes and finiteness of both timed calls."""
    torch.manual_seed(seed)
    built = BUILDERS[library](cfg)
    built.module.train()
    log_prob = built.log_prob(x[:16])
    if log_prob.shape != (16,) or not torch.isfinite(log_prob).all():
        raise RuntimeError(f"log_prob gave shape {tuple(log_prob.shape)} or non-finite values")
    with torch.no_grad():
        sample = built.sample(16)
    if sample.shape != (16, cfg.features) or not torch.isfinite(sample).all():
        raise RuntimeError(f"sample gave shape {tuple(sample.shape)} or non-finite values")
    return built


# -- timing -----------------------------------------------------------------------------------


def train_call(built: Built, x: Tensor) -> tuple[Callable[[], None], Callable[[], None]]:
    params = [p for p in built.module.parameters() if p.requires_grad]

    def prepare() -> None:
        for p in params:
            p.grad = None

    def step() -> None:
        (-built.log_prob(x).mean()).backward()

    return prepare, step


def sample_call(built: Built, n: int) -> tuple[Callable[[], None], Callable[[], None]]:
    def step() -> None:
        with torch.no_grad():
            built.sample(n)

    return lambda: None, step


def interleaved_medians(
    calls: dict[str, tuple[Callable[[], None], Callable[[], None]]], warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Time every library's call in rounds (rotating order); returns all times in seconds."""
    for prepare, step in calls.values():
        for _ in range(warmup):
            prepare()
            step()
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            prepare, step = calls[name]
            prepare()
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times


@dataclass
class CaseResult:
    model: str
    features: int
    params: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    times_s: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # metric -> library -> times

    def median_ms(self, metric: str, library: str) -> float | None:
        times = self.times_s.get(metric, {}).get(library)
        return statistics.median(times) * 1e3 if times else None


def run_case(model: str, features: int, args: argparse.Namespace) -> CaseResult:
    cfg = Config(model, features, args.transforms, tuple(args.hidden), args.bins)
    result = CaseResult(model, features)
    x = torch.randn(args.batch, features, generator=torch.Generator().manual_seed(args.seed))
    built: dict[str, Built] = {}
    for library in args.libraries:
        try:
            built[library] = build_checked(library, cfg, x, args.seed)
        except Exception as error:  # a peer that cannot build this configuration is reported and skipped
            reason = f"{type(error).__name__}: {error}".splitlines()[0]
            result.skipped[library] = reason
            print(f"  {model} features={features}: {library} skipped ({reason})", flush=True)
            if args.verbose:
                traceback.print_exc()
            continue
        result.params[library] = parameter_count(built[library].module)
    train_calls = {name: train_call(b, x) for name, b in built.items()}
    result.times_s["train"] = interleaved_medians(train_calls, args.warmup, args.train_repeats)
    sample_calls = {name: sample_call(b, args.samples) for name, b in built.items()}
    result.times_s["sample"] = interleaved_medians(sample_calls, args.sample_warmup, args.sample_repeats)
    return result


# -- report -----------------------------------------------------------------------------------


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or denominator is None else numerator / denominator


def goal_checks(results: list[CaseResult]) -> list[dict[str, object]]:
    checks: list[dict[str, object]] = []
    for r in results:
        ff = r.median_ms("train", "flowforge")
        peers = {p: r.median_ms("train", p) for p in PEERS if r.median_ms("train", p) is not None}
        fastest = min(peers, key=peers.get) if peers else None
        value = ratio(ff, peers.get(fastest)) if fastest else None
        checks.append(
            {
                "check": f"{r.model} features={r.features}: train step flowforge / fastest peer ({fastest})",
                "ratio": value,
                "goal": f"<= 1/{TRAIN_SPEEDUP} = {1 / TRAIN_SPEEDUP:.3f}",
                "pass": value is not None and value <= 1 / TRAIN_SPEEDUP,
            }
        )
    for r in results:
        if r.model == "MAF" and r.features == SAMPLE_GOAL_FEATURES:
            value = ratio(r.median_ms("sample", "flowforge"), r.median_ms("sample", "zuko"))
            checks.append(
                {
                    "check": f"MAF features={r.features}: sampling flowforge / zuko",
                    "ratio": value,
                    "goal": f"<= 1/{SAMPLE_SPEEDUP:g} = {1 / SAMPLE_SPEEDUP:.3f}",
                    "pass": value is not None and value <= 1 / SAMPLE_SPEEDUP,
                }
            )
    return checks


def print_report(results: list[CaseResult], libraries: Sequence[str], checks: list[dict[str, object]]) -> None:
    peers = [p for p in libraries if p != "flowforge"]
    head = f"{'model':<5} {'feat':>4}"
    print("\ntrainable parameters")
    print(head + "".join(f"  {lib:>10}" for lib in libraries))
    for r in results:
        print(f"{r.model:<5} {r.features:>4}" + "".join(f"  {r.params.get(lib, 'n/a'):>10}" for lib in libraries))

    print("\nmedian time, ms")
    print(head + f" {'metric':>6}" + "".join(f"  {lib:>10}" for lib in libraries))
    for r in results:
        for metric in METRICS:
            row = "".join(f"  {fmt(r.median_ms(metric, lib), '.2f'):>10}" for lib in libraries)
            print(f"{r.model:<5} {r.features:>4} {metric:>6}" + row)

    if "flowforge" in libraries and peers:
        print("\nratio flowforge / peer (median times; < 1: flowforge faster)")
        print(head + f" {'metric':>6}" + "".join(f"  {'/' + p:>10}" for p in peers))
        for r in results:
            for metric in METRICS:
                ff = r.median_ms(metric, "flowforge")
                row = "".join(f"  {fmt(ratio(ff, r.median_ms(metric, p)), '.3f'):>10}" for p in peers)
                print(f"{r.model:<5} {r.features:>4} {metric:>6}" + row)

    skipped = [(r, lib, why) for r in results for lib, why in r.skipped.items()]
    if skipped:
        print("\nnot built")
        for r, lib, why in skipped:
            print(f"  {r.model} features={r.features} {lib}: {why}")

    if checks:
        print("\ngoal checks")
        for c in checks:
            verdict = "PASS" if c["pass"] else "FAIL"
            print(f"  {verdict}  {c['check']}: {fmt(c['ratio'], '.3f')} (goal {c['goal']})")


# -- main -------------------------------------------------------------------------------------


def library_versions() -> dict[str, str]:
    versions = {"torch": torch.__version__}
    for name in LIBRARIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS, help="flows (default MAF NSF)")
    parser.add_argument(
        "--features", type=positive_int, nargs="+", default=[8, 32], help="feature counts (default 8 32)"
    )
    parser.add_argument("--transforms", type=positive_int, default=5, help="autoregressive layers (default 5)")
    parser.add_argument(
        "--hidden", type=positive_int, nargs="+", default=[64, 64], help="MADE hidden widths (default 64 64)"
    )
    parser.add_argument("--bins", type=positive_int, default=8, help="spline bins for NSF (default 8)")
    parser.add_argument("--batch", type=positive_int, default=512, help="training batch size (default 512)")
    parser.add_argument(
        "--samples", type=positive_int, default=4096, help="points drawn per sampling call (default 4096)"
    )
    parser.add_argument("--train-repeats", type=positive_int, default=15, help="timed training steps (default 15)")
    parser.add_argument("--sample-repeats", type=positive_int, default=5, help="timed sampling calls (default 5)")
    parser.add_argument("--warmup", type=nonnegative_int, default=3, help="untimed training steps first (default 3)")
    parser.add_argument(
        "--sample-warmup", type=nonnegative_int, default=1, help="untimed sampling calls first (default 1)"
    )
    parser.add_argument(
        "--libraries", nargs="+", default=list(LIBRARIES), choices=LIBRARIES, help="libraries (default all)"
    )
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=seed_int, default=0, help="seed for the data and the weights (default 0)")
    parser.add_argument(
        "--no-finite-checks", action="store_true", help="turn off flowforge's NaN/inf input scan while timing"
    )
    parser.add_argument("--verbose", action="store_true", help="print the traceback of a library that fails to build")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.libraries = [lib for lib in LIBRARIES if lib in args.libraries]
    versions = library_versions()
    print(
        f"autoregressive flows: transforms={args.transforms}, hidden={tuple(args.hidden)}, bins={args.bins}, "
        f"batch={args.batch}, samples={args.samples}, repeats train/sample={args.train_repeats}/"
        f"{args.sample_repeats} (warm-up {args.warmup}/{args.sample_warmup}), "
        f"flowforge finite checks {'off' if args.no_finite_checks else 'on'}, "
        f"torch threads={torch.get_num_threads()}"
    )
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    results: list[CaseResult] = []
    with flowforge.validation.checks(finite=not args.no_finite_checks):
        for model in args.models:
            for features in args.features:
                start = time.perf_counter()
                results.append(run_case(model, features, args))
                print(f"  {model} features={features} done ({time.perf_counter() - start:.0f} s)", flush=True)
    checks = goal_checks(results) if "flowforge" in args.libraries else []
    print_report(results, args.libraries, checks)

    payload = {
        "config": {
            "models": list(args.models),
            "features": list(args.features),
            "transforms": args.transforms,
            "hidden": list(args.hidden),
            "bins": args.bins,
            "bound": BOUND,
            "batch": args.batch,
            "samples": args.samples,
            "train_repeats": args.train_repeats,
            "sample_repeats": args.sample_repeats,
            "warmup": args.warmup,
            "sample_warmup": args.sample_warmup,
            "flowforge_finite_checks": not args.no_finite_checks,
            "seed": args.seed,
            "torch_threads": torch.get_num_threads(),
            "versions": versions,
        },
        "cases": [
            {
                "model": r.model,
                "features": r.features,
                "params": r.params,
                "skipped": r.skipped,
                "median_ms": {m: {lib: r.median_ms(m, lib) for lib in r.times_s.get(m, {})} for m in METRICS},
                "times_s": r.times_s,
            }
            for r in results
        ],
        "checks": checks,
    }
    write_results(RESULTS, payload)


if __name__ == "__main__":
    main()
