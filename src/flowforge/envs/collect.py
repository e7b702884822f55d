"""Collect scripted-expert demonstrations from MetaWorld into an episode data set (LeRobot v3 layout).

Each attempt resets the task with its own seed, rolls out the task's expert until success (or
``max_steps``) and keeps the episode only if it succeeded. Every kept episode is written as its
own Parquet file (``data/chunk-XXX/file-YYY.parquet``), and then the metadata is rewritten
atomically: ``meta/info.json``, ``meta/stats.json``, ``meta/tasks.jsonl``, the episodes table,
and last ``meta/collection.json`` (attempt counts, running statistics, the settings). A killed
collection therefore leaves a valid data set of the episodes finished so far, and running the
same command again resumes: it continues from the recorded attempt counts, with the same seeds
it would have used.

Images are stored inside the Parquet files as PNG bytes (feature dtype ``"image"``);
statistics are kept for ``observation.state`` and ``action``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from flowforge.checkpoint import write_atomic
from flowforge.data.episodes import encode_png
from flowforge.data.tabular import DataError
from flowforge.envs.metaworld import INSTRUCTIONS, MetaWorldEnv

CODEBASE_VERSION = "v3.0"
STATE_DIM, ACTION_DIM = 39, 4


def _episode_path(episode: int) -> str:
    return f"data/chunk-{episode // 1000:03d}/file-{episode % 1000:03d}.parquet"


def _write_parquet(path: Path, columns: dict[str, list], schema=None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as parquet

    table = pa.table(columns, schema=schema)
    sink = pa.BufferOutputStream()
    parquet.write_table(table, sink)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, sink.getvalue().to_pybytes())


def _new_record(settings: dict[str, Any]) -> dict[str, Any]:
    zeros = {"count": 0, "sum": None, "sumsq": None, "min": None, "max": None}
    return {
        "settings": settings,
        "tasks": {},
        "episodes": [],
        "stats": {"observation.state": dict(zeros), "action": dict(zeros)},
    }


def _accumulate(stats: dict[str, Any], values: np.ndarray) -> None:
    values = values.astype(np.float64)
    if stats["count"] == 0:
        stats.update(
            sum=values.sum(0).tolist(),
            sumsq=(values**2).sum(0).tolist(),
            min=values.min(0).tolist(),
            max=values.max(0).tolist(),
        )
    else:
        stats["sum"] = (np.asarray(stats["sum"]) + values.sum(0)).tolist()
        stats["sumsq"] = (np.asarray(stats["sumsq"]) + (values**2).sum(0)).tolist()
        stats["min"] = np.minimum(stats["min"], values.min(0)).tolist()
        stats["max"] = np.maximum(stats["max"], values.max(0)).tolist()
    stats["count"] += len(values)


def _summary(stats: dict[str, Any]) -> dict[str, Any]:
    count = stats["count"]
    mean = np.asarray(stats["sum"]) / count
    variance = np.maximum(np.asarray(stats["sumsq"]) / count - mean**2, 0.0)
    return {
        "mean": mean.tolist(),
        "std": np.sqrt(variance).tolist(),
        "min": stats["min"],
        "max": stats["max"],
        "count": [count],
    }


def _write_metadata(root: Path, record: dict[str, Any], fps: int) -> None:
    settings = record["settings"]
    episodes = record["episodes"]
    features = {
        "observation.state": {"dtype": "float32", "shape": [STATE_DIM], "names": None},
        "action": {"dtype": "float32", "shape": [ACTION_DIM], "names": None},
        "episode_index": {"dtype": "int64", "shape": [1], "names": None},
        "frame_index": {"dtype": "int64", "shape": [1], "names": None},
        "timestamp": {"dtype": "float32", "shape": [1], "names": None},
        "index": {"dtype": "int64", "shape": [1], "names": None},
        "task_index": {"dtype": "int64", "shape": [1], "names": None},
    }
    if settings["images"]:
        size = settings["size"]
        features[f"observation.images.{settings['camera']}"] = {
            "dtype": "image",
            "shape": [size, size, 3],
            "names": ["height", "width", "channels"],
        }
    total_frames = sum(e["length"] for e in episodes)
    task_list = record["task_list"]
    info = {
        "codebase_version": CODEBASE_VERSION,
        "robot_type": "sawyer",
        "total_episodes": len(episodes),
        "total_frames": total_frames,
        "total_tasks": len(task_list),
        "chunks_size": 1000,
        "fps": fps,
        "splits": {"train": f"0:{len(episodes)}"},
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "video_path": None,
        "features": features,
    }
    meta = root / "meta"
    meta.mkdir(parents=True, exist_ok=True)
    if episodes:
        _write_parquet(
            meta / "episodes" / "chunk-000" / "file-000.parquet",
            {
                "episode_index": [e["episode_index"] for e in episodes],
                "tasks": [[e["task"]] for e in episodes],
                "length": [e["length"] for e in episodes],
                "dataset_from_index": [e["from"] for e in episodes],
                "dataset_to_index": [e["from"] + e["length"] for e in episodes],
                "data/chunk_index": [e["episode_index"] // 1000 for e in episodes],
                "data/file_index": [e["episode_index"] % 1000 for e in episodes],
                "seed": [e["seed"] for e in episodes],
            },
        )
        stats = {key: _summary(value) for key, value in record["stats"].items() if value["count"]}
        write_atomic(meta / "stats.json", (json.dumps(stats, indent=1) + "\n").encode())
    tasks = "".join(json.dumps({"task_index": i, "task": INSTRUCTIONS[t]}) + "\n" for i, t in enumerate(task_list))
    write_atomic(meta / "tasks.jsonl", tasks.encode())
    write_atomic(meta / "info.json", (json.dumps(info, indent=2) + "\n").encode())
    write_atomic(meta / "collection.json", (json.dumps(record) + "\n").encode())


def collect(
    tasks: list[str],
    episodes: int,
    root: str | Path,
    *,
    images: bool = False,
    camera: str = "corner",
    size: int = 84,
    seed: int = 0,
    max_steps: int = 500,
    max_attempts_factor: int = 3,
    progress: bool | None = None,
) -> dict[str, dict[str, int]]:
    """Collect ``episodes`` successful expert episodes per task into ``root``; returns the per-task
    ``{"attempted", "succeeded"}`` counts (the expert's success rate). Resumes an interrupted run."""
    from tqdm.auto import tqdm

    from flowforge.utils.progress import progress_enabled

    for task in tasks:
        if task not in INSTRUCTIONS:
            raise ValueError(f"unknown MetaWorld task {task!r}")
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    root = Path(root)
    settings = {"images": images, "camera": camera, "size": size, "seed": seed, "max_steps": max_steps}
    state_file = root / "meta" / "collection.json"
    if state_file.is_file():
        record = json.loads(state_file.read_text())
        if record["settings"] != settings:
            raise DataError(f"{root} was collected with {record['settings']}; resume with the same settings")
    else:
        if root.exists() and any(root.iterdir()):
            raise DataError(f"{root} exists and is not a collection to resume; choose an empty folder")
        record = _new_record(settings)
    record.setdefault("task_list", [])
    fps = None
    bar = tqdm(total=episodes * len(tasks), desc="collect", disable=not progress_enabled(progress), leave=False)
    for task in tasks:
        counts = record["tasks"].setdefault(task, {"attempted": 0, "succeeded": 0})
        if task not in record["task_list"]:
            record["task_list"].append(task)
        task_index = record["task_list"].index(task)
        bar.update(min(counts["succeeded"], episodes))
        env = MetaWorldEnv(task, seed=seed, image=images, camera=camera, size=size, max_steps=max_steps)
        fps = round(1.0 / env.env.unwrapped.dt)
        expert = env.expert()
        while counts["succeeded"] < episodes and counts["attempted"] < max_attempts_factor * episodes:
            episode_seed = seed * 1_000_003 + task_index * 10_007 + counts["attempted"]
            observation, info = env.reset(seed=episode_seed)
            states, actions, frames = [], [], []
            success = False
            for _ in range(max_steps):
                action = np.clip(expert.get_action(observation["state"]), -1.0, 1.0).astype(np.float32)
                states.append(observation["state"])
                actions.append(action)
                if images:
                    frames.append(encode_png(observation["image"]))
                observation, _, terminated, truncated, info = env.step(action)
                if info["is_success"]:
                    success = True
                    break
                if terminated or truncated:
                    break
            counts["attempted"] += 1
            if success:
                index = len(record["episodes"])
                start = sum(e["length"] for e in record["episodes"])
                length = len(states)
                columns: dict[str, list] = {
                    "observation.state": [s.tolist() for s in states],
                    "action": [a.tolist() for a in actions],
                    "episode_index": [index] * length,
                    "frame_index": list(range(length)),
                    "timestamp": [f / fps for f in range(length)],
                    "index": list(range(start, start + length)),
                    "task_index": [task_index] * length,
                }
                if images:
                    columns[f"observation.images.{camera}"] = frames
                _write_parquet(root / _episode_path(index), columns)
                _accumulate(record["stats"]["observation.state"], np.asarray(states))
                _accumulate(record["stats"]["action"], np.asarray(actions))
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
            _write_metadata(root, record, fps)
        env.close()
    bar.close()
    return {task: dict(record["tasks"][task]) for task in tasks}


__all__ = ["collect"]
