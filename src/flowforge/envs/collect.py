"""Collect scripted-expert demonstrations from MetaWorld into an episode data set (LeRobot v3.0 layout).

Each attempt resets the task with its own seed, rolls out the task's expert until success (or
``max_steps``) and keeps the episode only if it succeeded. Each frame stores the robot's own state
(hand position and gripper opening) as ``observation.state``, MetaWorld's whole 39-d vector (object
and goal poses included) as ``observation.environment_state``, the action, and with ``images`` the
frame of each camera inside the Parquet file as PNG bytes (feature dtype ``"image"``,
``observation.images.<camera>``; several cameras with ``cameras``); with ``action_noise`` the
robot receives a perturbed action, stored as ``action.executed`` next to the expert's own
(``action``). The metadata is
LeRobot v3.0's: ``info.json``, ``tasks.parquet``, the episodes table with each episode's data file
index and statistics (``stats/<feature>/<stat>`` columns), and ``stats.json`` with ``min``, ``max``,
``mean``, ``std``, ``count`` and the quantiles ``q01 q10 q50 q90 q99`` of every feature
(:mod:`flowforge.data.feature_stats`), so LeRobot opens, trains on, resumes and merges these folders.

Crash safety: every attempt ends in exactly one commit point. A kept episode is first written
as its own Parquet file (``data/chunk-XXX/file-YYY.parquet``, through a temporary name), which no
metadata lists yet. Then a complete new metadata folder ``.meta-NNNNNN`` is written (the episodes
table, ``stats.json``, ``tasks.parquet``, ``info.json`` and last ``collection.json``: attempt
counts, running statistics, the settings), and ``meta`` -- a relative symbolic link -- is switched
to it with one atomic rename. A reader therefore always sees one consistent generation of
metadata, and a killed collection is a valid data set of the episodes committed so far. Running
the same call again resumes: leftovers of an uncommitted attempt (temporary files, unlisted data
files, unfinished metadata folders) are removed and collection continues from the recorded
attempt counts, with the same seeds it would have used, so the result equals an uninterrupted run.

A folder is resumed when it holds a committed collection (``meta/collection.json``), restarted when
it was started by :func:`collect` but nothing is committed yet (the marker file
``.flowforge-collection`` or only temporary files), and refused otherwise. Folders written before
this scheme (``meta`` a plain folder) are resumed too: their metadata is rebuilt from
``collection.json``. Where symbolic links cannot be made, ``meta`` is swapped by two renames
(``meta`` -> ``.meta-previous``, new -> ``meta``); a kill between them is repaired on resume.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from flowforge.config import check_seed
from flowforge.data.episodes import decode_png, encode_png, metadata_folder
from flowforge.data.feature_stats import STATISTICS, aggregate_stats, feature_stats, image_stats
from flowforge.data.tabular import DataError
from flowforge.envs.episode import run_episode
from flowforge.envs.metaworld import (
    INSTRUCTIONS,
    MAX_EPISODE_STEPS,
    ROBOT_STATE_DIM,
    TASK_SEED_STRIDE,
    MetaWorldEnv,
    check_cameras,
)
from flowforge.utils.locks import FolderBusy, exclusive_lock
from flowforge.validation import check_bool, check_count, check_real

CODEBASE_VERSION = "v3.0"
STATE_DIM, ACTION_DIM = 39, 4
#: A collection's seed s gives its episodes the seeds s x this + the task's offset + the attempt (a prime:
#: collections with other seeds never share an episode).
EPISODE_SEEDS_PER_SEED = 1_000_003
#: What the robot received, stored next to the expert's ``action`` when collected with action noise.
EXECUTED_ACTION = "action.executed"
ROBOT_STATE_NAMES = ("hand_x", "hand_y", "hand_z", "gripper_opening")
#: Numeric columns of a data file, each with statistics.
NUMERIC_FEATURES = (
    "observation.state",
    "observation.environment_state",
    "action",
    EXECUTED_ACTION,
    "timestamp",
    "frame_index",
    "episode_index",
    "index",
    "task_index",
)
#: The folder layout: 2 stores the robot's own state as ``observation.state`` and MetaWorld's whole
#: 39-d vector as ``observation.environment_state`` (layout 1, without the setting, stored the latter
#: as ``observation.state``); a collection is resumed only in its own layout.
LAYOUT = 2
MARKER = ".flowforge-collection"
"""File written into a new folder before anything else: the folder is a collection in progress."""
LOCK = ".flowforge-collection.lock"
"""Held (a POSIX lock) by the collection writing the folder; the file stays, empty."""
#: Correlation time, in control steps, of ``collect``'s ``action_noise`` (an Ornstein-Uhlenbeck process).
ACTION_NOISE_STEPS = 8
_PREVIOUS = ".meta-previous"  # the old metadata folder while ``meta`` is swapped by renames
_NEXT_LINK = ".meta.next"  # the new link, renamed over ``meta`` at the commit point
_GENERATION = re.compile(r"\.meta-\d{6}")
_DATA_FILE = re.compile(r"file-(\d{3})\.parquet")
_CHUNK = re.compile(r"chunk-(\d{3})")


def _after_write(step: str) -> None:
    """Called after every write step of the collector; does nothing. Tests replace it to inject a
    failure (a simulated kill) after any step, so every state a kill can leave is exercised."""


def _episode_path(episode: int) -> str:
    return f"data/chunk-{episode // 1000:03d}/file-{episode % 1000:03d}.parquet"


def _fsync_folder(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # folders cannot be opened on some platforms
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _write_file(path: Path, data: bytes, step: str) -> None:
    """Write ``data`` to ``path`` and flush it to disk (no rename: for files nothing lists yet)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    _after_write(step)


