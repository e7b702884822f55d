"""Robot demonstrations stored in the LeRobot v3.0 folder layout, and a torch Dataset over them.

Layout (what lerobot 0.6 writes, and :func:`flowforge.envs.collect.collect` too):

* ``meta/info.json``: ``codebase_version`` (``"v3.0"``), ``fps``, counts, ``data_path`` and
  ``video_path`` (file name templates) and ``features`` (``dtype``, ``shape``, ``names`` per key; the
  dtype a numpy type name, ``"image"``, ``"video"`` or ``"string"``);
* ``meta/stats.json``: ``min``, ``max``, ``mean``, ``std``, ``count`` and the quantiles
  ``q01 q10 q50 q90 q99`` per feature (image and video features per colour channel, (3, 1, 1));
* ``meta/tasks.parquet``: lerobot's task table (the task strings as the pandas index ``task``, a
  ``task_index`` column, rows in task_index order); folders written by earlier flowforge versions
  have ``meta/tasks.jsonl`` (one ``{"task_index", "task"}`` per line) instead, read when there is no
  ``tasks.parquet``;
* ``meta/episodes/chunk-XXX/file-YYY.parquet``: one or more files, read in order, one row per
  episode (``episode_index`` = the row's position, ``tasks``, ``length``, ``data/chunk_index``,
  ``data/file_index``, ``dataset_from_index``, ``dataset_to_index`` and per video feature
  ``videos/<key>/chunk_index``, ``videos/<key>/file_index``, ``videos/<key>/from_timestamp``,
  ``videos/<key>/to_timestamp``; lerobot adds ``stats/<feature>/<stat>`` columns);
* ``data/chunk-XXX/file-YYY.parquet``: one row per frame, several episodes per file, with every
  non-video feature as a column (``observation.state``, ``action``, ``episode_index``,
  ``frame_index``, ``timestamp``, ``index`` (global), ``task_index``, ...); an ``"image"`` feature is
  a ``{"bytes", "path"}`` struct holding the PNG file;
* ``videos/<key>/chunk-XXX/file-YYY.mp4``: a ``"video"`` feature, one file per camera holding several
  episodes one after another. The frame of a row is the one whose presentation time is
  ``videos/<key>/from_timestamp + timestamp``, within ``tolerance_s`` (1e-4 s, as lerobot); it is
  decoded with PyAV the way lerobot's ``pyav`` backend does (seek to the keyframe before, decode
  forward, convert to RGB24).

:class:`EpisodeDataset` yields, for frame ``t`` of an episode, the observations at
``t - obs_horizon + 1 .. t`` and the actions ``t .. t + H - 1``; windows that run past the
episode's start or end repeat the edge frame and are flagged in ``*_is_pad`` masks (as lerobot
does). Every feature of info.json is in an item (see :class:`EpisodeDataset`); one that cannot be
read is a :class:`~flowforge.errors.DataError` naming the feature and the file, never left out.
Parquet files are opened lazily and a few are kept in memory, so random access does not load the
whole set.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flowforge.data.normalize import Normalizer
from flowforge.errors import DataError
from flowforge.validation import MAX_HORIZON, check_count, check_real, is_count

EPISODE_COLUMNS = ("episode_index", "length", "data/chunk_index", "data/file_index")
"""The columns of ``meta/episodes`` this module needs (lerobot's table has more)."""
FRAME_COLUMNS = ("observation.state", "action", "episode_index", "frame_index")
"""The columns every data file needs."""
STATISTICS = ("mean", "std", "min", "max")
"""The statistics ``observation.state`` and ``action`` must have in stats.json."""
QUANTILES = ("q01", "q10", "q50", "q90", "q99")
"""lerobot's quantile statistics (optional; checked like the others when present)."""
TOLERANCE_S = 1e-4
"""Largest distance (seconds, exclusive) between a row's video timestamp and the decoded frame's, as lerobot."""
DEFAULT_DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
DEFAULT_VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
CAMERA_DTYPES = ("image", "video")
_BOOKKEEPING = ("episode_index", "frame_index", "timestamp", "index", "task_index")
_EPISODES_FILE = re.compile(r"chunk-(\d+)/file-(\d+)\.parquet")


def data_set_holding(path: str | Path) -> Path | None:
    """The episode data set folder that is ``path`` or holds it (a collection rewrites its
    folders), resolved; ``None`` when there is none."""
    resolved = Path(path).resolve()
    for folder in (resolved, *resolved.parents):
        if (folder / "meta" / "info.json").is_file():
            return folder
    return None


def data_set_or_run_holding(path: str | Path) -> tuple[Path, str] | None:
    """The episode data set or trained run folder (one with a ``checkpoint.json``) that is ``path``
    or holds it, resolved, with what it is (``"episode data set"`` or ``"run"``); ``None`` when
    neither does. Nothing else may be written there: a collection rewrites a data set's folders,
    and a run's are its own."""
    resolved = Path(path).resolve()
    for folder in (resolved, *resolved.parents):
        if (folder / "meta" / "info.json").is_file():
            return folder, "episode data set"
        if (folder / "checkpoint.json").is_file():
            return folder, "run"
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


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


def numeric_dtype(dtype: str) -> np.dtype | None:
    """The numpy dtype of a numeric (bool, integer, float) feature dtype name; None for anything else."""
    if dtype in (*CAMERA_DTYPES, "string"):
        return None
    try:
        value = np.dtype(dtype)
    except (TypeError, ValueError):
        return None
    return value if value.kind in "biuf" else None


def image_shape(feature: dict[str, Any]) -> tuple[int, int, int]:
    """(height, width, channels) of an image or video feature: by its ``names`` when they say which
    axis is which, else channels last (lerobot's order) unless only the first axis can be channels."""
    shape = list(feature.get("shape", ()))
    names = feature.get("names")
    if len(shape) != 3:
        raise ValueError(f"an image feature has 3 dimensions, got shape {shape}")
    if isinstance(names, list) and len(names) == 3 and {"height", "width", "channels"} <= set(map(str, names)):
        named = dict(zip(map(str, names), shape, strict=True))
        return named["height"], named["width"], named["channels"]
    if shape[2] not in (1, 3, 4) and shape[0] in (1, 3, 4):
        return shape[1], shape[2], shape[0]
    return shape[0], shape[1], shape[2]


def _is_depth(feature: dict[str, Any]) -> bool:
    info = feature.get("info") if isinstance(feature.get("info"), dict) else {}
    video_info = feature.get("video_info") if isinstance(feature.get("video_info"), dict) else {}
    return bool(info.get("is_depth_map") or info.get("video.is_depth_map") or video_info.get("video.is_depth_map"))


def metadata_folder(root: str | Path) -> Path:
    """``root/meta``, resolved when it is a collection's link to one generation of metadata: the
    reads through it see that generation even when a running collection commits the next."""
    meta = Path(root) / "meta"
    return Path(os.path.realpath(meta)) if meta.is_symlink() else meta


def read_info(root: str | Path, meta: Path | None = None) -> dict[str, Any]:
    """``meta/info.json`` of a data set folder, checked for the keys (and their types) this module needs,
    and for features it can read (numbers, ``"image"``, ``"video"``, ``"string"``). ``meta``: the
    metadata folder to read (:func:`metadata_folder`), ``root/meta`` when not given."""
    path = (Path(root) / "meta" if meta is None else meta) / "info.json"
    if not path.is_file():
        raise DataError(f"{root} is not an episode data set: meta/info.json is missing")
    info = _read_json_object(path)
    for key in ("fps", "features", "total_episodes", "total_frames"):
        if key not in info:
            raise DataError(f"{path}: the key {key!r} is missing")
    version = info.get("codebase_version")
    if version is not None and (not isinstance(version, str) or re.fullmatch(r"v[012](\..*)?", version)):
        raise DataError(
            f"{path}: codebase_version {version!r}: only the LeRobot v3.0 layout is read "
            "(lerobot's convert_dataset_v21_to_v30 converts v2.1 folders)"
        )
    fps = info["fps"]
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not np.isfinite(fps) or fps <= 0:
        raise DataError(f"{path}: the key 'fps' must be a positive number, got {fps!r}")
    for key in ("total_episodes", "total_frames"):
        if not _is_int(info[key]) or info[key] < 0:
            raise DataError(f"{path}: the key {key!r} must be a non-negative integer, got {info[key]!r}")
    if "total_tasks" in info and (not _is_int(info["total_tasks"]) or info["total_tasks"] < 0):
        raise DataError(f"{path}: the key 'total_tasks' must be a non-negative integer, got {info['total_tasks']!r}")
    features = info["features"]
    if not isinstance(features, dict):
        raise DataError(f"{path}: the key 'features' must be an object of features, got {type(features).__name__}")
    for name, feature in features.items():
        if not isinstance(feature, dict):
            raise DataError(f"{path}: features[{name!r}] must be an object with dtype and shape, got {feature!r}")
        dtype = feature.get("dtype")
        if not isinstance(dtype, str):
            raise DataError(f"{path}: features[{name!r}] needs a string 'dtype', got {dtype!r}")
        shape = feature.get("shape", [])
        if not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape):
            raise DataError(
                f"{path}: features[{name!r}]['shape'] must be a list of non-negative integers, got {shape!r}"
            )
        if dtype not in (*CAMERA_DTYPES, "string") and numeric_dtype(dtype) is None:
            raise DataError(
                f"{path}: features[{name!r}] has dtype {dtype!r}, which flowforge cannot read "
                "(a numpy number or bool type, 'image', 'video' or 'string')"
            )
        if dtype in CAMERA_DTYPES:
            try:
                image_shape(feature)
            except ValueError as error:
                raise DataError(f"{path}: features[{name!r}] ({dtype}): {error}") from error
        if dtype == "video" and _is_depth(feature):
            raise DataError(f"{path}: features[{name!r}] is a depth-map video, which flowforge cannot read")
    for key, default in (("data_path", DEFAULT_DATA_PATH), ("video_path", DEFAULT_VIDEO_PATH)):
        template = info.get(key, default)
        needed = key == "data_path" or any(f["dtype"] == "video" for f in features.values())
        if needed and not isinstance(template, str):
            raise DataError(f"{path}: the key {key!r} must be a file name template, got {template!r}")
    return info


