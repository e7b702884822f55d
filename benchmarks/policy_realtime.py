"""Benchmark: chunked execution with inference delay, few-step policy heads and chunk likelihoods.

What it measures (MetaWorld MT10, the simulator's state + language, 50 demonstrations per task,
``configs/policy/mt10.toml``: width 64, 3 layers, chunks of 16 executing 8, 10,000 steps of 128):

1. **Execution methods with delay.** The flow policy is rolled out with ``sync``, ``async`` and
   ``rtc``, and a second flow policy trained with training-time real-time chunking
   (``rtc_training_delay`` = the largest delay, noise of ``--rtc-prefix-noise`` on its training
   prefixes, ``--rtc-unprefixed-fraction`` of its rows without one; ``flow-rtc`` below) with
   ``rtc-trained``: training with prefixes costs the plain policy success, so each method gets
   the policy it is meant for; ``rtc-trained-guided`` is that policy with both variants at once
   (its prefix given, the next steps guided to the old plan: :data:`TRAINED_GUIDANCE`). Delays
   ``D`` in ``--delays`` (control steps), ``--episodes`` fresh-seed episodes per task: success,
   the mean and largest action jump where a chunk takes over, and the episode length counting the
   steps the robot waited.
   Goals at D = 4: RTC (either variant) within 2 points of the D = 0 synchronous policy; its
   boundary jump at most half of naive async's; where async loses more than 5 points, RTC at
   least 10 points above it. A jump is read against the ordinary change between two steps of one
   chunk, which evaluation reports next to it (and the demonstrations' own: a mean of 0.105), and
   against its other part, the deviation of the action sent from the one the chunk left behind
   had planned for that step (a jump is at most that deviation plus the plan's own change).
   ``--rtc-schedule``, ``--max-guidance``, ``--rtc-jacobian`` and ``--rtc-overlap`` set RTC's
   prefix weights, guidance clip, how the guidance reaches the noisy chunk and how many steps
   after the frozen ones it reaches; the ``guidance leverage`` line
   measures how far the paper's vector-Jacobian guidance can move this model's chunks at all
   (:func:`_guidance_leverage`). ``--candidates N`` runs each RTC variant a second time sampling N
   chunks per request and keeping the one whose action where it takes over lies closest to the
   last action sent (``ChunkExecutor``'s ``candidates``; named ``...-xN``); ``--episode-offset``
   evaluates another range of fresh seeds.
2. **Few-step heads** (``shortcut``, ``meanflow``, ``consistency``, and one-segment consistency
   heads distilled from the flow model for ``--distill-steps``, starting from its weights
   (``[distill]`` of the policy config): ``consistency-distilled`` by consistency distillation,
   ``consistency-trajectory`` by regressing the teacher's Euler trajectories onto their ends) at
   1 and 2 steps against the
   10-step flow head (synchronous, D = 0). Each head's temperature at each step count is chosen
   among ``--few-step-noise-scales`` by rollouts on validation seeds (``--validation-episodes`` per
   task, a seed range the evaluation never uses; ties go to the higher temperature), as the flow
   head's 0.5 was chosen by ``policy_mt10.py``: one step from a narrowed noise gives a chunk near
   the conditional mean, whose small actions can stall short of a target. Goals: within 2 points
   of the flow head; chunk latency at 1 step at most 1/5 of the flow head's at 10 (batch 1, one
   thread, cached, medians, all heads measured alternately in one run).
3. **Likelihood**: for held-out observations (episodes collected with another seed), the flow
   head's ``log_prob`` of the observation's own expert chunk against chunks of other tasks'
   episodes paired with the same observation; AUROC (goal >= 0.9).
4. A PNG of one episode's actions around chunk boundaries for every method at D = 4.

Every phase stores its result under ``--work`` and is skipped when it exists, so an interrupted run
continues where it stopped. Run two copies with disjoint ``--models`` to train in parallel; the
evaluation phases of a copy run once its models exist. The summary goes to
``benchmarks/results/policy_realtime.json``.

How to run
----------
Needs the ``robot`` extra::

    python benchmarks/policy_realtime.py                                  # everything (hours on 2 cores)
    python benchmarks/policy_realtime.py --episodes 5 --steps 2000        # a quick look
    python benchmarks/policy_realtime.py --tasks reach-v3,push-v3 ...     # other tasks (one --work per set)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from common import (  # benchmarks/ is on sys.path
    RESULTS_DIR,
    claim_work_folder,
    model_weights_digest,
    nonnegative_float,
    nonnegative_int,
    parse_tasks,
    policy_settings_changed,
    positive_float,
    positive_int,
    read_json,
    refuse_other_settings,
    run_resumable,
    seed_int,
    write_json,
)
from flowforge.data.episodes import EpisodeDataset
from flowforge.envs.collect import collect
from flowforge.envs.evaluate import EVALUATION_SEED_BASE, VALIDATION_SEED_BASE, evaluate
from flowforge.envs.metaworld import MT10
from flowforge.policy.heads import GUIDANCE_JACOBIANS, RTC_SCHEDULES
from flowforge.runs.policy import load_policy, load_policy_config, train_policy
from flowforge.validation import MAX_CANDIDATES

ROOT = Path(__file__).resolve().parents[1]
FEW_STEP = ("shortcut", "meanflow", "consistency", "consistency-distilled", "consistency-trajectory")
#: The consistency heads distilled from the flow model, by distillation method.
DISTILLED = {"consistency-distilled": "consistency", "consistency-trajectory": "trajectory"}
MODELS = ("flow", "flow-rtc", *FEW_STEP)
#: flow-rtc's noise on its training prefixes and fraction of rows without one (``policy.rtc_prefix_noise``,
#: ``policy.rtc_unprefixed_fraction``): see the seventh run in docs/benchmarks/policy_realtime.md.
RTC_PREFIX_NOISE, RTC_UNPREFIXED_FRACTION = 0.2, 0.5
#: Execution methods measured with delay: ``rtc-trained-guided`` is ``rtc-trained`` with
#: ``overlap_guidance`` (both RTC variants at once: the prefix given, the rest of the overlap guided).
METHODS = ("sync", "async", "rtc", "rtc-trained", "rtc-trained-guided")
#: ``rtc-trained-guided``'s guidance (the ``--rtc-*`` options set ``rtc``'s): the paper's
#: vector-Jacobian guidance and schedule with the clip at 10, the smallest jump that kept the success
#: in the eighth run of docs/benchmarks/policy_realtime.md (the identity guidance over 3 steps reached
#: half of async's jump and lost 3.5 points).
TRAINED_GUIDANCE = {"overlap_guidance": True, "max_guidance": 10.0}


def _cached(path: Path, compute):
    """The JSON at ``path``, computed and written first when missing (a resumable phase)."""
    stored = read_json(path)
    if stored is not None:
        return stored
    result = compute()
    write_json(path, result)
    return result


def _train(args, name: str, data: Path) -> Path:
    """Train the model ``name``: a head kind, ``flow-rtc`` (the flow head with training-time RTC), or
    one of :data:`DISTILLED` (a one-segment consistency head distilled from the ``flow`` model,
    trained first if it is not yet). A finished run is reused only under the settings asked for."""
    run = args.work / "runs" / name
    config = _run_config(args, name, data)
    if (run / "trained.json").exists():
        if name == "flow-rtc":
            policy_config = load_policy(run).policy_config
            asked = {
                "rtc_training_delay": max(args.delays),
                "rtc_prefix_noise": args.rtc_prefix_noise,
                "rtc_unprefixed_fraction": args.rtc_unprefixed_fraction,
            }
            trained = {key: getattr(policy_config, key) for key in asked}
            if trained != asked:
                raise SystemExit(
                    f"{run} was trained with {trained}, not {asked}: move it away to train again, or ask for "
                    "its settings (--delays, --rtc-prefix-noise, --rtc-unprefixed-fraction)"
                )
        refuse_other_settings(run, policy_settings_changed(run, config))
        return run
    start = time.perf_counter()
    print(f"[train] {name}: {config.train.steps} steps", flush=True)
    train_policy(config, run, resume=(run / "checkpoint.json").exists())
    write_json(run / "trained.json", {"seconds": time.perf_counter() - start})
    return run


def _run_config(args, name: str, data: Path):
    """The run config of the model ``name`` (for a distilled head, after its teacher is trained)."""
    kind = "flow" if name == "flow-rtc" else "consistency" if name in DISTILLED else name
    steps = args.distill_steps if name in DISTILLED else args.steps
    overrides = [
        f'policy.kind="{kind}"',
        f'data.root="{data}"',
        f"train.steps={steps}",
        f"train.warmup_steps={min(500, steps // 10)}",
        f"train.seed={args.seed}",
        "train.progress=false",
    ]
    if name in DISTILLED:
        teacher = _train(args, "flow", data)
        overrides += [
            "policy.consistency_segments=1",
            f'distill.teacher="{teacher}"',
            f'distill.method="{DISTILLED[name]}"',
            f"train.lr={args.distill_lr}",
        ]
    if name == "flow-rtc":
        overrides += [
            f"policy.rtc_training_delay={max(args.delays)}",
            f"policy.rtc_prefix_noise={args.rtc_prefix_noise}",
            f"policy.rtc_unprefixed_fraction={args.rtc_unprefixed_fraction}",
        ]
    if name == "meanflow":  # its loss differentiates the expert in time: a smooth time embedding,
        # with which the plain squared error trains better than the adaptive weight
        overrides += ["policy.time_embedding_frequency=4.0", "policy.meanflow_adaptive_power=0.0"]
    return load_policy_config(ROOT / "configs" / "policy" / "mt10.toml", overrides)


def _evaluate(args, name: str, run: Path, validation: bool = False, **settings) -> dict:
    """Roll a run out on MT10 (``--episodes`` per task; ``--validation-episodes`` on the validation seeds)."""
    phase = "validate" if validation else "eval"

    def compute() -> dict:
        policy = load_policy(run)
        episodes, extra = (
            (args.validation_episodes, {"seed_base": VALIDATION_SEED_BASE}) if validation else (args.episodes, {})
        )
        if not validation and args.episode_offset:
            extra = {"seed_base": EVALUATION_SEED_BASE + args.episode_offset}
        processes = min(args.eval_processes, len(args.tasks))
        report = evaluate(policy, args.tasks, episodes, progress=False, processes=processes, **settings, **extra)
        print(f"[{phase}] {name}\n{report.table()}", flush=True)
        return report.to_dict()

    # Every setting of the rollout, and the weights, are in the file name: another temperature,
    # episode count or retrained model is another result.
    episodes = args.validation_episodes if validation else args.episodes
    weights = model_weights_digest(run)
    offset = {} if validation or not args.episode_offset else {"episode_offset": args.episode_offset}
    key = json.dumps({"episodes": episodes, "weights": weights, **offset, **settings}, sort_keys=True)
    return _cached(args.work / f"{phase}-{name}-{hashlib.sha256(key.encode()).hexdigest()[:8]}.json", compute)


def _few_step(args, kind: str, run: Path, steps: int) -> tuple[dict, float, dict[float, float]]:
    """A few-step head at ``steps`` steps: its temperature chosen on validation seeds, then evaluated."""
    validation = {
        scale: _evaluate(
            args,
            f"{kind}-{steps}step-noise{scale:g}",
            run,
            validation=True,
            sampling={"steps": steps, "noise_scale": scale},
        )["average_success"]
        for scale in args.few_step_noise_scales
    }
    chosen = max(validation, key=lambda scale: (validation[scale], scale))
    result = _evaluate(
        args, f"{kind}-{steps}step-noise{chosen:g}", run, sampling={"steps": steps, "noise_scale": chosen}
    )
    return result, chosen, validation


def _latency(args, runs: dict[str, Path]) -> dict:
    """Median cached chunk latency of every head, measured alternately (batch 1, one thread)."""

    cases = {"flow, 10 steps": ("flow", 10)}
    for kind in FEW_STEP:
        if kind in runs:
            cases.update({f"{kind}, 1 step": (kind, 1), f"{kind}, 2 steps": (kind, 2)})
    path = args.work / "latency.json"
    if path.exists() and not set(cases) <= set(read_json(path) or {}):
        path.unlink()  # measured before a head joined: all heads are measured again, alternately

    def compute() -> dict:
        item = EpisodeDataset(args.work / "mt10", 1, 16)[0]
        batch = {"state": item["observation.environment_state"][None], "instruction": [item["task"]]}
        policies = {kind: load_policy(runs[kind]) for kind, _ in cases.values()}
        times: dict[str, list[float]] = {name: [] for name in cases}
        for repeat in range(args.latency_repeats + 3):
            for name, (kind, steps) in cases.items():
                result = policies[kind].predict_chunk(batch, steps=steps)
                if repeat >= 3:
                    times[name].append(result.seconds)
        return {name: 1000 * statistics.median(values) for name, values in times.items()}

    return _cached(path, compute)


def _auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counted half (the Mann-Whitney statistic)."""
    greater = (positive[:, None] > negative[None, :]).mean()
    ties = (positive[:, None] == negative[None, :]).mean()
    return float(greater + 0.5 * ties)