def _parquet_bytes(columns: dict[str, list]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as parquet

    sink = pa.BufferOutputStream()
    parquet.write_table(pa.table(columns), sink)
    return sink.getvalue().to_pybytes()


def _new_record(settings: dict[str, Any]) -> dict[str, Any]:
    return {"settings": settings, "tasks": {}, "episodes": [], "task_list": []}


def _episode_columns(root: Path, episode: int, images: list[str]) -> dict[str, np.ndarray]:
    """The numeric columns (and decoded images) of a committed episode's data file."""
    import pyarrow.parquet as parquet

    table = parquet.read_table(root / _episode_path(episode)).to_pydict()
    columns = {key: np.asarray(table[key]) for key in NUMERIC_FEATURES if key in table}
    for key in images:
        columns[key] = np.stack([decode_png(value).permute(1, 2, 0).numpy() for value in table[key]])
    return columns


def _episode_stats(columns: dict[str, np.ndarray]) -> dict[str, dict[str, list]]:
    """Every feature's statistics over one episode (LeRobot's per-episode ``stats/...`` columns)."""
    stats = {}
    for key, values in columns.items():
        if values.dtype == np.uint8 and values.ndim == 4:
            stats[key] = image_stats(values)
        else:
            stats[key] = feature_stats(values)
    return stats


def _tasks_parquet(instructions: list[str]) -> bytes:
    """``meta/tasks.parquet`` as LeRobot writes it: a pandas frame indexed by ``task`` with a
    ``task_index`` column (the pandas metadata written by hand: pandas is not a dependency)."""
    import pyarrow as pa
    import pyarrow.parquet as parquet

    table = pa.table({"task_index": pa.array(range(len(instructions)), pa.int64()), "task": instructions})
    pandas = {
        "index_columns": ["task"],
        "column_indexes": [
            {
                "name": None,
                "field_name": None,
                "pandas_type": "unicode",
                "numpy_type": "object",
                "metadata": {"encoding": "UTF-8"},
            }
        ],
        "columns": [
            {
                "name": "task_index",
                "field_name": "task_index",
                "pandas_type": "int64",
                "numpy_type": "int64",
                "metadata": None,
            },
            {"name": "task", "field_name": "task", "pandas_type": "unicode", "numpy_type": "object", "metadata": None},
        ],
        "creator": {"library": "pyarrow", "version": pa.__version__},
        "pandas_version": "2.2.3",
    }
    table = table.replace_schema_metadata({b"pandas": json.dumps(pandas).encode()})
    sink = pa.BufferOutputStream()
    parquet.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _features(settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    features = {
        "observation.state": {"dtype": "float32", "shape": [ROBOT_STATE_DIM], "names": list(ROBOT_STATE_NAMES)},
        "observation.environment_state": {"dtype": "float32", "shape": [STATE_DIM], "names": None},
        "action": {"dtype": "float32", "shape": [ACTION_DIM], "names": ["dx", "dy", "dz", "gripper"]},
        "timestamp": {"dtype": "float32", "shape": [1], "names": None},
        "frame_index": {"dtype": "int64", "shape": [1], "names": None},
        "episode_index": {"dtype": "int64", "shape": [1], "names": None},
        "index": {"dtype": "int64", "shape": [1], "names": None},
        "task_index": {"dtype": "int64", "shape": [1], "names": None},
    }
    if settings.get("action_noise"):
        features[EXECUTED_ACTION] = dict(features["action"])
    if settings["images"]:
        size = settings["size"]
        for camera in _cameras(settings):
            features[f"observation.images.{camera}"] = {
                "dtype": "image",
                "shape": [size, size, 3],
                "names": ["height", "width", "channels"],
            }
    return features


def _cameras(settings: dict[str, Any]) -> list[str]:
    """The cameras of a collection's settings (``cameras`` for several, else the one ``camera``)."""
    return list(settings.get("cameras", [settings["camera"]]))


def _metadata_files(record: dict[str, Any], fps: int, episode_stats: list[dict]) -> list[tuple[str, bytes]]:
    """The metadata files of the committed episodes in ``record``, in writing order (collection.json last).

    ``episode_stats``: every committed episode's statistics per feature (:func:`_episode_stats`).
    """
    settings = record["settings"]
    episodes = record["episodes"]
    features = _features(settings)
    total_frames = sum(e["length"] for e in episodes)
    task_list = record["task_list"]
    info = {
        "codebase_version": CODEBASE_VERSION,
        "robot_type": "sawyer",
        "total_episodes": len(episodes),
        "total_frames": total_frames,
        "total_tasks": len(task_list),
        "chunks_size": 1000,
        "data_files_size_in_mb": 100,
        "video_files_size_in_mb": 200,
        "fps": fps,
        "splits": {"train": f"0:{len(episodes)}"},
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "video_path": None,
        "features": features,
    }
    files: list[tuple[str, bytes]] = []
    if episodes:
        table: dict[str, list] = {
            "episode_index": [e["episode_index"] for e in episodes],
            "tasks": [[e["task"]] for e in episodes],
            "length": [e["length"] for e in episodes],
            "data/chunk_index": [e["episode_index"] // 1000 for e in episodes],
            "data/file_index": [e["episode_index"] % 1000 for e in episodes],
            "dataset_from_index": [e["from"] for e in episodes],
            "dataset_to_index": [e["from"] + e["length"] for e in episodes],
        }
        for key in features:
            for name in STATISTICS:
                table[f"stats/{key}/{name}"] = [stats[key][name] for stats in episode_stats]
        table["meta/episodes/chunk_index"] = [0] * len(episodes)
        table["meta/episodes/file_index"] = [0] * len(episodes)
        files.append(("episodes/chunk-000/file-000.parquet", _parquet_bytes(table)))
        stats = {key: aggregate_stats([e[key] for e in episode_stats]) for key in features}
        files.append(("stats.json", (json.dumps(stats, indent=1) + "\n").encode()))
    files.append(("tasks.parquet", _tasks_parquet([INSTRUCTIONS[t] for t in task_list])))
    files.append(("info.json", (json.dumps(info, indent=2) + "\n").encode()))
    files.append(("collection.json", (json.dumps(record) + "\n").encode()))
    return files


def _commit(root: Path, record: dict[str, Any], fps: int, episode_stats: list[dict]) -> None:
    """Write a new metadata folder for ``record`` and make it ``meta`` with one atomic rename: the commit point."""
    record["generation"] = record.get("generation", 0) + 1
    record["fps"] = fps
    folder = root / f".meta-{record['generation']:06d}"
    if folder.exists():  # an uncommitted leftover (the committed one has a smaller number)
        shutil.rmtree(folder)
    folder.mkdir()
    _after_write("metadata folder")
    for name, data in _metadata_files(record, fps, episode_stats):
        _write_file(folder / name, data, f"meta/{name}")
    _fsync_folder(folder)
    meta, link = root / "meta", root / _NEXT_LINK
    previous = Path(os.readlink(meta)).name if meta.is_symlink() else None
    if os.path.lexists(link):
        link.unlink()
    try:
        os.symlink(folder.name, link, target_is_directory=True)
    except OSError:  # no symbolic links here (e.g. Windows without the privilege): swap by two renames
        if meta.is_dir() and not meta.is_symlink():
            os.replace(meta, root / _PREVIOUS)
            _after_write("old metadata moved aside")
        elif os.path.lexists(meta):
            meta.unlink()
        os.replace(folder, meta)
        _fsync_folder(root)
        _after_write("commit")
        shutil.rmtree(root / _PREVIOUS, ignore_errors=True)
        _after_write("old metadata removed")
        return
    _after_write("next link")
    if meta.is_dir() and not meta.is_symlink():  # a folder written before this scheme, or by the fallback
        os.replace(meta, root / _PREVIOUS)
        _after_write("old metadata moved aside")
        previous = _PREVIOUS
    os.replace(link, meta)  # the commit point
    _fsync_folder(root)
    _after_write("commit")
    if previous and previous != folder.name and (root / previous).is_dir():
        shutil.rmtree(root / previous)
        _after_write("old metadata removed")


def _only_temporary_files(folder: Path) -> bool:
    """Whether ``folder`` holds nothing but the temporary files (and their folders) a killed collection leaves."""
    for entry in folder.iterdir():
        if entry.is_symlink() or entry.is_file():
            if not (entry.name.startswith(".") and entry.name.endswith(".tmp")) and entry.name != LOCK:
                return False
        elif not _only_temporary_files(entry):
            return False
    return True


def _open_folder(root: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """Read-only look at ``root``: the committed record to resume, ``None`` for a new or restarted
    collection; a :class:`DataError` for a folder that is not a collection or has other settings."""
    meta = metadata_folder(root)  # one generation for both reads: a commit in between switches the link
    state_file = meta / "collection.json"
    if not os.path.lexists(root / "meta") and (root / _PREVIOUS / "collection.json").is_file():
        state_file = root / _PREVIOUS / "collection.json"  # killed between the two renames of a swap
    if state_file.is_file():
        try:
            record = json.loads(state_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DataError(f"{state_file}: not a readable collection record ({error})") from error
        kinds = {"settings": dict, "tasks": dict, "episodes": list, "task_list": list}
        if not isinstance(record, dict) or not all(isinstance(record.get(k), kind) for k, kind in kinds.items()):
            raise DataError(
                f"{state_file}: not a collection record (needs settings and tasks (tables), episodes and "
                "task_list (lists))"
            )
        committed = _committed_episodes(state_file.parent)
        if committed is not None and committed != len(record["episodes"]):
            raise DataError(
                f"{state_file} records {len(record['episodes'])} episodes, but {state_file.parent / 'info.json'} "
                f"lists {committed}: the folder was changed by another program; collect into a new folder"
            )
        if record["settings"].get("layout") != settings["layout"]:
            raise DataError(
                f"{root} was collected in an earlier layout (the 39-d state as observation.state); "
                "collect into a new folder"
            )
        if record["settings"] != settings:
            before = record["settings"]

            def shown(values: dict, key: str) -> str:  # a setting left at its default is not recorded
                return repr(values[key]) if key in values else "not set"

            differ = ", ".join(
                f"{key} {shown(before, key)} (now {shown(settings, key)})"
                for key in sorted(set(before) | set(settings))
                if before.get(key) != settings.get(key)
            )
            raise DataError(f"{root} was collected with other settings: {differ}; resume with the same settings")
        return record
    if root.exists() and not root.is_dir():
        raise DataError(f"{root} exists and is not a folder; choose an empty folder")
    if _committed_episodes(meta):
        raise DataError(
            f"{meta / 'info.json'} lists committed episodes, but {state_file} (the collection record) is missing: "
            "the folder was not written by a collection that can resume; collect into a new folder"
        )
    if root.exists() and not (root / MARKER).is_file() and not _only_temporary_files(root):
        raise DataError(f"{root} exists and is not a collection to resume; choose an empty folder")
    return None


def _committed_episodes(meta: Path) -> int | None:
    """The episode count ``meta/info.json`` lists (``None`` when there is no readable count)."""
    try:
        count = json.loads((meta / "info.json").read_text()).get("total_episodes")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    return count if isinstance(count, int) and not isinstance(count, bool) else None


def _clean(root: Path, committed: int) -> None:
    """Remove what an uncommitted attempt left: temporary files, metadata folders that ``meta`` does not
    name, the next link, and data files of episodes ``committed`` and later (which no metadata lists)."""
    meta = root / "meta"
    if not os.path.lexists(meta) and (root / _PREVIOUS).is_dir():
        os.replace(root / _PREVIOUS, meta)  # finish the interrupted swap backwards: the old one is committed
    current = Path(os.readlink(meta)).name if meta.is_symlink() else None
    if meta.is_symlink() and not meta.is_dir():
        meta.unlink()  # a dangling link (cannot be committed: targets are removed only after a commit)
        current = None
    for entry in list(root.iterdir()):
        stale_folder = (_GENERATION.fullmatch(entry.name) or entry.name == _PREVIOUS) and entry.name != current
        if stale_folder and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        elif entry.name == _NEXT_LINK or (entry.name.startswith(".") and entry.name.endswith(".tmp")):
            entry.unlink()
    data = root / "data"
    if data.is_dir():
        for chunk in data.iterdir():
            number = _CHUNK.fullmatch(chunk.name)
            if not number or not chunk.is_dir():
                continue
            for entry in chunk.iterdir():
                match = _DATA_FILE.fullmatch(entry.name)
                temporary = entry.name.startswith(".") and entry.name.endswith(".tmp")
                if temporary or (match and int(number[1]) * 1000 + int(match[1]) >= committed):
                    entry.unlink()


def collect(
    tasks: list[str],
    episodes: int,
    root: str | Path,
    *,
    images: bool = False,
    camera: str = "corner",
    cameras: list[str] | None = None,
    size: int = 84,
    seed: int = 0,
    max_steps: int = 500,
    max_attempts_factor: int = 3,
    action_noise: float = 0.0,
    noisy_tasks: list[str] | None = None,
    progress: bool | None = None,
) -> dict[str, dict[str, int]]:
    """Collect ``episodes`` successful expert episodes per task into ``root``; returns the per-task
    ``{"attempted", "succeeded"}`` counts (the expert's success rate). Resumes an interrupted run;
    a folder that holds everything asked for already is answered from its record, nothing read back.

    With ``images``, each frame stores the image of ``camera``, or of every one of ``cameras`` (MetaWorld
    camera names, e.g. ``["corner", "gripperPOV"]``), as the feature ``observation.images.<camera>``.
    Two collections into one folder at once are refused: the second raises a :class:`DataError`,
    unless everything it asks for is committed already (then it returns the recorded counts).

    ``action_noise`` :math:`\\sigma > 0` perturbs what the robot receives, as DART does (Laskey et al.
    2017): the expert's action plus :math:`n_t`, an Ornstein-Uhlenbeck process of stationary spread
    :math:`\\sigma` per dimension and correlation time :data:`ACTION_NOISE_STEPS`,
    :math:`n_{t+1} = \\rho n_t + \\sqrt{1 - \\rho^2}\\,\\sigma\\epsilon_t` with
    :math:`\\rho = e^{-1/8}` and :math:`n_0 = 0` (drawn from each attempt's seed). ``action`` then
    stores the expert's action at every state visited (the label a policy learns), and
    ``action.executed`` what the robot received (clipped to [-1, 1]). A policy trained on such data
    sees states off the expert's own path, each with the expert's way back (MT10: see the README).
    ``noisy_tasks`` (some of ``tasks``; all by default) are the tasks collected with that noise, the
    others as the expert acts (their ``action.executed`` equals ``action``): recoveries where a task
    needs them, the other tasks' demonstrations as clean as a collection without noise."""
    if isinstance(tasks, str):
        raise TypeError(f"tasks must be a list of MetaWorld task names, got the string {tasks!r}")
    tasks = list(tasks)
    if not tasks:
        raise ValueError("tasks is empty: name at least one MetaWorld task, e.g. ['reach-v3']")
    for task in tasks:
        if task not in INSTRUCTIONS:
            raise ValueError(f"tasks: unknown MetaWorld task {task!r}; the v3 tasks are: {', '.join(INSTRUCTIONS)}")
    episodes = check_count("episodes", episodes)
    size = check_count("size", size, low=8)
    max_steps = check_count("max_steps", max_steps, high=MAX_EPISODE_STEPS)
    max_attempts_factor = check_count("max_attempts_factor", max_attempts_factor)
    images = check_bool("images", images)
    action_noise = check_real("action_noise", action_noise, non_negative=True)
    if action_noise > 1:
        raise ValueError(f"action_noise must be at most 1 (actions span [-1, 1]), got {action_noise!r}")
    if noisy_tasks is not None:
        noisy_tasks = _checked_noisy_tasks(noisy_tasks, tasks, action_noise)
    check_seed("seed", seed)
    from flowforge.envs.evaluate import VALIDATION_SEED_BASE

    if max_attempts_factor * episodes > TASK_SEED_STRIDE:  # a task's attempts would reach the next task's seeds
        raise ValueError(
            f"episodes must be at most {TASK_SEED_STRIDE // max_attempts_factor} with max_attempts_factor "
            f"{max_attempts_factor} (each task has {TASK_SEED_STRIDE:,} attempt seeds), got {episodes}"
        )
    # demonstrations stay below the seeds kept for choosing settings and for evaluation
    last = VALIDATION_SEED_BASE - 1
    highest = seed * EPISODE_SEEDS_PER_SEED + (len(tasks) - 1) * TASK_SEED_STRIDE + max_attempts_factor * episodes - 1
    if highest > last:
        raise ValueError(
            f"seed must be an int in 0..{(last - highest) // EPISODE_SEEDS_PER_SEED + seed} for this collection "
            f"(seed x {EPISODE_SEEDS_PER_SEED:,} + each task's and attempt's offset is an episode's seed, below "
            f"the validation and evaluation seeds from {VALIDATION_SEED_BASE:,}), got {seed}"
        )
    cameras = check_cameras([camera] if cameras is None else cameras)
    root = Path(root)
    settings = {
        "images": images,
        "camera": cameras[0],
        "size": size,
        "seed": seed,
        "max_steps": max_steps,
        "layout": LAYOUT,
    }
    if len(cameras) > 1:  # one camera keeps the settings of earlier collections, which then resume
        settings["cameras"] = cameras
    if action_noise:  # likewise: collections without noise keep their settings
        settings["action_noise"] = action_noise
    if noisy_tasks is not None:  # and collections with noise on every task
        settings["noisy_tasks"] = noisy_tasks
    try:
        record = _open_folder(root, settings)  # reads only: nothing is written before the inputs are valid
    except DataError:
        if _busy(root):  # read while another collection committed: that is the refusal to report
            raise DataError(f"{root}: {_BUSY}") from None
        raise
    root.mkdir(parents=True, exist_ok=True)
    try:
        with exclusive_lock(root / LOCK, wait=False):
            return _collect_locked(root, tasks, episodes, settings, cameras, max_attempts_factor, progress)
    except FolderBusy:
        # Busy, but what is asked for is committed already (two benchmark copies started together):
        # nothing to write, so the answer is the record's.
        counts = _committed_counts(root, record, tasks, episodes, max_attempts_factor)
        if counts is not None:
            return counts
        raise DataError(f"{root}: {_BUSY}") from None


def _checked_noisy_tasks(noisy_tasks: list[str], tasks: list[str], action_noise: float) -> list[str]:
    """``noisy_tasks`` checked against the collection's ``tasks`` and ``action_noise``, sorted (a
    resumed collection compares its settings, whatever order the tasks were named in)."""
    if isinstance(noisy_tasks, str):
        raise TypeError(f"noisy_tasks must be a list of task names, got the string {noisy_tasks!r}")
    noisy_tasks = list(noisy_tasks)
    if not noisy_tasks:
        raise ValueError("noisy_tasks is empty: name at least one of the tasks, or leave it out for all of them")
    if not action_noise:
        raise ValueError(f"noisy_tasks = {noisy_tasks}: the tasks collected with action noise need action_noise > 0")
    outside = [task for task in noisy_tasks if task not in tasks]
    if outside:
        named = ", ".join(map(repr, outside))
        raise ValueError(f"noisy_tasks: {named} not among the tasks collected ({', '.join(tasks)})")
    repeated = sorted({task for task in noisy_tasks if noisy_tasks.count(task) > 1})
    if repeated:
        raise ValueError(f"noisy_tasks: {', '.join(repeated)} named more than once; name each once")
    return sorted(noisy_tasks)


_BUSY = "another collection is writing into this folder; wait for it to finish or choose another folder"


def _committed_counts(
    root: Path, record: dict[str, Any] | None, tasks: list[str], episodes: int, max_attempts_factor: int
) -> dict[str, dict[str, int]] | None:
    """The per-task counts when everything asked for is committed already (each task has its
    ``episodes``, or ran out of attempts) in the current metadata scheme; otherwise None."""
    if record is None or not (root / "meta").is_symlink():
        return None
    counts = {task: record["tasks"].get(task, {"attempted": 0, "succeeded": 0}) for task in tasks}
    limit = max_attempts_factor * episodes
    if all(c["succeeded"] >= episodes or c["attempted"] >= limit for c in counts.values()):
        return {task: dict(c) for task, c in counts.items()}
    return None


def _expert_actor(expert: Any, labels: list[np.ndarray], noise: float, seed: int) -> Any:
    """The actor of one attempt: the expert's action (appended to ``labels``, clipped as sent) plus,
    with ``noise`` > 0, :func:`collect`'s Ornstein-Uhlenbeck perturbation drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    rho = float(np.exp(-1.0 / ACTION_NOISE_STEPS))
    state = np.zeros(ACTION_DIM)

    def act(observation: dict[str, Any]) -> np.ndarray:
        nonlocal state
        # the expert reads object poses
        label = np.clip(expert.get_action(observation["environment_state"]), -1.0, 1.0).astype(np.float32)
        labels.append(label)
        if not noise:
            return label
        state = rho * state + np.sqrt(1 - rho**2) * noise * rng.standard_normal(ACTION_DIM)
        return (label + state).astype(np.float32)

    return act


def _busy(root: Path) -> bool:
    """Whether another process holds ``root``'s collection lock (the lock file is never created here)."""
    if not (root / LOCK).is_file():
        return False
    try:
        with exclusive_lock(root / LOCK, wait=False):
            return False
    except FolderBusy:
        return True


def _collect_locked(
    root: Path,
    tasks: list[str],
    episodes: int,
    settings: dict[str, Any],
    cameras: list[str],
    max_attempts_factor: int,
    progress: bool | None,
) -> dict[str, dict[str, int]]:
    """:func:`collect`'s work, done while holding the folder's lock (the record is read again under it)."""
    from tqdm.auto import tqdm

    from flowforge.utils.progress import progress_enabled

    images, size, seed, max_steps = settings["images"], settings["size"], settings["seed"], settings["max_steps"]
    action_noise = settings.get("action_noise", 0.0)
    record = _open_folder(root, settings)
    rebuild = False
    if record is None:  # new, or started without a commit: begin again
        if not (root / MARKER).is_file():
            _write_file(root / MARKER, (json.dumps({"settings": settings}) + "\n").encode(), "marker")
        _clean(root, 0)
        record = _new_record(settings)
    else:
        _clean(root, len(record["episodes"]))
        done = _committed_counts(root, record, tasks, episodes, max_attempts_factor)
        if done is not None:  # nothing to add: skip reading back every episode's frames for statistics
            return done
        rebuild = not (root / "meta").is_symlink()  # written before this scheme: rebuild from the record
    image_keys = [f"observation.images.{name}" for name in cameras] if images else []
    # Every committed episode's statistics, read back from its data file (not kept in the record).
    episode_stats = [_episode_stats(_episode_columns(root, e["episode_index"], image_keys)) for e in record["episodes"]]
    fps = None
    bar = tqdm(total=episodes * len(tasks), desc="collect", disable=not progress_enabled(progress), leave=False)
    for task in tasks:
        counts = record["tasks"].setdefault(task, {"attempted": 0, "succeeded": 0})
        if task not in record["task_list"]:
            record["task_list"].append(task)
        task_index = record["task_list"].index(task)
        bar.update(min(counts["succeeded"], episodes))
        env = MetaWorldEnv(task, seed=seed, image=images, cameras=cameras, size=size, max_steps=max_steps)
        fps = round(1.0 / env.env.unwrapped.dt)
        if rebuild:
            _commit(root, record, fps, episode_stats)
            rebuild = False
        expert = env.expert()
        noisy = settings.get("noisy_tasks")
        task_noise = action_noise if noisy is None or task in noisy else 0.0
        while counts["succeeded"] < episodes and counts["attempted"] < max_attempts_factor * episodes:
            episode_seed = seed * EPISODE_SEEDS_PER_SEED + task_index * TASK_SEED_STRIDE + counts["attempted"]
            labels: list[np.ndarray] = []
            actor = _expert_actor(expert, labels, task_noise, episode_seed)
            episode = run_episode(env, actor, episode_seed, max_steps, keep=True)
            counts["attempted"] += 1
            if episode.success:
                index = len(record["episodes"])
                start = sum(e["length"] for e in record["episodes"])
                length = episode.steps
                arrays = {
                    "observation.state": np.stack([o["state"] for o in episode.observations]),
                    "observation.environment_state": np.stack([o["environment_state"] for o in episode.observations]),
                    "action": np.stack(labels),
                    "timestamp": np.arange(length, dtype=np.float32) / fps,
                    "frame_index": np.arange(length),
                    "episode_index": np.full(length, index),
                    "index": np.arange(start, start + length),
                    "task_index": np.full(length, task_index),
                }
                if action_noise:
                    arrays[EXECUTED_ACTION] = np.stack(episode.actions)
                columns: dict[str, list] = {key: values.tolist() for key, values in arrays.items()}
                for key in image_keys:
                    entry = "image." + key.removeprefix("observation.images.")
                    arrays[key] = np.stack([o[entry] for o in episode.observations])
                    columns[key] = [encode_png(frame) for frame in arrays[key]]
                path = root / _episode_path(index)
                temporary = path.with_name(f".{path.name}.tmp")
                _write_file(temporary, _parquet_bytes(columns), "data file (temporary)")
                os.replace(temporary, path)  # still uncommitted: no metadata lists it yet
                _after_write("data file")
                episode_stats.append(_episode_stats(arrays))
                record["episodes"].append(
                    {
                        "episode_index": index,
                        "task": INSTRUCTIONS[task],
                        "length": length,
                        "from": start,
                        "seed": episode_seed,
                    }
                )
                counts["succeeded"] += 1
                bar.update(1)
            _commit(root, record, fps, episode_stats)  # one commit point per attempt
        env.close()
    bar.close()
    return {task: dict(record["tasks"][task]) for task in tasks}


__all__ = ["collect"]
