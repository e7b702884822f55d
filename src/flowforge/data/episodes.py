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
from flowforge.errors import DataError

EPISODE_COLUMNS = ("episode_index", "length", "data/chunk_index", "data/file_index")
"""The columns of ``meta/episodes`` this module needs (lerobot's table has more)."""
FRAME_COLUMNS = ("observation.state", "action", "episode_index", "frame_index")
"""The columns every data file needs."""
STATISTICS = ("mean", "std", "min", "max")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _read_json_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text (byte {error.start}: {error.reason})") from error
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({error.strerror or error})") from error


def _parse_json(path: Path, text: str, where: str = "") -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}{where}: not valid JSON ({error})") from error
    except RecursionError as error:
        raise DataError(f"{path}{where}: not valid JSON (nested too deeply)") from error


def _read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; a :class:`DataError` naming the file for anything else."""
    value = _parse_json(path, _read_json_text(path))
    if not isinstance(value, dict):
        raise DataError(f"{path}: the top level must be a JSON object, got {type(value).__name__}")
    return value


def read_info(root: str | Path) -> dict[str, Any]:
    """``meta/info.json`` of a data set folder, checked for the keys (and their types) this module needs."""
    path = Path(root) / "meta" / "info.json"
    if not path.is_file():
        raise DataError(f"{root} is not an episode data set: meta/info.json is missing")
    info = _read_json_object(path)
    for key in ("fps", "features", "total_episodes", "total_frames"):
        if key not in info:
            raise DataError(f"{path}: the key {key!r} is missing")
    fps = info["fps"]
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not np.isfinite(fps) or fps <= 0:
        raise DataError(f"{path}: the key 'fps' must be a positive number, got {fps!r}")
    for key in ("total_episodes", "total_frames"):
        if not _is_int(info[key]) or info[key] < 0:
            raise DataError(f"{path}: the key {key!r} must be a non-negative integer, got {info[key]!r}")
    features = info["features"]
    if not isinstance(features, dict):
        raise DataError(f"{path}: the key 'features' must be an object of features, got {type(features).__name__}")
    for name, feature in features.items():
        if not isinstance(feature, dict):
            raise DataError(f"{path}: features[{name!r}] must be an object with dtype and shape, got {feature!r}")
        if not isinstance(feature.get("dtype"), str):
            raise DataError(f"{path}: features[{name!r}] needs a string 'dtype', got {feature.get('dtype')!r}")
        shape = feature.get("shape", [])
        if not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape):
            raise DataError(
                f"{path}: features[{name!r}]['shape'] must be a list of non-negative integers, got {shape!r}"
            )
    return info


def read_tasks(root: str | Path) -> dict[int, str]:
    """``task_index -> task`` from ``meta/tasks.jsonl`` (or lerobot's ``meta/tasks.parquet``); empty if neither."""
    root = Path(root)
    tasks: dict[int, str] = {}
    path = root / "meta" / "tasks.jsonl"
    if path.is_file():
        for number, line in enumerate(_read_json_text(path).splitlines(), start=1):
            if not line.strip():
                continue
            row = _parse_json(path, line, f", line {number}")
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {number}: must be a JSON object, got {type(row).__name__}")
            for key in ("task_index", "task"):
                if key not in row:
                    raise DataError(f"{path}, line {number}: the key {key!r} is missing")
            if not _is_int(row["task_index"]) or row["task_index"] < 0:
                raise DataError(
                    f"{path}, line {number}: 'task_index' must be a non-negative integer, got {row['task_index']!r}"
                )
            if not isinstance(row["task"], str):
                raise DataError(f"{path}, line {number}: 'task' must be a string, got {row['task']!r}")
            tasks[row["task_index"]] = row["task"]
    elif (root / "meta" / "tasks.parquet").is_file():  # lerobot writes the tasks as the table's index
        path = root / "meta" / "tasks.parquet"
        table = _read_parquet(path)
        names = [c for c in table.column_names if c != "task_index"]
        if "task_index" not in table.column_names or not names:
            raise DataError(f"{path} needs a task_index and a task column")
        for index, task in zip(table.column("task_index").to_pylist(), table.column(names[0]).to_pylist(), strict=True):
            tasks[index] = task
    return tasks


def read_stats(root: str | Path, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """``meta/stats.json`` (empty if absent): one object of ``mean``, ``std``, ``min``, ``max`` per feature,
    each finite numbers; for ``observation.state`` and ``action`` all four, sized as info.json says."""
    path = Path(root) / "meta" / "stats.json"
    if not path.is_file():
        return {}
    stats = _read_json_object(path)
    features = (info or {}).get("features", {})
    for name, entry in stats.items():
        if not isinstance(entry, dict):
            raise DataError(f"{path}: {name!r} must be an object of statistics, got {type(entry).__name__}")
        if name in ("observation.state", "action"):
            missing = [key for key in STATISTICS if key not in entry]
            if missing:
                raise DataError(f"{path}: {name!r} lacks the key(s) {', '.join(map(repr, missing))}")
        for key in STATISTICS:
            if key not in entry:
                continue
            try:
                values = np.asarray(entry[key], dtype=np.float64)
            except (TypeError, ValueError) as error:
                raise DataError(f"{path}: {name!r}[{key!r}] must be numbers, got {entry[key]!r}") from error
            if not np.isfinite(values).all():
                raise DataError(f"{path}: {name!r}[{key!r}] must be finite numbers, got {entry[key]!r}")
            shape = features.get(name, {}).get("shape") if name in ("observation.state", "action") else None
            if shape and values.size != int(np.prod(shape)):
                raise DataError(
                    f"{path}: {name!r}[{key!r}] has {values.size} values, info.json says the shape is {tuple(shape)}"
                )
    return stats


def read_episodes(root: str | Path, info: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of ``meta/episodes``, checked against info.json: the needed columns, whole non-negative
    numbers, positive lengths, unique episode indices, ``total_episodes`` rows and ``total_frames`` frames."""
    path = Path(root) / "meta" / "episodes" / "chunk-000" / "file-000.parquet"
    if not path.is_file() and info["total_episodes"] == 0:
        return []
    table = _read_parquet(path)
    missing = [c for c in EPISODE_COLUMNS if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: the column(s) {', '.join(map(repr, missing))} are missing")
    episodes = table.to_pylist()
    info_path = Path(root) / "meta" / "info.json"
    if len(episodes) != info["total_episodes"]:
        raise DataError(
            f"{path} lists {len(episodes)} episodes, {info_path} says total_episodes={info['total_episodes']}"
        )
    seen: set[int] = set()
    for row, entry in enumerate(episodes):
        for column in EPISODE_COLUMNS:
            value = entry[column]
            if not _is_int(value) or value < 0:
                raise DataError(f"{path}, row {row}: {column!r} must be a non-negative integer, got {value!r}")
        if entry["length"] < 1:
            raise DataError(f"{path}, row {row}: 'length' must be >= 1, got {entry['length']}")
        if entry["episode_index"] in seen:
            raise DataError(f"{path}, row {row}: episode_index {entry['episode_index']} appears twice")
        seen.add(entry["episode_index"])
    frames = sum(int(e["length"]) for e in episodes)
    if frames != info["total_frames"]:
        raise DataError(
            f"{path}: the episode lengths add up to {frames} frames, "
            f"{info_path} says total_frames={info['total_frames']}"
        )
    start = 0
    for row, entry in enumerate(episodes):
        first, last = entry.get("dataset_from_index"), entry.get("dataset_to_index")
        if first is not None and last is not None and (first != start or last != start + entry["length"]):
            raise DataError(
                f"{path}, row {row}: episode {entry['episode_index']} spans dataset_from_index={first} .. "
                f"dataset_to_index={last}, its length {entry['length']} and the episodes before it say "
                f"{start} .. {start + entry['length']}"
            )
        start += int(entry["length"])
    return episodes


def _read_parquet(path: Path):
    import pyarrow.parquet as parquet

    if not path.is_file():
        raise DataError(f"{path} is missing")
    try:
        return parquet.read_table(path)
    except Exception as error:  # pyarrow's own exception types for damaged files
        raise DataError(f"{path}: not a readable Parquet file ({error})") from error


def _data_path(root: Path, entry: dict[str, Any]) -> Path:
    chunk, file = int(entry["data/chunk_index"]), int(entry["data/file_index"])
    return root / "data" / f"chunk-{chunk:03d}" / f"file-{file:03d}.parquet"


def _numeric_column(path: Path, name: str, values: list, shape: tuple[int, ...] | None, frames: list) -> np.ndarray:
    """``values`` as a float array, every entry finite and (when ``shape`` is given) of that shape."""
    try:
        array = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise DataError(f"{path}: column {name!r} holds rows that are not numbers of one shape ({error})") from error
    if shape is not None and array.shape[1:] != shape:
        raise DataError(f"{path}: {name} has shape {array.shape[1:]}, info.json says {shape}")
    bad = np.argwhere(~np.isfinite(array.reshape(len(array), -1)))
    if len(bad):
        row, element = (int(i) for i in bad[0])
        value = array.reshape(len(array), -1)[row, element]
        where = f"[{element}]" if array.ndim > 1 else ""
        raise DataError(
            f"{path}, row {row} (frame_index {frames[row]}): {name}{where} is {value} "
            f"({len(bad)} non-finite value(s) in that column); states and actions must be finite numbers"
        )
    return array


def check_data_file(
    path: Path, columns: dict[str, list], entries: list[dict[str, Any]], features: dict[str, Any]
) -> None:
    """Check the columns of one data file against the meta/episodes rows that point at it: the needed
    columns, every numeric feature finite (state and action of the shape info.json gives), each
    episode's row count, its frame indices ``0 .. length-1`` in order, and no rows of other episodes."""
    missing = [c for c in FRAME_COLUMNS if c not in columns]
    if missing:
        raise DataError(f"{path}: the column(s) {', '.join(map(repr, missing))} are missing")
    frames = columns["frame_index"]
    for name, feature in features.items():
        main = name in ("observation.state", "action")
        if name in columns and (main or str(feature.get("dtype")).startswith("float")):
            shape = tuple(feature.get("shape", ())) if main else None
            _numeric_column(path, name, columns[name], shape, frames)
    rows_of: dict[Any, list[int]] = {}
    for row, episode in enumerate(columns["episode_index"]):
        rows_of.setdefault(episode, []).append(row)
    listed = {e["episode_index"] for e in entries}
    foreign = [e for e in rows_of if e not in listed]
    if foreign:
        raise DataError(
            f"{path}: {len(rows_of[foreign[0]])} row(s) (first row {rows_of[foreign[0]][0]}) belong to episode_index "
            f"{foreign[0]!r}, which meta/episodes does not place in this file"
        )
    for entry in entries:
        episode, length = entry["episode_index"], int(entry["length"])
        rows = rows_of.get(episode, [])
        if len(rows) != length:
            raise DataError(
                f"{path}: episode {episode} has {len(rows)} frames (rows) in this file, meta/episodes says {length}"
            )
        for expected, row in enumerate(rows):
            if frames[row] != expected:
                raise DataError(
                    f"{path}, row {row}: episode {episode} has frame_index {frames[row]!r} where {expected} "
                    f"belongs (frame indices must run 0 .. {length - 1} in order)"
                )
        index, first = columns.get("index"), entry.get("dataset_from_index")
        if index is not None and first is not None:
            for offset, row in enumerate(rows):
                if index[row] != first + offset:
                    raise DataError(
                        f"{path}, row {row}: episode {episode} frame {offset} has index {index[row]!r}, "
                        f"meta/episodes (dataset_from_index={first}) says {first + offset}"
                    )


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
        self.episodes = episodes = read_episodes(self.root, self.info)
        if not episodes:
            raise DataError(f"{self.root}/meta/info.json: the data set has no episodes")
        self.tasks = read_tasks(self.root)
        self.lengths = [int(e["length"]) for e in episodes]
        self.starts = np.cumsum([0, *self.lengths])
        self._cache: OrderedDict[tuple[int, int], dict[str, Any]] = OrderedDict()
        self.cache_files = cache_files
        self.stats = read_stats(self.root, self.info)

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
            path = _data_path(self.root, entry)
            table = _read_parquet(path)
            columns = {name: table.column(name).to_pylist() for name in table.column_names}
            entries = [e for e in self.episodes if (e["data/chunk_index"], e["data/file_index"]) == file_key]
            check_data_file(path, columns, entries, self.features)
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


def verify_dataset(root: str | Path) -> None:
    """Check a whole data set folder against its metadata; a :class:`DataError` names the file and what disagrees.

    Reads info.json, tasks, stats.json and meta/episodes (counts, lengths, index ranges), then every data
    file: readable, the needed columns, finite states and actions of the declared shape, each episode's rows
    and frame indices, and no rows of episodes that meta/episodes places elsewhere.
    """
    root = Path(root)
    info = read_info(root)
    read_tasks(root)
    read_stats(root, info)
    files: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for entry in read_episodes(root, info):
        files.setdefault((int(entry["data/chunk_index"]), int(entry["data/file_index"])), []).append(entry)
    for entries in files.values():
        path = _data_path(root, entries[0])
        table = _read_parquet(path)
        try:
            columns = {name: table.column(name).to_pylist() for name in table.column_names}
        except Exception as error:  # pyarrow decoding errors of damaged pages
            raise DataError(f"{path}: not a readable Parquet file ({error})") from error
        check_data_file(path, columns, entries, info["features"])


def _read_collection(root: Path) -> dict[str, dict[str, int]]:
    path = root / "meta" / "collection.json"
    record = _read_json_object(path)
    tasks = record.get("tasks", {})
    if not isinstance(tasks, dict):
        raise DataError(f"{path}: the key 'tasks' must be an object of per-task counts, got {type(tasks).__name__}")
    for task, counts in tasks.items():
        if not isinstance(counts, dict):
            raise DataError(f"{path}: tasks[{task!r}] must be an object with attempted and succeeded, got {counts!r}")
        for key in ("attempted", "succeeded"):
            if key not in counts:
                raise DataError(f"{path}: tasks[{task!r}] lacks the key {key!r}")
            if not _is_int(counts[key]) or counts[key] < 0:
                raise DataError(f"{path}: tasks[{task!r}][{key!r}] must be a non-negative integer, got {counts[key]!r}")
    return tasks


def describe(root: str | Path, verify: bool = True) -> str:
    """A human-readable summary: features, episode and frame counts, tasks and their episodes.

    With ``verify`` (the default) the whole folder is checked first (:func:`verify_dataset`), so what is
    reported is what a data set loader will read; without it only the metadata files are read.
    """
    root_path = Path(root)
    if verify:
        verify_dataset(root_path)
    info = read_info(root)
    lines = [
        f"{root}: {info['total_episodes']} episodes, {info['total_frames']} frames at {info['fps']} fps "
        f"(layout {info.get('codebase_version', '?')})",
        "features:",
    ]
    for name, feature in info["features"].items():
        lines.append(f"  {name}: {feature.get('dtype')} {tuple(feature.get('shape', ()))}")
    if (root_path / "meta" / "collection.json").is_file():
        lines.append("expert success per task (kept / attempted):")
        for task, counts in _read_collection(root_path).items():
            rate = counts["succeeded"] / max(counts["attempted"], 1)
            lines.append(f"  {task}: {counts['succeeded']} / {counts['attempted']} ({rate:.0%})")
    return "\n".join(lines)


__all__ = [
    "EpisodeDataset",
    "check_data_file",
    "describe",
    "encode_png",
    "read_episodes",
    "read_info",
    "read_stats",
    "read_tasks",
    "verify_dataset",
]