def _likelihood(args, run: Path) -> dict:
    """AUROC of the flow head's log p(chunk | observation): own expert chunk vs other tasks' chunks."""

    def compute() -> dict:
        heldout = EpisodeDataset(args.work / "heldout", 1, 16)
        policy = load_policy(run)
        generator = np.random.default_rng(0)
        rows = [
            int(i)
            for i in generator.choice(len(heldout), size=min(args.likelihood_frames, len(heldout)), replace=False)
        ]
        items = [heldout[i] for i in rows]
        tasks = [item["task"] for item in items]
        states = torch.stack([item["observation.environment_state"] for item in items])
        own = torch.stack([item["action"] for item in items])
        others = []
        for task in tasks:
            candidates = [j for j, other in enumerate(tasks) if other != task]
            others.append(own[int(generator.choice(candidates))])
        foreign = torch.stack(others)
        scores = {}
        for name, chunks in (("own", own), ("other task", foreign)):
            values = []
            for start in range(0, len(rows), 64):
                part = slice(start, start + 64)
                batch = {"state": states[part], "instruction": tasks[part], "action": chunks[part]}
                values.append(policy.log_prob(batch, method="rk4", steps=10))
            scores[name] = torch.cat(values).numpy()
        return {
            "auroc": _auroc(scores["own"], scores["other task"]),
            "pairs": len(rows),
            "median_log_prob_own": float(np.median(scores["own"])),
            "median_log_prob_other": float(np.median(scores["other task"])),
        }

    return _cached(args.work / "likelihood.json", compute)


