"""LeRobot v3.0 folders written by lerobot 0.6.1 itself (tests/fixtures/lerobot_v3, made by its make_fixture.py):
flowforge reads every frame as lerobot reads it, and a damaged copy is a DataError naming the feature and file.

``shared`` keeps both episodes in one data file, one mp4 and one meta/episodes file (lerobot's default
sizes); ``split`` has three episodes, each in its own data file, mp4 and meta/episodes file. The expected
values are what ``LeRobotDataset(..., video_backend="pyav")`` returned for every frame; lerobot gives
pixels as float32 ``uint8 / 255``, stored in expected.npz as those uint8 values (bit for bit the same, see
make_fixture.py). Both sides decode the AV1 video with PyAV (FFmpeg's dav1d decoder, whose output the AV1
standard fixes bit for bit, and swscale's yuv420p -> RGB24), so video frames must be equal too.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("pyarrow", reason="LeRobot folders are Parquet files: pip install pyarrow")
pytest.importorskip("av", reason="LeRobot video features are mp4 files decoded with PyAV: pip install av")

import pyarrow as pa
import pyarrow.parquet as parquet

from flowforge.data.episodes import EpisodeDataset, describe, verify_dataset
from flowforge.errors import DataError

# interop/lerobot_check.py points this at a folder lerobot has just written, to check it the same way.
FIXTURES = Path(os.environ.get("FLOWFORGE_LEROBOT_FIXTURE") or Path(__file__).parent / "fixtures" / "lerobot_v3")
FOLDERS = ("shared", "split")
WRIST, TOP = "observation.images.wrist", "observation.images.top"
VIDEO = "videos/observation.images.top/chunk-000/file-000.mp4"
DATA = "data/chunk-000/file-000.parquet"
EPISODES = "meta/episodes/chunk-000/file-000.parquet"


@pytest.fixture(scope="module")
def expected() -> dict:
    with np.load(FIXTURES / "expected.npz") as arrays:
        values = {key: arrays[key] for key in arrays.files}
    return {"arrays": values, "record": json.loads((FIXTURES / "expected.json").read_text())}


def _lerobot(expected: dict, folder: str, key: str) -> np.ndarray:
    return expected["arrays"][f"{folder}/{key}"]


@pytest.mark.parametrize("folder", FOLDERS)
def test_every_frame_reads_as_lerobot_reads_it(folder: str, expected: dict) -> None:
    data = EpisodeDataset(FIXTURES / folder)
    record = expected["record"]["folders"][folder]
    assert len(data) == record["length"] and len(data.episodes) == record["num_episodes"]
    assert data.image_keys == [WRIST] and data.video_keys == [TOP]
    items = [data[i] for i in range(len(data))]
    for key in ("observation.state", "action"):
        mine = torch.stack([item[key][0] for item in items]).numpy()
        theirs = _lerobot(expected, folder, key)
        assert mine.dtype == theirs.dtype == np.float32 and np.array_equal(mine, theirs)  # bit for bit
    for key in (WRIST, TOP):
        mine = torch.stack([item[key][0] for item in items])  # (n, 3, h, w) uint8
        assert mine.dtype == torch.uint8 and mine.shape == (len(data), 3, 32, 32)
        assert np.array_equal(mine.numpy(), _lerobot(expected, folder, key)), key
        lerobot_floats = _lerobot(expected, folder, key).astype(np.float32) / np.float32(255)
        assert np.array_equal((mine.float() / 255).numpy(), lerobot_floats)  # lerobot's own convention
    assert [item["task"] for item in items] == record["tasks"]
    for key in ("episode_index", "frame_index", "index", "task_index", "timestamp"):
        assert np.array_equal([item[key] for item in items], _lerobot(expected, folder, key)), key


def test_episodes_tasks_and_metadata_of_several_files(expected: dict) -> None:
    data = EpisodeDataset(FIXTURES / "split")
    assert [e["meta/episodes/file_index"] for e in data.episodes] == [0, 1, 2]  # three meta/episodes files
    assert [e["data/file_index"] for e in data.episodes] == [0, 1, 2]
    assert [e["episode_index"] for e in data.episodes] == [0, 1, 2] and data.lengths == [3, 2, 4]
    assert data.tasks == {0: "pick the red cube", 1: "place it in the bin"}
    assert [e["tasks"] for e in data.episodes] == [
        ["pick the red cube"],
        ["place it in the bin"],
        ["pick the red cube"],
    ]
    shared = EpisodeDataset(FIXTURES / "shared")
    assert shared.lengths == [5, 4] and [e["dataset_from_index"] for e in shared.episodes] == [0, 5]
    assert shared.episodes[1][f"videos/{TOP}/from_timestamp"] == pytest.approx(0.5)  # 2nd episode in the same mp4
    # stats.json with lerobot's quantiles, and image statistics per colour channel (3, 1, 1)
    assert set(shared.stats["observation.state"]) == {"min", "max", "mean", "std", "count", "q01", "q10", "q50"} | {
        "q90",
        "q99",
    }
    assert np.asarray(shared.stats[TOP]["mean"]).shape == (3, 1, 1)
    normalizer = shared.normalizer("observation.state")
    state = torch.stack([shared[i]["observation.state"][0] for i in range(len(shared))])
    assert normalizer.normalize(state).mean(0).abs().max() < 1e-5
    for folder in FOLDERS:
        verify_dataset(FIXTURES / folder)
        summary = describe(FIXTURES / folder)
        assert f"{TOP}: video (32, 32, 3)" in summary and f"{WRIST}: image (32, 32, 3)" in summary


def test_windows_and_whole_episodes_of_cameras(expected: dict) -> None:
    data = EpisodeDataset(FIXTURES / "shared", obs_horizon=3, action_horizon=4)
    wrist, top = _lerobot(expected, "shared", WRIST), _lerobot(expected, "shared", TOP)
    item = data[6]  # episode 1, frame 1: frames 0, 0 (padding), 1 of episode 1 = rows 5, 5, 6
    assert item["observation_is_pad"].tolist() == [True, False, False]
    assert np.array_equal(item[TOP].numpy(), top[[5, 5, 6]]) and np.array_equal(item[WRIST].numpy(), wrist[[5, 5, 6]])
    assert item["action_is_pad"].tolist() == [False, False, False, True]
    assert np.array_equal(data.camera_frames(1, TOP).numpy(), top[5:9])
    assert np.array_equal(data.camera_frames(0, WRIST, [4, 0]).numpy(), wrist[[4, 0]])


def test_plain_list_columns_and_the_older_tasks_file_read_the_same(tmp_path: Path, expected: dict) -> None:
    copy = _copy("shared", tmp_path)
    table = parquet.read_table(copy / DATA)
    plain = pa.array(table.column("observation.state").to_pylist(), pa.list_(pa.float32()))
    parquet.write_table(table.set_column(0, "observation.state", plain), copy / DATA)
    (copy / "meta" / "tasks.parquet").unlink()  # flowforge's earlier folders: meta/tasks.jsonl
    lines = [{"task_index": 0, "task": "pick the red cube"}, {"task_index": 1, "task": "place it in the bin"}]
    (copy / "meta" / "tasks.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    data = EpisodeDataset(copy)
    state = torch.stack([data[i]["observation.state"][0] for i in range(len(data))]).numpy()
    assert np.array_equal(state, _lerobot(expected, "shared", "observation.state"))
    assert [data[i]["task"] for i in range(len(data))] == expected["record"]["folders"]["shared"]["tasks"]
    verify_dataset(copy)


def _copy(folder: str, tmp_path: Path) -> Path:
    copy = tmp_path / folder
    shutil.copytree(FIXTURES / folder, copy)
    return copy


def _set_column(path: Path, column: str, change) -> None:
    """Rewrite one column of a Parquet file (same type), ``change`` editing its values as a list."""
    table = parquet.read_table(path)
    values = table.column(column).to_pylist()
    change(values)
    index = table.column_names.index(column)
    parquet.write_table(table.set_column(index, column, pa.array(values, table.schema.field(column).type)), path)


def _shift(row: int, seconds: float):
    def change(values: list) -> None:
        values[row] += seconds

    return change


def _expect_error(root: Path, index: int, message: str) -> None:
    """Item ``index`` and the verification (describe) both refuse the folder with ``message``."""
    with pytest.raises(DataError, match=message):
        EpisodeDataset(root)[index]
    with pytest.raises(DataError, match=message):
        describe(root)


def test_a_missing_video_file_names_the_file_and_feature(tmp_path: Path) -> None:
    copy = _copy("split", tmp_path)
    (copy / "videos/observation.images.top/chunk-000/file-001.mp4").unlink()
    EpisodeDataset(copy)[0]  # episode 0 has its own mp4
    _expect_error(
        copy, 3, r"videos/observation\.images\.top/chunk-000/file-001\.mp4 is missing .*'observation\.images\.top'"
    )


def test_an_undecodable_video_names_the_file_and_feature(tmp_path: Path) -> None:
    copy = _copy("shared", tmp_path)
    (copy / VIDEO).write_bytes(b"\x00\x00\x00\x18ftypisom" + b"garbage" * 20)
    _expect_error(copy, 0, r"file-000\.mp4: feature 'observation\.images\.top'.*cannot be decoded")


def test_a_timestamp_beyond_the_tolerance_names_the_file_and_feature(tmp_path: Path, expected: dict) -> None:
    copy = _copy("shared", tmp_path)
    _set_column(copy / DATA, "timestamp", _shift(7, 5e-5))  # within lerobot's 1e-4 s: the same frame
    assert np.array_equal(EpisodeDataset(copy)[7][TOP][0].numpy(), _lerobot(expected, "shared", TOP)[7])
    verify_dataset(copy)
    _set_column(copy / DATA, "timestamp", _shift(7, 1.5e-4))  # now 2e-4 s away from every frame
    # lerobot's timestamp sync check: each row one frame (0.1 s at 10 fps) after the one before, within 1e-4 s
    message = r"file-000\.parquet, row 7: episode 1's timestamp .* is 0\.10\d+ s after the frame before; at 10 fps"
    _expect_error(copy, 6, message)
    looser = EpisodeDataset(copy, tolerance_s=1e-3)[7][TOP][0]  # a wider tolerance takes the nearest frame
    assert np.array_equal(looser.numpy(), _lerobot(expected, "shared", TOP)[7])
    verify_dataset(copy, tolerance_s=1e-3)


def test_timestamps_that_do_not_follow_the_frame_rate_are_refused(tmp_path: Path) -> None:
    """Every timestamp 0 would show one video frame for the whole episode."""
    copy = _copy("shared", tmp_path)

    def zeros(values: list) -> None:
        values[:] = [0.0] * len(values)

    _set_column(copy / DATA, "timestamp", zeros)
    _expect_error(copy, 0, r"row 1: episode 0's timestamp 0\.0 is 0 s after the frame before; at 10 fps")


def test_a_video_span_that_does_not_fit_the_episode_is_refused(tmp_path: Path) -> None:
    """An edited from_timestamp would make an episode read another episode's frames."""
    copy = _copy("shared", tmp_path)

    def from_zero(values: list) -> None:
        values[1] = 0.0

    _set_column(copy / EPISODES, "videos/observation.images.top/from_timestamp", from_zero)
    _expect_error(copy, 0, r"feature 'observation\.images\.top': from_timestamp 0\.0 \.\. to_timestamp .* spans")