def _format_path(root: Path, info: dict[str, Any], key: str, **fields: Any) -> Path:
    """A data or video file's path from info.json's template ``key``."""
    default = DEFAULT_DATA_PATH if key == "data_path" else DEFAULT_VIDEO_PATH
    template = info.get(key) or default
    try:
        return root / template.format(**fields)
    except (KeyError, IndexError, ValueError, AttributeError) as error:
        raise DataError(
            f"{root}/meta/info.json: the {key} template {template!r} does not format ({error!r})"
        ) from error


def _tasks_jsonl(path: Path) -> dict[int, str]:
    tasks: dict[int, str] = {}
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
    return tasks


def _tasks_parquet(path: Path) -> dict[int, str]:
    """lerobot's ``meta/tasks.parquet``: a pandas frame whose index (``task``) holds the task strings and
    whose ``task_index`` column their indices, rows in task_index order (lerobot looks a task up by row)."""
    table = _read_parquet(path)
    names = table.column_names
    if "task_index" not in names:
        raise DataError(f"{path}: the column 'task_index' is missing")
    column = "task" if "task" in names else None
    if column is None:
        try:
            index = (table.schema.pandas_metadata or {}).get("index_columns", [])
        except Exception:  # pandas metadata that is not JSON
            index = []
        candidates = [c for c in index if isinstance(c, str) and c in names] or [
            c for c in names if c == "__index_level_0__"
        ]
        if not candidates:
            raise DataError(f"{path}: no task column (the pandas index 'task' of lerobot's table) besides task_index")
        column = candidates[0]
    try:
        indices, texts = table.column("task_index").to_pylist(), table.column(column).to_pylist()
    except Exception as error:  # pyarrow decoding errors of damaged pages
        raise DataError(f"{path}: not a readable Parquet file ({error})") from error
    tasks: dict[int, str] = {}
    for row, (index, text) in enumerate(zip(indices, texts, strict=True)):
        if not _is_int(index) or index != row:
            raise DataError(
                f"{path}, row {row}: task_index is {index!r}; lerobot's task table lists task_index 0, 1, ... "
                "in row order"
            )
        if not isinstance(text, str):
            raise DataError(f"{path}, row {row}: the task must be a string, got {text!r}")
        if text in tasks.values():
            raise DataError(f"{path}, row {row}: the task {text!r} appears twice")
        tasks[index] = text
    return tasks


