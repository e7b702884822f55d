"""Benchmark: flow-matching policies from pixels and the robot's own state on MetaWorld.

What it measures
----------------
1. **Renderer**: frames per second of each camera (``--cameras``) at 84x84 on this CPU
   (:func:`flowforge.envs.metaworld.render_rate`).
2. **MT10 from pixels, one model for all ten tasks** (``configs/policy/mt10_images.toml``): the
   robot's own state (hand position and gripper opening, with the previous frame's), the goal
   position as its own observation (reach's goal is a dot of about 2x2 pixels the colour of the
   arm, and its height cannot be read from one view), two 84x84 cameras (corner and gripperPOV)
   and the instruction; ``--demos`` expert demonstrations per task. Three heads on the same
   encoder (residual GroupNorm stages with spatial-softmax keypoints, random crops in training):
   the flow head, DDPM (sampled with DDIM at 10 steps) and MSE regression. Success on fresh
   seeds: ``--episodes`` per task for the flow head, ``--baseline-episodes`` for the baselines,
   with 95% Wilson intervals. The flow head's temperature (``noise_scale``) is chosen among
   ``--noise-scales`` (1 and 0.5) on ``--validation-episodes`` per task from a seed range the
   evaluation never uses, as ``policy_mt10.py`` chooses it; the flow head is reported at the
   config's temperature (1) and, when validation chose another, at that one too, which the goals
   judge (when ``--noise-scales`` leaves the config's out, only at the chosen one). The same
   flow model trained at other flow time laws (``policy.time_sampler``: uniform and
   logit-normal, :data:`FLOW_TIME_MODELS`) than pi0's shifted Beta, which favours the noise end,
   is scored on the same validation seeds at temperature 1; the best law's model is the flow
   head judged (ties keep pi0's), and only it is rolled out on the evaluation seeds. Then every
   MT10 head (the judged flow setting, DDPM, MSE) chooses on the same validation seeds how many
   actions of each chunk it executes before asking for the next (``n_action_steps``: the
   config's 8 and ``--action-steps``, 4 and 2; ties keep the config's); a count other than the
   config's is rolled out on the evaluation seeds too, and is the result the goals judge. Goal:
   the flow head >= 90% on average and ahead of both baselines. The flow head's and DDPM's
   evaluation and validation episodes, each at its judged setting, are pooled: twice the sample
   for a comparison near 100%.
   **DART data**: the trained flow head and DDPM are each fine-tuned for ``--fine-tune-steps``
   (10,000) on the same number of demonstrations collected again with DART action noise
   (``--action-noise`` 0.1: the robot receives the expert's action plus correlated noise, the data
   holds the expert's action at every state visited), starting from their trained weights and
   normalising with the new data's statistics (``flow-dart``, ``ddpm-dart``), and are judged the
   same way: temperature and action steps chosen on validation seeds, the two heads pooled, flow
   ahead of DDPM. The same pair is also trained from scratch on that data alone, as the MT10
   models are on theirs (``flow-dart-scratch``, ``ddpm-dart-scratch``), and judged the same way,
   with MSE trained the same way (``mse-dart-scratch``) as its second baseline.
   **Targeted DART data**: the three heads trained from scratch, as their MT10 models, on data in
   which only ``--dart-tasks`` (peg insertion, the task the flow head loses) were collected with
   the action noise, the other tasks' demonstrations as clean as the MT10 set's
   (``flow-targeted-dart``, ``ddpm-targeted-dart``, ``mse-targeted-dart``), judged the same way.
   **Two frames**: the flow head and DDPM trained from scratch, as their one-frame models, on two
   observation frames (``policy.obs_horizon = 2``: both cameras, the state and the goal of the
   frame before as well, Diffusion Policy's default; ``flow-history``, ``ddpm-history``), judged
   as the DART pair is.
   **x-prediction**: the flow head with an expert that outputs the clean chunk instead of the
   velocity (``policy.prediction = "sample"``, ``flow-sample-prediction``), trained from scratch
   on the MT10 data and judged as the DART pair is, against the same DDPM and MSE.
3. **What privileged state was worth**: the same flow model with MetaWorld's whole 39-d state
   (object and goal poses) instead of the robot's own state and the goal.
4. **Ablations on reach, push and pick-place** (one model for the three tasks):
   today's conv encoder against the keypoint encoder, each with and without augmentation, with
   one camera (corner) and two; success and the training step time side by side (the ``steptime``
   phase times every ablation model one after another in one process: run it on an idle machine).
5. **Training throughput** (frames per second of training, same model, same data): every window
   decoded up front in memory (``tensors``), each frame decoded once in memory (``memory``), the
   uint8 cache on disk memory-mapped (``cache``) and the PNG files decoded per batch (``decode``),
   the last two with 0 and ``--workers`` DataLoader workers.

Training runs are sized by time: the step time of the flow model (and of the base ablation model)
is measured first, with the run's own data pipeline, and sets the steps of every run of its table
so that one run takes about ``--hours`` (2) and ``--ablation-hours`` (0.5: three tasks, eight
runs) on this machine (``sizing.json``; ``--steps`` and ``--ablation-steps`` fix them instead).

Every phase stores its result under ``--work`` (data sets, frame caches, run folders, ``*.json``)
and is skipped when its result exists, so an interrupted run continues where it stopped (a training
run resumes from its last checkpoint). A stored evaluation is reused only when it rolled out the
model's present weights with the episodes, seeds, step limit and sampling asked for now; otherwise
it is made again. The tables are printed and written to ``benchmarks/results/policy_vision.json``.

How to run
----------
Needs the ``robot`` extra (``pip install -e '.[robot]'``) and headless rendering (``MUJOCO_GL=egl``)::

    python benchmarks/policy_vision.py                        # everything (about a day on a 2-core CPU)
    python benchmarks/policy_vision.py --phases render,throughput
    pytest -m slow tests/test_benchmark_scripts.py -k policy_vision   # every phase at toy sizes (minutes)
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from common import (  # benchmarks/ is on sys.path
    RESULTS_DIR,
    claim_work_folder,
    model_weights_digest,
    nonnegative_float,
    nonnegative_int,
    parse_tasks,
    positive_float,
    positive_int,
    read_json,
    run_resumable,
    seed_int,
    stored_evaluation,
    write_json,
)
from flowforge.checkpoint import read_manifest
from flowforge.config import name_list
from flowforge.data.episodes import EpisodeDataset
from flowforge.envs.collect import collect
from flowforge.envs.evaluate import EVALUATION_SEED_BASE, VALIDATION_SEED_BASE, evaluate, wilson_interval
from flowforge.envs.metaworld import CAMERAS, MT10, render_rate
from flowforge.runs.policy import load_policy, load_policy_config, prepare_policy, train_policy
from flowforge.train.distributed import ShardedBatches

ABLATION_TASKS = ["reach-v3", "push-v3", "pick-place-v3"]
PHASES = ("render", "collect", "throughput", "train", "steptime", "eval")
ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "policy" / "mt10_images.toml"

#: The conv encoder, whose convolutions take no keypoint count (the base config's is set back to
#: the default, which a config must leave unset for an encoder that does not read it).
CONV = ['policy.image_encoder="conv"', "policy.keypoints=32"]
#: The ablation grid: name -> overrides of the base config (keypoint encoder, crops, two cameras).
ABLATIONS = {
    "keypoints+aug+2cam": [],
    "keypoints+aug+1cam": ['policy.cameras=["corner"]'],
    "keypoints+noaug+2cam": ['policy.augmentation="none"'],
    "keypoints+noaug+1cam": ['policy.augmentation="none"', 'policy.cameras=["corner"]'],
    "conv+aug+2cam": CONV,
    "conv+aug+1cam": [*CONV, 'policy.cameras=["corner"]'],
    "conv+noaug+2cam": [*CONV, 'policy.augmentation="none"'],
    "conv+noaug+1cam": [*CONV, 'policy.augmentation="none"', 'policy.cameras=["corner"]'],
}
#: The full-state variant: MetaWorld's 39 numbers (goal and object poses included, so no goal of its
#: own; ``goal_key = None`` is set in :func:`_config`, TOML having no null) with the same images.
FULL_STATE = ['policy.state_key="observation.environment_state"', "policy.previous_state=false"]
#: The flow head trained at other flow time laws than pi0's shifted Beta (the config's), which puts
#: almost no weight near the data end, where the last steps set a chunk's fine detail (peg
#: insertion): model name -> ``policy.time_sampler``.
FLOW_TIME_MODELS = {"flow-uniform-time": "uniform", "flow-logit-normal-time": "logit-normal"}
#: The MT10 models: name -> overrides of the base config.
MODELS = {
    "flow": [],
    "ddpm": ['policy.kind="ddpm"'],
    "mse": ['policy.kind="mse"'],
    "flow-full-state": FULL_STATE,
} | {name: [f'policy.time_sampler="{law}"'] for name, law in FLOW_TIME_MODELS.items()}
#: Fine-tuned on demonstrations collected with DART action noise (``--action-noise``), each from the
#: trained weights of its MT10 model (``--fine-tune-steps``): name -> the model it starts from.
DART_MODELS = {"flow-dart": "flow", "ddpm-dart": "ddpm"}
MODELS |= {name: MODELS[base] for name, base in DART_MODELS.items()}
#: Trained from scratch, as their MT10 models, on the DART data alone instead of fine-tuned on it:
#: name -> that model.
DART_SCRATCH_MODELS = {"flow-dart-scratch": "flow", "ddpm-dart-scratch": "ddpm", "mse-dart-scratch": "mse"}
MODELS |= {name: MODELS[base] for name, base in DART_SCRATCH_MODELS.items()}
#: Trained from scratch like their MT10 models on data whose ``--dart-tasks`` alone were collected
#: with DART action noise, the other tasks' demonstrations clean (the MT10 set's): name -> that model.
TARGETED_DART_MODELS = {"flow-targeted-dart": "flow", "ddpm-targeted-dart": "ddpm", "mse-targeted-dart": "mse"}
MODELS |= {name: MODELS[base] for name, base in TARGETED_DART_MODELS.items()}
#: Two observation frames (images, state and goal of the frame before as well, Diffusion Policy's
#: ``n_obs_steps = 2``), trained from scratch like their one-frame models: name -> that model.
HISTORY_MODELS = {"flow-history": "flow", "ddpm-history": "ddpm"}
MODELS |= {name: [*MODELS[base], "policy.obs_horizon=2"] for name, base in HISTORY_MODELS.items()}
#: The flow head whose expert predicts the clean chunk instead of the velocity (x-prediction),
#: trained from scratch on the MT10 data like the flow head: DDPM's network, too, estimates the
#: clean chunk (from its noise prediction) at every step.
SAMPLE_PREDICTION_MODEL = "flow-sample-prediction"
MODELS[SAMPLE_PREDICTION_MODEL] = ['policy.prediction="sample"']
#: Each flow head judged against the DDPM trained like it (same data, same observation): flow -> DDPM.
FLOW_VARIANT_PAIRS = {
    "flow-dart": "ddpm-dart",
    "flow-dart-scratch": "ddpm-dart-scratch",
    "flow-history": "ddpm-history",
    SAMPLE_PREDICTION_MODEL: "ddpm",
    "flow-targeted-dart": "ddpm-targeted-dart",
}
#: Each flow head judged against the MSE head trained like it too, where one is: flow -> MSE.
FLOW_VARIANT_MSE = {
    "flow-dart-scratch": "mse-dart-scratch",
    SAMPLE_PREDICTION_MODEL: "mse",
    "flow-targeted-dart": "mse-targeted-dart",
}
#: The models evaluated like the flow head (``--episodes`` a task), the others on ``--baseline-episodes``.
FLOW_MODELS = ("flow", *FLOW_VARIANT_PAIRS, *FLOW_TIME_MODELS)
#: The models sampled with DDIM at 10 steps.
DDPM_MODELS = ("ddpm", *FLOW_VARIANT_PAIRS.values())


def _load(path: Path) -> dict | None:
    value = read_json(path)  # None when missing or cut short: made again
    return value if isinstance(value, dict) else None


def _save(path: Path, value: dict) -> dict:
    write_json(path, value)
    return value


def _config(args: argparse.Namespace, data: Path, steps: int, overrides: list[str]):
    settings = [
        f'data.root="{data}"',
        f'data.cache="{data}.frames"',
        f"data.workers={args.workers}",
        f"train.steps={steps}",
        f"train.seed={args.seed}",
        f"train.batch_size={args.batch}",
        f"train.checkpoint_every={max(1, min(1000, steps))}",
        f"train.warmup_steps={min(500, steps // 10)}",
        "train.progress=true" if args.progress else "train.progress=false",
    ]
    config = load_policy_config(CONFIG, settings + overrides)
    if config.policy.state_key == "observation.environment_state":
        config = dataclasses.replace(config, policy=dataclasses.replace(config.policy, goal_key=None))
    return config


# ---------------------------------------------------------------- phases
def _render(args) -> dict:
    path = args.work / "render.json"
    done = _load(path)
    if done is not None:
        return done
    print("[render] frames/s per camera at 84x84", flush=True)
    rates = render_rate(args.tasks[0], args.cameras, size=84, frames=args.render_frames)
    return _save(path, {"task": args.tasks[0], "size": 84, "frames_per_second": rates})


def _collect(
    args, tasks: list[str], name: str, action_noise: float = 0.0, noisy_tasks: list[str] | None = None
) -> Path:
    root = args.work / name
    collected_before = (root / "meta").exists()  # then this call's time is not the collection's
    start = time.perf_counter()
    counts = collect(
        tasks,
        args.demos,
        root,
        images=True,
        cameras=args.cameras,
        size=84,
        action_noise=action_noise,
        noisy_tasks=noisy_tasks,
        progress=args.progress,
    )
    record = args.work / f"{name}-collect.json"
    if not record.exists():
        seconds = "seconds_resuming" if collected_before else "seconds"
        _save(record, {"counts": counts, seconds: time.perf_counter() - start})
    return root


def _step_seconds(policy, data, batch_size: int, steps: int, workers: int) -> float:
    """Median seconds of a training step (forward, backward, Adam) after two warm-up steps, batches
    read as the trainer reads them."""
    batches = ShardedBatches(data, None, batch_size, seed=0, workers=workers)
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-4)
    policy.train()
    times = []
    tick = time.perf_counter()
    for step in range(steps + 2):
        batch, _ = batches.next()
        loss = policy.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        now = time.perf_counter()
        if step >= 2:
            times.append(now - tick)
        tick = now
    return statistics.median(times)


def _time_model(
    args,
    data: Path,
    overrides: list[str],
    frames: str | None = None,
    workers: int | None = None,
    steps: int | None = None,
) -> tuple[float, float, int]:
    """Build the model of the base config with ``overrides`` on ``data`` as training builds it and
    time its steps (``frames``, ``workers``: the config's unless given; ``steps``: ``--step-time-steps``).
    Returns the median seconds a step, the seconds the data took to prepare, and the cameras."""
    config = _config(args, data, 1, overrides)
    dataset = EpisodeDataset(data, config.policy.obs_horizon, config.policy.horizon)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    policy, windows = prepare_policy(
        config.policy,
        dataset,
        progress=args.progress,
        frames=frames or config.data.frames,
        cache=config.data.cache_folder(),
    )
    prepared = time.perf_counter() - start
    workers = config.data.workers if workers is None else workers
    seconds = _step_seconds(policy, windows, args.batch, steps or args.step_time_steps, workers)
    return seconds, prepared, len(policy.policy_config.image_keys)


def _throughput(args, data: Path) -> dict:
    """Training frames per second for each way of reading the camera frames (same model and data)."""
    path = args.work / "throughput.json"
    table = _load(path) or {}
    sources = [("tensors", 0), ("memory", 0), ("cache", 0), ("cache", args.workers), ("decode", 0)]
    sources.append(("decode", args.workers))
    for frames, workers in dict.fromkeys(sources):
        name = f"{frames}, {workers} workers"
        if name in table:
            continue
        seconds, prepared, cameras = _time_model(args, data, [], frames, workers, args.throughput_steps)
        table[name] = {
            "seconds_per_step": seconds,
            "frames_per_second": args.batch / seconds,
            "images_per_second": args.batch * cameras / seconds,
            "preparation_seconds": prepared,
        }
        print(f"[throughput] {name}: {args.batch / seconds:.0f} frames/s (prepared in {prepared:.0f} s)", flush=True)
        _save(path, table)
    return table


def _sizing(args, data: Path, ablation_data: Path | None) -> dict:
    """Training steps that make one run last about ``--hours`` (MT10) and ``--ablation-hours``
    (ablations), from the measured step time of the flow model (and of the base ablation model)
    with the run's own data pipeline; fixed once, so that every run of a table gets the same steps."""
    path = args.work / "sizing.json"
    sizing = _load(path) or {}
    options = (
        ("mt10", data, args.hours, "--hours"),
        ("ablation", ablation_data, args.ablation_hours, "--ablation-hours"),
    )
    for name, root, hours, option in options:
        if name in sizing and sizing[name].get("hours") != hours:
            recorded = sizing[name]
            raise SystemExit(
                f"{option} {hours:g}: {path} sized the {name} runs for {recorded.get('hours')} h "
                f"({recorded.get('steps')} steps); ask for that, or give another --work"
            )
        if root is None or name in sizing:  # a table sized once keeps its steps
            continue
        seconds = _time_model(args, root, [])[0]
        steps = max(100, round(hours * 3600 / seconds / 100) * 100)
        sizing[name] = {"step_seconds": seconds, "hours": hours, "steps": steps}
        print(f"[size] {name}: {seconds:.2f} s a step -> {steps} steps for {hours:g} h", flush=True)
    return _save(path, sizing)


def _ablation_step_times(args, data: Path, ablations: list[str]) -> dict:
    """Median seconds of a training step of each ablation model, measured one after another in one
    process, each with its own data pipeline. The time each run records at its start depends on
    what the other run sharing the cores was doing then; run this phase on an otherwise idle machine."""
    path = args.work / "ablation-step-times.json"
    table = _load(path) or {}
    for name in ablations:
        if name in table:
            continue
        table[name] = _time_model(args, data, ABLATIONS[name])[0]
        print(f"[steptime] ablation-{name}: {table[name]:.3f} s a step", flush=True)
        _save(path, table)
    return table


def _train(args, name: str, data: Path, steps: int, overrides: list[str], start_from: Path | None = None) -> Path:
    """Train (or resume) the run ``name``; ``start_from``: a trained run whose weights it starts from."""
    run = args.work / "runs" / name
    done = run / "trained.json"
    if done.exists():
        return run
    if start_from is not None and not (start_from / "trained.json").exists():
        base = start_from.name
        raise SystemExit(f"[train] {name} starts from the trained {base}: train that first (--models {base},{name})")
    step_seconds = _time_model(args, data, overrides)[0]
    config = _config(args, data, steps, overrides)
    began = f" from {start_from.name}'s weights" if start_from is not None else ""
    print(f"[train] {name}: {steps} steps{began} ({step_seconds:.2f} s a step)", flush=True)
    checkpoint = run / "checkpoint.json"
    # ``seconds`` below times this process only: a resumed run says from which step
    resumed_at = read_manifest(run, training=True)["trainer"]["state"]["step"] if checkpoint.exists() else 0
    start = time.perf_counter()
    policy, _ = train_policy(config, run, resume=checkpoint.exists(), start_from=start_from)
    seconds = time.perf_counter() - start
    parameters = sum(p.numel() for p in policy.parameters())
    record = {"steps": steps, "seconds": seconds, "step_seconds": step_seconds, "parameters": parameters}
    if resumed_at:
        record["resumed_at_step"] = resumed_at
    if start_from is not None:
        record["started_from"] = {"run": start_from.name, "weights": model_weights_digest(start_from)}
    _save(done, record)
    since = f" since step {resumed_at}" if resumed_at else ""
    print(f"[train] {name}: {seconds:.0f} s{since}, {parameters:,} parameters", flush=True)
    return run


def _evaluate(
    args, name: str, run: Path, tasks: list[str], episodes: int, validation: bool = False, **sampling
) -> dict:
    """Roll a run out on fresh seeds (``validation``: on the seeds kept for choosing settings)."""
    phase = "validate" if validation else "eval"
    path = args.work / f"{phase}-{name}.json"
    seed_base = VALIDATION_SEED_BASE if validation else EVALUATION_SEED_BASE
    settings = {"episodes": episodes, "seed_base": seed_base, "max_steps": args.max_steps, "sampling": sampling}
    done = stored_evaluation(path, run, tasks, **settings)
    if done is not None:
        return done
    policy = load_policy(run)
    start = time.perf_counter()
    report = evaluate(
        policy,
        tasks,
        episodes,
        max_steps=args.max_steps,
        seed_base=seed_base,
        progress=args.progress,
        sampling=sampling,
        processes=min(args.eval_processes, len(tasks)),
    )
    result = report.to_dict() | {"seconds": time.perf_counter() - start, "weights": model_weights_digest(run)}
    print(f"[{phase}] {name}\n{report.table()}", flush=True)
    return _save(path, result)


def _chosen_on_validation(
    args, run: Path, episodes: int, results: dict[str, dict], settings: dict, preference
) -> tuple[Any, dict[Any, dict]]:
    """Roll each of ``settings`` (value -> (name of its validation result, name of its evaluation
    result, sampling)) out on the validation seeds and choose the value with the best success,
    ties going to the largest ``preference(value)``. The chosen value's evaluation result, when
    ``results`` lacks it (it holds the config's), is rolled out on ``episodes`` evaluation episodes
    per task. Returns the chosen value and every value's validation report."""
    reports = {
        value: _evaluate(args, stored, run, args.tasks, args.validation_episodes, True, **sampling)
        for value, (stored, _, sampling) in settings.items()
    }
    chosen = max(reports, key=lambda value: (reports[value]["average_success"], preference(value)))
    _, judged, sampling = settings[chosen]
    if judged not in results:
        results[judged] = _evaluate(args, judged, run, args.tasks, episodes, **sampling)
    return chosen, reports


def _judged_temperature(args, name: str, run: Path, results: dict[str, dict]) -> tuple[str, dict, dict]:
    """Choose the flow model ``name``'s temperature (``noise_scale``) on validation seeds among
    ``--noise-scales`` (ties go to the higher one); one other than the config's is rolled out on
    the evaluation seeds too. Returns the name of the result the goals judge, that setting's
    validation report, and the summary entry."""
    configured = load_policy(run).policy_config.noise_scale
    settings = {
        scale: (
            f"{name}-noise{scale:g}",
            name if scale == configured else f"{name}-noise{scale:g}",
            {"noise_scale": scale},
        )
        for scale in args.noise_scales
    }
    chosen, reports = _chosen_on_validation(args, run, args.episodes, results, settings, lambda scale: scale)
    entry = {
        "validation": {scale: report["average_success"] for scale, report in reports.items()},
        "chosen": chosen,
        "config": configured,
    }
    return settings[chosen][1], reports[chosen], entry


def _judged_action_steps(
    args, name: str, run: Path, sampling: dict, episodes: int, results: dict[str, dict], validation: str | None = None
) -> tuple[str, dict, dict]:
    """Choose how many actions of each chunk the head whose result is ``name`` (rolled out with
    ``sampling``) executes before it asks for the next, among the config's ``n_action_steps`` and
    ``--action-steps``, on the validation seeds (``validation``: the name its episodes there at the
    config's count are stored under; default ``name``). Ties keep the config's count, then the
    larger (fewer chunks a second); another count is rolled out on ``episodes`` evaluation episodes
    per task too. Returns the name of the result the goals judge, that setting's validation report,
    and the summary entry."""
    configured = load_policy(run).policy_config.n_action_steps
    settings = {configured: (validation or name, name, sampling)}
    for count in args.action_steps:
        label = f"{name}-actions{count}"  # its validation and its evaluation result
        settings.setdefault(count, (label, label, {**sampling, "n_action_steps": count}))
    chosen, reports = _chosen_on_validation(
        args, run, episodes, results, settings, lambda count: (count == configured, count)
    )
    entry = {
        "validation": {count: report["average_success"] for count, report in reports.items()},
        "chosen": chosen,
        "config": configured,
    }
    return settings[chosen][1], reports[chosen], entry


def _pooled(reports: list[dict], tasks: list[str]) -> tuple[int, int]:
    """Successes and episodes of ``tasks`` over several evaluation reports (their ``to_dict()``)."""
    outcomes = [success for report in reports for task in tasks for success in report["tasks"][task]["successes"]]
    return sum(outcomes), len(outcomes)


# ---------------------------------------------------------------- the report
def _success_table(title: str, results: dict[str, dict], tasks: list[str]) -> None:
    names = list(results)
    print(f"\n{title}")
    print(f"{'task':26s} " + " ".join(f"{n:>20s}" for n in names))
    for task in tasks:
        cells = []
        for n in names:
            entry = results[n]["tasks"].get(task)
            cells.append(f"{entry['success_rate']:20.0%}" if entry else f"{'-':>20s}")
        print(f"{task:26s} " + " ".join(cells))
    print(f"{'average':26s} " + " ".join(f"{results[n]['average_success']:20.1%}" for n in names))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("benchmark-work/policy_vision"))
    parser.add_argument("--phases", default=",".join(PHASES), help=f"some of {', '.join(PHASES)}")
    parser.add_argument("--tasks", default=",".join(MT10), help="the multi-task set (MT10)")
    parser.add_argument("--ablation-tasks", default=",".join(ABLATION_TASKS))
    parser.add_argument("--ablations", default=",".join(ABLATIONS), help=f"some of {', '.join(ABLATIONS)}")
    parser.add_argument("--models", default=",".join(MODELS), help=f"some of {', '.join(MODELS)}")
    parser.add_argument("--cameras", default="corner,gripperPOV")
    parser.add_argument("--demos", type=positive_int, default=50, help="expert demonstrations per task")
    parser.add_argument("--hours", type=positive_float, default=2.0, help="the length of one MT10 training run")
    parser.add_argument("--ablation-hours", type=positive_float, default=0.5, help="the length of one ablation run")
    parser.add_argument("--steps", type=positive_int, default=None, help="MT10 training steps (default: from --hours)")
    parser.add_argument(
        "--action-noise",
        type=nonnegative_float,
        default=0.1,
        help="DART action noise of the data the *-dart models fine-tune on",
    )
    parser.add_argument(
        "--dart-tasks",
        default="peg-insert-side-v3",
        help="the tasks collected with --action-noise for the *-targeted-dart models (the others clean)",
    )
    parser.add_argument(
        "--fine-tune-steps", type=positive_int, default=10000, help="training steps of the *-dart models"
    )
    parser.add_argument("--ablation-steps", type=positive_int, default=None, help="default: from --ablation-hours")
    parser.add_argument("--batch", type=positive_int, default=64)
    parser.add_argument(
        "--workers", type=nonnegative_int, default=1, help="DataLoader workers of training and throughput"
    )
    parser.add_argument("--episodes", type=positive_int, default=50, help="per task, the flow head")
    parser.add_argument("--baseline-episodes", type=positive_int, default=20, help="per task, DDPM, MSE and full state")
    parser.add_argument("--ablation-episodes", type=positive_int, default=20, help="per task")
    parser.add_argument("--noise-scales", default="1,0.5", help="flow temperatures to choose from on validation seeds")
    parser.add_argument(
        "--action-steps",
        default="4,2",
        help="actions executed per chunk to choose from on validation seeds, besides the config's, for every MT10 "
        "head ('': the config's only)",
    )
    parser.add_argument("--validation-episodes", type=positive_int, default=20, help="per task and setting")
    parser.add_argument("--max-steps", type=positive_int, default=500, help="control steps per evaluation episode")
    parser.add_argument("--throughput-steps", type=positive_int, default=30)
    parser.add_argument("--step-time-steps", type=positive_int, default=10, help="steps timed before each training run")
    parser.add_argument("--render-frames", type=positive_int, default=200)
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
    torch.set_num_threads(args.threads)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        parser.error(f"--phases: unknown {', '.join(unknown)}; choose from {', '.join(PHASES)}")
    try:
        args.cameras = name_list("--cameras", args.cameras, CAMERAS, "camera")
    except ValueError as error:
        parser.error(str(error))
    ablations = [a.strip() for a in args.ablations.split(",") if a.strip()]
    bad = [a for a in ablations if a not in ABLATIONS]
    if bad:
        parser.error(f"--ablations: unknown {', '.join(bad)}; choose from {', '.join(ABLATIONS)}")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad:
        parser.error(f"--models: unknown {', '.join(bad)}; choose from {', '.join(MODELS)}")
    try:
        args.noise_scales = [float(s) for s in args.noise_scales.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--noise-scales {args.noise_scales!r}: need numbers separated by commas")
    if not args.noise_scales or any(not 0 <= scale <= 1 for scale in args.noise_scales):  # NaN fails too
        parser.error(f"--noise-scales {args.noise_scales}: name one or more temperatures, each in [0, 1]")
    try:
        args.action_steps = [int(count) for count in args.action_steps.split(",") if count.strip()]
    except ValueError:
        parser.error(f"--action-steps {args.action_steps!r}: need whole numbers separated by commas")
    horizon = load_policy_config(CONFIG).policy.horizon
    if any(not 1 <= count <= horizon for count in args.action_steps):
        parser.error(f"--action-steps {args.action_steps}: each count must be in 1..{horizon} (the chunk's length)")
    if not 0 < args.action_noise <= 1:  # NaN fails too
        parser.error(f"--action-noise {args.action_noise}: need a number in (0, 1] (actions span [-1, 1])")
    try:
        args.tasks = parse_tasks("--tasks", args.tasks)
        ablation_tasks = parse_tasks("--ablation-tasks", args.ablation_tasks, at_least=0)
        args.dart_tasks = parse_tasks("--dart-tasks", args.dart_tasks)
        outside = [task for task in args.dart_tasks if task not in args.tasks]
        if outside and any(model in TARGETED_DART_MODELS for model in models):
            raise ValueError(f"--dart-tasks: {', '.join(outside)} not among --tasks (the *-targeted-dart models)")
        claim_work_folder(
            args.work,
            tasks=(args.tasks, args.work / "mt10-images"),
            ablation_tasks=(ablation_tasks, args.work / "ablation-images"),
        )  # once every argument is valid
    except ValueError as error:
        parser.error(str(error))

    summary: dict = {"settings": {k: str(v) for k, v in vars(args).items()}}
    if "render" in phases:
        summary["render"] = _render(args)
    data = ablation_data = dart_data = targeted_dart_data = None
    if any(p in phases for p in ("collect", "throughput", "train", "steptime", "eval")):
        # the MT10 set is only made when an MT10 model or the throughput table needs it
        data = _collect(args, args.tasks, "mt10-images") if models or "throughput" in phases else None
        if any(model in DART_MODELS or model in DART_SCRATCH_MODELS for model in models):
            dart_data = _collect(args, args.tasks, f"mt10-images-dart{args.action_noise:g}", args.action_noise)
        if any(model in TARGETED_DART_MODELS for model in models):
            name = f"mt10-images-dart{args.action_noise:g}-{'+'.join(args.dart_tasks)}"
            targeted_dart_data = _collect(args, args.tasks, name, args.action_noise, args.dart_tasks)
        ablation_data = _collect(args, ablation_tasks, "ablation-images") if ablations else None
    if "throughput" in phases:
        summary["throughput"] = _throughput(args, ablation_data or data)

    runs: dict[str, tuple[Path, list[str], dict]] = {}
    if "train" in phases or "eval" in phases:
        steps, ablation_steps = args.steps, args.ablation_steps
        from_scratch = [model for model in models if model not in DART_MODELS]  # the others: --fine-tune-steps
        if (from_scratch and steps is None) or (ablations and ablation_steps is None):
            summary["sizing"] = sizing = _sizing(args, data if from_scratch else None, ablation_data)
            steps = steps or sizing.get("mt10", {}).get("steps")
            ablation_steps = ablation_steps or sizing.get("ablation", {}).get("steps")
        for model in models:
            sampling = {"method": "ddim", "steps": 10} if model in DDPM_MODELS else {}
            if model in DART_MODELS:
                run = _train(
                    args, model, dart_data, args.fine_tune_steps, MODELS[model], args.work / "runs" / DART_MODELS[model]
                )
            else:
                model_data = (
                    dart_data
                    if model in DART_SCRATCH_MODELS
                    else targeted_dart_data
                    if model in TARGETED_DART_MODELS
                    else data
                )
                run = _train(args, model, model_data, steps, MODELS[model])
            runs[model] = (run, args.tasks, sampling)
        for name in ablations:
            run = _train(args, f"ablation-{name}", ablation_data, ablation_steps, ABLATIONS[name])
            runs[f"ablation-{name}"] = (run, ablation_tasks, {})
    if "steptime" in phases and ablations:
        summary["ablation_step_seconds"] = _ablation_step_times(args, ablation_data, ablations)
    if "eval" in phases:
        results = {}
        for name, (run, tasks, sampling) in runs.items():
            if name in FLOW_TIME_MODELS and "flow" in runs:
                continue  # scored against pi0's law on validation seeds below; only the chosen one here
            chooses_temperature = name in ("flow", *FLOW_VARIANT_PAIRS)
            if chooses_temperature and load_policy(run).policy_config.noise_scale not in args.noise_scales:
                continue  # judged only at a temperature of --noise-scales: rolled out at the chosen one below
            episodes = (
                args.episodes
                if name in FLOW_MODELS
                else args.ablation_episodes
                if name.startswith("ablation-")
                else args.baseline_episodes
            )
            results[name] = _evaluate(args, name, run, tasks, episodes, **sampling)
        flow_name = "flow"  # the flow result the goals judge: at the temperature validation chose
        temperatures = summary["flow_temperature"] = {}
        action_steps = summary["action_steps"] = {}  # every head judged -> its choice of n_action_steps
        # each flow head judged (at its chosen setting) -> its episodes on the validation seeds
        flow_validations: dict[str, dict] = {}
        if "flow" in runs:
            flow_name, flow_validation, temperatures["flow"] = _judged_temperature(
                args, "flow", runs["flow"][0], results
            )
            # The time law is chosen on the same validation seeds: the shifted Beta at the
            # temperature chosen above, the others at 1; the best one is the flow result judged.
            laws = {"shifted-beta": (flow_name, flow_validation)}
            for name, law in FLOW_TIME_MODELS.items():
                if name in runs:
                    laws[law] = (
                        name,
                        _evaluate(
                            args,
                            f"{name}-noise1",
                            runs[name][0],
                            args.tasks,
                            args.validation_episodes,
                            True,
                            noise_scale=1.0,
                        ),
                    )
            chosen_scale = temperatures["flow"]["chosen"]
            flow_run, flow_sampling = runs["flow"][0], {"noise_scale": chosen_scale}
            validated_as = f"flow-noise{chosen_scale:g}"
            if len(laws) > 1:
                best = max(laws, key=lambda law: laws[law][1]["average_success"])  # ties keep the earlier, pi0's
                flow_name, flow_validation = laws[best]
                if flow_name in FLOW_TIME_MODELS:
                    results[flow_name] = _evaluate(args, flow_name, runs[flow_name][0], args.tasks, args.episodes)
                    flow_run, flow_sampling = runs[flow_name][0], {"noise_scale": 1.0}
                    validated_as = f"{flow_name}-noise1"
                summary["flow_time"] = {
                    "validation": {law: report["average_success"] for law, (_, report) in laws.items()},
                    "chosen": best,
                }
            flow_name, flow_validation, action_steps["flow"] = _judged_action_steps(
                args, flow_name, flow_run, flow_sampling, args.episodes, results, validated_as
            )
            flow_validations[flow_name] = flow_validation
        # each flow variant run (DART data, two frames) -> the name of its result the goals judge
        judged_variants: dict[str, str] = {}
        for variant in (variant for variant in FLOW_VARIANT_PAIRS if variant in runs):
            variant_run = runs[variant][0]
            judged, _, temperatures[variant] = _judged_temperature(args, variant, variant_run, results)
            chosen_scale = temperatures[variant]["chosen"]
            judged, flow_validations[judged], action_steps[variant] = _judged_action_steps(
                args,
                judged,
                variant_run,
                {"noise_scale": chosen_scale},
                args.episodes,
                results,
                f"{variant}-noise{chosen_scale:g}",
            )
            judged_variants[variant] = judged
        # The baselines get the same choice of action steps, on the same validation seeds; DDPM is
        # rolled out there in any case, to pool its episodes with the flow head's.
        judged_baselines: dict[str, str] = {}  # baseline -> the name of its result the goals judge
        baseline_validations: dict[str, dict] = {}
        for head in dict.fromkeys(("ddpm", "mse", *FLOW_VARIANT_PAIRS.values(), *FLOW_VARIANT_MSE.values())):
            if head in runs and (head in DDPM_MODELS or args.action_steps):
                run, _, sampling = runs[head]
                judged, baseline_validations[judged], action_steps[head] = _judged_action_steps(
                    args, head, run, sampling, args.baseline_episodes, results
                )
                judged_baselines[head] = judged
        summary["results"] = results
        main_results = {n: r for n, r in results.items() if not n.startswith("ablation-")}
        if main_results:
            _success_table("MT10 from pixels (state: robot + goal; two cameras; language)", main_results, args.tasks)
        ablation_results = {n.removeprefix("ablation-"): r for n, r in results.items() if n.startswith("ablation-")}
        if ablation_results:
            _success_table("Ablations (one model for the ablation tasks)", ablation_results, ablation_tasks)
            # step times measured one after another on an idle machine where the steptime phase ran
            step_times = _load(args.work / "ablation-step-times.json") or {}
            print(f"\n{'ablation':26s} {'average':>8s} {'s/step':>8s} {'parameters':>11s}")
            for name in ablation_results:
                trained = _load(args.work / "runs" / f"ablation-{name}" / "trained.json") or {}
                seconds = step_times.get(name, trained.get("step_seconds", float("nan")))
                print(
                    f"{name:26s} {ablation_results[name]['average_success']:8.1%} "
                    f"{seconds:8.2f} {trained.get('parameters', 0):11,d}"
                )
        for name, entry in temperatures.items():
            print(f"\n{name}: the temperature on validation seeds ({args.validation_episodes} episodes a task)")
            for scale, rate in entry["validation"].items():
                print(f"  noise_scale {scale:<5g} {rate:6.1%}" + ("   <- chosen" if scale == entry["chosen"] else ""))
        for name, entry in action_steps.items():
            print(f"\n{name}: actions run per chunk on validation seeds ({args.validation_episodes} episodes a task)")
            for count, rate in entry["validation"].items():
                mark = "   <- chosen" if count == entry["chosen"] else ""
                print(f"  n_action_steps {count:<3d} {rate:6.1%}{mark}")
        if "flow_time" in summary:
            print("\nThe flow head's time law on the same validation seeds (pi0's at its temperature, others at 1)")
            entry = summary["flow_time"]
            for law, rate in entry["validation"].items():
                print(f"  time_sampler {law:13s} {rate:6.1%}" + ("   <- chosen" if law == entry["chosen"] else ""))
        checks = {}
        # each flow head judged -> the baselines trained on its data with its observation, DDPM first
        baselines_of = {flow_name: ("ddpm", "mse")} | {
            judged: (FLOW_VARIANT_PAIRS[flow], *([FLOW_VARIANT_MSE[flow]] if flow in FLOW_VARIANT_MSE else []))
            for flow, judged in judged_variants.items()
        }
        ddpm_of = {judged: baselines[0] for judged, baselines in baselines_of.items()}
        for judged, baselines in baselines_of.items():
            if judged not in results:
                continue
            flow = results[judged]["average_success"]
            checks[f"{judged} >= 90% on MT10 from pixels"] = flow >= 0.9
            for other in (judged_baselines.get(head, head) for head in baselines):
                if other in results:
                    checks[f"{judged} ahead of {other}"] = flow > results[other]["average_success"]
        pooled = summary["pooled"] = {}
        for judged, ddpm in ddpm_of.items():
            if judged not in flow_validations or ddpm not in judged_baselines:
                continue
            # Both heads sit at the ceiling: pooling the evaluation seeds with the validation seeds
            # (each head's judged setting's episodes there) doubles each sample behind the comparison.
            ddpm = judged_baselines[ddpm]
            pooled[judged] = _pooled([results[judged], flow_validations[judged]], args.tasks)
            pooled[ddpm] = _pooled([results[ddpm], baseline_validations[ddpm]], args.tasks)
        if pooled:
            print("\nEvaluation and validation seeds together (95% Wilson intervals)")
            for name, (successes, episodes) in pooled.items():
                low, high = wilson_interval(successes, episodes)
                print(
                    f"  {name:34s} {successes:5d} of {episodes:5d} {successes / episodes:6.1%}  [{low:.1%}, {high:.1%}]"
                )
        summary["goals"] = checks
        print("\nGoals")
        for name, passed in checks.items():
            print(f"  {'PASS' if passed else 'FAIL'}  {name}")
    if "render" in summary:
        print("\nRenderer at 84x84 (frames/s, one process)")
        for camera, rate in summary["render"]["frames_per_second"].items():
            print(f"  {camera:14s} {rate:8.0f}")
    if "throughput" in summary:
        print(f"\nTraining throughput (batch {args.batch}, frames/s)")
        for name, entry in summary["throughput"].items():
            print(f"  {name:22s} {entry['frames_per_second']:8.0f}   prepared in {entry['preparation_seconds']:.0f} s")
    out = RESULTS_DIR / "policy_vision.json"
    # A run of some phases keeps what the others wrote before (a run of every phase replaces it all).
    _save(out, (_load(out) or {}) | summary)
    print(f"wrote {out}")


if __name__ == "__main__":
    run_resumable(main)