def test_an_episode_moved_in_its_video_is_refused(tmp_path: Path) -> None:
    copy = _copy("shared", tmp_path)
    _set_column(copy / EPISODES, f"videos/{TOP}/from_timestamp", _shift(1, 0.03))  # episode 1 between frames
    EpisodeDataset(copy)[0]
    _expect_error(copy, 5, r"file-000\.mp4: feature 'observation\.images\.top', episode 1 frame 0: no frame within")


@pytest.mark.parametrize(
    "content",
    [b"not a parquet file at all", b"PAR1" + b"\x00" * 40 + b"PAR1"],
)
def test_a_garbage_tasks_table_names_the_file(tmp_path: Path, content: bytes) -> None:
    copy = _copy("shared", tmp_path)
    (copy / "meta" / "tasks.parquet").write_bytes(content)
    message = r"meta/tasks\.parquet: not a readable Parquet file"
    with pytest.raises(DataError, match=message):
        EpisodeDataset(copy)
    with pytest.raises(DataError, match=message):
        describe(copy)


def test_a_tasks_table_out_of_order_or_too_short_is_refused(tmp_path: Path) -> None:
    copy = _copy("shared", tmp_path)
    tasks = copy / "meta" / "tasks.parquet"
    _set_column(tasks, "task_index", lambda values: values.reverse())
    with pytest.raises(DataError, match=r"tasks\.parquet, row 0: task_index is 1"):
        EpisodeDataset(copy)
    parquet.write_table(pa.table({"task_index": [0], "task": ["pick the red cube"]}), tasks)
    with pytest.raises(DataError, match=r"file-000\.parquet, row 5: task_index 1 is not in the task table"):
        EpisodeDataset(copy)[0]  # the whole data file is checked when it is read
    with pytest.raises(DataError, match=r"info\.json says total_tasks=2, the task table lists 1 tasks"):
        describe(copy)