def read_tasks(root: str | Path, meta: Path | None = None) -> dict[int, str]:
    """``task_index -> task`` from lerobot's ``meta/tasks.parquet`` or, when there is none, the
    ``meta/tasks.jsonl`` of earlier flowforge folders; empty if neither exists."""
    meta = Path(root) / "meta" if meta is None else meta
    if (meta / "tasks.parquet").is_file():
        return _tasks_parquet(meta / "tasks.parquet")
    if (meta / "tasks.jsonl").is_file():
        return _tasks_jsonl(meta / "tasks.jsonl")
    return {}


def _expected_stat_size(feature: dict[str, Any] | None, key: str) -> int | None:
    if feature is None:
        return None
    if key == "count":
        return 1
    if feature.get("dtype") in CAMERA_DTYPES:
        return image_shape(feature)[2]  # one value per colour channel, (3, 1, 1) in lerobot's files
    if feature.get("dtype") == "string":
        return None
    return int(np.prod(feature.get("shape", ()))) or 1


def read_stats(root: str | Path, info: dict[str, Any] | None = None, meta: Path | None = None) -> dict[str, Any]:
    """``meta/stats.json`` (empty if absent): one object of statistics per feature (``min``, ``max``,
    ``mean``, ``std``, ``count`` and lerobot's quantiles ``q01 .. q99``), each finite numbers, sized as
    info.json's feature (a number per dimension, per colour channel for images and videos, ``count``
    one number); ``observation.state`` and ``action`` need ``mean``, ``std``, ``min`` and ``max``."""
    path = (Path(root) / "meta" if meta is None else meta) / "stats.json"
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
        for key in (*STATISTICS, "count", *QUANTILES):
            if key not in entry:
                continue
            try:
                values = np.asarray(entry[key], dtype=np.float64)
            except (TypeError, ValueError) as error:
                raise DataError(f"{path}: {name!r}[{key!r}] must be numbers, got {entry[key]!r}") from error
            if not np.isfinite(values).all():
                raise DataError(f"{path}: {name!r}[{key!r}] must be finite numbers, got {entry[key]!r}")
            if key == "count" and (values < 0).any():
                raise DataError(f"{path}: {name!r}['count'] must be a non-negative number, got {entry[key]!r}")
            size = _expected_stat_size(features.get(name), key)
            if size is not None and values.size != size:
                shape = tuple(features[name].get("shape", ()))
                raise DataError(
                    f"{path}: {name!r}[{key!r}] has {values.size} values, info.json says the shape is {shape}"
                    + (" (statistics of images are per colour channel)" if size != np.prod(shape) else "")
                )
    return stats


def _episode_files(meta: Path) -> list[Path]:
    """Every ``meta/episodes/chunk-XXX/file-YYY.parquet``, in (chunk, file) order."""
    folder = meta / "episodes"
    found = []
    for path in folder.glob("chunk-*/file-*.parquet") if folder.is_dir() else []:
        match = _EPISODES_FILE.fullmatch(path.relative_to(folder).as_posix())
        if match:
            found.append(((int(match[1]), int(match[2])), path))
    return [path for _, path in sorted(found)]


def _video_columns(key: str) -> tuple[str, str, str, str]:
    prefix = f"videos/{key}/"
    return prefix + "chunk_index", prefix + "file_index", prefix + "from_timestamp", prefix + "to_timestamp"


