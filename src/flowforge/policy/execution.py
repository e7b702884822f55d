r"""Executing a chunk policy in an environment, apart from the model.

A :class:`ChunkExecutor` turns a policy that predicts chunks of :math:`H` actions into one action
per control step:

* **Adapter**: it keeps the last ``obs_horizon`` observation dicts of the episode (the first one
  repeated at the start), takes the state from the entry the policy's ``state_key`` names
  (``environment_state`` or ``state``), converts images from HWC to CHW and adds the batch dimension, so the
  policy sees the batch it was trained on. An observation with a NaN/inf state, a wrong shape or
  a missing instruction is refused (``ValueError``) before it enters the history, so one bad
  frame never poisons the actions after it.
* **Queue**: it predicts a chunk when its queue is empty and executes ``n_action_steps`` of it
  before replanning.
* **Temporal ensembling** (``temporal_ensemble = m``, ACT's scheme): it predicts at every step and
  averages every prediction made for the current step with weights :math:`e^{-m i}`, oldest first.

* **Execution with inference delay** (``execution``, ``delay`` = D control steps): ``sync``: the
  robot stands still for D steps while each chunk is computed (:attr:`ChunkExecutor.waited`);
  ``async``: the next chunk is requested D steps before the executed part of the current one runs
  out, from the observation at that step, and takes over when it arrives, at its index D (its
  first D actions were for steps already gone). One chunk is computed at a time, so after the first
  chunk each runs for max(``n_action_steps`` - D, D) steps: any ``n_action_steps`` up to 2D replans
  as soon as a chunk arrives. ``rtc``: async with real-time chunking (Black et
  al. 2025): the new chunk is inpainted to agree with the D actions that run meanwhile and,
  with decaying weights (``guidance_schedule``), with the rest of the current plan
  (:class:`~flowforge.policy.heads.ChunkGuide`; ``guidance_jacobian`` says how the guidance
  reaches the noisy chunk); ``rtc-trained``: async, the new chunk of a policy trained with
  prefixes (``rtc_training_delay``) completes the D actions that run meanwhile, given as they are,
  and with ``overlap_guidance`` is also guided, as ``rtc``, towards the rest of the current plan.
  Past a chunk's end its last action is held. :attr:`ChunkExecutor.executed` records, per control
  step, which chunk and index the action came from, and :attr:`ChunkExecutor.timings` when each
  chunk was requested and arrived.

* **Candidates** (``candidates = N``): every chunk but an episode's first is sampled N times in
  one batch, from the same observation (and guide or prefix), and the one whose action where it
  takes over lies closest to the action sent just before is kept: with
  :math:`A^{(1)}, \dots, A^{(N)}` drawn from the policy and :math:`a_{k-1}` the last action of the
  chunk in effect, the kept chunk is :math:`\arg\min_n \lVert A^{(n)}_d - a_{k-1} \rVert_2` (actions
  clipped to [-1, 1] as sent; :math:`d` the index at which it takes over). Each candidate is a
  draw of the policy given the newer observation, so the choice never returns to the old plan
  where no draw agrees with it; it picks, among the ways the policy would go on, the one that
  joins the motion smoothly (the backward coherence of Liu et al. 2024's bidirectional decoding,
  taken at the take-over step). The jump left is the smallest of N draws' instead of one draw's.
  The price: the draw that changes least where it takes over lags the others a little, which
  costs success where a late correction matters (MetaWorld MT10 at D = 4 with ``rtc-trained``,
  10,000 training steps: 4 candidates halve async's jump and lose about 0.7 points more than one
  draw; at 30,000 steps the policy's draws differ less and 4 candidates bring the jump to 0.69x of
  async's; docs/benchmarks/policy_realtime.md, tenth and eleventh runs).

Sampling settings (``steps``, ``method``, ``noise_scale``) are given to the executor and passed to
every :meth:`~flowforge.policy.ChunkPolicy.predict_chunk`; the policy's config is never changed.
Every predicted chunk's :class:`~flowforge.policy.ChunkResult` is kept in :attr:`ChunkExecutor.chunks`.

>>> import numpy as np
>>> from flowforge.policy import ChunkPolicy, PolicyConfig
>>> config = PolicyConfig(state_key="observation.state", state_dim=3, action_dim=2, horizon=4, width=16, layers=1,
...                       heads=2, language=False)
>>> policy = ChunkPolicy(config)
>>> executor = ChunkExecutor(policy.eval(), n_action_steps=2, steps=3)
>>> actions = [executor.act({"state": np.zeros(3, dtype=np.float32)}) for _ in range(3)]
>>> [a.shape for a in actions], [c.nfe for c in executor.chunks]
([(2,), (2,), (2,)], [3, 3])
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from numbers import Real
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flowforge.policy.config import DERIVED_FEATURES
from flowforge.policy.core import Batch, ChunkPolicy, ChunkResult
from flowforge.policy.heads import GUIDANCE_JACOBIANS, RTC_SCHEDULES, ChunkGuide, ChunkPrefix, rtc_weights
from flowforge.validation import MAX_CANDIDATES, check_bool, check_choice, check_count, check_real, is_count

#: Execution methods: ``sync`` (the robot waits for every chunk), ``async`` (the next chunk is
#: requested ``delay`` steps before the current one runs out and switched to when it arrives) and
#: ``rtc`` (async, with real-time chunking's guided inpainting of the actions that run meanwhile) and
#: ``rtc-trained`` (async; a policy trained with clean prefixes completes the actions that run meanwhile,
#: and with ``overlap_guidance`` is guided as ``rtc`` over the rest of the overlap).
EXECUTIONS = ("sync", "async", "rtc", "rtc-trained")


@dataclass(frozen=True)
class ChunkTiming:
    """When a chunk was requested (the control step of its observation, which is also its ``origin``:
    the step its index 0 is for) and when it arrived (took over)."""

    requested: int
    arrived: int
    origin: int


#: The longest delay in control steps (12.5 s at MetaWorld's 80 Hz; a chunk covers well under a second).
MAX_DELAY = 1000


def _delay_range(delay: int | tuple[int, int]) -> tuple[int, int]:
    """``delay`` as ``(low, high)`` control steps: a fixed delay, or a range drawn from uniformly."""
    values = list(delay) if isinstance(delay, tuple | list) else [delay, delay]
    if len(values) != 2 or not all(is_count(v, low=0, high=MAX_DELAY) for v in values):
        raise ValueError(
            f"delay must be an int in 0..{MAX_DELAY}, a range (low, high) of them (control steps) or 'real', "
            f"got {delay!r}"
        )
    if values[0] > values[1]:
        raise ValueError(f"delay = {delay!r}: the range's low end is above its high end")
    return values[0], values[1]


def _as_sent(actions: np.ndarray) -> np.ndarray:
    """Actions as the robot receives them: clipped to the action space, [-1, 1] (jumps, deviations
    and the choice among candidates are all measured on these)."""
    return np.clip(actions, -1.0, 1.0)


def _checked_vector(observation: dict[str, Any], key: str) -> np.ndarray:
    """``observation[key]`` as a finite float32 vector (a ``ValueError`` names the entry otherwise)."""
    value = np.asarray(observation[key])
    if value.ndim != 1 or not np.issubdtype(value.dtype, np.number) or np.iscomplexobj(value):
        raise ValueError(f"observation[{key!r}] must be a vector of numbers, got {value.dtype} of shape {value.shape}")
    with np.errstate(over="ignore"):
        value = value.astype(np.float32)  # checked after the cast: 1e300 becomes inf here
    if not np.isfinite(value).all():
        bad = int(np.flatnonzero(~np.isfinite(value))[0])
        raise ValueError(
            f"observation[{key!r}] holds {value[bad]} at index {bad} (as float32); a policy acts only on finite "
            "observations"
        )
    return value


def _goal(observation: dict[str, Any], goal_key: str) -> np.ndarray:
    """The goal entry of an observation: ``goal``, or the numbers of the entry it derives from."""
    name = goal_key.removeprefix("observation.")
    if name in observation:
        return _checked_vector(observation, name)
    source, start, end = DERIVED_FEATURES[goal_key]
    source = source.removeprefix("observation.")
    if source not in observation:
        raise ValueError(f"observation has no {name!r} entry (nor {source!r}, which holds it): the policy's goal_key")
    vector = _checked_vector(observation, source)
    if vector.size < end:
        raise ValueError(
            f"observation[{source!r}] has {vector.size} numbers; the goal is its numbers {start}..{end - 1}"
        )
    return vector[start:end]


class ChunkExecutor:
    """One action per control step from a chunk policy (see the module docstring).

    Arguments:
        policy: the chunk policy (put it in eval mode first).
        n_action_steps: actions executed from each chunk before replanning (default: the policy's).
        temporal_ensemble: ``m`` of ACT's temporal ensembling (predict every step), or ``None``.
        steps, method, noise_scale: sampling settings of every chunk (default: the policy's config).
        execution: ``"sync"``, ``"async"``, ``"rtc"`` or ``"rtc-trained"`` (see the module docstring).
        delay: inference delay D in control steps, a range ``(low, high)`` from which each chunk's
            delay is drawn uniformly (requests plan for ``high``), or ``"real"``: a background
            inference thread, with the caller pacing the steps at ``control_period`` seconds
            (:func:`flowforge.envs.episode.run_episode`'s ``pace``).
        control_period: seconds per control step with ``delay="real"`` (MetaWorld: 1/80).
        max_guidance: real-time chunking's guidance clip :math:`\beta` (guided executions only:
            ``"rtc"``, or ``"rtc-trained"`` with ``overlap_guidance``; ``None``: the paper's 5,
            :class:`~flowforge.policy.heads.ChunkGuide`'s default).
        guidance_schedule: real-time chunking's prefix weights over the overlap after the frozen
            steps, one of :data:`~flowforge.policy.heads.RTC_SCHEDULES` (guided executions only;
            ``None``: the paper's ``"exp"``, :func:`~flowforge.policy.heads.rtc_weights`' default).
        guidance_jacobian: how real-time chunking's guidance reaches the noisy chunk, one of
            :data:`~flowforge.policy.heads.GUIDANCE_JACOBIANS` (guided executions only; ``None``:
            the paper's ``"vjp"``; ``"identity"`` needs no backward pass and keeps its grip on a
            policy that is sure of its chunks, see :class:`~flowforge.policy.heads.ChunkGuide`).
        guided_overlap: how many steps after the frozen ones the guidance reaches, the schedule
            decaying over them (guided executions only; ``None``: every step the current plan still
            has, the paper's). A short overlap holds the new chunk to the old plan where it takes
            over and leaves the steps after free to follow the newer observation.
        overlap_guidance: ``execution="rtc-trained"`` only: besides completing the given prefix,
            guide the new chunk towards the rest of the current plan with real-time chunking's
            decaying weights, as ``"rtc"`` does after its frozen steps (both variants at once).
        candidates: chunks sampled (in one batch) for every chunk after an episode's first, of
            which the one joining the last action sent most smoothly is kept (see the module
            docstring); 1 (the default) samples one. Needs a head that samples from noise.
    """

    def __init__(
        self,
        policy: ChunkPolicy,
        n_action_steps: int | None = None,
        temporal_ensemble: float | None = None,
        *,
        steps: int | None = None,
        method: str | None = None,
        noise_scale: float | None = None,
        execution: str = "sync",
        delay: int | tuple[int, int] | str = 0,
        max_guidance: float | None = None,
        guidance_schedule: str | None = None,
        guidance_jacobian: str | None = None,
        guided_overlap: int | None = None,
        overlap_guidance: bool = False,
        candidates: int = 1,
        control_period: float = 1 / 80,
    ) -> None:
        if not isinstance(policy, ChunkPolicy):
            raise TypeError(f"policy must be a ChunkPolicy, got {type(policy).__name__}")
        config = policy.policy_config
        check_choice("execution", execution, EXECUTIONS)
        #: ``delay="real"``: chunks are computed by a background thread while the caller paces the
        #: control steps at ``control_period`` seconds; a chunk takes over at the first step after
        #: it is done, and the delay requests plan for is the measured one.
        self.real = delay == "real"
        self.control_period = check_real("control_period", control_period, positive=True)
        low, high = (1, 1) if self.real else _delay_range(delay)
        if temporal_ensemble is not None and (execution != "sync" or high):
            raise ValueError("temporal_ensemble predicts at every step: it runs with execution='sync' and delay=0")
        #: chunks sampled for every chunk after an episode's first; the smoothest take-over is kept.
        self.candidates = check_count("candidates", candidates, high=MAX_CANDIDATES)
        if self.candidates > 1 and temporal_ensemble is not None:
            raise ValueError(f"candidates = {candidates} chooses where a chunk takes over; temporal_ensemble averages")
        if self.candidates > 1 and not policy.head.samples_from_noise:
            raise ValueError(
                f"candidates = {candidates}: a {config.kind!r} head gives one chunk per observation; "
                "only heads that sample from noise have others to choose among"
            )
        if execution == "rtc" and not getattr(policy.head, "guidable", False):
            raise ValueError(f"execution='rtc' guides a flow head; a {config.kind!r} head cannot be guided")
        given = [
            f"{name} = {value!r}"
            for name, value in (
                ("max_guidance", max_guidance),
                ("guidance_schedule", guidance_schedule),
                ("guidance_jacobian", guidance_jacobian),
                ("guided_overlap", guided_overlap),
            )
            if value is not None
        ]
        check_bool("overlap_guidance", overlap_guidance)
        if overlap_guidance and execution != "rtc-trained":
            raise ValueError(
                f"overlap_guidance = True guides the overlap after training-time RTC's prefix "
                f"(execution='rtc-trained'); execution={execution!r} "
                + ("always guides it" if execution == "rtc" else "has no prefix")
            )
        if given and not (execution == "rtc" or overlap_guidance):
            raise ValueError(
                f"{', '.join(given)}: guides real-time chunking, which execution={execution!r} does not run"
                + (" without overlap_guidance = True" if execution == "rtc-trained" else "")
            )
        if max_guidance is None:
            max_guidance = ChunkGuide.max_guidance
        max_guidance = check_real("max_guidance", max_guidance, non_negative=True)
        if guidance_schedule is None:
            guidance_schedule = RTC_SCHEDULES[0]
        check_choice("guidance_schedule", guidance_schedule, RTC_SCHEDULES)
        if guidance_jacobian is None:
            guidance_jacobian = ChunkGuide.jacobian
        check_choice("guidance_jacobian", guidance_jacobian, GUIDANCE_JACOBIANS)
        if guided_overlap is not None:
            check_count("guided_overlap", guided_overlap, low=0, high=config.horizon)
        #: steps after the frozen ones that the guidance reaches (the schedule decays over them).
        self.guided_overlap = config.horizon if guided_overlap is None else guided_overlap
        if execution == "rtc-trained" and self.real:
            raise ValueError("execution='rtc-trained' needs a known delay bound: give delay as steps, not 'real'")
        if execution == "rtc-trained" and not config.rtc_training_delay:
            raise ValueError(
                f"execution='rtc-trained' samples with the executed prefix given, which a policy learns only when "
                f"trained with rtc_training_delay >= 1 (a flow policy's [policy] setting); this {config.kind!r} "
                "policy was trained without it: use execution='rtc' (flow heads) or 'async'"
            )
        if execution == "rtc-trained" and high > config.rtc_training_delay:
            raise ValueError(
                f"execution='rtc-trained' with delay = {delay} needs a flow policy trained with "
                f"rtc_training_delay >= {high} (this one: {config.rtc_training_delay})"
            )
        #: the chunks are guided towards the plan in effect (``rtc``; ``rtc-trained`` with overlap_guidance).
        self.guided = execution == "rtc" or overlap_guidance
        self.execution, self.max_guidance, self.guidance_schedule = execution, max_guidance, guidance_schedule
        self.guidance_jacobian = guidance_jacobian
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chunk-inference") if self.real else None
        self.closed = False
        #: the delay of each chunk is drawn uniformly from ``delay_range`` (torch's generator); its
        #: largest value, ``delay``, is what requests plan for and what real-time chunking freezes.
        self.delay_range, self.delay = (low, high), high
        n_action_steps = config.n_action_steps if n_action_steps is None else n_action_steps
        n_action_steps = check_count("n_action_steps", n_action_steps, high=config.horizon)
        if temporal_ensemble is not None and (
            isinstance(temporal_ensemble, bool)
            or not isinstance(temporal_ensemble, Real)  # a NumPy number too, as everywhere else
            or not math.isfinite(temporal_ensemble)
            or temporal_ensemble < 0
        ):
            raise ValueError(f"temporal_ensemble must be a finite number >= 0 or None, got {temporal_ensemble!r}")
        self.sampling = {
            k: v for k, v in (("steps", steps), ("method", method), ("noise_scale", noise_scale)) if v is not None
        }
        policy.sampling(**self.sampling)  # a bad setting fails here, not at the first chunk
        self.policy, self.n_action_steps, self.temporal_ensemble = policy, n_action_steps, temporal_ensemble
        #: the :class:`ChunkResult` of every chunk predicted since the last :meth:`reset`.
        self.chunks: list[ChunkResult] = []
        #: per chunk since the last :meth:`reset`: :class:`ChunkTiming` (requested, arrived, origin).
        self.timings: list[ChunkTiming] = []
        #: per control step since the last :meth:`reset`: (chunk number, index in it) of the action sent.
        self.executed: list[tuple[int, int]] = []
        self.reset()

    def reset(self) -> None:
        """Forget the observation history, the queued actions and the chunk log (every episode start)."""
        config = self.policy.policy_config
        self.history: deque[dict[str, Any]] = deque(maxlen=config.obs_horizon + int(config.previous_state))
        self._queue: deque[np.ndarray] = deque()
        self._ensemble: list[tuple[int, np.ndarray]] = []  # (step predicted at, chunk)
        self._ensembled: list[np.ndarray] = []  # with temporal ensembling: the averaged actions sent
        self._step = 0
        self.chunks.clear()
        self.timings.clear()
        self.executed.clear()
        self._plan: np.ndarray | None = None  # the chunk in effect and its number
        self._plan_number = -1
        self._pending: tuple[int, Any] | None = None  # (number, chunk or future) of a chunk on its way
        #: control steps the robot stood still waiting for a chunk (each counts towards an episode's length).
        self.waited = 0

    # ---------------------------------------------------------------- the adapter
    def checked_observation(self, observation: dict[str, Any]) -> dict[str, Any]:
        """One observation dict, refused before it can enter the history (so a bad frame never lingers).

        The state is the entry named by the policy's ``state_key`` without ``observation.``
        (``environment_state`` or ``state``); with ``goal_key`` the ``goal`` entry (or the numbers
        of ``environment_state`` it derives from) follows it. Each camera's image is the entry
        ``image.<camera>`` (``image`` for the unnamed camera of earlier policies), (H, W, 3) uint8.
        """
        config = self.policy.policy_config
        key = config.observation_key
        if not isinstance(observation, dict) or key not in observation:
            raise ValueError(
                f"observation must be a dict with a {key!r} entry (the policy's state_key {config.state_key!r})"
            )
        checked = {**observation, key: _checked_vector(observation, key)}
        copies = 2 if config.previous_state else 1  # this frame's and the previous frame's
        goal = config.goal_size
        if config.goal_key is not None:
            checked["goal"] = _goal(observation, config.goal_key)
            if checked["goal"].size != goal:
                raise ValueError(f"observation['goal'] must be {goal} numbers, got shape {checked['goal'].shape}")
        if copies * checked[key].size + goal != config.state_dim:
            parts = f"{key!r}" + (" twice (previous_state)" if copies == 2 else "")
            parts += f" and {goal} of the goal" if config.goal_key is not None else ""
            raise ValueError(
                f"observation[{key!r}] must be {(config.state_dim - goal) // copies} numbers "
                f"(the policy's state of {config.state_dim} is {parts}), got shape {checked[key].shape}"
            )
        if self.policy.encoder.sees_images:
            height, width = config.image_shape[1:]
            for name in self._image_entries(observation):
                image = np.asarray(observation[name])
                if image.dtype != np.uint8 or image.shape != (height, width, 3):
                    raise ValueError(
                        f"observation[{name!r}] must be uint8 of shape ({height}, {width}, 3), got {image.dtype} "
                        f"of shape {image.shape}"
                    )
                checked[name] = image.copy()  # the history keeps this frame, whatever the caller's buffer becomes
        if config.language and not isinstance(observation.get("instruction"), str):
            raise ValueError("observation['instruction'] must be the task's instruction (a string)")
        return checked

    def _image_entries(self, observation: dict[str, Any]) -> list[str]:
        """The observation's entries of the policy's cameras, in order; a ``ValueError`` names the
        cameras when one is missing."""
        config = self.policy.policy_config
        entries = config.image_keys
        missing = [name for name in entries if name not in observation]
        if missing:
            given = sorted(k for k in observation if k == "image" or k.startswith("image."))
            trained = ", ".join(config.cameras) if config.cameras is not None else "one unnamed camera ('image')"
            raise ValueError(
                f"observation has no {missing[0]!r}: this policy was trained on the cameras {trained}; "
                f"the observation's images: {', '.join(given) or 'none'}"
            )
        return entries

    def batch(self, observation: dict[str, Any]) -> Batch:
        """Add ``observation`` to the history and return the policy's batch of one observation window."""
        config = self.policy.policy_config
        self.history.append(self.checked_observation(observation))
        while len(self.history) < self.history.maxlen:
            self.history.appendleft(self.history[0])  # pad the episode start by repetition
        device = self.policy.state_normalizer.shift.device
        frames = list(self.history)
        key, extra = config.observation_key, int(config.previous_state)
        states = []
        for i in range(extra, len(frames)):
            parts = [frames[i][key]] + ([frames[i - 1][key]] if extra else [])
            if config.goal_key is not None:
                parts.append(frames[i]["goal"])
            states.append(np.concatenate(parts))
        batch: Batch = {"state": torch.as_tensor(np.stack(states), dtype=torch.float32, device=device)[None]}
        for name in config.image_keys:
            images = np.stack([np.asarray(f[name]).transpose(2, 0, 1) for f in frames[extra:]])
            batch[name] = torch.as_tensor(images, device=device)[None]
        if config.language:
            batch["instruction"] = [observation["instruction"]]
        return batch

    # ---------------------------------------------------------------- acting
    def _chunk(
        self,
        batch: Batch,
        guide: ChunkGuide | None = None,
        prefix: ChunkPrefix | None = None,
        joins: tuple[np.ndarray, int] | None = None,
    ) -> np.ndarray:
        return self._keep(self._predict(batch, guide, prefix, joins))

    def _predict(
        self,
        batch: Batch,
        guide: ChunkGuide | None,
        prefix: ChunkPrefix | None,
        joins: tuple[np.ndarray, int] | None = None,
    ) -> ChunkResult:
        """One chunk; with ``candidates`` > 1 and ``joins`` = (the last action sent before it takes
        over, the index at which it does), the candidate joining that action most closely."""
        if joins is None:  # one chunk asked for, or an episode's first
            return self.policy.predict_chunk(batch, **self.sampling, guide=guide, prefix=prefix)
        n = self.candidates
        rows: Batch = {
            key: value * n if isinstance(value, list) else value.expand(n, *value.shape[1:])
            for key, value in batch.items()
        }
        if guide is not None:
            guide = dataclasses.replace(guide, actions=torch.as_tensor(guide.actions).expand(n, -1, -1))
        if prefix is not None:
            prefix = dataclasses.replace(prefix, actions=torch.as_tensor(prefix.actions).expand(n, -1, -1))
        result = self.policy.predict_chunk(rows, **self.sampling, guide=guide, prefix=prefix)
        last, index = joins
        takeover = _as_sent(result.actions[:, min(index, result.actions.shape[1] - 1)].cpu().numpy())
        kept = int(np.linalg.norm(takeover - _as_sent(last), axis=-1).argmin())
        return dataclasses.replace(result, actions=result.actions[kept : kept + 1])

    def _keep(self, result: ChunkResult) -> np.ndarray:
        """Log a computed chunk (in the caller's thread, in request order) and return its actions."""
        self.chunks.append(result)
        if self.real:  # plan requests for the delay measured so far, in whole control steps
            measured = statistics.median(c.seconds for c in self.chunks)
            self.delay = max(1, math.ceil(measured / self.control_period))
        return result.actions[0].cpu().numpy().copy()  # the plan: a copy, so the logged chunk stays as computed

    def warm_up(self, observation: dict[str, Any]) -> None:
        """Compute and discard the chunks this execution will request, for one observation, so that
        one-time costs are not timed as a chunk's delay.

        The first chunk a process computes is several times slower than the next, and the first
        guided one (``rtc``: its vector-Jacobian product) far more (about 0.9 s against 0.05 s at
        the MT10 size on one CPU thread); with ``delay="real"`` that is a second of the robot
        holding its last action. This runs a plain chunk, then a guided or prefixed one (a batch
        of ``candidates``) as the execution asks, in each thread that will compute them (and the
        inference thread with ``delay="real"``). Nothing is logged or kept: the observation history
        and the caller's random state are as they were.
        """
        self._refuse_if_closed()
        config = self.policy.policy_config
        history = self.history.copy()
        batch = self.batch(observation)
        self.history = history
        extra: dict[str, Any] = {}
        actions = torch.zeros(1, config.horizon, config.action_dim)
        frozen = min(max(self.delay, 1), config.horizon - 1)
        if self.guided:
            weights = rtc_weights(
                config.horizon,
                frozen=frozen,
                overlap=min(config.horizon, frozen + self.guided_overlap),
                schedule=self.guidance_schedule,
            )
            extra["guide"] = self._chunk_guide(actions, weights)
        if self.execution == "rtc-trained":
            extra["prefix"] = ChunkPrefix(actions, min(frozen, config.rtc_training_delay))

        # with candidates, the chunks after the first are sampled as a batch of them
        joins = (np.zeros(config.action_dim, dtype=np.float32), frozen) if self.candidates > 1 else None

        def compute() -> None:
            with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
                self._predict(batch, None, None)
                if extra or joins is not None:
                    self._predict(batch, extra.get("guide"), extra.get("prefix"), joins)

        compute()  # the first chunk of an episode is computed here, while the robot waits
        if self._worker is not None:
            self._worker.submit(compute).result()

    def _refuse_if_closed(self) -> None:
        if self.closed:
            raise RuntimeError("this ChunkExecutor was closed: make a new one to act again")

    def close(self) -> None:
        """Stop the inference thread (``delay="real"``); the executor acts no more after it."""
        if self._worker is not None:
            self._worker.shutdown(wait=True)
        self.closed = True

    def act(self, observation: dict[str, Any]) -> np.ndarray:
        """The next action for an observation dict (``state``, ``image`` when used, ``instruction``).

        An observation refused here leaves the observation history as it was. When a chunk is
        refused (a state that overflows the network), the frames it was computed from are dropped:
        the next valid observation starts a new window, as at an episode's start, so a bad frame
        already in the history cannot refuse every chunk after it."""
        self._refuse_if_closed()
        batch = self.batch(observation)
        try:
            return self._act(batch)
        except Exception:
            self.history.clear()
            raise

    def _act(self, batch: Batch) -> np.ndarray:
        if self.temporal_ensemble is not None:
            chunk = self._chunk(batch)
            self._ensemble = [(s, c) for s, c in self._ensemble if self._step - s < len(c)] + [(self._step, chunk)]
            weights = np.array([math.exp(-self.temporal_ensemble * i) for i in range(len(self._ensemble))])
            actions = np.stack([c[self._step - s] for s, c in self._ensemble])
            self._step += 1
            sent = ((weights[:, None] * actions).sum(0) / weights.sum()).astype(np.float32)
            self._ensembled.append(sent)
            return sent.copy()
        step = self._step
        if self._plan is None or (self.execution == "sync" and self._index(step) >= self.n_action_steps):
            # Nothing to execute meanwhile: the robot stands still while the chunk is computed. The
            # next request waits for the next step even where the delay is longer than the executed
            # part: at this step it would see the observation this chunk was computed from.
            self._start(self._request(batch, step), arrives=step)
        elif self.execution != "sync":
            self._arrive(step)
            # Request the next chunk so that it arrives when this one's executed part runs out.
            if self._pending is None and self.n_action_steps - self._index(step) <= self.delay:
                self._pending = self._request(batch, step)
                self._arrive(step)  # with no delay it takes over at once
        index = min(self._index(step), len(self._plan) - 1)  # past the chunk's end: hold its last action
        self.executed.append((self._plan_number, index))
        self._step += 1
        return self._plan[index].copy()  # the caller's to change: the logged chunk stays as computed

    def boundary_jumps(self) -> list[float]:
        """The size (L2 norm) of the change of the action sent, clipped to the action space, at every
        control step of this episode where a new chunk took over (the robot's "jumps")."""
        changes, switches = self._action_changes()
        return [float(changes[k - 1]) for k in switches]

    def within_chunk_changes(self) -> list[float]:
        """The size of the change of the action sent at every other step (the same chunk continuing):
        the ordinary motion that a boundary jump is to be read against."""
        changes, switches = self._action_changes()
        taken_over = set(switches)
        return [float(changes[k - 1]) for k in range(1, len(changes) + 1) if k not in taken_over]

    def plan_deviations(self) -> list[float]:
        """At every take-over where the chunk left behind had planned an action for that step: the
        size (L2 norm, clipped actions) of the difference between the action sent and the one the
        old chunk planned. A boundary jump is at most this deviation plus the plan's own change at
        that step; the deviation is the part that continuing a chunk (RTC) reduces and switching to
        a fresh one (async) does not."""
        _, switches = self.sent_actions()
        horizon = self.policy.policy_config.horizon
        deviations = []
        for k in switches:
            (new, i), (old, j) = self.executed[k], self.executed[k - 1]
            if j + 1 < horizon:
                sent = _as_sent(self.chunks[new].actions[0, i].cpu().numpy())
                planned = _as_sent(self.chunks[old].actions[0, j + 1].cpu().numpy())
                deviations.append(float(np.linalg.norm(sent - planned)))
        return deviations

    def _action_changes(self) -> tuple[np.ndarray, list[int]]:
        """The L2 norm of ``action[k] - action[k - 1]`` for k = 1..T-1 of the actions sent, and the take-over steps."""
        actions, switches = self.sent_actions()
        return np.linalg.norm(np.diff(actions, axis=0), axis=1), switches

    def sent_actions(self) -> tuple[np.ndarray, list[int]]:
        """This episode's actions as sent (T, A), clipped to the action space, and the steps where a
        new chunk took over (for :func:`flowforge.eval.plots.plot_chunk_boundaries`). With temporal
        ensembling every action is an average of several chunks, so no chunk takes over: every change
        is read as motion within a chunk and there are no take-over steps."""
        if self.temporal_ensemble is not None:
            sent = [_as_sent(action) for action in self._ensembled]
            return np.stack(sent) if sent else np.zeros((0, self.policy.policy_config.action_dim)), []
        actions = [_as_sent(self.chunks[n].actions[0, i].cpu().numpy()) for n, i in self.executed]
        switches = [k for k in range(1, len(self.executed)) if self.executed[k][0] != self.executed[k - 1][0]]
        return np.stack(actions) if actions else np.zeros((0, self.policy.policy_config.action_dim)), switches

    # ---------------------------------------------------------------- chunk bookkeeping
    def _index(self, step: int) -> int:
        """The index, in the chunk in effect, of the action for control step ``step``."""
        return step - self.timings[self._plan_number].origin

    def _request(self, batch: Batch, step: int) -> tuple[int, np.ndarray]:
        """Compute a chunk from the observation at ``step``; it arrives its delay later (the first
        chunk of an episode, and every synchronous one, while the robot waits its delay)."""
        guide = self._guide(step) if self.guided else None
        prefix = self._prefix(step) if self.execution == "rtc-trained" else None
        waits = self._plan is None or self.execution == "sync"
        if self.real and not waits:  # computed meanwhile; it takes over when done (see _arrive)
            self.timings.append(ChunkTiming(requested=step, arrived=-1, origin=step))
            joins = self._joins(step, self.delay)  # the delay measured so far
            return len(self.timings) - 1, self._worker.submit(self._predict, batch, guide, prefix, joins)
        if not self.real:  # drawn first: where the chunk takes over decides which candidate joins best
            low, high = self.delay_range
            delay = low if low == high else int(torch.randint(low, high + 1, ()))
        chunk = self._chunk(batch, guide, prefix, self._joins(step, 0 if waits else delay))
        if self.real:
            delay = math.ceil(self.chunks[-1].seconds / self.control_period)
        if waits:
            self.waited += delay
        self.timings.append(ChunkTiming(requested=step, arrived=step if waits else step + delay, origin=step))
        return len(self.timings) - 1, chunk

    def _joins(self, step: int, takeover: int) -> tuple[np.ndarray, int] | None:
        """For a chunk requested at ``step`` that takes over at its index ``takeover``: the action the
        chunk in effect sends just before (its last action past its end), and that index; ``None``
        for an episode's first chunk, which joins nothing."""
        if self._plan is None or self.candidates == 1:
            return None
        sent = min(self._index(step) + takeover - 1, len(self._plan) - 1)
        return self._plan[sent], takeover

    def _arrive(self, step: int) -> None:
        if self._pending is None:
            return
        number, chunk = self._pending
        if isinstance(chunk, Future):
            if not chunk.done():
                return
            self._pending = None  # a chunk refused in the inference thread is not waited for again
            try:
                result = chunk.result()
            except Exception:
                del self.timings[number]  # the last one (one request at a time): timings stay numbered as chunks
                raise
            self._start((number, self._keep(result)), arrives=step)
        elif self.timings[number].arrived == step:
            self._start(self._pending, arrives=step)
            self._pending = None

    def _start(self, numbered: tuple[int, np.ndarray], arrives: int) -> None:
        number, chunk = numbered
        self._plan, self._plan_number = chunk, number
        if self.timings[number].arrived != arrives:
            self.timings[number] = dataclasses.replace(self.timings[number], arrived=arrives)

    def _prefix(self, step: int) -> ChunkPrefix | None:
        """Training-time RTC: the new chunk (index 0 = ``step``) starts with the actions of the chunk in
        effect that execute during the delay, given."""
        if self._plan is None:
            return None
        planned = self._plan[self._index(step) :]
        if len(planned) == 0:
            return None
        config = self.policy.policy_config
        # past the plan's end the robot holds its last action: those held actions run during the delay too
        actions = np.concatenate([planned, np.repeat(planned[-1:], config.horizon, axis=0)])[: config.horizon]
        # (a measured delay beyond the trained prefixes gives as many as the policy was trained with)
        return ChunkPrefix(torch.as_tensor(actions[None]), min(self.delay, config.horizon, config.rtc_training_delay))

    def _guide(self, step: int) -> ChunkGuide | None:
        """Real-time chunking: the new chunk (index 0 = ``step``) must agree with the actions of the chunk
        in effect that execute during the delay, and softly with the rest of what it still plans. (With
        a prefix the first part holds already: there each prediction is the given action itself.)"""
        if self._plan is None:
            return None
        horizon = self.policy.policy_config.horizon
        start = self._index(step)
        planned = self._plan[start:]  # the current chunk's actions for steps step, step + 1, ...
        if len(planned) == 0:
            return None
        # the D actions that run meanwhile are frozen, the held last action past the plan's end included
        frozen = min(self.delay, horizon)
        target = np.concatenate([planned, np.repeat(planned[-1:], horizon, axis=0)])[:horizon]
        weights = rtc_weights(
            horizon,
            frozen=frozen,
            overlap=max(frozen, min(len(planned), horizon, frozen + self.guided_overlap)),
            schedule=self.guidance_schedule,
        )
        return self._chunk_guide(torch.as_tensor(target[None]), weights)

    def _chunk_guide(self, actions: Tensor, weights: Tensor) -> ChunkGuide:
        return ChunkGuide(actions, weights, self.max_guidance, self.guidance_jacobian)


__all__ = ["EXECUTIONS", "ChunkExecutor", "ChunkTiming"]