def test_a_damaged_image_names_the_file_and_feature(tmp_path: Path) -> None:
    copy = _copy("shared", tmp_path)

    def damage(values: list) -> None:
        values[2] = {"bytes": values[2]["bytes"][:60], "path": None}

    _set_column(copy / DATA, WRIST, damage)
    EpisodeDataset(copy)[1]
    _expect_error(copy, 2, r"file-000\.parquet, .*(frame|row) 2: observation\.images\.wrist is not a readable image")


def test_a_16_bit_image_is_refused_not_clipped_and_every_frame_source_reads_grey_alike(tmp_path: Path) -> None:
    import io

    from PIL import Image

    from flowforge.data.episodes import decode_png

    def png(array: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        return buffer.getvalue()

    copy = _copy("shared", tmp_path)
    shape = EpisodeDataset(copy)[2][WRIST].shape[-2:]

    def deepen(values: list) -> None:
        values[2] = {"bytes": png(np.full(tuple(shape), 1000, np.uint16)), "path": None}

    _set_column(copy / DATA, WRIST, deepen)
    message = r"(frame|row) 2: observation\.images\.wrist has I;16 pixels \(uint16\), 8-bit images are read"
    _expect_error(copy, 2, message)
    with pytest.raises(DataError, match="has I;16 pixels"):
        decode_png(png(np.full((4, 4), 1000, np.uint16)))
    grey = np.arange(16, dtype=np.uint8).reshape(4, 4)
    assert decode_png(png(grey)).tolist() == [grey.tolist()]  # one channel, as the data set reads it


def test_features_that_cannot_be_read_are_refused_not_dropped(tmp_path: Path) -> None:
    copy = _copy("shared", tmp_path)
    info_path = copy / "meta" / "info.json"
    info = json.loads(info_path.read_text())
    info["features"]["observation.audio"] = {"dtype": "audio", "shape": [16000], "names": None}
    info_path.write_text(json.dumps(info))
    with pytest.raises(DataError, match=r"info\.json: features\['observation\.audio'\] has dtype 'audio'"):
        EpisodeDataset(copy)
    del info["features"]["observation.audio"]
    info["features"]["observation.velocity"] = {"dtype": "float32", "shape": [3], "names": None}  # no column
    info_path.write_text(json.dumps(info))
    _expect_error(copy, 0, r"data/chunk-000/file-000\.parquet: the column\(s\) 'observation\.velocity' are missing")
    del info["features"]["observation.velocity"]
    info["features"][TOP]["info"]["is_depth_map"] = True
    info_path.write_text(json.dumps(info))
    with pytest.raises(DataError, match=r"info\.json: features\['observation\.images\.top'\] is a depth-map video"):
        EpisodeDataset(copy)


def test_a_missing_episodes_file_is_found(tmp_path: Path) -> None:
    copy = _copy("split", tmp_path)
    (copy / "meta/episodes/chunk-000/file-001.parquet").unlink()
    with pytest.raises(DataError, match=r"lists 2 episodes, .*info\.json says total_episodes=3"):
        EpisodeDataset(copy)
    shutil.copy(
        FIXTURES / "split/meta/episodes/chunk-000/file-002.parquet", copy / "meta/episodes/chunk-000/file-001.parquet"
    )
    with pytest.raises(DataError, match=r"file-001\.parquet, row 0: 'meta/episodes/file_index' is 2"):
        EpisodeDataset(copy)


def test_every_feature_is_in_an_item(tmp_path: Path) -> None:
    """Features beyond state, action and cameras come along: observation windows, values, strings."""
    copy = _copy("shared", tmp_path)
    table = parquet.read_table(copy / DATA)
    n = table.num_rows
    velocity = pa.array([[float(i), 0.5, -1.0] for i in range(n)], pa.list_(pa.float32(), 3))
    table = table.append_column("observation.velocity", velocity)
    table = table.append_column("next.reward", pa.array([i / 10 for i in range(n)], pa.float32()))
    table = table.append_column("next.done", pa.array([i in (4, 8) for i in range(n)]))
    table = table.append_column("note", pa.array([f"row {i}" for i in range(n)]))
    parquet.write_table(table, copy / DATA)
    info = json.loads((copy / "meta" / "info.json").read_text())
    info["features"]["observation.velocity"] = {"dtype": "float32", "shape": [3], "names": None}
    info["features"]["next.reward"] = {"dtype": "float32", "shape": [1], "names": None}
    info["features"]["next.done"] = {"dtype": "bool", "shape": [1], "names": None}
    info["features"]["note"] = {"dtype": "string", "shape": [1], "names": None}
    (copy / "meta" / "info.json").write_text(json.dumps(info))
    data = EpisodeDataset(copy, obs_horizon=2)
    item = data[6]  # episode 1, frame 1
    assert set(info["features"]) <= set(item)
    assert (
        item["observation.velocity"][:, 0].tolist() == [5.0, 6.0]
        and item["observation.velocity"].dtype == torch.float32
    )
    assert item["next.reward"].shape == () and item["next.reward"].item() == pytest.approx(0.6)
    assert item["next.done"].dtype == torch.bool and not item["next.done"] and data[8]["next.done"]
    assert item["note"] == "row 6" and item["index"] == 6 and item["timestamp"] == pytest.approx(0.1)
    verify_dataset(copy)
    _set_column(copy / DATA, "next.reward", lambda values: values.__setitem__(3, float("nan")))
    _expect_error(copy, 0, r"file-000\.parquet, row 3 \(frame_index 3\): next\.reward is nan")


def test_statistics_of_other_data_and_an_emptied_task_table_are_refused(tmp_path: Path) -> None:
    """Policies normalise with meta/stats.json: statistics that disagree with the data files (edited,
    or copied from another set) are refused by the verification, naming the feature, statistic and dim."""
    copy = _copy("shared", tmp_path)
    stats_path = copy / "meta" / "stats.json"
    stats = json.loads(stats_path.read_text())
    stats["action"]["std"] = [0.0 for _ in stats["action"]["std"]]
    stats_path.write_text(json.dumps(stats))
    with pytest.raises(DataError, match=r"stats\.json: 'action'\['std'\]\[0\] is 0, the data files give"):
        verify_dataset(copy)
    copy = _copy("split", tmp_path)
    table = parquet.read_table(copy / "meta" / "tasks.parquet")
    parquet.write_table(table.slice(0, 0), copy / "meta" / "tasks.parquet")
    with pytest.raises(DataError, match=r"info\.json says total_tasks=\d+, the task table lists 0 tasks"):
        verify_dataset(copy)


def test_values_the_declared_dtype_cannot_hold_are_refused(tmp_path: Path) -> None:
    copy = _copy("shared", tmp_path)
    info_path = copy / "meta" / "info.json"
    info = json.loads(info_path.read_text())
    info["features"]["observation.state"]["dtype"] = "int64"
    info_path.write_text(json.dumps(info))
    message = r"row 0 \(frame_index 0\): observation\.state\[0\] is 0\.18\d*, which info\.json's dtype int64"
    _expect_error(copy, 0, message)


def test_a_data_set_without_task_index_reads_every_frame(tmp_path: Path) -> None:
    """The column is optional: each frame falls back to its episode's task (it used to end iteration at frame 1)."""
    copy = _copy("shared", tmp_path)
    info_path = copy / "meta" / "info.json"
    info = json.loads(info_path.read_text())
    del info["features"]["task_index"]
    info_path.write_text(json.dumps(info))
    table = parquet.read_table(copy / DATA)
    parquet.write_table(table.drop(["task_index"]), copy / DATA)
    dataset = EpisodeDataset(copy)
    items = list(dataset)
    assert len(items) == len(dataset) and all(isinstance(item["task"], str) and item["task"] for item in items)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"obs_horizon": 2.5}, "obs_horizon must be"),
        ({"action_horizon": 10**9}, "action_horizon must be an int in 1..1000"),
        ({"cache_files": 0}, "cache_files must be a positive int"),
        ({"tolerance_s": math.inf}, "tolerance_s must be a finite number > 0"),
    ],
)
def test_bad_dataset_settings_are_refused_naming_them(setting: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EpisodeDataset(FIXTURES / "shared", **setting)


def test_training_refuses_statistics_of_other_data(tmp_path: Path) -> None:
    """A policy normalises with stats.json: edited entries for its state or action are refused when
    its training windows are read, naming the entry (they used to set the scale silently)."""
    from flowforge.policy import PolicyConfig
    from flowforge.policy.data import policy_tensors

    config = PolicyConfig(horizon=4, n_action_steps=2, language=False, state_key="observation.state")
    for key in ("observation.state", "action"):
        copy = _copy("shared", tmp_path / key)
        stats_path = copy / "meta" / "stats.json"
        stats = json.loads(stats_path.read_text())
        stats[key]["std"] = [100 * value for value in stats[key]["std"]]
        stats_path.write_text(json.dumps(stats))
        message = rf"stats\.json: '{key}'\['std'\]\[0\] is .*; the statistics belong to other data"
        with pytest.raises(DataError, match=message):
            policy_tensors(EpisodeDataset(copy, 1, 4), progress=False, config=config)
    tensors, _ = policy_tensors(EpisodeDataset(FIXTURES / "shared", 1, 4), progress=False, config=config)
    assert tensors["action"].shape[1:] == (4, 2)


def test_a_long_episode_of_float32_timestamps_passes_the_sync_check() -> None:
    """Near 1,000 s a float32 timestamp rounds by about 1e-4 s: regular frames must still pass."""
    from flowforge.data.episodes import check_data_file

    fps, frames = 30, 60_000
    columns = {
        "timestamp": (np.arange(frames, dtype=np.float32) / np.float32(fps)).tolist(),
        "frame_index": list(range(frames)),
        "episode_index": [0] * frames,
        "index": list(range(frames)),
        "task_index": [0] * frames,
        "observation.state": [[0.0]] * frames,
        "action": [[0.0]] * frames,
    }
    features = {
        "observation.state": {"dtype": "float32", "shape": [1]},
        "action": {"dtype": "float32", "shape": [1]},
        "timestamp": {"dtype": "float32", "shape": [1]},
    }
    entries = [{"episode_index": 0, "length": frames, "tasks": ["t"]}]
    check_data_file(Path("long.parquet"), columns, entries, features, {0: "t"}, fps)
    columns["timestamp"][30_000] += 0.01
    with pytest.raises(DataError, match=r"row 30000: episode 0's timestamp"):
        check_data_file(Path("long.parquet"), columns, entries, features, {0: "t"}, fps)