def read_episodes(root: str | Path, info: dict[str, Any], meta: Path | None = None) -> list[dict[str, Any]]:
    """The rows of every ``meta/episodes`` file (in file order), checked against info.json: the needed
    columns (and each video feature's file and time range), whole non-negative numbers, positive lengths,
    ``episode_index`` equal to the row's position, ``total_episodes`` rows, ``total_frames`` frames and
    consecutive ``dataset_from_index .. dataset_to_index`` ranges."""
    root = Path(root)
    meta = root / "meta" if meta is None else meta
    files = _episode_files(meta)
    if not files:
        if info["total_episodes"] == 0:
            return []
        raise DataError(f"{meta / 'episodes' / 'chunk-000' / 'file-000.parquet'} is missing")
    video_keys = [k for k, f in info["features"].items() if f.get("dtype") == "video"]
    episodes: list[dict[str, Any]] = []
    where: list[tuple[Path, int]] = []  # (file, row in it) of each episode, for messages
    for path in files:
        table = _read_parquet(path)
        needed = list(EPISODE_COLUMNS) + [c for key in video_keys for c in _video_columns(key)]
        missing = [c for c in needed if c not in table.column_names]
        if missing:
            raise DataError(f"{path}: the column(s) {', '.join(map(repr, missing))} are missing")
        try:
            rows = table.to_pylist()
        except Exception as error:  # pyarrow decoding errors of damaged pages
            raise DataError(f"{path}: not a readable Parquet file ({error})") from error
        match = _EPISODES_FILE.fullmatch(path.relative_to(meta / "episodes").as_posix())
        for row, entry in enumerate(rows):
            for column, value in zip(("chunk_index", "file_index"), (int(match[1]), int(match[2])), strict=True):
                listed = entry.get(f"meta/episodes/{column}")
                if listed is not None and listed != value:
                    raise DataError(f"{path}, row {row}: 'meta/episodes/{column}' is {listed!r}, the file's is {value}")
            episodes.append(entry)
            where.append((path, row))
    path = files[0] if len(files) == 1 else meta / "episodes" / f"({len(files)} files)"
    info_path = meta / "info.json"
    if len(episodes) != info["total_episodes"]:
        raise DataError(
            f"{path} lists {len(episodes)} episodes, {info_path} says total_episodes={info['total_episodes']}"
        )
    seen: set[int] = set()
    for position, entry in enumerate(episodes):
        file, row = where[position]
        for column in EPISODE_COLUMNS:
            value = entry[column]
            if not _is_int(value) or value < 0:
                raise DataError(f"{file}, row {row}: {column!r} must be a non-negative integer, got {value!r}")
        if entry["length"] < 1:
            raise DataError(f"{file}, row {row}: 'length' must be >= 1, got {entry['length']}")
        if entry["episode_index"] in seen:
            raise DataError(f"{file}, row {row}: episode_index {entry['episode_index']} appears twice")
        seen.add(entry["episode_index"])
        for key in video_keys:
            chunk, number, first, last = (entry[c] for c in _video_columns(key))
            for column, value in zip(_video_columns(key)[:2], (chunk, number), strict=True):
                if not _is_int(value) or value < 0:
                    raise DataError(f"{file}, row {row}: {column!r} must be a non-negative integer, got {value!r}")
            if not (_is_number(first) and _is_number(last) and np.isfinite([first, last]).all() and 0 <= first <= last):
                raise DataError(
                    f"{file}, row {row}: feature {key!r}: from_timestamp {first!r} .. to_timestamp {last!r} "
                    "must be finite seconds, 0 <= from <= to"
                )
            span = entry["length"] / info["fps"]
            if _is_int(entry["length"]) and abs((last - first) - span) >= 0.5 / info["fps"]:
                raise DataError(
                    f"{file}, row {row}: feature {key!r}: from_timestamp {first!r} .. to_timestamp {last!r} spans "
                    f"{last - first:.6g} s; the episode's {entry['length']} frames at {info['fps']} fps take "
                    f"{span:.6g} s"
                )
    frames = sum(int(e["length"]) for e in episodes)
    if frames != info["total_frames"]:
        raise DataError(
            f"{path}: the episode lengths add up to {frames} frames, "
            f"{info_path} says total_frames={info['total_frames']}"
        )
    start = 0
    for position, entry in enumerate(episodes):
        file, row = where[position]
        if entry["episode_index"] != position:
            raise DataError(
                f"{file}, row {row}: episode_index {entry['episode_index']} where {position} belongs "
                "(episodes are listed in episode_index order, 0, 1, ...)"
            )
        first, last = entry.get("dataset_from_index"), entry.get("dataset_to_index")
        if first is not None and last is not None and (first != start or last != start + entry["length"]):
            raise DataError(
                f"{file}, row {row}: episode {entry['episode_index']} spans dataset_from_index={first} .. "
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


def _read_columns(path: Path) -> dict[str, list]:
    table = _read_parquet(path)
    try:
        return {name: table.column(name).to_pylist() for name in table.column_names}
    except Exception as error:  # pyarrow decoding errors of damaged pages
        raise DataError(f"{path}: not a readable Parquet file ({error})") from error


def _data_path(root: Path, entry: dict[str, Any], info: dict[str, Any] | None = None) -> Path:
    chunk, file = int(entry["data/chunk_index"]), int(entry["data/file_index"])
    return _format_path(root, info or {}, "data_path", chunk_index=chunk, file_index=file)


def _video_path(root: Path, entry: dict[str, Any], key: str, info: dict[str, Any]) -> Path:
    chunk, file = (int(entry[c]) for c in _video_columns(key)[:2])
    return _format_path(root, info, "video_path", video_key=key, chunk_index=chunk, file_index=file)


def _numeric_column(
    path: Path, name: str, values: list, shape: tuple[int, ...] | None, frames: list, dtype: str = "float32"
) -> np.ndarray:
    """``values`` as a float array, every entry finite and (when ``shape`` is given) of that shape
    (a feature of shape (1,) may be stored as plain numbers, as lerobot does)."""
    try:
        array = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise DataError(f"{path}: column {name!r} holds rows that are not numbers of one shape ({error})") from error
    if shape is not None and array.shape[1:] != shape and not (shape == (1,) and array.ndim == 1):
        raise DataError(f"{path}: {name} has shape {array.shape[1:]}, info.json says {shape}")
    bad = np.argwhere(~np.isfinite(array.reshape(len(array), -1)))
    if len(bad):
        row, element = (int(i) for i in bad[0])
        value = array.reshape(len(array), -1)[row, element]
        where = f"[{element}]" if array.ndim > 1 else ""
        kind = "states and actions" if name in ("observation.state", "action") else f"{dtype} features"
        raise DataError(
            f"{path}, row {row} (frame_index {frames[row]}): {name}{where} is {value} "
            f"({len(bad)} non-finite value(s) in that column); {kind} must be finite numbers"
        )
    declared = numeric_dtype(dtype)
    if declared is not None and declared.kind in "biu":  # integers stored as floats are read back exactly
        flat = array.reshape(len(array), -1)
        if declared.kind == "b":
            fits = (flat == 0) | (flat == 1)
        else:
            limits = np.iinfo(declared)
            fits = (flat == np.round(flat)) & (flat >= limits.min) & (flat <= limits.max)
        if not fits.all():
            row, element = (int(i) for i in np.argwhere(~fits)[0])
            where = f"[{element}]" if array.ndim > 1 else ""
            raise DataError(
                f"{path}, row {row} (frame_index {frames[row]}): {name}{where} is {float(flat[row, element])!r}, which "
                f"info.json's dtype {dtype} cannot hold"
            )
    return array


def _image_bytes(path: Path, key: str, row: int, value: Any) -> bytes:
    data = value.get("bytes") if isinstance(value, dict) else value
    if not isinstance(data, (bytes, bytearray)) or not data:
        stored = f" (a file name {value.get('path')!r} only)" if isinstance(value, dict) and value.get("path") else ""
        raise DataError(f"{path}, row {row}: {key} holds no image bytes{stored}, got {type(data).__name__}")
    return bytes(data)


def check_data_file(
    path: Path,
    columns: dict[str, list],
    entries: list[dict[str, Any]],
    features: dict[str, Any],
    tasks: dict[int, str] | None = None,
    fps: float | None = None,
    tolerance_s: float = TOLERANCE_S,
) -> None:
    """Check the columns of one data file against the meta/episodes rows that point at it: the needed
    columns and one for every feature except videos, every numeric feature finite and of the shape
    info.json gives, strings, image bytes present, each episode's row count, its frame indices
    ``0 .. length-1`` in order, its global ``index`` range, no rows of other episodes and, given the
    ``tasks`` table, every ``task_index`` in it and the episode's tasks as meta/episodes lists them;
    given ``fps``, timestamps one frame (1/fps s, within ``tolerance_s``) apart, as lerobot checks
    them (a video frame is found by its row's timestamp)."""
    missing = [c for c in FRAME_COLUMNS if c not in columns]
    missing += [k for k, f in features.items() if f.get("dtype") != "video" and k not in columns and k not in missing]
    if any(f.get("dtype") == "video" for f in features.values()) and "timestamp" not in columns:
        missing.append("timestamp")  # the video frame of a row is found by its timestamp
    if missing:
        raise DataError(f"{path}: the column(s) {', '.join(map(repr, missing))} are missing")
    frames = columns["frame_index"]
    for name, feature in features.items():
        dtype = feature.get("dtype")
        if name in ("observation.state", "action") or numeric_dtype(dtype) is not None:
            _numeric_column(path, name, columns[name], tuple(feature.get("shape", ())), frames, str(dtype))
        elif dtype == "string":
            for row, value in enumerate(columns[name]):
                if not isinstance(value, str):
                    raise DataError(f"{path}, row {row}: {name} (dtype string) is {value!r}")
        elif dtype == "image":
            for row, value in enumerate(columns[name]):
                _image_bytes(path, name, row, value)
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
    task_indices = columns.get("task_index")
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
        if fps is not None and "timestamp" in columns and len(rows) > 1:
            times = np.asarray([columns["timestamp"][row] for row in rows], dtype=np.float64)
            steps = np.diff(times)
            # Timestamps are stored as float32: their own rounding grows with t (1e-4 s near 1,000 s).
            rounding = 2 * np.spacing(np.abs(times[1:]).astype(np.float32)).astype(np.float64)
            off = np.flatnonzero(np.abs(steps - 1.0 / fps) >= tolerance_s + rounding)
            if len(off):
                row = rows[int(off[0]) + 1]
                raise DataError(
                    f"{path}, row {row}: episode {episode}'s timestamp {columns['timestamp'][row]!r} is "
                    f"{steps[off[0]]:.6g} s after the frame before; at {fps} fps frames are {1.0 / fps:.6g} s apart"
                )
        index, first = columns.get("index"), entry.get("dataset_from_index")
        if index is not None and first is not None:
            for offset, row in enumerate(rows):
                if index[row] != first + offset:
                    raise DataError(
                        f"{path}, row {row}: episode {episode} frame {offset} has index {index[row]!r}, "
                        f"meta/episodes (dataset_from_index={first}) says {first + offset}"
                    )
        if tasks and task_indices is not None:
            for row in rows:
                if task_indices[row] not in tasks:
                    raise DataError(
                        f"{path}, row {row}: task_index {task_indices[row]!r} is not in the task table "
                        f"(task_index 0 .. {len(tasks) - 1})"
                    )
            listed_tasks = entry.get("tasks")
            used = {tasks[task_indices[row]] for row in rows}
            if isinstance(listed_tasks, list) and set(listed_tasks) != used:
                raise DataError(
                    f"{path}: episode {episode}'s frames have the task(s) {sorted(used)}, meta/episodes lists "
                    f"{listed_tasks}"
                )


#: Pillow's modes of more than 8 bits a channel (16-bit and 32-bit integer, float).
WIDE_IMAGE_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")


def _decode_image(data: bytes, where: str, key: str, shape: tuple[int, int, int] | None) -> np.ndarray:
    """An image file's pixels (h, w, c) uint8; with ``shape`` (h, w, c) they must have it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            mode = image.mode
            if mode not in WIDE_IMAGE_MODES and mode not in ("RGB", "L", "RGBA"):
                image = image.convert("RGB")  # palette, bilevel, CMYK, ...: 8 bits a channel as RGB
            array = np.asarray(image)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise DataError(f"{where}: {key} is not a readable image ({error})") from error
    if mode in WIDE_IMAGE_MODES or array.dtype != np.uint8:  # converting would clip them to 255
        raise DataError(f"{where}: {key} has {mode} pixels ({array.dtype}), 8-bit images are read")
    if array.ndim == 2:
        array = array[:, :, None]
    if shape is not None and array.shape != tuple(shape):
        raise DataError(f"{where}: {key} is a {array.shape} (h, w, c) image, info.json says {tuple(shape)}")
    return array


def _video_frames(
    path: Path,
    key: str,
    timestamps: list[float],
    tolerance_s: float,
    shape: tuple[int, int, int],
    where: str = "",
    labels: list[str] | None = None,
) -> np.ndarray:
    """The frames (n, h, w, 3) uint8 of ``timestamps`` (seconds into the file) in a video, decoded with PyAV
    as lerobot's ``pyav`` backend does: seek to the keyframe at or before the first timestamp, decode forward
    to the last one, and take for each timestamp the closest decoded frame, which must lie within
    ``tolerance_s``. ``where`` and ``labels`` (one per timestamp) go into error messages."""
    try:
        import av
    except ImportError as error:
        raise DataError(f"{path}: reading the video feature {key!r} needs PyAV: pip install av") from error
    if not path.is_file():
        raise DataError(f"{path} is missing (the video of feature {key!r}{where})")
    first, last = min(timestamps), max(timestamps)
    loaded: list[np.ndarray] = []
    times: list[float] = []
    problem = None
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                problem = "the file has no video stream"
            else:
                stream = container.streams.video[0]
                container.seek(round(first / stream.time_base) - 1, backward=True, any_frame=False, stream=stream)
                for frame in container.decode(stream):
                    if frame.pts is None:
                        continue
                    time = float(frame.pts * stream.time_base)
                    loaded.append(frame.to_ndarray(format="rgb24"))
                    times.append(time)
                    if time >= last:
                        break
    except (av.error.FFmpegError, OSError, EOFError) as error:
        problem = f"cannot be decoded ({error})"
    if problem is not None:
        raise DataError(f"{path}: feature {key!r}{where}: {problem}")
    if not loaded:
        raise DataError(f"{path}: feature {key!r}{where}: no frame decodes between {first:.6f} s and {last:.6f} s")
    if loaded[0].shape != tuple(shape):
        raise DataError(
            f"{path}: feature {key!r}: the video's frames are {loaded[0].shape} (h, w, c), "
            f"info.json says {tuple(shape)}"
        )
    decoded = np.asarray(times)
    picked = []
    for number, time in enumerate(timestamps):
        nearest = int(np.argmin(np.abs(decoded - time)))
        if not abs(decoded[nearest] - time) < tolerance_s:
            label = f" {labels[number]}" if labels else ""
            raise DataError(
                f"{path}: feature {key!r}{where}{label}: no frame within {tolerance_s} s of {time:.6f} s "
                f"(the nearest is at {decoded[nearest]:.6f} s)"
            )
        picked.append(loaded[nearest])
    return np.stack(picked)


def _video_times(path: Path, key: str, shape: tuple[int, int, int]) -> np.ndarray:
    """The presentation times (seconds) of every frame of a video, decoding each (for verification)."""
    try:
        import av
    except ImportError as error:
        raise DataError(f"{path}: reading the video feature {key!r} needs PyAV: pip install av") from error
    if not path.is_file():
        raise DataError(f"{path} is missing (the video of feature {key!r})")
    times: list[float] = []
    problem = None
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                problem = "the file has no video stream"
            else:
                stream = container.streams.video[0]
                for frame in container.decode(stream):
                    if (frame.height, frame.width) != tuple(shape[:2]):
                        problem = (
                            f"a frame is {frame.height}x{frame.width} (h x w), info.json says {shape[0]}x{shape[1]}"
                        )
                        break
                    if frame.pts is not None:
                        times.append(float(frame.pts * stream.time_base))
    except (av.error.FFmpegError, OSError, EOFError) as error:
        problem = f"cannot be decoded ({error})"
    if problem is not None:
        raise DataError(f"{path}: feature {key!r}: {problem}")
    return np.sort(np.asarray(times, dtype=np.float64))


def frame_vectors(values: Any, dtype: Any = np.float32) -> np.ndarray:
    """A vector feature's rows, one per frame, as ``(frames, n)``: LeRobot stores a feature of
    shape ``[1]`` as plain numbers, which become rows of one."""
    array = np.asarray(values, dtype=dtype)
    return array[:, None] if array.ndim == 1 else array


def read_metadata(
    root: str | Path,
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[int, str], dict[str, Any]]:
    """A data set's info, episodes, tasks and statistics, all from one generation of metadata. A
    collection running in the folder may commit the next generation and remove this one while it is
    read: then the reads start again from the new one."""
    attempts = 0
    while True:
        meta = metadata_folder(root)
        try:
            info = read_info(root, meta)
            return info, read_episodes(root, info, meta), read_tasks(root, meta), read_stats(root, info, meta)
        except DataError:
            attempts += 1
            if meta.exists() or attempts == 3:
                raise


class EpisodeDataset(torch.utils.data.Dataset):
    """Observation windows and action chunks from an episode data set folder.

    Arguments:
        root: the data set folder.
        obs_horizon: observation frames per item (the current one and the ones before it).
        action_horizon: H, actions per item (the current one and the ones after it).
        cache_files: Parquet files kept in memory at once.
        tolerance_s: the largest distance (exclusive) between a row's timestamp in a video and the
            decoded frame's (lerobot's default).

    Each item is a dict with every feature of info.json: ``observation.state`` (obs_horizon, D)
    and ``action`` (H, A) float32; each image and video feature (obs_horizon, 3, h, w) uint8
    (channel first, as ``uint8`` pixels; lerobot returns them divided by 255 as float32); every other
    ``observation.*`` numeric feature an (obs_horizon, *shape) window in its dtype; other numeric
    features their value at frame t (a tensor; shape-(1,) features are stored and returned as
    scalars, as in lerobot); string features the string; ``observation_is_pad`` (obs_horizon,),
    ``action_is_pad`` (H,), ``task`` (str), and ``episode_index``, ``frame_index``, ``index``,
    ``task_index`` (int) and ``timestamp`` (float) when the data has them.
    """

    def __init__(
        self,
        root: str | Path,
        obs_horizon: int = 1,
        action_horizon: int = 1,
        cache_files: int = 8,
        tolerance_s: float = TOLERANCE_S,
    ) -> None:
        obs_horizon = check_count("obs_horizon", obs_horizon, high=MAX_HORIZON)
        action_horizon = check_count("action_horizon", action_horizon, high=MAX_HORIZON)
        cache_files = check_count("cache_files", cache_files)
        tolerance_s = check_real("tolerance_s", tolerance_s, positive=True)
        self.root = Path(root)
        self.info, episodes, self.tasks, self.stats = read_metadata(self.root)
        self.obs_horizon, self.action_horizon = obs_horizon, action_horizon
        self.tolerance_s = float(tolerance_s)
        self.features = self.info["features"]
        for key in ("observation.state", "action"):
            if key not in self.features:
                raise DataError(f"{self.root}/meta/info.json: feature {key!r} is missing")
        self.image_keys = [k for k, f in self.features.items() if f.get("dtype") == "image"]
        """Features stored as image files inside the data files (dtype ``"image"``)."""
        self.video_keys = [k for k, f in self.features.items() if f.get("dtype") == "video"]
        """Features stored as mp4 files (dtype ``"video"``)."""
        self.camera_keys = [k for k in self.features if k in self.image_keys or k in self.video_keys]
        self.episodes = episodes
        if not episodes:
            raise DataError(f"{self.root}/meta/info.json: the data set has no episodes")
        self.lengths = [int(e["length"]) for e in episodes]
        self.starts = np.cumsum([0, *self.lengths])
        # (chunk, file) -> the data file's columns and each episode's rows in it
        self._cache: OrderedDict[tuple[int, int], tuple[dict[str, Any], dict[int, list[int]]]] = OrderedDict()
        self.cache_files = cache_files

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
        """Every column of one episode's data file rows (by position in the data set), as lists with one
        entry per frame (video features are not columns: see :meth:`camera_frames`)."""
        self._check_episode(episode)
        entry = self.episodes[episode]
        file_key = (int(entry["data/chunk_index"]), int(entry["data/file_index"]))
        if file_key not in self._cache:
            path = _data_path(self.root, entry, self.info)
            columns = _read_columns(path)
            entries = [e for e in self.episodes if (e["data/chunk_index"], e["data/file_index"]) == file_key]
            check_data_file(path, columns, entries, self.features, self.tasks, self.info["fps"], self.tolerance_s)
            rows_of: dict[int, list[int]] = {}  # episode_index -> its rows, found once per file read
            for row, index in enumerate(columns["episode_index"]):
                rows_of.setdefault(index, []).append(row)
            self._cache[file_key] = (columns, rows_of)
            if len(self._cache) > self.cache_files:
                self._cache.popitem(last=False)
        self._cache.move_to_end(file_key)
        columns, rows_of = self._cache[file_key]
        rows = rows_of.get(entry["episode_index"], [])
        if len(rows) != self.lengths[episode]:
            raise DataError(
                f"{self.root}: episode {entry['episode_index']} has {len(rows)} frames in its data file, "
                f"meta/episodes says {self.lengths[episode]}"
            )
        return {name: [values[i] for i in rows] for name, values in columns.items()}

    def camera_frames(self, episode: int, key: str, frames: list[int] | None = None) -> Tensor:
        """Frames of an image or video feature of one episode (by position), (n, 3, h, w) uint8;
        all of the episode's frames unless ``frames`` (frame indices) are given."""
        feature = self.features.get(key)
        if feature is None or feature.get("dtype") not in CAMERA_DTYPES:
            raise KeyError(f"{key!r} is not an image or video feature of {self.root}")
        columns = self.episode_columns(episode)
        frames = list(range(self.lengths[episode])) if frames is None else list(frames)
        outside = [f for f in frames if not is_count(f, 0, self.lengths[episode] - 1)]
        if outside:
            raise IndexError(
                f"frame {outside[0]!r} of episode {episode}: expected an int in 0..{self.lengths[episode] - 1}"
            )
        return self._camera(key, columns, episode, frames)

    def _check_episode(self, episode: int) -> None:
        """Refuse an episode position outside ``0..episodes - 1`` (no Python-style negative index)."""
        if not is_count(episode, 0, len(self.lengths) - 1):
            raise IndexError(f"episode {episode!r}: expected an int in 0..{len(self.lengths) - 1}")

    def _camera(self, key: str, columns: dict[str, Any], episode: int, frames: list[int]) -> Tensor:
        feature, entry = self.features[key], self.episodes[episode]
        shape = image_shape(feature)
        if not frames:  # no frame asked for: none read
            return torch.zeros(0, shape[2], shape[0], shape[1], dtype=torch.uint8)
        path = _data_path(self.root, entry, self.info)
        if feature["dtype"] == "image":
            pixels = [
                _decode_image(
                    _image_bytes(path, key, f, columns[key][f]),
                    f"{path}, episode {entry['episode_index']} frame {f}",
                    key,
                    shape,
                )
                for f in frames
            ]
            array = np.stack(pixels)
        else:
            video = _video_path(self.root, entry, key, self.info)
            start = float(entry[f"videos/{key}/from_timestamp"])
            timestamps = [start + float(columns["timestamp"][f]) for f in frames]
            where = f", episode {entry['episode_index']}"
            labels = [f"frame {f}" for f in frames]
            array = _video_frames(video, key, timestamps, self.tolerance_s, shape, where, labels)
        return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2)

    def _array(self, key: str, values: list, frames: list[int]) -> Tensor:
        shape = tuple(self.features[key]["shape"])
        array = frame_vectors([values[f] for f in frames])
        if array.shape[1:] != shape:
            raise DataError(f"{self.root}: {key} has shape {array.shape[1:]}, info.json says {shape}")
        return torch.from_numpy(array)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not is_count(index, 0, len(self) - 1):
            raise IndexError(f"index {index!r}: expected an int in 0..{len(self) - 1} (a frame of the data set)")
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
        task_index = columns["task_index"][frame] if "task_index" in columns else None
        item["task"] = self.tasks.get(task_index, str((self.episodes[episode].get("tasks") or [""])[0]))
        for key, feature in self.features.items():
            if key in item:
                continue
            dtype = feature.get("dtype")
            if dtype in CAMERA_DTYPES:
                item[key] = self._camera(key, columns, episode, obs_frames)
            elif dtype == "string":
                item[key] = columns[key][frame]
            elif key in _BOOKKEEPING:
                value = columns[key][frame]
                item[key] = float(value) if key == "timestamp" else int(value)
            else:
                numpy_dtype = numeric_dtype(dtype)
                if key.startswith("observation."):
                    rows = [columns[key][f] for f in obs_frames]
                    vectors = frame_vectors(rows, numpy_dtype) if feature.get("shape") == [1] else np.asarray(rows)
                    item[key] = torch.from_numpy(vectors.astype(numpy_dtype, copy=False))
                else:
                    item[key] = torch.from_numpy(np.asarray(columns[key][frame], dtype=numpy_dtype))
        return item


