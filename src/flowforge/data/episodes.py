"""Robot demonstrations stored in the LeRobot v3 folder layout, and a torch Dataset over them.

Layout (what :func:`flowforge.envs.collect.collect` writes; a lerobot data set without videos
reads the same way):

* ``meta/info.json``: ``codebase_version``, ``fps``, counts, ``data_path`` and ``features``
  (``dtype``, ``shape`` per key);
* ``meta/stats.json``: ``mean``, ``std``, ``min``, ``max``, ``count`` per numeric feature;
* ``meta/tasks.jsonl``: one ``{"task_index", "task"}`` per line (lerobot's ``meta/tasks.parquet``
  is read too);
* ``meta/episodes/chunk-000/file-000.parquet``: one row per episode (``episode_index``,
  ``tasks``, ``length``, ``dataset_from_index``, ``dataset_to_index``, ``data/chunk_index``,
  ``data/file_index``);
* ``data/chunk-XXX/file-YYY.parquet``: one row per frame with ``observation.state``,
  ``action``, ``episode_index``, ``frame_index``, ``timestamp``, ``index``, ``task_index`` and,
  with images, ``observation.images.<camera>`` as PNG bytes (dtype ``"image"`` in info.json).

:class:`EpisodeDataset` yields, for frame ``t`` of an episode, the observations at
``t - obs_horizon + 1 .. t`` and the actions ``t .. t + H - 1``; windows that run past the
episode's start or end repeat the edge frame and are flagged in ``*_is_pad`` masks (as lerobot
does). Parquet files are opened lazily and a few are kept in memory, so random access does not
load the whole set.
"""

from __future__ import annotations

import io
import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flowforge.data.normalize import Normalizer
from flowforge.data.tabular import DataError


def read_info(root: str | Path) -> dict[str, Any]:
    """``meta/info.json`` of a data set folder, checked for the keys this module needs."""
    path = Path(root) / "meta" / "info.json"
    if not path.is_file():
        raise DataError(f"{root} is not an episode data set: meta/info.json is missing")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error})") from error
    for key in ("fps", "features", "total_episodes", "total_frames"):
        if key not in info:
            raise DataError(f"{path}: the key {key!r} is missing")
    return info


def _read_parquet(path: Path):
    import pyarrow.parquet as parquet

    if not path.is_file():
        raise DataError(f"{path} is missing")
    try:
        return parquet.read_table(path)
    except Exception as error:  # pyarrow's own exception types for damaged files
        raise DataError(f"{path}: not a readable Parquet file ({error})") from error


