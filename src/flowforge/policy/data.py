"""Training data for a policy from an episode data set (LeRobot v3 layout).

Every frame of every episode is one training example, windowed the way
:class:`~flowforge.data.EpisodeDataset` windows them: the observations of the last ``obs_horizon``
frames (repeating the episode's first frame before it starts) and the next ``horizon`` actions
(repeating the last one past the episode's end, flagged in ``action_is_pad``).

* :func:`policy_tensors` builds each episode's windows with one indexing operation and keeps them
  in memory: 37,000 MetaWorld frames are a few megabytes without images and about 80 MB per
  obs_horizon frame with 84x84 images (uint8).
* :class:`PolicyWindows` keeps only the numbers in memory and reads the camera frames of each
  batch from a frame source (:mod:`flowforge.data.frame_cache`: a memory-mapped uint8 cache on
  disk, or PNG files decoded per batch, in ``DataLoader`` workers when there are some); one copy
  per frame, however many windows and cameras.

The state vector is what the policy's config asks for (:attr:`PolicyConfig.state_features`):
``state_key``'s numbers, with ``previous_state`` those of the frame before (the episode's first
frame repeats itself, as MetaWorld's own previous-frame numbers do at a reset), then the goal
(``goal_key``: the data set's feature, or the numbers of ``observation.environment_state`` it is
derived from, :data:`~flowforge.policy.config.DERIVED_FEATURES`). Each camera's images are the
batch entry ``image.<camera>`` from the feature ``observation.images.<camera>`` (``image`` from the
data set's first camera for a policy whose camera is unnamed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from flowforge.data.episodes import EpisodeDataset, check_stats_match, frame_vectors
from flowforge.errors import ConfigError, DataError
from flowforge.policy.config import DERIVED_FEATURES, PolicyConfig

#: The prefix of a data set's camera features (LeRobot's convention).
CAMERA_PREFIX = "observation.images."


def dataset_cameras(dataset: EpisodeDataset) -> list[str]:
    """The camera names of a data set: its features ``observation.images.<name>`` (image or video)."""
    return [key.removeprefix(CAMERA_PREFIX) for key in dataset.camera_keys if key.startswith(CAMERA_PREFIX)]


def camera_features(dataset: EpisodeDataset, cameras: list[str] | None) -> list[str]:
    """The data set features of ``cameras`` (``None``: the first camera feature); a :class:`ConfigError`
    names a camera the data set lacks and the cameras it has."""
    if cameras is None:
        if not dataset.camera_keys:
            raise ConfigError(f"{dataset.root}: the policy uses images but the data set has no camera feature")
        return [dataset.camera_keys[0]]
    features = []
    for camera in cameras:
        key = CAMERA_PREFIX + camera
        if key not in dataset.camera_keys:
            raise ConfigError(
                f"cameras: {camera!r} is not a camera of {dataset.root} (no feature {key!r}); its cameras: "
                f"{', '.join(dataset_cameras(dataset)) or 'none'}"
            )
        features.append(key)
    return features


def check_observation_mode(dataset: EpisodeDataset, config: PolicyConfig) -> None:
    """Refuse a config that reads what the data set lacks (its state, goal or cameras): a
    :class:`ConfigError` names the setting, the value and what the data set has."""
    for setting, key in (("state_key", config.state_key), ("goal_key", config.goal_key)):
        if key is None or key in dataset.features:
            continue
        source, start, end = DERIVED_FEATURES.get(key, (None, 0, 0))
        if source is not None and source in dataset.features:
            size = int(np.prod(dataset.features[source].get("shape", [0])))
            if size < end:
                raise ConfigError(
                    f"{setting} = {key!r} is numbers {start}..{end - 1} of {source!r}; {dataset.root}'s "
                    f"{source} has {size} numbers"
                )
            continue
        derived = f" nor {source!r}, from which it is derived" if source is not None else ""
        older = (
            " (folders collected before the robot/environment state split hold it as observation.state)"
            if key.endswith("environment_state")
            else ""
        )
        numeric = [k for k, f in dataset.features.items() if k.startswith("observation.") and "shape" in f]
        raise ConfigError(
            f"{setting} = {key!r}: {dataset.root} has no such feature{derived}{older}; its observations: "
            f"{', '.join(k for k in numeric if k not in dataset.camera_keys) or 'none'}"
        )
    if config.image_shape is not None:
        camera_features(dataset, config.cameras)


def _feature(columns: dict[str, Any], key: str) -> np.ndarray:
    """One episode's numbers of ``key``, derived from its source feature when the data set lacks it."""
    if key in columns:
        return frame_vectors(columns[key])
    source, start, end = DERIVED_FEATURES[key]
    return frame_vectors(columns[source])[:, start:end]