def decode_png(value: Any, where: str = "image bytes") -> Tensor:
    """An image file's pixels (c, h, w) uint8, from its bytes or lerobot's ``{"bytes", "path"}``
    struct, read as the data set reads them: RGB, RGBA and grey keep their channels, other 8-bit
    modes become RGB and deeper pixels are refused."""
    data = value["bytes"] if isinstance(value, dict) else value
    if not isinstance(data, (bytes, bytearray)):
        raise DataError(f"an image is stored as bytes, got {type(data).__name__}")
    return torch.from_numpy(_decode_image(bytes(data), where, "the image", None).copy()).permute(2, 0, 1)


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of an (h, w, 3) uint8 image."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def check_stats_match(root: Path, key: str, stats: dict[str, Any], values: np.ndarray) -> None:
    """meta/stats.json's min, max, mean and std of ``key`` against its values in the data files:
    policies normalise with them, so statistics of other data (or edited ones) would train silently
    on a wrong scale."""
    recomputed = {"min": values.min(0), "max": values.max(0), "mean": values.mean(0), "std": values.std(0)}
    for name, actual in recomputed.items():
        stated = np.asarray(stats[name], dtype=np.float64).reshape(-1)
        close = np.isclose(stated, actual, rtol=1e-3, atol=1e-4)
        if not close.all():
            dim = int(np.flatnonzero(~close)[0])
            raise DataError(
                f"{root}/meta/stats.json: {key!r}[{name!r}][{dim}] is {stated[dim]:.6g}, the data files give "
                f"{actual[dim]:.6g}; the statistics belong to other data (policies normalise with them)"
            )


