"""The one episode loop, shared by demonstration collection and policy evaluation.

:func:`run_episode` resets an environment with a seed, asks an actor for one action per control
step (a scripted expert when collecting, a :class:`~flowforge.policy.execution.ChunkExecutor`
when evaluating), clips it to the action space [-1, 1] and steps until MetaWorld's success flag
rises, the episode terminates or ``max_steps`` pass. The actor sees the observation dict with the
task's ``instruction`` added.

>>> class Line:  # a stand-in environment: success once the position passes 1
...     def reset(self, seed=None):
...         self.x = 0.0
...         return {"state": [self.x]}, {"instruction": "move right", "is_success": False}
...     def step(self, action):
...         self.x += float(action[0])
...         return {"state": [self.x]}, 0.0, False, False, {"instruction": "move right", "is_success": self.x > 1}
>>> episode = run_episode(Line(), lambda observation: [3.0], seed=0, max_steps=10, keep=True)
>>> episode.success, episode.steps, episode.actions[0].tolist()  # the action was clipped to 1
(True, 2, [1.0])
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flowforge.validation import check_count, check_real


@dataclass
class Episode:
    """One episode's outcome: ``success``, ``steps`` taken, and with ``keep=True`` the observation
    each action was taken at, the actions (float32, clipped) and the observation after the last step."""

    success: bool
    steps: int
    observations: list[dict[str, Any]] = field(default_factory=list)
    actions: list[np.ndarray] = field(default_factory=list)
    final_observation: dict[str, Any] | None = None


def run_episode(
    env: Any,
    act: Callable[[dict[str, Any]], Any],
    seed: int,
    max_steps: int = 500,
    keep: bool = False,
    pace: float | None = None,
) -> Episode:
    """Run one episode of ``env`` with the actor ``act`` (see the module docstring).

    ``pace``: seconds per control step; each step then lasts at least that long, as on a robot
    whose controller runs at a fixed rate (MetaWorld's: 1/80 s), so that time an actor spends
    thinking in the background passes in control steps; a step that took longer (the actor
    blocked) is followed by steps of the full period, not by shorter ones that catch up.
    """
    max_steps = check_count("max_steps", max_steps)
    pace = check_real("pace", pace, positive=True, optional=True)
    observation, info = env.reset(seed=seed)
    episode = Episode(success=False, steps=0)
    tick = time.perf_counter()
    for step in range(1, max_steps + 1):
        action = np.clip(np.asarray(act({**observation, "instruction": info["instruction"]})), -1.0, 1.0)
        action = action.astype(np.float32)
        if keep:
            episode.observations.append(observation)
            episode.actions.append(action)
        observation, _, terminated, truncated, info = env.step(action)
        episode.steps = step
        if pace is not None:
            # A step that overran (a chunk computed while the robot waited) is not made up for by
            # hurrying the steps after it: a controller at a fixed rate never runs faster.
            tick = max(tick + pace, time.perf_counter())
            time.sleep(max(0.0, tick - time.perf_counter()))
        if info["is_success"]:
            episode.success = True
            break
        if terminated or truncated:
            break
    if keep:
        episode.final_observation = observation
    return episode


__all__ = ["Episode", "run_episode"]
