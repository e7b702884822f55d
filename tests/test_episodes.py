"""Expert demonstrations in the LeRobot v3 layout: collection (robot extra), reloading, windows and masks, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from flowforge.cli import app
from flowforge.data.episodes import EpisodeDataset
from flowforge.data.normalize import Normalizer
from flowforge.data.tabular import DataError

pytest.importorskip("metaworld", reason="MetaWorld is the robot extra: pip install 'flowforge[robot]'")

from flowforge.envs.collect import collect


@pytest.fixture(scope="module")
def state_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reach")
    counts = collect(["reach-v3"], 2, root, progress=False)
    assert counts == {"reach-v3": {"attempted": 2, "succeeded": 2}}
    return root


def test_collected_episodes_reload_with_windows_and_padding(state_set: Path) -> None:
    info = json.loads((state_set / "meta" / "info.json").read_text())
    assert info["total_episodes"] == 2 and info["codebase_version"] == "v3.0" and info["fps"] == 80
    data = EpisodeDataset(state_set, obs_horizon=2, action_horizon=8)
    assert len(data) == info["total_frames"]
    first = data[0]
    assert first["observation.environment_state"].shape == (2, 39) and first["action"].shape == (8, 4)
    assert first["observation.state"].shape == (2, 4)  # the robot's own state: hand position and gripper
    torch.testing.assert_close(first["observation.state"], first["observation.environment_state"][:, :4])
    assert first["observation_is_pad"].tolist() == [True, False]  # nothing before the first frame
    torch.testing.assert_close(first["observation.state"][0], first["observation.state"][1])
    assert first["task"] == "reach the goal position"
    length = data.lengths[0]
    last = data[length - 1]
    assert last["action_is_pad"].tolist() == [False] + [True] * 7
    assert (last["action"][1:] == last["action"][0]).all()  # padding repeats the last action
    assert data[length]["episode_index"] == 1 and data[length]["frame_index"] == 0


def test_statistics_and_normalizers(state_set: Path) -> None:
    data = EpisodeDataset(state_set)
    actions = torch.stack([data[i]["action"][0] for i in range(len(data))]).double()
    stats = json.loads((state_set / "meta" / "stats.json").read_text())["action"]
    np.testing.assert_allclose(stats["mean"], actions.mean(0).numpy(), atol=1e-6)
    np.testing.assert_allclose(stats["min"], actions.min(0).values.numpy(), atol=1e-7)
    for mode in ("mean_std", "min_max"):
        normalizer = data.normalizer("action", mode)
        torch.testing.assert_close(normalizer.unnormalize(normalizer.normalize(actions.float())), actions.float())
        again = Normalizer(normalizer.features, mode)
        again.load_state_dict(normalizer.state_dict())  # the statistics travel as buffers
        torch.testing.assert_close(again.normalize(actions.float()), normalizer.normalize(actions.float()))
    scaled = data.normalizer("action", "min_max").normalize(actions.float())
    assert scaled.min() >= -1 - 1e-6 and scaled.max() <= 1 + 1e-6


def test_images_are_stored_and_decoded(tmp_path: Path) -> None:
    collect(["reach-v3"], 2, tmp_path, images=True, size=32, progress=False)
    data = EpisodeDataset(tmp_path, obs_horizon=2)
    item = data[3]
    image = item["observation.images.corner"]
    assert image.shape == (2, 3, 32, 32) and image.dtype == torch.uint8 and image.float().std() > 5


def test_an_interrupted_collection_resumes(tmp_path: Path) -> None:
    collect(["reach-v3"], 1, tmp_path, progress=False)
    counts = collect(["reach-v3"], 2, tmp_path, progress=False)
    assert counts["reach-v3"]["succeeded"] == 2
    seeds = [json.loads((tmp_path / "meta" / "collection.json").read_text())["episodes"][i]["seed"] for i in (0, 1)]
    assert seeds[0] != seeds[1]
    assert len(EpisodeDataset(tmp_path)) == json.loads((tmp_path / "meta" / "info.json").read_text())["total_frames"]
    with pytest.raises(
        DataError, match=r"collected with other settings: images False \(now True\); resume with the same settings"
    ):
        collect(["reach-v3"], 3, tmp_path, images=True, progress=False)


def test_malformed_folders_give_clear_errors(state_set: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"meta/info\.json is missing"):
        EpisodeDataset(tmp_path)
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(state_set, broken)
    (broken / "meta" / "stats.json").unlink()  # optional; with it, its sizes disagree with info.json first
    info = json.loads((broken / "meta" / "info.json").read_text())
    info["features"]["observation.state"]["shape"] = [38]
    (broken / "meta" / "info.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match=r"observation\.state has shape"):
        EpisodeDataset(broken)[0]
    info["features"]["observation.state"]["shape"] = [39]
    (broken / "meta" / "info.json").write_text(json.dumps(info))
    data_file = broken / "data" / "chunk-000" / "file-000.parquet"  # episode 0, read by item 0
    data_file.write_bytes(data_file.read_bytes()[:200])
    with pytest.raises(DataError, match="not a readable Parquet file"):
        EpisodeDataset(broken)[0]


def test_data_commands(state_set: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["data", "info", str(state_set)])
    assert result.exit_code == 0 and "2 episodes" in result.output and "reach-v3: 2 / 2 (100%)" in result.output
    result = runner.invoke(
        app, ["data", "collect", "--out", str(tmp_path / "x"), "--tasks", "fly-v3", "--episodes", "1"]
    )
    assert result.exit_code != 0 and "unknown MetaWorld v3 task 'fly-v3'" in result.output
    result = runner.invoke(app, ["data", "info", str(tmp_path / "nothing")])
    assert result.exit_code != 0 and "meta/info.json is missing" in result.output


def test_the_older_tasks_file_is_read_when_there_is_no_tasks_table(state_set: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "older"
    shutil.copytree(state_set, copy)
    assert (copy / "meta" / "tasks.parquet").is_file()  # LeRobot v3.0's tasks table, as collected
    (copy / "meta" / "tasks.parquet").unlink()
    (copy / "meta" / "tasks.jsonl").write_text(json.dumps({"task_index": 0, "task": "reach the goal position"}) + "\n")
    assert EpisodeDataset(copy)[0]["task"] == "reach the goal position"


@pytest.mark.parametrize("plain", [False, True])
def test_a_lerobot_style_folder_with_multi_episode_files_reads(tmp_path: Path, plain: bool) -> None:
    """The v3 layout as lerobot writes it: several episodes per data file, tasks as a Parquet table,
    images as {"bytes", "path"} structs, and (``plain``) features of shape [1] as plain numbers."""
    import pyarrow as pa
    import pyarrow.parquet as parquet

    from flowforge.data.episodes import encode_png

    lengths = [3, 4]
    rows = {"observation.state": [], "observation.gripper": [], "action": [], "episode_index": [], "frame_index": []}
    rows["task_index"] = []
    images = []
    for episode, length in enumerate(lengths):
        for frame in range(length):
            rows["observation.state"].append([float(episode), float(frame)])
            action, gripper = float(10 * episode + frame), float(frame) / 10
            rows["action"].append(action if plain else [action])
            rows["observation.gripper"].append(gripper if plain else [gripper])
            rows["episode_index"].append(episode)
            rows["frame_index"].append(frame)
            rows["task_index"].append(episode)
            images.append({"bytes": encode_png(np.full((4, 4, 3), 40 * frame, np.uint8)), "path": None})
    (tmp_path / "data" / "chunk-000").mkdir(parents=True)
    (tmp_path / "meta" / "episodes" / "chunk-000").mkdir(parents=True)
    parquet.write_table(
        pa.table({**rows, "observation.images.top": images}), tmp_path / "data" / "chunk-000" / "file-000.parquet"
    )
    parquet.write_table(
        pa.table(
            {
                "episode_index": [0, 1],
                "tasks": [["pick"], ["place"]],
                "length": lengths,
                "data/chunk_index": [0, 0],
                "data/file_index": [0, 0],
                "dataset_from_index": [0, 3],
                "dataset_to_index": [3, 7],
            }
        ),
        tmp_path / "meta" / "episodes" / "chunk-000" / "file-000.parquet",
    )
    parquet.write_table(
        pa.table({"__index_level_0__": ["pick", "place"], "task_index": [0, 1]}), tmp_path / "meta" / "tasks.parquet"
    )
    features = {
        "observation.state": {"dtype": "float32", "shape": [2]},
        "observation.gripper": {"dtype": "float32", "shape": [1]},
        "action": {"dtype": "float32", "shape": [1]},
        "observation.images.top": {"dtype": "image", "shape": [4, 4, 3]},
    }
    info = {"codebase_version": "v3.0", "fps": 10, "total_episodes": 2, "total_frames": 7, "features": features}
    (tmp_path / "meta" / "info.json").write_text(json.dumps(info))
    data = EpisodeDataset(tmp_path, obs_horizon=1, action_horizon=3)
    item = data[4]  # episode 1, frame 1
    assert item["episode_index"] == 1 and item["frame_index"] == 1 and item["task"] == "place"
    assert item["action"][:, 0].tolist() == [11.0, 12.0, 13.0] and item["action_is_pad"].tolist() == [False] * 3
    assert item["observation.images.top"].shape == (1, 3, 4, 4) and int(item["observation.images.top"].max()) == 40
    assert data[6]["action_is_pad"].tolist() == [False, True, True]
    assert item["observation.gripper"].shape == (1, 1)  # (obs_horizon, *shape) however it is stored
    # policy training reads the same shapes: a one-number action stays one number per step
    from flowforge.policy.config import PolicyConfig
    from flowforge.policy.data import policy_tensors

    config = PolicyConfig(state_key="observation.state", state_dim=2, action_dim=1, horizon=3, language=False)
    tensors, _ = policy_tensors(data, progress=False, config=config)
    assert tensors["action"].shape == (7, 3, 1) and tensors["action"][4, :, 0].tolist() == [11.0, 12.0, 13.0]


def _damaged_copy(state_set: Path, tmp_path: Path) -> Path:
    import shutil

    copy = tmp_path / "damaged"
    shutil.copytree(state_set, copy)
    return copy


def _rewrite_parquet(path: Path, change) -> None:
    """Read a Parquet file as columns of lists, let ``change`` edit them, write it back."""
    import pyarrow as pa
    import pyarrow.parquet as parquet

    table = parquet.read_table(path)
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    change(columns)
    parquet.write_table(pa.table(columns), path)


def _set(column: str, row: int, value, element: int | None = None):
    def change(columns: dict) -> None:
        if element is None:
            columns[column][row] = value
        else:
            columns[column][row][element] = value

    return change


INFO, TASKS, STATS, COLLECTION = "info.json", "tasks.jsonl", "stats.json", "collection.json"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        (INFO, b'{"fps": 80,', r"info\.json: not valid JSON"),
        (INFO, b"\xff\xfe{}", r"info\.json: not UTF-8"),
        (INFO, b"[1, 2]", r"info\.json: the top level must be a JSON object, got list"),
        (INFO, b'{"features": {}, "total_episodes": 2, "total_frames": 1}', r"info\.json: the key 'fps' is missing"),
        (INFO, b'{"fps": 80, "features": [], "total_episodes": 2, "total_frames": 1}', r"info\.json: .*'features'"),
        (INFO, b'{"fps": "fast", "features": {}, "total_episodes": 2, "total_frames": 1}', r"info\.json: .*'fps'"),
        (TASKS, b'{"task_index": 0, "task": "reach"}\noops\n', r"tasks\.jsonl, line 2: not valid JSON"),
        (TASKS, b'[0, "reach"]\n', r"tasks\.jsonl, line 1: must be a JSON object"),
        (TASKS, b'{"task": "reach"}\n', r"tasks\.jsonl, line 1: the key 'task_index' is missing"),
        (TASKS, b'{"task_index": 0, "task": "r\xe9ach"}\n', r"tasks\.jsonl: not UTF-8"),
        (STATS, b"{", r"stats\.json: not valid JSON"),
        (STATS, b"null", r"stats\.json: the top level must be a JSON object, got NoneType"),
        (STATS, b'{"action": [1, 2]}', r"stats\.json: 'action' must be an object"),
        (STATS, b'{"action": {"mean": [0, 0, 0, 0]}}', r"stats\.json: 'action' lacks the key\(s\) 'std'"),
        (STATS, b'{"action": {"mean": "a", "std": 1, "min": 0, "max": 1}}', r"stats\.json: 'action'\['mean'\]"),
        (COLLECTION, b"\x80", r"collection\.json: not UTF-8"),
        (COLLECTION, b"[]", r"collection\.json: the top level must be a JSON object"),
        (COLLECTION, b'{"tasks": ["reach-v3"]}', r"collection\.json: the key 'tasks' must be"),
        (COLLECTION, b'{"tasks": {"reach-v3": {"attempted": 2}}}', r"collection\.json: .*lacks the key 'succeeded'"),
    ],
)
def test_damaged_metadata_files_are_data_errors_naming_the_file(
    state_set: Path, tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    from flowforge.data.episodes import describe

    copy = _damaged_copy(state_set, tmp_path)
    if name == TASKS:  # the older tasks file is read where there is no tasks table
        (copy / "meta" / "tasks.parquet").unlink()
    (copy / "meta" / name).write_bytes(content)
    with pytest.raises(DataError, match=message):
        describe(copy)
    if name != COLLECTION:  # the data set reads every other metadata file
        with pytest.raises(DataError, match=message):
            EpisodeDataset(copy)
    result = CliRunner().invoke(app, ["data", "info", str(copy)])
    assert result.exit_code == 2 and name in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        (
            "observation.state",
            float("nan"),
            r"file-000\.parquet, row 5 \(frame_index 5\): observation\.state\[3\] is nan",
        ),
        ("action", float("inf"), r"file-000\.parquet, row 5 \(frame_index 5\): action\[3\] is inf"),
    ],
)
def test_non_finite_states_and_actions_are_refused(
    state_set: Path, tmp_path: Path, column: str, value: float, message: str
) -> None:
    from flowforge.data.episodes import describe
    from flowforge.policy.data import policy_tensors

    copy = _damaged_copy(state_set, tmp_path)
    _rewrite_parquet(copy / "data" / "chunk-000" / "file-000.parquet", _set(column, 5, value, element=3))
    with pytest.raises(DataError, match=message):
        EpisodeDataset(copy)[0]  # any frame of the episode: the whole file is checked when it is read
    with pytest.raises(DataError, match=message):
        policy_tensors(EpisodeDataset(copy, action_horizon=4), progress=False)
    with pytest.raises(DataError, match=message):
        describe(copy)
    assert "2 episodes" in describe(copy, verify=False)  # the metadata alone is fine


def _episodes_file(root: Path) -> Path:
    return root / "meta" / "episodes" / "chunk-000" / "file-000.parquet"


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _drop_last_row(columns: dict) -> None:
    for values in columns.values():
        values.pop()


def _edit_info(key: str, value):
    def damage(root: Path) -> None:
        info = json.loads((root / "meta" / "info.json").read_text())
        info[key] = value(info[key])
        (root / "meta" / "info.json").write_text(json.dumps(info))

    return damage


FILE0, FILE1 = "data/chunk-000/file-000.parquet", "data/chunk-000/file-001.parquet"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda root: _truncate(root / FILE1), r"file-001\.parquet: not a readable Parquet file"),
        (lambda root: (root / FILE1).unlink(), r"file-001\.parquet is missing"),
        (lambda root: _rewrite_parquet(root / FILE0, _drop_last_row), r"file-000\.parquet: episode 0 has \d+ frames"),
        (lambda root: _rewrite_parquet(root / FILE1, _set("frame_index", 3, 2)), r"file-001\.parquet, row 3: .*"),
        (lambda root: _rewrite_parquet(root / FILE1, _set("episode_index", 0, 0)), r"file-001\.parquet: 1 row"),
        (lambda root: _rewrite_parquet(root / FILE1, _set("index", 2, 0)), r"file-001\.parquet, row 2: .*index 0"),
        (lambda root: _truncate(_episodes_file(root)), r"episodes/chunk-000/file-000\.parquet: not a readable"),
        (
            lambda root: _rewrite_parquet(_episodes_file(root), _set("length", 1, 3)),
            r"file-000\.parquet: the episode lengths add up to \d+ frames, .*info\.json says total_frames",
        ),
        (_edit_info("total_episodes", lambda n: n + 1), r"lists 2 episodes, .*info\.json says total_episodes=3"),
        (_edit_info("total_frames", lambda n: n - 1), r"info\.json says total_frames="),
    ],
)
def test_data_info_verifies_the_data_files(state_set: Path, tmp_path: Path, damage, message: str) -> None:
    from flowforge.data.episodes import describe

    copy = _damaged_copy(state_set, tmp_path)
    damage(copy)
    with pytest.raises(DataError, match=message):
        describe(copy)
    result = CliRunner().invoke(app, ["data", "info", str(copy)])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_a_row_count_mismatch_with_meta_episodes_is_found_when_loading(state_set: Path, tmp_path: Path) -> None:
    copy = _damaged_copy(state_set, tmp_path)
    _rewrite_parquet(copy / FILE1, _drop_last_row)
    data = EpisodeDataset(copy)
    data[0]  # episode 0 is whole
    with pytest.raises(DataError, match=r"file-001\.parquet: episode 1 has \d+ frames .*meta/episodes says \d+"):
        data[len(data) - 1]


@pytest.mark.parametrize("old_removed", [False, True])
def test_a_reader_sees_one_generation_of_metadata_while_a_collection_commits(
    state_set: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, old_removed: bool
) -> None:
    import os
    import shutil

    import flowforge.data.episodes as episodes

    root = tmp_path / "collecting"
    shutil.copytree(state_set, root, symlinks=True)  # meta: the link to one generation, as collect leaves it
    old = Path(os.readlink(root / "meta")).name
    new = root / ".meta-999999"  # the next generation: the same episodes, marked in two of its files
    shutil.copytree(root / old, new)
    info = json.loads((new / "info.json").read_text())
    (new / "info.json").write_text(json.dumps({**info, "generation": "new"}))
    stats = json.loads((new / "stats.json").read_text())
    (new / "stats.json").write_text(json.dumps({**stats, "marker": {}}))
    read_info, switched = episodes.read_info, []

    def read_info_then_commit(*args, **kwargs):  # the collection commits right after info.json is read
        read = read_info(*args, **kwargs)
        if not switched:
            switched.append(True)
            os.symlink(new.name, root / ".meta-next")
            os.replace(root / ".meta-next", root / "meta")
            if old_removed:
                shutil.rmtree(root / old)
        return read

    monkeypatch.setattr(episodes, "read_info", read_info_then_commit)
    data = EpisodeDataset(root)
    assert switched and (data.info.get("generation") == "new") == ("marker" in data.stats) == old_removed
