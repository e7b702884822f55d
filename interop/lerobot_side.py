"""The lerobot half of the LeRobot interop check: runs inside lerobot's own environment.

Called by ``interop/lerobot_check.py`` with lerobot's Python (``lerobot`` 0.6.1 on Python 3.12,
installed in a separate virtual environment: it brings its own torch), offline
(``HF_HUB_OFFLINE=1``). Each command prints one JSON line with what it found:

* ``open ROOT``: opens a folder with ``LeRobotDataset``, reads every frame, and reports frame and
  episode counts, features, the tasks and the first frame's state;
* ``resume ROOT``: appends one episode with lerobot's own recorder (``LeRobotDataset.resume``),
  copying the features of the folder's first frame, and reopens it;
* ``aggregate OUT ROOT...``: merges folders with ``aggregate_datasets`` and opens the result.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch


def _open(root: Path) -> dict:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    dataset = LeRobotDataset("local/" + root.name, root=root)
    tasks = set()
    for index in range(len(dataset)):
        item = dataset[index]
        tasks.add(item["task"])
        for key, value in item.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
                raise ValueError(f"frame {index}: {key} is not finite")
    first = dataset[0]
    return {
        "frames": len(dataset),
        "episodes": dataset.num_episodes,
        "features": sorted(dataset.features),
        "tasks": sorted(tasks),
        "first_state": first["observation.state"].tolist(),
        "stats_keys": sorted(dataset.meta.stats["observation.state"]),
    }


def _resume(root: Path) -> dict:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    source = LeRobotDataset("local/" + root.name, root=root)
    first = source[0]
    dataset = LeRobotDataset.resume("local/" + root.name, root=root)
    defaults = {"timestamp", "frame_index", "episode_index", "index", "task_index"}
    for step in range(5):
        frame = {"task": "reach the goal position"}
        for key, feature in source.features.items():
            if key in defaults:
                continue
            value = first[key]
            if feature["dtype"] in ("image", "video"):
                frame[key] = (value.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            else:
                frame[key] = (value.numpy() + 0.01 * step).astype(feature["dtype"])
        dataset.add_frame(frame)
    dataset.save_episode()
    dataset.finalize()
    return _open(root)


def _aggregate(out: Path, roots: list[Path]) -> dict:
    from lerobot.datasets.aggregate import aggregate_datasets

    aggregate_datasets(["local/" + root.name for root in roots], "local/" + out.name, roots=list(roots), aggr_root=out)
    return _open(out)


def main() -> None:
    command, *paths = sys.argv[1:]
    paths = [Path(p) for p in paths]
    if command == "open":
        result = _open(paths[0])
    elif command == "resume":
        result = _resume(paths[0])
    elif command == "aggregate":
        result = _aggregate(paths[0], paths[1:])
    else:
        raise SystemExit(f"unknown command {command!r}: open, resume or aggregate")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
