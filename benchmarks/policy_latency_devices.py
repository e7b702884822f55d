"""Benchmark: chunk latency of every policy head on this machine's CPU or a CUDA GPU, eager, in
bf16, as a CUDA graph of the sampling loop and through ``torch.compile``.

What it measures
----------------
The time from an observation on the host to its action chunk on the host, at the size of the MT10
benchmarks (``configs/policy/mt10.toml``: width 64, 3 layers, 4 heads, chunks of 16 of 4-d actions,
39-d state, a language token over ten instructions), for the 10-step flow head and the one-step
``shortcut``, ``meanflow`` and ``consistency`` heads, at batch 1 (a robot) and 64 (a fleet, or
evaluation). Latency does not depend on the weights' values, so each policy is built from the
config with random weights (the instruction table filled with random unit vectors).

Ways of running one chunk (``mode``):

* ``eager``: :meth:`~flowforge.policy.ChunkPolicy.predict_chunk` as evaluation calls it (input
  checks, the prefix's KV cache, the finiteness check of the chunk), float32.
* ``eager-bf16``: the same under ``torch.autocast`` to bfloat16.
* ``graph`` and ``graph-bf16`` (CUDA only): the sampling computation
  (:meth:`~flowforge.policy.ChunkPolicy.chunk_from_noise`: encoder, prefix cache, every solver
  step, unnormalisation) captured once as a CUDA graph for the batch size and step count,
  then replayed: the observation and noise are copied into the graph's input buffers and the chunk
  out of its output buffer. The chunk is checked for finiteness on the host, as ``predict_chunk``
  checks it.
* ``compile`` (flow head only; compiling takes tens of seconds per shape): the same computation
  through ``torch.compile`` in its default mode.

Every case is run alternately (one chunk of each case per round, ``--repeats`` rounds after
``--warmup``), so drifts in the machine's speed reach all alike; the table gives medians in
milliseconds. A CPU run uses one thread (``torch.set_num_threads(1)``), as a control loop sharing
its cores would. With the same noise, each graph's chunk is compared with ``eager``'s (float32:
the same computation; bf16: the rounding it costs).

How to run
----------
::

    python benchmarks/policy_latency_devices.py                      # CPU, one thread
    python benchmarks/policy_latency_devices.py --device cuda        # a CUDA GPU

Results go to ``benchmarks/results/policy_latency_<device>.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import Tensor

from common import RESULTS_DIR, nonnegative_int, positive_int, write_json  # benchmarks/ is on sys.path
from flowforge.policy import ChunkPolicy, PolicyConfig, build_policy

#: Each head and the solver steps it samples with.
HEADS = {"flow": 10, "shortcut": 1, "meanflow": 1, "consistency": 1}
BATCHES = (1, 64)
STATE_DIM, ACTION_DIM, HORIZON, TASKS = 39, 4, 16, 10


def mt10_policy(kind: str, device: torch.device) -> ChunkPolicy:
    """A policy of the MT10 benchmarks' size with random weights."""
    config = PolicyConfig(
        kind=kind,
        state_dim=STATE_DIM,
        action_dim=ACTION_DIM,
        horizon=HORIZON,
        n_action_steps=8,
        width=64,
        layers=3,
        heads=4,
        language=True,
        instructions=[f"task {i}" for i in range(TASKS)],
        sampling_steps=HEADS[kind],
    )
    torch.manual_seed(0)
    policy = build_policy(config).eval()
    policy.set_instruction_embeddings(torch.nn.functional.normalize(torch.randn(TASKS, 384), dim=1))
    return policy.to(device)