#: Flow times at which :func:`_guidance_leverage` measures the Jacobian of the predicted chunk.
LEVERAGE_TIMES = (0.05, 0.3, 0.6, 0.9)


def _guidance_leverage(args, run: Path, frames: int = 40) -> dict:
    r"""How far real-time chunking's guidance can move a chunk. Its pull is
    :math:`c_t J^\top [W \odot (Y - \hat A)]` with :math:`J = \partial \hat A / \partial x_t` and
    :math:`\hat A = x_t + (1 - t) v(x_t, t)`; a model sure of its chunk (a narrow conditional) has
    :math:`\hat A` nearly independent of :math:`x_t`, so :math:`J` is small and the pull is weak
    against the model's own pull to that chunk. Reported: the mean and largest singular value of
    :math:`J` (64 x 64 at the MT10 size, exact), averaged over ``frames`` held-out observations, at
    :data:`LEVERAGE_TIMES`, with :math:`x_t = (1 - t)\,s\,\varepsilon + t A` (A the observation's
    own expert chunk, normalised; s the temperature)."""

    def compute() -> dict:
        heldout = EpisodeDataset(args.work / "heldout", 1, 16)
        policy = load_policy(run).eval()
        generator = np.random.default_rng(1)
        torch.manual_seed(1)
        rows = [int(i) for i in generator.choice(len(heldout), size=min(frames, len(heldout)), replace=False)]
        values: dict[str, list[float]] = {}
        for row in rows:
            item = heldout[row]
            batch = policy.checked_batch(
                {"state": item["observation.environment_state"][None], "instruction": [item["task"]]}
            )
            with torch.no_grad():
                velocity = policy.head.velocity(policy.expert.encode(policy.prefix(batch, False)))
            chunk = policy.normalize_action(item["action"][None])
            for t in LEVERAGE_TIMES:
                x = (1 - t) * args.noise_scale * torch.randn_like(chunk) + t * chunk
                time_ = torch.full((1,), t)

                def predicted(x: torch.Tensor, time_=time_, t: float = t, field=velocity) -> torch.Tensor:
                    return x + (1 - t) * field(x, time_)

                jacobian = torch.autograd.functional.jacobian(predicted, x).reshape(chunk.numel(), chunk.numel())
                singular = torch.linalg.svdvals(jacobian)
                values.setdefault(f"{t:g} mean", []).append(float(singular.mean()))
                values.setdefault(f"{t:g} max", []).append(float(singular.max()))
        return {"frames": len(rows), **{key: float(np.mean(v)) for key, v in values.items()}}

    # keyed by the weights too: a model trained again is measured again
    weights = model_weights_digest(run)[:16]
    return _cached(args.work / f"guidance-leverage-{args.noise_scale:g}-{weights}.json", compute)


