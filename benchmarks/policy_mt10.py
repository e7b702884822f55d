"""Benchmark: flow-matching action policies against MSE regression and DDPM on MetaWorld.

What it measures
----------------
1. **MT10, state + language, one model for all ten tasks.** 50 expert demonstrations per task
   (``flowforge data collect``), then four policies with the same encoders, transformer, data,
   optimizer and number of steps (``configs/policy/mt10.toml``):

   * ``flow``: :class:`~flowforge.policy.FlowHead` (10 Euler steps),
   * ``hierarchical``: :class:`~flowforge.policy.HierarchicalFlowHead` (keyframes, then the chunk),
   * ``mse``: :class:`~flowforge.policy.RegressionHead`,
   * ``ddpm``: :class:`~flowforge.policy.DiffusionHead` (100 training steps), sampled with DDIM
     at 10 steps; ``ddpm100`` is the same model with the full 100-step DDPM chain (fewer episodes,
     ``--ddpm100-episodes``, since each chunk costs ten times more).

   Each is rolled out for ``--episodes`` episodes per task with fresh seeds (never used for the
   demonstrations); success rate per task with 95% Wilson intervals, and the average.

   The flow head's sampling temperature (``noise_scale``, the scale of its initial noise) is chosen
   among ``--noise-scales`` by rollouts on validation seeds (``--validation-episodes`` per task,
   a seed range neither the demonstrations nor the evaluation use); the evaluation reports the
   flow at temperature 1 (``flow``) and, when another one won, at the chosen one too.
2. **Images**: ``flow`` with 84x84 corner-camera images (state + image + language, the last
   ``--image-frames`` frames, 2 by default as in Diffusion Policy) on ``--image-tasks``, trained
   on ``--image-demos`` demonstrations per task.
3. **Latency** on this CPU (1 thread, batch 1, median of ``--latency-repeats``): time to produce
   one chunk with the cached prefix (KV cache) and without it (the whole observation re-encoded at
   every integration step), for the state and the image policy; and the flow head at 10 steps against
   DDPM at 100 and DDIM at 10.

Goals: the flow head's average success >= 90% and ahead of MSE and DDPM; cached >= 3x faster than
uncached with image tokens; the flow head (10 steps) >= 5x faster than DDPM (100 steps) at no loss
in success.

Every phase stores its result under ``--work`` (data sets, run folders, ``*.json``) and is skipped
when its result exists, so an interrupted run continues where it stopped. The final tables are
printed and written to ``benchmarks/results/policy_mt10.json``.

How to run
----------
Needs the ``robot`` extra (``pip install -e '.[robot]'``)::

    python benchmarks/policy_mt10.py                      # everything (hours on a 2-core CPU)
    python benchmarks/policy_mt10.py --steps 3000 --episodes 10 --models flow,mse   # a quick look
    python benchmarks/policy_mt10.py --tasks reach-v3,push-v3 ...   # other tasks (one --work per task set)
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from common import (  # benchmarks/ is on sys.path
    RESULTS_DIR,
    claim_work_folder,
    model_weights_digest,
    nonnegative_int,
    parse_tasks,
    policy_settings_changed,
    positive_int,
    read_json,
    refuse_other_settings,
    run_resumable,
    seed_int,
    stored_evaluation,
    write_json,
)
from flowforge.config import name_list
from flowforge.data.episodes import EpisodeDataset
from flowforge.envs.collect import collect
from flowforge.envs.evaluate import EVALUATION_SEED_BASE, VALIDATION_SEED_BASE, evaluate
from flowforge.envs.metaworld import MT10
from flowforge.policy import POLICY_KINDS
from flowforge.runs.policy import load_policy, load_policy_config, train_policy
from flowforge.validation import MAX_NOISE_SCALE

ROOT = Path(__file__).resolve().parents[1]


def _config(args: argparse.Namespace, kind: str, data: Path, image: bool = False):
    steps = args.image_steps if image else args.steps
    overrides = [
        f'policy.kind="{kind}"',
        f'data.root="{data}"',
        f"train.steps={steps}",
        # the config's 500 wherever it fits (runs made before stay resumable), a tenth of a shorter run
        f"train.warmup_steps={500 if steps > 500 else steps // 10}",
        f"train.seed={args.seed}",
        "train.progress=true" if args.progress else "train.progress=false",
    ]
    if image:
        overrides += [
            "policy.image_shape=[3, 84, 84]",
            f"policy.obs_horizon={args.image_frames}",
            f"train.batch_size={args.image_batch}",
        ]
    return load_policy_config(ROOT / "configs" / "policy" / "mt10.toml", overrides)


def _train(args, name: str, kind: str, data: Path, image: bool = False) -> Path:
    run = args.work / "runs" / name
    done = run / "trained.json"
    config = _config(args, kind, data, image)
    if done.exists():  # reused only under the settings asked for
        refuse_other_settings(run, policy_settings_changed(run, config))
        return run
    start = time.perf_counter()
    print(f"[train] {name}: {config.train.steps} steps", flush=True)
    train_policy(config, run, resume=(run / "checkpoint.json").exists())
    seconds = time.perf_counter() - start
    write_json(done, {"steps": config.train.steps, "seconds": seconds})
    print(f"[train] {name}: {seconds:.0f} s", flush=True)
    return run


def _evaluate(
    args, name: str, run: Path, tasks: list[str], episodes: int, validation: bool = False, **sampling
) -> dict:
    """Evaluate a run; ``sampling``: the sampling arguments of every chunk (steps, method, noise_scale)."""
    path = args.work / f"{'validate' if validation else 'eval'}-{name}.json"
    seed_base = VALIDATION_SEED_BASE if validation else EVALUATION_SEED_BASE
    done = stored_evaluation(path, run, tasks, episodes=episodes, seed_base=seed_base, sampling=sampling)
    if done is not None:
        return done
    policy = load_policy(run)
    start = time.perf_counter()
    processes = min(args.eval_processes, len(tasks))
    report = evaluate(
        policy, tasks, episodes, progress=args.progress, sampling=sampling, processes=processes, seed_base=seed_base
    )
    result = report.to_dict() | {"seconds": time.perf_counter() - start, "weights": model_weights_digest(run)}
    print(f"[{'validate' if validation else 'eval'}] {name}\n{report.table()}", flush=True)
    write_json(path, result)
    return result


def _latency(policy, batch: dict, repeats: int, use_cache: bool, **sampling) -> tuple[float, int]:
    noise = torch.randn(1, policy.policy_config.horizon, policy.policy_config.action_dim)
    results = [policy.predict_chunk(batch, **sampling, use_cache=use_cache, noise=noise) for _ in range(repeats + 3)]
    return statistics.median(r.seconds for r in results[3:]), results[-1].nfe


def _paired_latency(policy, batch: dict, repeats: int) -> tuple[float, float, int]:
    """Median cached and uncached chunk times, measured alternately so that drifts in the machine's
    speed reach both alike."""
    noise = torch.randn(1, policy.policy_config.horizon, policy.policy_config.action_dim)
    cached, uncached = [], []
    for _ in range(repeats + 3):
        cached.append(policy.predict_chunk(batch, use_cache=True, noise=noise))
        uncached.append(policy.predict_chunk(batch, use_cache=False, noise=noise))
    median = statistics.median
    return median(r.seconds for r in cached[3:]), median(r.seconds for r in uncached[3:]), cached[-1].nfe


def _latencies(args, runs: dict[str, Path], image_data: Path | None) -> dict:
    """Median chunk latencies; entries already measured (by an earlier or parallel run) are kept."""
    path = args.work / "latency.json"
    table = read_json(path) or {}
    state_set = EpisodeDataset(args.work / "mt10", 1, 16)
    item = state_set[0]
    state_batch = {"state": item["observation.environment_state"][None], "instruction": [item["task"]]}
    if "flow" in runs and "flow cached" not in table:
        cached, uncached, nfe = _paired_latency(load_policy(runs["flow"]), state_batch, args.latency_repeats)
        table["flow cached"] = {"ms": 1000 * cached, "nfe": nfe}
        table["flow uncached"] = {"ms": 1000 * uncached, "nfe": nfe}
    for name, sampling, use_cache in (
        ("hierarchical cached", {}, True),
        ("ddpm 100 steps", {"method": "ddpm"}, True),
        ("ddim 10 steps", {"method": "ddim", "steps": 10}, True),
        ("mse", {}, True),
    ):
        kind = "ddpm" if name.startswith("dd") else name.split()[0]
        if kind not in runs or name in table:
            continue
        median, nfe = _latency(load_policy(runs[kind]), state_batch, args.latency_repeats, use_cache, **sampling)
        table[name] = {"ms": 1000 * median, "nfe": nfe}
    if image_data is not None and "flow-images" in runs and "flow images cached" not in table:
        image_set = EpisodeDataset(image_data, args.image_frames, 16)
        item = image_set[0]
        key = image_set.image_keys[0]
        state = item["observation.environment_state"][None]
        batch = {"state": state, "image": item[key][None], "instruction": [item["task"]]}
        cached, uncached, nfe = _paired_latency(load_policy(runs["flow-images"]), batch, args.latency_repeats)
        table["flow images cached"] = {"ms": 1000 * cached, "nfe": nfe}
        table["flow images uncached"] = {"ms": 1000 * uncached, "nfe": nfe}
    latest = read_json(path) or {}
    write_json(path, latest | table)
    return latest | table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("benchmark-work/policy_mt10"))
    parser.add_argument("--models", default="flow,hierarchical,mse,ddpm")
    parser.add_argument("--tasks", default=",".join(MT10), help="the tasks of the multi-task model (MT10)")
    parser.add_argument("--demos", type=positive_int, default=50)
    parser.add_argument("--steps", type=positive_int, default=10000)
    parser.add_argument("--episodes", type=positive_int, default=50)
    parser.add_argument("--ddpm100-episodes", type=nonnegative_int, default=10)
    parser.add_argument("--noise-scales", default="1,0.5,0.25,0", help="flow temperatures to choose from")
    parser.add_argument("--validation-episodes", type=nonnegative_int, default=50, help="per task and temperature")
    parser.add_argument("--image-tasks", default="reach-v3,push-v3,drawer-open-v3")
    parser.add_argument("--image-demos", type=positive_int, default=20)
    parser.add_argument("--image-steps", type=nonnegative_int, default=5000)
    parser.add_argument("--image-episodes", type=positive_int, default=20)
    parser.add_argument("--image-batch", type=positive_int, default=64)
    parser.add_argument("--image-frames", type=positive_int, default=2, help="observation frames of the image policy")
    parser.add_argument("--latency-repeats", type=positive_int, default=100)
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument(
        "--eval-processes",
        type=positive_int,
        default=1,
        help="evaluate the tasks in this many processes (one torch thread each; same seeds, same results)",
    )
    parser.add_argument("--seed", type=seed_int, default=0)
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    try:
        tasks = parse_tasks("--tasks", args.tasks)
        image_tasks = parse_tasks("--image-tasks", args.image_tasks, at_least=0)
        models = name_list("--models", args.models, POLICY_KINDS, "policy kind")
        try:
            scales = [float(s) for s in args.noise_scales.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--noise-scales {args.noise_scales!r}: need comma-separated numbers") from None
        if not scales or not all(0 <= scale <= MAX_NOISE_SCALE for scale in scales):  # NaN fails too
            raise ValueError(f"--noise-scales {args.noise_scales!r}: name temperatures in [0, {MAX_NOISE_SCALE:g}]")
        claim_work_folder(
            args.work, tasks=(tasks, args.work / "mt10"), image_tasks=(image_tasks, args.work / "images")
        )  # only once every argument is valid
    except ValueError as error:
        parser.error(str(error))
    torch.set_num_threads(args.threads)

    data = args.work / "mt10"
    collect(tasks, args.demos, data, progress=args.progress)
    runs = {kind: _train(args, kind, kind, data) for kind in models}
    image_data = None
    if image_tasks and args.image_steps > 0:
        image_data = args.work / "images"
        collect(image_tasks, args.image_demos, image_data, images=True, progress=args.progress)
        runs["flow-images"] = _train(args, "flow-images", "flow", image_data, image=True)

    results = {}
    for kind in models:
        sampling = {"method": "ddim", "steps": 10} if kind == "ddpm" else {}
        results[kind] = _evaluate(args, kind, runs[kind], tasks, args.episodes, **sampling)
    flow_name, chosen_scale, validation = "flow", 1.0, {}
    if "flow" in models and len(scales) > 1 and args.validation_episodes > 0:
        for scale in scales:
            name = f"flow-noise{scale:g}"
            report = _evaluate(args, name, runs["flow"], tasks, args.validation_episodes, True, noise_scale=scale)
            validation[scale] = report["average_success"]
        chosen_scale = max(scales, key=lambda s: (validation[s], s))  # ties go to the higher temperature
        if chosen_scale != 1.0:
            flow_name = f"flow-noise{chosen_scale:g}"
            run = runs["flow"]
            results[flow_name] = _evaluate(args, flow_name, run, tasks, args.episodes, noise_scale=chosen_scale)
    if "ddpm" in models and args.ddpm100_episodes > 0:
        results["ddpm100"] = _evaluate(args, "ddpm100", runs["ddpm"], tasks, args.ddpm100_episodes, method="ddpm")
    if "flow-images" in runs:
        results["flow-images"] = _evaluate(args, "flow-images", runs["flow-images"], image_tasks, args.image_episodes)
    latency = _latencies(args, runs, image_data)

    print(f"\n{'MT10' if tuple(tasks) == MT10 else ', '.join(tasks)}: success (state + language), one model per column")
    names = [n for n in results if n != "flow-images"]
    print(f"{'task':26s} " + " ".join(f"{n:>14s}" for n in names))
    for task in tasks:
        cells = []
        for n in names:
            entry = results[n]["tasks"].get(task)
            cells.append(f"{entry['success_rate']:14.0%}" if entry else f"{'-':>14s}")
        print(f"{task:26s} " + " ".join(cells))
    print(f"{'average':26s} " + " ".join(f"{results[n]['average_success']:14.1%}" for n in names))
    if "flow-images" in results:
        print("\nThe flow head with 84x84 images")
        for task, entry in results["flow-images"]["tasks"].items():
            low, high = entry["interval"]
            print(f"{task:26s} {entry['success_rate']:6.0%}  [{low:.0%}, {high:.0%}]")
    print("\nLatency per chunk (batch 1, 1 thread)")
    for name, entry in latency.items():
        print(f"{name:26s} {entry['ms']:8.2f} ms   NFE {entry['nfe']}")
    if validation:
        print("\nThe flow head's temperature on validation seeds (average success)")
        for scale, rate in validation.items():
            print(f"  noise_scale {scale:<5g} {rate:6.1%}" + ("   <- chosen" if scale == chosen_scale else ""))
    checks = {}
    if flow_name in results:
        flow = results[flow_name]["average_success"]
        checks[f"{flow_name} >= 90%"] = flow >= 0.9
        for other in ("mse", "ddpm"):
            if other in results:
                checks[f"{flow_name} ahead of {other}"] = flow > results[other]["average_success"]
    if "flow images cached" in latency:
        ratio = latency["flow images uncached"]["ms"] / latency["flow images cached"]["ms"]
        checks[f"cache speed-up with images {ratio:.1f}x >= 3x"] = ratio >= 3
    if "ddpm 100 steps" in latency and "flow cached" in latency:
        ratio = latency["ddpm 100 steps"]["ms"] / latency["flow cached"]["ms"]
        no_loss = (
            "ddpm100" not in results or results[flow_name]["average_success"] >= results["ddpm100"]["average_success"]
        )
        checks[f"flow@10 {ratio:.1f}x faster than ddpm@100 (>= 5x) at no loss"] = ratio >= 5 and no_loss
    print("\nGoals")
    for name, passed in checks.items():
        print(f"  {'PASS' if passed else 'FAIL'}  {name}")
    out = RESULTS_DIR / "policy_mt10.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        "settings": {k: str(v) for k, v in vars(args).items()},
        "results": results,
        "validation": {f"{s:g}": rate for s, rate in validation.items()},
        "latency": latency,
    }
    write_json(out, summary | {"goals": checks})
    print(f"wrote {out}")


if __name__ == "__main__":
    run_resumable(main)