def verify_dataset(root: str | Path, tolerance_s: float = TOLERANCE_S) -> None:
    """Check a whole data set folder against its metadata; a :class:`DataError` names the file and what disagrees.

    Reads info.json, tasks, stats.json (whose state and action min, max, mean and std must be those of
    the data files) and every meta/episodes file (counts, lengths, index ranges, video
    time ranges), then every data file: readable, the needed columns and one per feature, finite numbers of
    the declared shape, each episode's rows, frame indices and tasks, no rows of episodes that meta/episodes
    places elsewhere, and every image decoding to its declared size; then every video file: decodable, of
    the declared size, with a frame within ``tolerance_s`` of every row's ``from_timestamp + timestamp``.
    """
    root = Path(root)
    info, episodes, tasks, stats = read_metadata(root)
    if "total_tasks" in info and len(tasks) != info["total_tasks"]:
        raise DataError(
            f"{root}/meta/info.json says total_tasks={info['total_tasks']}, the task table lists {len(tasks)} tasks"
        )
    normalised = {key: [] for key in ("observation.state", "action") if key in stats and key in info["features"]}
    features = info["features"]
    files: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for entry in episodes:
        files.setdefault((int(entry["data/chunk_index"]), int(entry["data/file_index"])), []).append(entry)
    # video file -> (feature, [(timestamp, episode, frame)]) of every row that shows a frame of it
    queries: dict[Path, tuple[str, list[tuple[float, int, int]]]] = {}
    for entries in files.values():
        path = _data_path(root, entries[0], info)
        columns = _read_columns(path)
        check_data_file(path, columns, entries, features, tasks, info["fps"], tolerance_s)
        for key, values in normalised.items():
            values.append(np.asarray(columns[key], dtype=np.float64).reshape(len(columns[key]), -1))
        for key, feature in features.items():
            if feature.get("dtype") == "image":
                shape = image_shape(feature)
                for row, value in enumerate(columns[key]):
                    _decode_image(_image_bytes(path, key, row, value), f"{path}, row {row}", key, shape)
        for entry in entries:
            rows = [i for i, e in enumerate(columns["episode_index"]) if e == entry["episode_index"]]
            for key in (k for k, f in features.items() if f.get("dtype") == "video"):
                start = float(entry[f"videos/{key}/from_timestamp"])
                video = _video_path(root, entry, key, info)
                wanted = queries.setdefault(video, (key, []))[1]
                wanted.extend(
                    (start + float(columns["timestamp"][r]), entry["episode_index"], f) for f, r in enumerate(rows)
                )
    for key, values in normalised.items():
        check_stats_match(root, key, stats[key], np.concatenate(values))
    for video, (key, wanted) in queries.items():
        times = _video_times(video, key, image_shape(features[key]))
        if not len(times):
            raise DataError(f"{video}: feature {key!r}: the video has no frames")
        for time, episode, frame in wanted:
            at = int(np.searchsorted(times, time))
            around = times[max(at - 1, 0) : at + 1]  # the decoded frames just before and after
            nearest = float(around[np.argmin(np.abs(around - time))])
            if not abs(nearest - time) < tolerance_s:
                raise DataError(
                    f"{video}: feature {key!r}, episode {episode} frame {frame}: no frame within {tolerance_s} s of "
                    f"{time:.6f} s (the nearest is at {nearest:.6f} s)"
                )


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
        settings = _read_json_object(root_path / "meta" / "collection.json").get("settings")
        noise = settings.get("action_noise") if isinstance(settings, dict) else None
        if noise:
            noisy = settings.get("noisy_tasks")
            where = ", ".join(map(str, noisy)) if isinstance(noisy, list) else "every task"
            lines.append(f"action noise (DART): {noise} on {where}; action.executed holds what the robot received")
    return "\n".join(lines)


__all__ = [
    "TOLERANCE_S",
    "EpisodeDataset",
    "check_data_file",
    "decode_png",
    "describe",
    "encode_png",
    "image_shape",
    "numeric_dtype",
    "read_episodes",
    "read_info",
    "read_stats",
    "read_tasks",
    "verify_dataset",
]