def _boundary_plot(args, runs: dict[str, Path], delay: int) -> Path:
    from flowforge.envs.evaluate import rollout
    from flowforge.envs.metaworld import MetaWorldEnv
    from flowforge.eval.plots import plot_chunk_boundaries
    from flowforge.policy import ChunkExecutor

    path = RESULTS_DIR / "policy_realtime_boundaries.png"
    policies = {name: load_policy(runs[name]) for name in ("flow", "flow-rtc")}
    traces = {}
    env = MetaWorldEnv("push-v3" if "push-v3" in args.tasks else args.tasks[0], max_steps=200)
    try:
        for method in METHODS:
            execution = method.removesuffix("-guided")
            policy = policies["flow-rtc" if execution == "rtc-trained" else "flow"]
            guided = TRAINED_GUIDANCE if method == "rtc-trained-guided" else {}
            for candidates in (1, args.candidates) if execution.startswith("rtc") else (1,):
                settings = {"noise_scale": args.noise_scale, "candidates": candidates, **guided}
                executor = ChunkExecutor(policy, execution=execution, delay=delay, **settings)
                rollout(executor, env, seed=900_000_123, max_steps=120)
                traces[f"{method}{f' x{candidates}' if candidates > 1 else ''}, D = {delay}"] = executor.sent_actions()
    finally:
        env.close()
    return plot_chunk_boundaries(traces, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("benchmark-work/policy_realtime"))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--demos", type=positive_int, default=50)
    parser.add_argument("--steps", type=positive_int, default=10000)
    parser.add_argument(
        "--distill-steps",
        type=positive_int,
        default=5000,
        help="steps of the consistency heads distilled from the flow head",
    )
    parser.add_argument(
        "--distill-lr",
        type=positive_float,
        default=1e-4,
        help="their peak learning rate (they start from the flow head's weights; 3e-4 first undid them)",
    )
    parser.add_argument("--episodes", type=positive_int, default=50)
    parser.add_argument(
        "--tasks",
        default=",".join(MT10),
        help="the tasks (MT10); at least two, the likelihood pairing each chunk with another task's",
    )
    parser.add_argument("--delays", default="0,2,4,6")
    parser.add_argument("--noise-scale", type=nonnegative_float, default=0.5, help="the flow policies' temperature")
    parser.add_argument(
        "--rtc-prefix-noise",
        type=nonnegative_float,
        default=RTC_PREFIX_NOISE,
        help="flow-rtc's policy.rtc_prefix_noise: the spread of the noise on its training prefixes",
    )
    parser.add_argument(
        "--rtc-unprefixed-fraction",
        type=float,
        default=RTC_UNPREFIXED_FRACTION,
        help="flow-rtc's policy.rtc_unprefixed_fraction: the fraction of its training rows without a prefix",
    )
    parser.add_argument(
        "--few-step-noise-scales", default="0.5,1", help="the few-step heads' temperatures tried on validation seeds"
    )
    parser.add_argument(
        "--rtc-schedule",
        choices=RTC_SCHEDULES,
        help="real-time chunking's prefix weights over the overlap after the frozen steps (default exp, the paper's)",
    )
    parser.add_argument(
        "--max-guidance",
        type=nonnegative_float,
        help="real-time chunking's guidance clip beta (default 5, the paper's)",
    )
    parser.add_argument(
        "--rtc-jacobian",
        choices=GUIDANCE_JACOBIANS,
        help="how real-time chunking's guidance reaches the noisy chunk (default vjp, the paper's)",
    )
    parser.add_argument(
        "--rtc-overlap",
        type=int,
        help="steps after the frozen ones that real-time chunking guides (default: the whole plan left, the paper's)",
    )
    parser.add_argument(
        "--candidates",
        type=positive_int,
        default=4,
        help="also run the RTC variants sampling this many chunks, keeping the one that joins the last action "
        "sent most closely (ChunkExecutor's candidates; 1: only the plain runs; with rtc-trained, 4 came "
        "nearest to both goals at D = 4, see the tenth run in docs/benchmarks/policy_realtime.md)",
    )
    parser.add_argument(
        "--episode-offset",
        type=nonnegative_int,
        default=0,
        help="evaluate each task's episodes from this one on (another range of fresh seeds)",
    )
    parser.add_argument(
        "--validation-episodes", type=positive_int, default=20, help="per task, for choosing temperatures"
    )
    parser.add_argument("--latency-repeats", type=positive_int, default=100)
    parser.add_argument("--likelihood-frames", type=positive_int, default=400)
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument(
        "--eval-processes",
        type=positive_int,
        default=1,
        help="evaluate the tasks in this many processes (one torch thread each; same seeds, same results)",
    )
    parser.add_argument("--seed", type=seed_int, default=0)
    args = parser.parse_args()
    try:
        args.delays = sorted({int(d) for d in args.delays.split(",")})
    except ValueError:
        parser.error(f"--delays {args.delays!r}: need comma-separated control steps, e.g. 0,2,4,6")
    if args.delays[0] < 0 or args.delays[-1] > 15:
        parser.error(f"--delays {','.join(map(str, args.delays))}: need delays in 0..15 (under the chunk's 16 steps)")
    try:
        args.few_step_noise_scales = [float(s) for s in args.few_step_noise_scales.split(",")]
    except ValueError:
        parser.error(f"--few-step-noise-scales {args.few_step_noise_scales!r}: need comma-separated numbers")
    if not args.few_step_noise_scales or not all(0 <= s < float("inf") for s in args.few_step_noise_scales):
        parser.error(f"--few-step-noise-scales {args.few_step_noise_scales}: each must be finite and >= 0")
    if args.rtc_overlap is not None and not 0 <= args.rtc_overlap <= 16:
        parser.error(f"--rtc-overlap {args.rtc_overlap}: need an integer in 0..16 (the chunk's steps)")
    if args.max_guidance is not None and not 0 <= args.max_guidance < float("inf"):
        parser.error(f"--max-guidance {args.max_guidance}: need a finite number >= 0")
    if not 0 <= args.rtc_prefix_noise < float("inf"):
        parser.error(f"--rtc-prefix-noise {args.rtc_prefix_noise}: need a finite number >= 0")
    if not 0 < args.rtc_unprefixed_fraction < 1:
        parser.error(f"--rtc-unprefixed-fraction {args.rtc_unprefixed_fraction}: need a number in (0, 1)")
    if not 1 <= args.candidates <= MAX_CANDIDATES:
        parser.error(f"--candidates {args.candidates}: need an integer in 1..{MAX_CANDIDATES}")
    if not 0 <= args.episode_offset <= 10**6:
        parser.error(f"--episode-offset {args.episode_offset}: need an integer in 0..1000000")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        parser.error(f"--models {args.models!r}: name one or more of {', '.join(MODELS)}")
    try:
        args.tasks = parse_tasks("--tasks", args.tasks, at_least=2)
        claim_work_folder(args.work, tasks=(args.tasks, args.work / "mt10"))  # only once every argument is valid
    except ValueError as error:
        parser.error(str(error))
    torch.set_num_threads(args.threads)

    collect(args.tasks, args.demos, args.work / "mt10", progress=False)
    collect(args.tasks, 5, args.work / "heldout", seed=1, progress=False)  # other scenes, for the likelihood
    runs = {kind: _train(args, kind, args.work / "mt10") for kind in models}
    sampling = {"noise_scale": args.noise_scale}
    # Only the settings given enter the guided rollouts' settings (and so their cache keys).
    guidance = {
        key: value
        for key, value in (
            ("guidance_schedule", args.rtc_schedule),
            ("max_guidance", args.max_guidance),
            ("guidance_jacobian", args.rtc_jacobian),
            ("guided_overlap", args.rtc_overlap),
        )
        if value is not None
    }
    results: dict[str, dict] = {}
    for delay in args.delays:
        for method in METHODS:
            execution = method.removesuffix("-guided")
            model = "flow-rtc" if execution == "rtc-trained" else "flow"
            if model not in runs or (delay == 0 and execution == "async"):  # async without delay is sync
                continue
            name = f"flow-{method}-D{delay}"
            settings = {
                "rtc": {**sampling, **guidance},
                "rtc-trained-guided": {**sampling, **TRAINED_GUIDANCE},
            }.get(method, sampling)
            results[name] = _evaluate(args, name, runs[model], sampling=settings, execution=execution, delay=delay)
            if args.candidates > 1 and execution.startswith("rtc"):
                name = f"flow-{method}-x{args.candidates}-D{delay}"
                settings = {**settings, "candidates": args.candidates}
                results[name] = _evaluate(args, name, runs[model], sampling=settings, execution=execution, delay=delay)
    if "flow" in runs:
        leverage = _guidance_leverage(args, runs["flow"])
        print(
            "guidance leverage (singular values of d(predicted chunk)/d(noisy chunk), mean / largest): "
            + ", ".join(
                f"t = {t:g}: {leverage[f'{t:g} mean']:.3f} / {leverage[f'{t:g} max']:.3f}" for t in LEVERAGE_TIMES
            ),
            flush=True,
        )
    temperatures: dict[str, dict] = {}
    for kind in FEW_STEP:
        if kind in runs:
            for steps in (1, 2):
                name = f"{kind}-{steps}step"
                results[name], chosen, validation = _few_step(args, kind, runs[kind], steps)
                temperatures[name] = {"chosen": chosen, "validation": validation}
    if not all(name in runs for name in ("flow", "flow-rtc", *FEW_STEP)):
        print("evaluations of these models done; the summary needs every model (run without --models)")
        return
    if 0 not in args.delays:
        print("evaluations at these delays done; the summary compares with the synchronous policy at D = 0")
        return
    latency = _latency(args, runs)
    likelihood = _likelihood(args, runs["flow"])
    plot = _boundary_plot(args, runs, 4 if 4 in args.delays else max(args.delays))

    print(
        "\nExecution with inference delay (flow head, success / mean jump / max jump / length with waits / "
        "mean change within a chunk / mean deviation from the plan left behind)"
    )
    for name, result in results.items():
        if name.startswith("flow-"):
            # absent from evaluations of older releases
            within, deviation = result.get("mean_action_change_within_chunks"), result.get("mean_deviation_from_plan")
            print(
                f"{name:26s} {result['average_success']:6.1%}  {result['mean_boundary_jump'] or 0:.3f}  "
                f"{result['max_boundary_jump'] or 0:.3f}  {result['mean_episode_length_with_waits']:.1f}  "
                f"{'-' if within is None else f'{within:.3f}'}  {'-' if deviation is None else f'{deviation:.3f}'}"
            )
    print("\nFew-step heads (average success; temperature chosen on validation seeds)")
    for name, result in results.items():
        if not name.startswith("flow-"):
            tried = ", ".join(f"{s:g}: {r:.1%}" for s, r in temperatures[name]["validation"].items())
            print(
                f"{name:26s} {result['average_success']:6.1%}   temperature {temperatures[name]['chosen']:g} ({tried})"
            )
    print("\nLatency per chunk (ms)")
    for name, ms in latency.items():
        print(f"{name:26s} {ms:8.2f}")
    print(
        f"\nLikelihood AUROC, own chunk vs other tasks' chunks: {likelihood['auroc']:.3f} ({likelihood['pairs']} pairs)"
    )

    base = results["flow-sync-D0"]["average_success"]
    checks = {}
    if 4 in args.delays:
        naive = results["flow-async-D4"]
        variants = [*METHODS[2:]] + ([f"{m}-x{args.candidates}" for m in METHODS[2:]] if args.candidates > 1 else [])
        for variant in variants:
            rtc = results[f"flow-{variant}-D4"]
            checks[f"{variant} at D=4 within 2 points of sync at D=0"] = rtc["average_success"] >= base - 0.02
            checks[f"{variant} boundary jump at most half of async's"] = (
                rtc["mean_boundary_jump"] <= 0.5 * naive["mean_boundary_jump"]
            )
            if naive["average_success"] < base - 0.05:
                checks[f"{variant} 10 points above async"] = rtc["average_success"] >= naive["average_success"] + 0.10
    for kind in FEW_STEP:
        for steps in (1, 2):
            checks[f"{kind} at {steps} step(s) within 2 points of flow at 10"] = (
                results[f"{kind}-{steps}step"]["average_success"] >= base - 0.02
            )
        ratio = latency[f"{kind}, 1 step"] / latency["flow, 10 steps"]
        checks[f"{kind} 1-step latency {ratio:.2f}x of flow@10 (<= 0.2)"] = ratio <= 0.2
    checks[f"likelihood AUROC {likelihood['auroc']:.3f} >= 0.9"] = likelihood["auroc"] >= 0.9
    print("\nGoals")
    for name, passed in checks.items():
        print(f"  {'PASS' if passed else 'FAIL'}  {name}")
    out = RESULTS_DIR / "policy_realtime.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        "results": results,
        "temperatures": temperatures,
        "latency": latency,
        "likelihood": likelihood,
        "plot": str(plot),
        "goals": checks,
    }
    write_json(out, summary)
    print(f"wrote {out} and {plot}")


if __name__ == "__main__":
    run_resumable(main)
