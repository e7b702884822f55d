"""Roll policies out in MetaWorld and report success rates with 95% intervals, latency and NFE.

This lives with the environments: the policy package never imports a simulator. A
:class:`~flowforge.policy.execution.ChunkExecutor` turns the policy's chunks into actions.

Every evaluation episode resets its task with a seed of its own from a range that demonstration
collection never uses (:data:`EVALUATION_SEED_BASE`), so the scenes differ from the training
demonstrations. Settings chosen by rollouts (a sampling temperature, say) are chosen on a third
range, :data:`VALIDATION_SEED_BASE`, so that the reported episodes play no part in the choice.
An episode succeeds when MetaWorld's success flag rises before the step limit.
"""

from __future__ import annotations

import io
import itertools
import math
import os
import statistics
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from flowforge.envs.episode import run_episode
from flowforge.envs.metaworld import TASK_SEED_STRIDE
from flowforge.errors import ConfigError
from flowforge.policy import ChunkExecutor, ChunkPolicy
from flowforge.validation import check_count, is_count

#: Evaluation seeds are EVALUATION_SEED_BASE + TASK_SEED_STRIDE * task position + episode.
EVALUATION_SEED_BASE = 900_000_000
#: Seeds for choosing settings by rollouts: VALIDATION_SEED_BASE + TASK_SEED_STRIDE * task position + episode.
VALIDATION_SEED_BASE = 800_000_000


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a success rate (95% for z = 1.96); sound at 0 and n successes.

    >>> [round(v, 3) for v in wilson_interval(45, 50)]
    [0.786, 0.957]
    """
    if not is_count(trials, 0) or not is_count(successes, 0, trials) or not (math.isfinite(z) and z > 0):
        raise ValueError(f"expected 0 <= successes <= trials and z > 0, got {successes}, {trials}, {z}")
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class TaskResult:
    """Outcomes of one task's evaluation episodes."""

    task: str
    successes: list[bool] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    #: control steps the robot stood still waiting for chunks, per episode.
    waited: list[int] = field(default_factory=list)
    #: action jumps where a new chunk took over, all episodes together.
    jumps: list[float] = field(default_factory=list)
    #: action changes between steps of one chunk (ordinary motion), all episodes together.
    changes: list[float] = field(default_factory=list)
    #: at take-overs, the action sent against the one the chunk left behind had planned.
    deviations: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return sum(self.successes) / max(1, len(self.successes))

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(sum(self.successes), len(self.successes))