def autocast(device: torch.device, bf16: bool, cache: bool = True):
    """bfloat16 autocast, or nothing; ``cache=False`` inside a CUDA graph capture (cast weights
    cached across the capture's boundary would be freed under the graph)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache) if bf16 else nullcontext()


def sampling_function(policy: ChunkPolicy, steps: int) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """``(state, task_index, noise) -> actions`` on tensors of fixed shapes, as a CUDA graph or
    ``torch.compile`` needs it (:meth:`~flowforge.policy.ChunkPolicy.chunk_from_noise`)."""
    sampling = policy.sampling(steps)

    def sample(state: Tensor, task_index: Tensor, noise: Tensor) -> Tensor:
        return policy.chunk_from_noise({"state": state, "task_index": task_index}, noise, sampling)[0]

    return sample


def _checked_on_host(actions: Tensor) -> Tensor:
    """The host copy of a chunk, refused when not finite (as ``predict_chunk`` refuses it)."""
    if not bool(torch.isfinite(actions).all()):
        raise RuntimeError("a non-finite chunk")
    return actions


class Case:
    """One way of running one head at one batch size: ``run(state, task_index, noise)`` takes host
    tensors and returns the chunk on the host."""

    def __init__(self, head: str, rows: int, mode: str, run: Callable[[Tensor, Tensor, Tensor], Tensor]) -> None:
        self.head, self.rows, self.mode, self.run = head, rows, mode, run
        self.times: list[float] = []

    @property
    def name(self) -> str:
        return f"{self.head}@{HEADS[self.head]}, batch {self.rows}, {self.mode}"


def eager_case(policy: ChunkPolicy, head: str, rows: int, bf16: bool) -> Case:
    device = policy.state_normalizer.shift.device

    def run(state: Tensor, task_index: Tensor, noise: Tensor) -> Tensor:
        with autocast(device, bf16):
            result = policy.predict_chunk({"state": state, "task_index": task_index.to(device)}, noise=noise)
        return result.actions.float().cpu()

    return Case(head, rows, "eager-bf16" if bf16 else "eager", run)


def graph_case(policy: ChunkPolicy, head: str, rows: int, bf16: bool, example: tuple[Tensor, ...]) -> Case:
    """The sampling computation captured as a CUDA graph (after warm-up runs on a side stream, as
    capture requires), replayed with the inputs copied into its buffers."""
    device = policy.state_normalizer.shift.device
    sample = sampling_function(policy, HEADS[head])
    inputs = [tensor.to(device) for tensor in example]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.inference_mode(), autocast(device, bf16, cache=False):
        for _ in range(3):
            sample(*inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph), autocast(device, bf16, cache=False):
        output = sample(*inputs)

    def run(state: Tensor, task_index: Tensor, noise: Tensor) -> Tensor:
        for buffer, value in zip(inputs, (state, task_index, noise), strict=True):
            buffer.copy_(value, non_blocking=True)
        graph.replay()
        return _checked_on_host(output.float().cpu())

    return Case(head, rows, "graph-bf16" if bf16 else "graph", run)


def compiled_case(policy: ChunkPolicy, head: str, rows: int, example: tuple[Tensor, ...]) -> Case:
    device = policy.state_normalizer.shift.device
    compiled = torch.compile(sampling_function(policy, HEADS[head]), dynamic=False)
    start = time.perf_counter()
    with torch.inference_mode():
        compiled(*(tensor.to(device) for tensor in example))
    print(f"  compiled {head} at batch {rows} in {time.perf_counter() - start:.0f} s", flush=True)

    def run(state: Tensor, task_index: Tensor, noise: Tensor) -> Tensor:
        with torch.inference_mode():
            return _checked_on_host(compiled(state.to(device), task_index.to(device), noise.to(device)).cpu())

    return Case(head, rows, "compile", run)


def inputs_for(rows: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = torch.randn(rows, 1, STATE_DIM, generator=generator)
    task_index = torch.randint(0, TASKS, (rows,), generator=generator)
    noise = torch.randn(rows, HORIZON, ACTION_DIM, generator=generator)
    return state, task_index, noise


def build_cases(device: torch.device, modes: list[str], compile_batches: tuple[int, ...]) -> tuple[list[Case], dict]:
    """Every case, and each graph's and bf16 run's largest difference from eager float32 (same noise)."""
    cases: list[Case] = []
    agreement: dict[str, float] = {}
    failures: dict[str, str] = {}
    for head in HEADS:
        policy = mt10_policy(head, device)
        for rows in BATCHES:
            example = inputs_for(rows, seed=rows)
            reference = eager_case(policy, head, rows, False)
            expected = reference.run(*example)
            built = [reference]
            for mode in modes:
                try:
                    if mode == "eager-bf16":
                        built.append(eager_case(policy, head, rows, True))
                    elif mode in ("graph", "graph-bf16"):
                        built.append(graph_case(policy, head, rows, mode == "graph-bf16", example))
                    elif mode == "compile" and head == "flow" and rows in compile_batches:
                        built.append(compiled_case(policy, head, rows, example))
                except Exception as error:  # a mode this machine cannot run is reported, not fatal
                    failures[f"{head}@{HEADS[head]}, batch {rows}, {mode}"] = f"{type(error).__name__}: {error}"[:300]
                    print(f"  {head}, batch {rows}, {mode}: failed ({type(error).__name__}: {error})", flush=True)
            for case in built[1:]:
                agreement[case.name] = float((case.run(*example) - expected).abs().max())
            cases += built
    return cases, {"max_abs_difference_from_eager": agreement, "failures": failures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=positive_int, default=100)
    parser.add_argument("--warmup", type=nonnegative_int, default=10)
    parser.add_argument("--no-compile", action="store_true", help="leave torch.compile out (it takes minutes)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.device not in ("cpu", "cuda"):
        parser.error(f"--device {args.device!r}: must be cpu or cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this machine has no CUDA GPU that torch can use")
    if args.out is not None and (args.out.is_dir() or not args.out.name):
        parser.error(f"--out {args.out}: give a file name")
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    # The solver's stage-time cache is traced through: its tensors become constants of the graph.
    warnings.filterwarnings("ignore", message=".*functools.lru_cache")
    out = args.out or RESULTS_DIR / f"policy_latency_{device.type}.json"
    modes = ["eager-bf16"] + (["graph", "graph-bf16"] if device.type == "cuda" else [])
    modes += [] if args.no_compile else ["compile"]
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"torch {torch.__version__}, {hardware}, threads {torch.get_num_threads()}", flush=True)

    cases, checks = build_cases(device, modes, BATCHES)
    inputs = {rows: inputs_for(rows, seed=100 + rows) for rows in BATCHES}
    for repeat in range(args.warmup + args.repeats):
        for case in cases:
            start = time.perf_counter()
            case.run(*inputs[case.rows])
            if repeat >= args.warmup:
                case.times.append(time.perf_counter() - start)
    medians = {case.name: 1000 * statistics.median(case.times) for case in cases}

    columns = ["eager", *modes]
    print(f"\nChunk latency, host to host, medians of {args.repeats} (ms) on {hardware}")
    for rows in BATCHES:
        print(f"\nbatch {rows}")
        print(f"{'head':16s}" + "".join(f"{mode:>13s}" for mode in columns) + f"{'best/eager':>12s}")
        for head, steps in HEADS.items():
            values = [medians.get(f"{head}@{steps}, batch {rows}, {mode}") for mode in columns]
            known = [v for v in values if v is not None]
            cells = "".join(f"{v:13.3f}" if v is not None else f"{'-':>13s}" for v in values)
            print(f"{head + f'@{steps}':16s}{cells}{values[0] / min(known):11.1f}x")
    print("\nLargest difference from eager float32 with the same noise (action units):")
    for name, value in checks["max_abs_difference_from_eager"].items():
        print(f"  {name}: {value:.2e}")
    for name, message in checks["failures"].items():
        print(f"  failed: {name}: {message}")
    payload = {"device": hardware, "torch": torch.__version__, "repeats": args.repeats, "medians_ms": medians, **checks}
    write_json(out, payload)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