def _episode_windows(
    columns: dict[str, Any], length: int, obs_h: int, act_h: int, config: PolicyConfig | None, state_key: str
) -> tuple[dict[str, Tensor], Tensor]:
    """One episode's state, action and padding windows, and its observed frame indices (length, obs_h)."""
    frames = torch.arange(length)
    observed = (frames[:, None] + torch.arange(-obs_h + 1, 1)[None]).clamp(0, length - 1)
    acted_raw = frames[:, None] + torch.arange(act_h)[None]
    acted = acted_raw.clamp(max=length - 1)
    keys = config.state_features if config is not None else [state_key]
    state = torch.as_tensor(_feature(columns, keys[0]))
    parts = [state[observed]]
    if config is not None and config.previous_state:
        parts.append(state[(observed - 1).clamp(min=0)])
    for key in keys[1:]:
        parts.append(torch.as_tensor(_feature(columns, key))[observed])
    action = torch.as_tensor(frame_vectors(columns["action"]))
    windows = {
        "state": torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0],
        "action": action[acted],
        "action_is_pad": acted_raw >= length,
    }
    return windows, observed


def _check_state(dataset: EpisodeDataset, state_key: str) -> None:
    if state_key not in dataset.features:
        older = " (folders collected before the robot/environment state split hold it as observation.state)"
        raise DataError(
            f"{dataset.root} has no {state_key!r} feature{older if state_key.endswith('environment_state') else ''}; "
            f"its features: {', '.join(dataset.features)}"
        )


def _windows(
    dataset: EpisodeDataset,
    instructions: list[str] | None,
    progress: bool,
    state_key: str,
    config: PolicyConfig | None,
    image_features: dict[str, str],
) -> tuple[dict[str, Tensor], list[str], Tensor]:
    """Every window's numbers (and the images of ``image_features``: batch key -> feature), the
    instructions, and every window's observed global frame indices (N, obs_horizon)."""
    instructions = list(instructions or [])
    obs_h, act_h = dataset.obs_horizon, dataset.action_horizon
    parts: dict[str, list[Tensor]] = {"state": [], "action": [], "action_is_pad": [], "task_index": []}
    parts.update({key: [] for key in image_features})
    observed_global = []
    # The features whose stats.json entries normalise the policy: checked against the data read here.
    state_keys = config.state_features if config is not None else [state_key]
    normalised = {DERIVED_FEATURES.get(key, (key,))[0] for key in state_keys} | {"action"}
    raw: dict[str, list[np.ndarray]] = {key: [] for key in sorted(normalised) if key in dataset.stats}
    for episode in tqdm(range(len(dataset.lengths)), desc="episodes", disable=not progress, leave=False):
        columns = dataset.episode_columns(episode)
        length = dataset.lengths[episode]
        for key, values in raw.items():
            values.append(np.asarray(columns[key], dtype=np.float64).reshape(length, -1))
        windows, observed = _episode_windows(columns, length, obs_h, act_h, config, state_key)
        for key, value in windows.items():
            parts[key].append(value)
        observed_global.append(observed + int(dataset.starts[episode]))
        task = dataset[int(dataset.starts[episode])]["task"]
        if task not in instructions:
            instructions.append(task)
        parts["task_index"].append(torch.full((length,), instructions.index(task), dtype=torch.long))
        for key, feature in image_features.items():
            parts[key].append(dataset.camera_frames(episode, feature)[observed])
    for key, values in raw.items():
        check_stats_match(dataset.root, key, dataset.stats[key], np.concatenate(values))
    return {key: torch.cat(values) for key, values in parts.items()}, instructions, torch.cat(observed_global)


def policy_tensors(
    dataset: EpisodeDataset,
    instructions: list[str] | None = None,
    progress: bool = True,
    state_key: str = "observation.environment_state",
    *,
    config: PolicyConfig | None = None,
) -> tuple[dict[str, Tensor], list[str]]:
    """Stack all windows of ``dataset`` into tensors.

    Returns ``(tensors, instructions)``: ``state`` (N, obs_horizon, D), ``action`` (N, H, A),
    ``action_is_pad`` (N, H), ``task_index`` (N,) into ``instructions``, and images
    (N, obs_horizon, 3, h, w) uint8. With ``config``, the state vector and the cameras are the
    config's (see the module docstring; images only when it has an ``image_shape``); without
    one, the state is the feature ``state_key`` and ``image`` holds the data set's first camera,
    if it has one. ``instructions`` extends the given list with the data set's tasks in order of appearance.
    """
    if config is not None:
        check_observation_mode(dataset, config)
        state_key = config.state_key
        features = (
            dict(zip(config.image_keys, camera_features(dataset, config.cameras), strict=True))
            if config.image_shape is not None
            else {}
        )
    else:
        _check_state(dataset, state_key)
        features = {"image": dataset.camera_keys[0]} if dataset.camera_keys else {}
    tensors, instructions, _ = _windows(dataset, instructions, progress, state_key, config, features)
    return tensors, instructions