@dataclass
class EvaluationReport:
    """Per-task results, the policy's chunk latencies (seconds) and evaluations per chunk, and the
    settings the episodes ran with (episodes, seeds, execution, delay, sampling), so that a saved
    report says what it measured."""

    tasks: list[TaskResult]
    latencies: list[float]
    nfe: list[int]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def mean_length_with_waits(self) -> float | None:
        """Mean episode length in control steps, counting the steps the robot waited for chunks."""
        lengths = [s + w for t in self.tasks for s, w in zip(t.steps, t.waited, strict=True)]
        return statistics.fmean(lengths) if lengths else None

    @property
    def average_success(self) -> float:
        return statistics.fmean(t.rate for t in self.tasks) if self.tasks else 0.0

    def table(self) -> str:
        lines = [f"{'task':32s} {'success':>8s}  95% interval   episodes"]
        for t in self.tasks:
            low, high = t.interval
            lines.append(f"{t.task:32s} {t.rate:8.1%}  [{low:5.1%}, {high:5.1%}]  {len(t.successes):6d}")
        lines.append(f"{'average':32s} {self.average_success:8.1%}")
        jumps = [j for t in self.tasks for j in t.jumps]
        changes = [c for t in self.tasks for c in t.changes]
        deviations = [d for t in self.tasks for d in t.deviations]
        if jumps:
            ordinary = f" (within a chunk: mean {statistics.fmean(changes):.3f})" if changes else ""
            if deviations:
                ordinary += f"; from the plan left behind: mean {statistics.fmean(deviations):.3f}"
            lines.append(
                f"action jump where chunks take over: mean {statistics.fmean(jumps):.3f}, max {max(jumps):.3f}"
                f"{ordinary}; mean episode length with waits {self.mean_length_with_waits:.1f} steps"
            )
        if self.latencies:
            lines.append(
                f"median chunk latency {1000 * statistics.median(self.latencies):.2f} ms, "
                f"NFE per chunk {statistics.median(self.nfe):g}"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        jumps = [j for t in self.tasks for j in t.jumps]
        changes = [c for t in self.tasks for c in t.changes]
        deviations = [d for t in self.tasks for d in t.deviations]
        return {
            "settings": self.settings,
            "tasks": {
                t.task: {
                    "success_rate": t.rate,
                    "interval": list(t.interval),
                    "successes": t.successes,
                    "steps": t.steps,
                    "waited": t.waited,
                    "mean_boundary_jump": statistics.fmean(t.jumps) if t.jumps else None,
                    "max_boundary_jump": max(t.jumps) if t.jumps else None,
                }
                for t in self.tasks
            },
            "average_success": self.average_success,
            "median_latency_s": statistics.median(self.latencies) if self.latencies else None,
            "median_nfe": statistics.median(self.nfe) if self.nfe else None,
            "mean_episode_length_with_waits": self.mean_length_with_waits,
            "mean_boundary_jump": statistics.fmean(jumps) if jumps else None,
            "max_boundary_jump": max(jumps) if jumps else None,
            "mean_action_change_within_chunks": statistics.fmean(changes) if changes else None,
            "mean_deviation_from_plan": statistics.fmean(deviations) if deviations else None,
        }


def save_gif(frames: list[np.ndarray], path: str | Path, fps: int = 20) -> Path:
    """Write (h, w, 3) uint8 frames as an animated GIF, atomically (an interrupted write leaves no
    truncated file under the name)."""
    from PIL import Image

    from flowforge.checkpoint import write_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(np.asarray(f)) for f in frames]
    encoded = io.BytesIO()
    images[0].save(encoded, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    write_atomic(path, encoded.getvalue())
    return path


def rollout(
    executor: ChunkExecutor, env, seed: int, max_steps: int = 500, record: bool = False
) -> tuple[bool, int, list[np.ndarray], list[float], list[int]]:
    """One episode: ``(success, steps, frames, chunk latencies, NFE per chunk)``.

    ``env`` is a :class:`~flowforge.envs.metaworld.MetaWorldEnv` (its observation ``image`` is
    recorded when ``record``); ``executor`` turns the policy's chunks into actions. The episode ends
    at success, at termination or after ``max_steps``. The policy's noise is drawn from torch's
    generator seeded with ``seed`` (the caller's random state is restored afterwards), so an
    episode is reproducible and two settings of one policy are compared on the same scenes and
    the same noise.
    """
    check_count("max_steps", max_steps)
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
        torch.manual_seed(seed)
        return _rollout(executor, env, seed, max_steps, record)


def _rollout(
    executor: ChunkExecutor, env, seed: int, max_steps: int, record: bool
) -> tuple[bool, int, list[np.ndarray], list[float], list[int]]:
    executor.reset()
    pace = executor.control_period if executor.real else None
    episode = run_episode(env, executor.act, seed, max_steps, keep=record, pace=pace)
    frames = []
    if record and episode.final_observation is not None and "image" in episode.final_observation:
        frames = [o["image"] for o in episode.observations] + [episode.final_observation["image"]]
    chunks = executor.chunks
    return episode.success, episode.steps, frames, [c.seconds for c in chunks], [c.nfe for c in chunks]


def _check_fits(executor: ChunkExecutor, env) -> None:
    """Refuse, before the first episode, a policy whose actions or observations are not the
    environment's (a policy trained on another robot's data): :class:`ConfigError` naming both;
    then warm the executor up on the first observation (:meth:`ChunkExecutor.warm_up`)."""
    config = executor.policy.policy_config
    action_size = int(np.prod(env.action_space.shape))
    if config.action_dim != action_size:
        raise ConfigError(
            f"the policy's actions have {config.action_dim} numbers; {env.task}'s have {action_size} "
            "(MetaWorld: hand x, y, z and gripper): it was trained for another robot"
        )
    observation, info = env.reset(seed=0)
    observation = {**observation, "instruction": info["instruction"]}
    try:
        executor.checked_observation(observation)
    except ValueError as error:
        raise ConfigError(f"the policy does not fit {env.task}'s observations: {error}") from error
    executor.warm_up(observation)  # one-time costs are not timed as the first episode's delays


def evaluate(
    policy: ChunkPolicy,
    tasks: list[str],
    episodes: int,
    *,
    max_steps: int = 500,
    image_size: int = 84,
    video_dir: str | Path | None = None,
    videos_per_task: int = 2,
    seed_base: int = EVALUATION_SEED_BASE,
    progress: bool = True,
    sampling: dict[str, Any] | None = None,
    temporal_ensemble: float | None = None,
    execution: str = "sync",
    delay: int | tuple[int, int] | str = 0,
    processes: int = 1,
) -> EvaluationReport:
    """Evaluate ``policy`` on each task for ``episodes`` fresh-seed episodes.

    Images are rendered when the policy uses them (from its cameras, at its image size), or when
    ``video_dir`` asks for GIFs (``image_size`` pixels for a policy without images; the first
    ``videos_per_task`` episodes of each task, named ``<task>-<episode>-<success|failure>.gif``).
    ``sampling``: the sampling arguments of every chunk (``steps``, ``method``, ``noise_scale``;
    with ``execution="rtc"`` also ``max_guidance``, ``guidance_schedule``, ``guidance_jacobian`` and
    ``guided_overlap``; with ``"rtc-trained"`` also ``overlap_guidance`` and, with it, those four;
    and the executor's ``candidates`` and ``n_action_steps``), checked before the first episode;
    ``temporal_ensemble``: ACT's ensembling weight, or ``None``;
    ``execution`` and ``delay``: how chunks run with an inference delay of ``delay`` control steps
    (:class:`~flowforge.policy.execution.ChunkExecutor`). The report counts the steps the robot
    waited and the action jumps where chunks took over. A policy whose action or state sizes are
    not the environment's (trained on another robot's data) is refused with a
    :class:`~flowforge.errors.ConfigError` before the first episode.

    ``processes`` > 1 splits the tasks into that many consecutive groups, each evaluated in a
    process of its own with one torch thread (the policy travels as a checkpoint). Every episode
    seeds its scene and its noise from its own seed, so the report is the one a single process
    gives, task for task; only the chunk latencies differ, measured with the processes sharing
    the cores. The processes are spawned, so each imports the calling script first: a script
    that calls this at its top level needs ``if __name__ == "__main__":`` around the call.
    """
    from flowforge.config import MAX_SEED
    from flowforge.envs.metaworld import CAMERAS, MAX_EPISODE_STEPS, MAX_EPISODES, MetaWorldEnv, _check_task

    if not isinstance(tasks, list | tuple) or not tasks or len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks must be a non-empty list of distinct task names, got {tasks!r}")
    for task in tasks:
        _check_task(task)
    check_count("episodes", episodes, high=MAX_EPISODES)
    check_count("max_steps", max_steps, high=MAX_EPISODE_STEPS)
    check_count("image_size", image_size, low=8)
    check_count("videos_per_task", videos_per_task, low=0)
    highest = seed_base + TASK_SEED_STRIDE * (len(tasks) - 1) + episodes - 1
    if not is_count(seed_base, 0) or highest > MAX_SEED:
        raise ValueError(f"seed_base must be an int >= 0 whose episode seeds stay <= {MAX_SEED}, got {seed_base!r}")
    processes = check_count("processes (at most one per task)", processes, high=len(tasks))
    policy.eval()
    executor = ChunkExecutor(
        policy, temporal_ensemble=temporal_ensemble, execution=execution, delay=delay, **(sampling or {})
    )
    recorded = {
        "episodes": episodes,
        "seed_base": seed_base,
        "max_steps": max_steps,
        "execution": execution,
        "delay": list(delay) if isinstance(delay, tuple) else delay,
        "temporal_ensemble": temporal_ensemble,
        "sampling": dict(sampling or {}),
    }
    if processes > 1:  # every setting is checked above, in this process, before any is started
        executor.close()
        settings = dict(
            max_steps=max_steps,
            image_size=image_size,
            video_dir=video_dir,
            videos_per_task=videos_per_task,
            sampling=sampling,
            temporal_ensemble=temporal_ensemble,
            execution=execution,
            delay=delay,
        )
        report = _evaluate_in_processes(policy, list(tasks), episodes, seed_base, processes, progress, settings)
        return replace(report, settings=recorded)
    needs_image = policy.encoder.sees_images or video_dir is not None
    config = policy.policy_config
    # The policy's cameras (an unnamed one is the corner camera earlier policies were trained on).
    cameras = list(config.cameras) if config.cameras is not None and config.image_shape is not None else ["corner"]
    if config.image_shape is not None:
        image_size = config.image_shape[1]
    foreign = [camera for camera in cameras if camera not in CAMERAS]
    if foreign and policy.encoder.sees_images:
        raise ConfigError(
            f"the policy sees the cameras {', '.join(cameras)}; MetaWorld has no {foreign[0]!r} (its cameras: "
            f"{', '.join(CAMERAS)}): it was trained on another robot's data"
        )
    results, latencies, nfe = [], [], []
    bar = tqdm(total=len(tasks) * episodes, desc="episodes", disable=not progress, leave=False)
    try:
        for position, task in enumerate(tasks):
            env = MetaWorldEnv(task, image=needs_image, cameras=cameras, size=image_size, max_steps=max_steps)
            result = TaskResult(task)
            try:
                if position == 0:
                    _check_fits(executor, env)
                for episode in range(episodes):
                    record = video_dir is not None and episode < videos_per_task
                    seed = seed_base + TASK_SEED_STRIDE * position + episode
                    success, steps, frames, chunk_latencies, chunk_nfe = rollout(executor, env, seed, max_steps, record)
                    result.successes.append(success)
                    result.steps.append(steps)
                    result.waited.append(executor.waited)
                    result.jumps += executor.boundary_jumps()
                    result.changes += executor.within_chunk_changes()
                    result.deviations += executor.plan_deviations()
                    latencies += chunk_latencies
                    nfe += chunk_nfe
                    if record and frames:
                        outcome = "success" if success else "failure"
                        save_gif(frames[::2], Path(video_dir) / f"{task}-{episode}-{outcome}.gif", fps=15)
                    bar.update(1)
                    bar.set_postfix(task=task, success=f"{result.rate:.0%}")
            finally:
                env.close()
            results.append(result)
    finally:
        bar.close()
        executor.close()
    return EvaluationReport(results, latencies, nfe, recorded)


def _exit_with_parent(parent: int) -> None:
    """Evaluation worker initializer: end this process once the process that started it is gone
    (killed), instead of lingering with its share of the episodes."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def _evaluate_group(
    checkpoint: str, tasks: list[str], episodes: int, seed_base: int, settings: dict
) -> EvaluationReport:
    """One process's share of :func:`evaluate`: the policy from ``checkpoint``, one torch thread."""
    from flowforge.checkpoint import load_model

    torch.set_num_threads(1)
    return evaluate(load_model(checkpoint), tasks, episodes, seed_base=seed_base, progress=False, **settings)


def _evaluate_in_processes(
    policy: ChunkPolicy,
    tasks: list[str],
    episodes: int,
    seed_base: int,
    processes: int,
    progress: bool,
    settings: dict,
) -> EvaluationReport:
    """:func:`evaluate` over ``processes`` consecutive groups of tasks; each group's seeds are the
    ones its tasks have at their positions in ``tasks``, so the merged report is a single run's."""
    import multiprocessing
    import tempfile
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    from flowforge.checkpoint import save_model

    bounds = [round(i * len(tasks) / processes) for i in range(processes + 1)]
    groups = [(first, tasks[first:last]) for first, last in itertools.pairwise(bounds)]
    with tempfile.TemporaryDirectory(prefix="flowforge-evaluate-") as folder:
        save_model(folder, policy)
        # spawn: a forked child of a process that has run torch's thread pool can hang in it
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            processes, mp_context=context, initializer=_exit_with_parent, initargs=(os.getpid(),)
        ) as pool:
            futures = [
                pool.submit(_evaluate_group, folder, group, episodes, seed_base + TASK_SEED_STRIDE * first, settings)
                for first, group in groups
            ]
            reports = []
            with tqdm(total=len(tasks), desc="tasks", disable=not progress, leave=False) as bar:
                for future in futures:  # in task order; each blocks until its group is done
                    try:
                        reports.append(future.result())
                    except BrokenProcessPool as error:
                        raise RuntimeError(
                            f"an evaluation process ended before reporting (processes = {processes}). Each one "
                            "starts by importing the main script: a script that calls evaluate at its top "
                            'level needs `if __name__ == "__main__":` around that call; otherwise the '
                            "process was killed (memory?) or crashed, and processes=1 shows why"
                        ) from error
                    bar.update(len(reports[-1].tasks))
    return EvaluationReport(
        [t for r in reports for t in r.tasks],
        [x for r in reports for x in r.latencies],
        [n for r in reports for n in r.nfe],
    )
