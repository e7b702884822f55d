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

import math
from collections import deque
from typing import Any

import numpy as np
import torch

from flowforge.policy.core import Batch, ChunkPolicy, ChunkResult


class ChunkExecutor:
    """One action per control step from a chunk policy (see the module docstring).

    Arguments:
        policy: the chunk policy (put it in eval mode first).
        n_action_steps: actions executed from each chunk before replanning (default: the policy's).
        temporal_ensemble: ``m`` of ACT's temporal ensembling (predict every step), or ``None``.
        steps, method, noise_scale: sampling settings of every chunk (default: the policy's config).
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
    ) -> None:
        config = policy.policy_config
        n_action_steps = config.n_action_steps if n_action_steps is None else n_action_steps
        if isinstance(n_action_steps, bool) or not isinstance(n_action_steps, int):
            raise ValueError(f"n_action_steps must be an int in 1..{config.horizon}, got {n_action_steps!r}")
        if not 1 <= n_action_steps <= config.horizon:
            raise ValueError(f"n_action_steps must be an int in 1..{config.horizon}, got {n_action_steps!r}")
        if temporal_ensemble is not None and not (
            isinstance(temporal_ensemble, int | float) and math.isfinite(temporal_ensemble) and temporal_ensemble >= 0
        ):
            raise ValueError(f"temporal_ensemble must be a finite number >= 0 or None, got {temporal_ensemble!r}")
        self.sampling = {
            k: v for k, v in (("steps", steps), ("method", method), ("noise_scale", noise_scale)) if v is not None
        }
        policy.sampling(**self.sampling)  # a bad setting fails here, not at the first chunk
        self.policy, self.n_action_steps, self.temporal_ensemble = policy, n_action_steps, temporal_ensemble
        #: the :class:`ChunkResult` of every chunk predicted since the last :meth:`reset`.
        self.chunks: list[ChunkResult] = []
        self.reset()

    def reset(self) -> None:
        """Forget the observation history, the queued actions and the chunk log (every episode start)."""
        self.history: deque[dict[str, Any]] = deque(maxlen=self.policy.policy_config.obs_horizon)
        self._queue: deque[np.ndarray] = deque()
        self._ensemble: list[tuple[int, np.ndarray]] = []  # (step predicted at, chunk)
        self._step = 0
        self.chunks.clear()

    # ---------------------------------------------------------------- the adapter
    def checked_observation(self, observation: dict[str, Any]) -> dict[str, Any]:
        """One observation dict, refused before it can enter the history (so a bad frame never lingers).

        The state is the entry named by the policy's ``state_key`` without ``observation.``
        (``environment_state`` or ``state``).
        """
        config = self.policy.policy_config
        key = config.observation_key
        if not isinstance(observation, dict) or key not in observation:
            raise ValueError(
                f"observation must be a dict with a {key!r} entry (the policy's state_key {config.state_key!r})"
            )
        state = np.asarray(observation[key])
        if state.shape != (config.state_dim,) or not np.issubdtype(state.dtype, np.number):
            raise ValueError(
                f"observation[{key!r}] must be {config.state_dim} numbers, got {state.dtype} of shape {state.shape}"
            )
        if not np.isfinite(state).all():
            bad = int(np.flatnonzero(~np.isfinite(state))[0])
            raise ValueError(
                f"observation[{key!r}] holds {state[bad]} at index {bad}; a policy acts only on finite observations"
            )
        if self.policy.encoder.sees_images:
            image = np.asarray(observation.get("image"))
            height, width = config.image_shape[1:]
            if image.dtype != np.uint8 or image.shape != (height, width, 3):
                raise ValueError(
                    f"observation['image'] must be uint8 of shape ({height}, {width}, 3), got {image.dtype} "
                    f"of shape {image.shape}"
                )
        if config.language and not isinstance(observation.get("instruction"), str):
            raise ValueError("observation['instruction'] must be the task's instruction (a string)")
        return {**observation, key: state.astype(np.float32)}

    def batch(self, observation: dict[str, Any]) -> Batch:
        """Add ``observation`` to the history and return the policy's batch of one observation window."""
        self.history.append(self.checked_observation(observation))
        while len(self.history) < self.policy.policy_config.obs_horizon:
            self.history.appendleft(self.history[0])  # pad the episode start by repetition
        device = self.policy.state_normalizer.shift.device
        frames = list(self.history)
        states = np.stack([f[self.policy.policy_config.observation_key] for f in frames])
        batch: Batch = {"state": torch.as_tensor(states, dtype=torch.float32, device=device)[None]}
        if self.policy.encoder.sees_images:
            images = np.stack([np.asarray(f["image"]).transpose(2, 0, 1) for f in frames])
            batch["image"] = torch.as_tensor(images, device=device)[None]
        if self.policy.policy_config.language:
            batch["instruction"] = [observation["instruction"]]
        return batch

    # ---------------------------------------------------------------- acting
    def _chunk(self, batch: Batch) -> np.ndarray:
        result = self.policy.predict_chunk(batch, **self.sampling)
        self.chunks.append(result)
        return result.actions[0].cpu().numpy()

    def act(self, observation: dict[str, Any]) -> np.ndarray:
        """The next action for an observation dict (``state``, ``image`` when used, ``instruction``)."""
        batch = self.batch(observation)
        if self.temporal_ensemble is not None:
            chunk = self._chunk(batch)
            self._ensemble = [(s, c) for s, c in self._ensemble if self._step - s < len(c)] + [(self._step, chunk)]
            weights = np.array([math.exp(-self.temporal_ensemble * i) for i in range(len(self._ensemble))])
            actions = np.stack([c[self._step - s] for s, c in self._ensemble])
            self._step += 1
            return ((weights[:, None] * actions).sum(0) / weights.sum()).astype(np.float32)
        if not self._queue:
            self._queue.extend(self._chunk(batch)[: self.n_action_steps])
        self._step += 1
        return self._queue.popleft()


__all__ = ["ChunkExecutor"]
