"""Training tensors for a policy from an episode data set (LeRobot v3 layout).

:func:`policy_tensors` turns every frame of every episode into one training example, the way
:class:`~flowforge.data.EpisodeDataset` windows them (observations padded at the episode start,
actions past its end repeated and flagged in ``action_is_pad``), but builds each episode's
windows with one indexing operation and keeps the result in memory: 37,000 MetaWorld frames are
a few megabytes without images and about 80 MB with 84x84 images (uint8).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from flowforge.data.episodes import EpisodeDataset
from flowforge.errors import DataError


def policy_tensors(
    dataset: EpisodeDataset,
    instructions: list[str] | None = None,
    progress: bool = True,
    state_key: str = "observation.environment_state",
) -> tuple[dict[str, Tensor], list[str]]:
    """Stack all windows of ``dataset`` into tensors.

    Returns ``(tensors, instructions)``: ``state`` (N, obs_horizon, D) from the feature
    ``state_key``, ``action`` (N, H, A),
    ``action_is_pad`` (N, H), ``task_index`` (N,) into ``instructions``, and ``image``
    (N, obs_horizon, 3, h, w) uint8 when the data set has a camera (its first image or video feature).
    ``instructions`` extends the given list with the data set's tasks in order of appearance.
    """
    instructions = list(instructions or [])
    if state_key not in dataset.features:
        older = " (folders collected before the robot/environment state split hold it as observation.state)"
        raise DataError(
            f"{dataset.root} has no {state_key!r} feature{older if state_key.endswith('environment_state') else ''}; "
            f"its features: {', '.join(dataset.features)}"
        )
    obs_h, act_h = dataset.obs_horizon, dataset.action_horizon
    parts: dict[str, list[Tensor]] = {"state": [], "action": [], "action_is_pad": [], "task_index": []}
    image_key = dataset.camera_keys[0] if dataset.camera_keys else None  # an image or a video feature
    if image_key is not None:
        parts["image"] = []
    for episode in tqdm(range(len(dataset.lengths)), desc="episodes", disable=not progress, leave=False):
        columns = dataset.episode_columns(episode)
        length = dataset.lengths[episode]
        frames = torch.arange(length)
        observed = (frames[:, None] + torch.arange(-obs_h + 1, 1)[None]).clamp(0, length - 1)
        acted_raw = frames[:, None] + torch.arange(act_h)[None]
        acted = acted_raw.clamp(max=length - 1)
        state = torch.as_tensor(np.asarray(columns[state_key], dtype=np.float32))
        action = torch.as_tensor(np.asarray(columns["action"], dtype=np.float32))
        parts["state"].append(state[observed])
        parts["action"].append(action[acted])
        parts["action_is_pad"].append(acted_raw >= length)
        task = dataset[int(dataset.starts[episode])]["task"]
        if task not in instructions:
            instructions.append(task)
        parts["task_index"].append(torch.full((length,), instructions.index(task), dtype=torch.long))
        if image_key is not None:
            parts["image"].append(dataset.camera_frames(episode, image_key)[observed])
    return {key: torch.cat(values) for key, values in parts.items()}, instructions