class EpisodeDataset(torch.utils.data.Dataset):
    """Observation windows and action chunks from an episode data set folder.

    Arguments:
        root: the data set folder.
        obs_horizon: observation frames per item (the current one and the ones before it).
        action_horizon: H, actions per item (the current one and the ones after it).
        cache_files: Parquet files kept in memory at once.

    Each item is a dict: ``observation.state`` (obs_horizon, D), ``observation.images.<camera>``
    (obs_horizon, 3, h, w) uint8 when present, ``action`` (H, A), ``observation_is_pad``
    (obs_horizon,), ``action_is_pad`` (H,), ``task`` (str), ``episode_index`` and ``frame_index``.
    """

    def __init__(self, root: str | Path, obs_horizon: int = 1, action_horizon: int = 1, cache_files: int = 8) -> None:
        if obs_horizon < 1 or action_horizon < 1:
            raise ValueError(f"horizons must be >= 1, got {obs_horizon} and {action_horizon}")
        self.root = Path(root)
        self.info = read_info(self.root)
        self.obs_horizon, self.action_horizon = obs_horizon, action_horizon
        self.features = self.info["features"]
        for key in ("observation.state", "action"):
            if key not in self.features:
                raise DataError(f"{self.root}/meta/info.json: feature {key!r} is missing")
        self.image_keys = [k for k, f in self.features.items() if f.get("dtype") == "image"]
        episodes = _read_parquet(self.root / "meta" / "episodes" / "chunk-000" / "file-000.parquet").to_pylist()
        if len(episodes) != self.info["total_episodes"]:
            listed, expected = len(episodes), self.info["total_episodes"]
            raise DataError(f"{self.root}: meta/episodes lists {listed} episodes, info.json says {expected}")
        self.episodes = episodes
        self.tasks = {}
        tasks_path = self.root / "meta" / "tasks.jsonl"
        if tasks_path.is_file():
            for line in tasks_path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.tasks[row["task_index"]] = row["task"]
        elif (self.root / "meta" / "tasks.parquet").is_file():  # lerobot writes the tasks as the table's index
            table = _read_parquet(self.root / "meta" / "tasks.parquet")
            names = [c for c in table.column_names if c != "task_index"]
            if "task_index" not in table.column_names or not names:
                raise DataError(f"{self.root}/meta/tasks.parquet needs a task_index and a task column")
            for index, task in zip(
                table.column("task_index").to_pylist(), table.column(names[0]).to_pylist(), strict=True
            ):
                self.tasks[index] = task
        self.lengths = [int(e["length"]) for e in episodes]
        self.starts = np.cumsum([0, *self.lengths])
        self._cache: OrderedDict[tuple[int, int], dict[str, Any]] = OrderedDict()
        self.cache_files = cache_files
        stats_path = self.root / "meta" / "stats.json"
        self.stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def normalizer(self, key: str, mode: str = "mean_std") -> Normalizer:
        """The normaliser of a numeric feature from stats.json (:class:`flowforge.data.normalize.Normalizer`)."""
        if key not in self.stats:
            raise DataError(f"{self.root}/meta/stats.json has no statistics for {key!r}")
        try:
            return Normalizer.from_statistics(self.stats[key], mode)
        except DataError as error:
            raise DataError(f"{self.root}/meta/stats.json, {key!r}: {error}") from error

    def episode_columns(self, episode: int) -> dict[str, Any]:
        """Every column of one episode (by position in the data set), as lists with one entry per frame."""
        entry = self.episodes[episode]
        file_key = (int(entry["data/chunk_index"]), int(entry["data/file_index"]))
        if file_key not in self._cache:
            path = self.root / "data" / f"chunk-{file_key[0]:03d}" / f"file-{file_key[1]:03d}.parquet"
            table = _read_parquet(path)
            columns = {name: table.column(name).to_pylist() for name in table.column_names}
            self._cache[file_key] = columns
            if len(self._cache) > self.cache_files:
                self._cache.popitem(last=False)
        self._cache.move_to_end(file_key)
        columns = self._cache[file_key]
        rows = [i for i, e in enumerate(columns["episode_index"]) if e == entry["episode_index"]]
        if len(rows) != self.lengths[episode]:
            raise DataError(
                f"{self.root}: episode {entry['episode_index']} has {len(rows)} frames in its data file, "
                f"meta/episodes says {self.lengths[episode]}"
            )
        return {name: [values[i] for i in rows] for name, values in columns.items()}

    def _array(self, key: str, values: list, frames: list[int]) -> Tensor:
        shape = tuple(self.features[key]["shape"])
        array = np.asarray([values[f] for f in frames], dtype=np.float32)
        if array.shape[1:] != shape:
            raise DataError(f"{self.root}: {key} has shape {array.shape[1:]}, info.json says {shape}")
        return torch.from_numpy(array)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} frames")
        episode = int(np.searchsorted(self.starts, index, side="right") - 1)
        frame = index - int(self.starts[episode])
        length = self.lengths[episode]
        columns = self.episode_columns(episode)
        observed = [frame - k for k in range(self.obs_horizon - 1, -1, -1)]
        acted = [frame + k for k in range(self.action_horizon)]
        obs_frames = [min(max(f, 0), length - 1) for f in observed]
        act_frames = [min(max(f, 0), length - 1) for f in acted]
        item: dict[str, Any] = {
            "observation.state": self._array("observation.state", columns["observation.state"], obs_frames),
            "action": self._array("action", columns["action"], act_frames),
            "observation_is_pad": torch.tensor([f < 0 for f in observed]),
            "action_is_pad": torch.tensor([f >= length for f in acted]),
            "episode_index": int(self.episodes[episode]["episode_index"]),
            "frame_index": frame,
        }
        task_index = columns.get("task_index", [None])[frame]
        item["task"] = self.tasks.get(task_index, str(self.episodes[episode].get("tasks", [""])[0]))
        for key in self.image_keys:
            item[key] = torch.stack([decode_png(columns[key][f]) for f in obs_frames])
        return item


def decode_png(value: Any) -> Tensor:
    from PIL import Image

    data = value["bytes"] if isinstance(value, dict) else value
    image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return torch.from_numpy(image.copy()).permute(2, 0, 1)


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of an (h, w, 3) uint8 image."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def describe(root: str | Path) -> str:
    """A human-readable summary: features, episode and frame counts, tasks and their episodes."""
    info = read_info(root)
    lines = [
        f"{root}: {info['total_episodes']} episodes, {info['total_frames']} frames at {info['fps']} fps "
        f"(layout {info.get('codebase_version', '?')})",
        "features:",
    ]
    for name, feature in info["features"].items():
        lines.append(f"  {name}: {feature.get('dtype')} {tuple(feature.get('shape', ()))}")
    collection = Path(root) / "meta" / "collection.json"
    if collection.is_file():
        record = json.loads(collection.read_text())
        lines.append("expert success per task (kept / attempted):")
        for task, counts in record.get("tasks", {}).items():
            rate = counts["succeeded"] / max(counts["attempted"], 1)
            lines.append(f"  {task}: {counts['succeeded']} / {counts['attempted']} ({rate:.0%})")
    return "\n".join(lines)


__all__ = ["EpisodeDataset", "describe", "encode_png", "read_info"]
