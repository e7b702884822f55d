"""Benchmark: chunk latency of the flow policy, this tree against an earlier revision, in one run.

What it measures
----------------
The time to produce one action chunk (batch 1, one thread, ``predict_chunk`` with the prefix's KV
cache and without it) for the flow policy at the MT10 benchmark's size (``configs/policy/mt10.toml``:
width 64, 3 layers, 4 heads, chunks of 16, 10 Euler steps; 39-d state, 4-d actions, language
token over ten instructions). Latency does not depend on the weights' values, so each side builds
its policy from the same config with random weights.

The earlier revision's ``src`` is taken from git (``git archive``) into a temporary folder. The two
sides run in separate processes, alternately (before, after, after, before, ...) for ``--rounds``
rounds of ``--repeats`` chunks each, so that drifts in the machine's speed reach both alike. The
table gives the median over all chunks of each side and the ratio after / before.

Goal: the cached 10-step chunk of this tree within 5% of the earlier revision's (ratio <= 1.05).

How to run
----------
::

    python benchmarks/policy_latency_change.py --before 5123853   # the revision before the split into parts
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

from common import RESULTS_DIR, positive_int, write_json  # benchmarks/ is on sys.path

ROOT = Path(__file__).resolve().parents[1]

MEASURE = r"""
import json, sys, torch
torch.set_num_threads(1)
from flowforge.policy import PolicyConfig, build_policy
repeats = int(sys.argv[1])
instructions = [f"task {i}" for i in range(10)]
config = PolicyConfig(kind="flow", state_dim=39, action_dim=4, horizon=16, n_action_steps=8, width=64, layers=3,
                      heads=4, language=True, instructions=instructions, sampling_steps=10)
torch.manual_seed(0)
policy = build_policy(config).eval()
policy.set_instruction_embeddings(torch.nn.functional.normalize(torch.randn(10, 384), dim=1))
batch = {"state": torch.randn(1, 1, 39), "task_index": torch.tensor([3])}
noise = torch.randn(1, 16, 4)
times = {"cached": [], "uncached": []}
for i in range(repeats + 5):
    for name, use_cache in (("cached", True), ("uncached", False)):
        result = policy.predict_chunk(batch, use_cache=use_cache, noise=noise)
        assert result.nfe == 10
        if i >= 5:
            times[name].append(result.seconds)
print(json.dumps(times))
"""


def _extract(revision: str, into: Path) -> Path:
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", revision, "src"], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def _measure(source: Path, repeats: int) -> dict[str, list[float]]:
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, str(repeats)],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(source), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="5123853", help="the earlier git revision")
    parser.add_argument("--rounds", type=positive_int, default=6)
    parser.add_argument("--repeats", type=positive_int, default=100, help="chunks per round and side")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "policy_latency_change.json")
    args = parser.parse_args()
    if args.out.is_dir() or not args.out.name:
        parser.error(f"--out {args.out}: give a file name")
    revision = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{args.before}^{{commit}}"], cwd=ROOT)
    if revision.returncode != 0:
        parser.error(f"--before {args.before!r}: not a revision of this repository")
    sides = {"after": ROOT / "src"}
    with tempfile.TemporaryDirectory() as folder:
        sides["before"] = _extract(args.before, Path(folder))
        times = {side: {"cached": [], "uncached": []} for side in sides}
        for round_index in range(args.rounds):
            order = ("before", "after") if round_index % 2 == 0 else ("after", "before")
            for side in order:
                measured = _measure(sides[side], args.repeats)
                for name, values in measured.items():
                    times[side][name].extend(values)
            print(f"round {round_index + 1}/{args.rounds} done", flush=True)
    medians = {side: {name: 1000 * statistics.median(v) for name, v in t.items()} for side, t in times.items()}
    print(f"\nChunk latency, flow policy at MT10 size, batch 1, 1 thread (median of {args.rounds * args.repeats})")
    print(f"{'':10s} {'before ' + args.before:>18s} {'after (this tree)':>18s} {'after / before':>15s}")
    for name in ("cached", "uncached"):
        before, after = medians["before"][name], medians["after"][name]
        print(f"{name:10s} {before:15.3f} ms {after:15.3f} ms {after / before:14.3f}x")
    ratio = medians["after"]["cached"] / medians["before"]["cached"]
    print(f"\nGoal: cached within 5% of before: {'PASS' if ratio <= 1.05 else 'FAIL'} ({ratio:.3f}x)")
    write_json(args.out, {"before": args.before, "medians_ms": medians, "cached_ratio": ratio})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