class PolicyWindows(Dataset):
    """A policy's training windows whose camera frames are read a batch at a time (see the module docstring).

    Arguments:
        tensors: the windows' numbers (``state``, ``action``, ``action_is_pad``, ``task_index``), N rows.
        observed: (N, obs_horizon) global frame indices of each window's observations.
        frames: batch key (``image.<camera>`` or ``image``) -> a frame source with
            ``take(index) -> (k, 3, H, W)`` uint8 (:mod:`flowforge.data.frame_cache`).

    ``__getitems__(indices)`` returns the batch ``(x, None)`` the :class:`~flowforge.train.Trainer`
    expects, with each camera's frames ``(B, obs_horizon, 3, H, W)``.
    """

    def __init__(self, tensors: dict[str, Tensor], observed: Tensor, frames: dict[str, Any]) -> None:
        rows = {int(v.shape[0]) for v in tensors.values()} | {int(observed.shape[0])}
        if len(rows) != 1:
            raise DataError(f"every tensor of the windows needs the same number of rows, got {sorted(rows)}")
        self.tensors, self.frames = tensors, frames
        self.observed = np.ascontiguousarray(observed.numpy().astype(np.int64))

    def __len__(self) -> int:
        return int(self.observed.shape[0])

    def __getitems__(self, indices: Sequence[int]) -> tuple[dict[str, Tensor], None]:
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        batch = {key: value.index_select(0, index) for key, value in self.tensors.items()}
        observed = self.observed[index.numpy()]
        for key, source in self.frames.items():
            images = source.take(observed.reshape(-1))
            batch[key] = images.view(*observed.shape, *images.shape[1:])
        return batch, None

    def __getitem__(self, i: int) -> tuple[dict[str, Tensor], None]:
        batch, _ = self.__getitems__([i])
        return {key: value[0] for key, value in batch.items()}, None

    def sample_frames(self, key: str, count: int = 1000) -> Tensor:
        """Up to ``count`` evenly spaced frames of camera ``key`` (image statistics)."""
        source = self.frames[key]
        index = np.unique(np.linspace(0, len(source) - 1, min(len(source), count)).round().astype(np.int64))
        return source.take(index)


def policy_windows(
    dataset: EpisodeDataset,
    config: PolicyConfig,
    frames: str = "cache",
    cache: str | None = None,
    instructions: list[str] | None = None,
    progress: bool = True,
) -> tuple[PolicyWindows, list[str]]:
    """The windows of ``dataset`` for ``config`` with camera frames read per batch: ``frames`` is
    ``"cache"`` (decoded once into the uint8 cache under ``cache``, memory-mapped; resumed when
    interrupted), ``"decode"`` (the PNG files decoded per batch) or ``"memory"`` (decoded into memory
    once, one copy per frame)."""
    from flowforge.data.frame_cache import EncodedFrames, FrameCache, MemoryFrames

    if frames not in ("cache", "decode", "memory"):
        raise ValueError(f"frames = {frames!r} is not one of cache, decode, memory")
    if frames == "cache" and not cache:
        raise ValueError("frames = 'cache' needs the cache folder (cache=...)")
    check_observation_mode(dataset, config)
    features = (
        dict(zip(config.image_keys, camera_features(dataset, config.cameras), strict=True))
        if config.image_shape is not None
        else {}
    )
    tensors, instructions, observed = _windows(dataset, instructions, progress, config.state_key, config, {})
    sources: dict[str, Any] = {}
    for key, feature in features.items():
        if frames == "cache":
            sources[key] = FrameCache.build(dataset, feature, cache, progress=progress)
        elif frames == "decode":
            sources[key] = EncodedFrames.from_dataset(dataset, feature, progress=progress)
        else:
            sources[key] = MemoryFrames.from_dataset(dataset, feature, progress=progress)
    return PolicyWindows(tensors, observed, sources), instructions


__all__ = [
    "CAMERA_PREFIX",
    "PolicyWindows",
    "camera_features",
    "check_observation_mode",
    "dataset_cameras",
    "policy_tensors",
    "policy_windows",
]
