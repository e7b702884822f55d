"""Crash safety of demonstration collection: a kill after any write step leaves a valid data set of the
committed episodes, and the same call resumes it to the same data as an uninterrupted run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from flowforge.data.tabular import DataError
from flowforge.errors import ConfigError

pytest.importorskip("metaworld", reason="MetaWorld is the robot extra: pip install 'flowforge[robot]'")

from flowforge.data.episodes import EpisodeDataset, describe
from flowforge.envs import collect as collect_module
from flowforge.envs.collect import collect

TASKS, EPISODES = ["reach-v3"], 2


class Killed(Exception):
    """Stands for a SIGKILL after a write step (nothing of the collector runs after it)."""


def _total_episodes(root: Path) -> int | None:
    path = root / "meta" / "info.json"
    return json.loads(path.read_text())["total_episodes"] if path.is_file() else None


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _actions(root: Path) -> list[list]:
    data = EpisodeDataset(root)
    return [data.episode_columns(i)["action"] for i in range(len(data.episodes))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An uninterrupted collection, with every write step it took and the episodes committed after each."""
    root = tmp_path_factory.mktemp("reference")
    steps: list[tuple[str, int | None]] = []
    patch = pytest.MonkeyPatch()
    patch.setattr(collect_module, "_after_write", lambda step: steps.append((step, _total_episodes(root))))
    try:
        counts = collect(TASKS, EPISODES, root, progress=False)
    finally:
        patch.undo()
    assert counts == {"reach-v3": {"attempted": 2, "succeeded": 2}}
    return {"root": root, "steps": steps, "counts": counts, "actions": _actions(root), "files": _files(root)}


def _check_committed(root: Path, expected: int | None, reference: dict) -> None:
    """The folder is a valid data set of ``expected`` episodes (None: not a data set yet) on which
    EpisodeDataset and describe agree, holding the reference's first episodes."""
    if expected is None:
        for read in (EpisodeDataset, describe):
            with pytest.raises(DataError, match=r"meta/info\.json is missing"):
                read(root)
        return
    assert f": {expected} episodes" in describe(root)  # describe verifies every file first
    if expected == 0:
        with pytest.raises(DataError, match="no episodes"):
            EpisodeDataset(root)
        return
    data = EpisodeDataset(root)
    assert len(data.episodes) == expected and len(data) == data.info["total_frames"]
    data[len(data) - 1]
    assert _actions(root) == reference["actions"][:expected]


def test_the_writer_has_the_expected_write_steps(reference: dict) -> None:
    names = [step for step, _ in reference["steps"]]
    assert names[0] == "marker" and names.count("commit") == EPISODES
    assert names.count("data file (temporary)") == EPISODES and "meta/info.json" in names
    committed = [n for step, n in reference["steps"] if step == "commit"]
    assert committed == [1, 2]


def test_a_kill_after_any_write_step_leaves_a_valid_set_that_resumes(reference: dict, tmp_path: Path) -> None:
    steps = reference["steps"]
    for k, (step, expected) in enumerate(steps):
        root = tmp_path / f"kill-{k}"
        calls = []

        def hook(name: str, k: int = k, calls: list = calls) -> None:
            calls.append(name)
            if len(calls) == k + 1:
                raise Killed(name)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(collect_module, "_after_write", hook)
            with pytest.raises(Killed):
                collect(TASKS, EPISODES, root, progress=False)
        assert calls[-1] == step, f"step {k}: the writer took other steps than the reference run"
        _check_committed(root, expected, reference)

        counts = collect(TASKS, EPISODES, root, progress=False)  # the same call resumes
        assert counts == reference["counts"], f"killed after step {k} ({step})"
        _check_committed(root, EPISODES, reference)
        assert _files(root) == reference["files"], f"killed after step {k} ({step}): leftovers"


def test_a_folder_with_only_temporary_files_is_restarted(reference: dict, tmp_path: Path) -> None:
    chunk = tmp_path / "data" / "chunk-000"
    chunk.mkdir(parents=True)
    (chunk / ".file-000.parquet.x1y2.tmp").write_bytes(b"PAR1 half")  # an earlier version's temporary name
    collect(TASKS, EPISODES, tmp_path, progress=False)
    _check_committed(tmp_path, EPISODES, reference)
    assert _files(tmp_path) == reference["files"]


def test_someone_elses_folder_is_refused_and_left_alone(tmp_path: Path) -> None:
    (tmp_path / "data" / "chunk-000").mkdir(parents=True)
    (tmp_path / "data" / "chunk-000" / "file-000.parquet").write_bytes(b"theirs")
    (tmp_path / "notes.txt").write_text("mine")
    before = _files(tmp_path)
    with pytest.raises(DataError, match="is not a collection to resume"):
        collect(TASKS, 1, tmp_path, progress=False)
    assert _files(tmp_path) == before and (tmp_path / "notes.txt").read_text() == "mine"


def test_a_folder_of_the_earlier_layout_killed_mid_metadata_is_repaired(reference: dict, tmp_path: Path) -> None:
    """meta as a plain folder whose episodes table already lists episode 1 while info.json and
    collection.json still say 1 episode (what a kill inside the earlier writer's metadata left)."""
    one = tmp_path / "one"
    collect(TASKS, 1, one, progress=False)
    old = tmp_path / "old"
    (old / "data").mkdir(parents=True)
    shutil.copytree(one / "meta", old / "meta")  # follows the link: a plain folder, as before
    shutil.copytree(one / "data", old / "data", dirs_exist_ok=True)
    source = reference["root"]
    for name in ("data/chunk-000/file-001.parquet", "meta/episodes/chunk-000/file-000.parquet"):
        shutil.copyfile(source / name, old / name)
    with pytest.raises(DataError, match="lists 2 episodes"):
        EpisodeDataset(old)
    assert collect(TASKS, EPISODES, old, progress=False) == reference["counts"]
    _check_committed(old, EPISODES, reference)
    assert (old / "meta").is_symlink() and not (old / ".meta-previous").exists()


def test_bad_task_lists_are_value_errors_naming_tasks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tasks is empty"):
        collect([], 1, tmp_path / "empty", progress=False)
    with pytest.raises(ValueError, match=r"tasks: unknown MetaWorld task 'fly-v3'"):
        collect(["fly-v3"], 1, tmp_path / "fly", progress=False)
    with pytest.raises(TypeError, match="tasks must be a list"):
        collect("reach-v3", 1, tmp_path / "string", progress=False)
    assert not any(tmp_path.iterdir())  # nothing is written before the inputs are valid


@pytest.mark.parametrize("seed", [-1, 2**32, True])
def test_a_seed_out_of_range_is_refused_before_the_folder_is_made(tmp_path: Path, seed) -> None:
    with pytest.raises(ConfigError, match=r"seed = .*expected an integer in \[0, 4294967295\]"):
        collect(["reach-v3"], 1, tmp_path / "demos", seed=seed)
    assert not (tmp_path / "demos").exists()


def test_a_seed_whose_episode_seeds_would_pass_the_limit_is_refused_before_the_folder_is_made(tmp_path: Path) -> None:
    """Each collection seed spans 1,000,003 episode seeds: 799 is the last whose stay below the
    validation and evaluation seeds (from 800,000,000); a task's attempts stay within its stride."""
    from typer.testing import CliRunner

    from flowforge.cli import app

    with pytest.raises(ValueError, match=r"seed must be an int in 0\.\.799 for this collection .* got 900"):
        collect(["reach-v3"], 1, tmp_path / "demos", seed=900)
    with pytest.raises(ValueError, match=r"episodes must be at most 3335 with max_attempts_factor 3 .* got 5000"):
        collect(["reach-v3"], 5000, tmp_path / "demos")
    result = CliRunner().invoke(
        app,
        [
            "data",
            "collect",
            "--tasks",
            "reach-v3",
            "--episodes",
            "1",
            "--out",
            str(tmp_path / "demos"),
            "--seed",
            "800",
        ],
    )
    assert result.exit_code == 2 and "--seed must be an int in 0..799 for this collection" in result.stderr
    assert not (tmp_path / "demos").exists()


def test_a_collection_inside_a_data_set_or_a_run_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from flowforge.cli import app

    data_set, run = tmp_path / "set", tmp_path / "run"
    (data_set / "meta").mkdir(parents=True)
    (data_set / "meta" / "info.json").write_text("{}")
    run.mkdir()
    (run / "checkpoint.json").write_text("{}")
    for out, holder in ((data_set / "sub", "episode data set"), (run / "sub", "run")):
        arguments = ["data", "collect", "--tasks", "reach-v3", "--episodes", "1", "--out", str(out)]
        result = CliRunner().invoke(app, arguments)
        assert result.exit_code == 2 and f"lies inside the {holder} " in result.stderr, result.output
        assert not out.exists()


def _copy_of(reference: dict, tmp_path: Path) -> Path:
    root = tmp_path / "copy"
    shutil.copytree(reference["root"], root, symlinks=True)
    return root


def test_committed_episodes_without_their_record_are_refused_and_kept(reference: dict, tmp_path: Path) -> None:
    """A folder whose info.json lists episodes its collection record does not (record lost, or
    episodes added by another program) is refused: restarting or resuming it would delete data."""
    root = _copy_of(reference, tmp_path)
    record_path = root / "meta" / "collection.json"
    record = json.loads(record_path.read_text())
    record_path.unlink()
    before = _files(root)
    with pytest.raises(DataError, match=r"lists committed episodes, but .* is missing"):
        collect(["push-v3"], 1, root, progress=False)
    assert _files(root) == before
    record_path.write_text(json.dumps({**record, "episodes": record["episodes"][:1]}))
    with pytest.raises(DataError, match=r"records 1 episodes, but .*info\.json lists 2"):
        collect(TASKS, EPISODES, root, progress=False)
    record_path.write_text(json.dumps({**record, "settings": None}))
    with pytest.raises(DataError, match="not a collection record"):
        collect(TASKS, EPISODES, root, progress=False)
    _check_committed(root, EPISODES, reference)


def test_a_second_collection_into_a_busy_folder_is_refused_unless_complete(reference: dict, tmp_path: Path) -> None:
    from flowforge.utils.locks import exclusive_lock

    root = _copy_of(reference, tmp_path)
    with exclusive_lock(root / collect_module.LOCK), pytest.raises(DataError, match="another collection is writing"):
        collect(TASKS, EPISODES + 1, root, progress=False)
    _check_committed(root, EPISODES, reference)
    before = _files(root)
    with exclusive_lock(root / collect_module.LOCK):  # what is asked for is committed already: no lock needed
        assert collect(TASKS, EPISODES, root, progress=False) == reference["counts"]
    assert _files(root) == before


def test_a_complete_folder_is_answered_without_reading_its_episodes(
    reference: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Asking again for what is committed returns the record's counts at once: no episode is read
    back (with images that decodes every frame) and nothing is written. Asking for more still
    reads them, to resume."""
    root = _copy_of(reference, tmp_path)
    before = _files(root)

    def no_reading(*args, **kwargs):
        raise AssertionError("a committed episode was read back")

    monkeypatch.setattr(collect_module, "_episode_columns", no_reading)
    assert collect(TASKS, EPISODES, root, progress=False) == reference["counts"]
    assert collect(TASKS, EPISODES - 1, root, progress=False) == reference["counts"]
    assert _files(root) == before
    with pytest.raises(AssertionError, match="read back"):
        collect(TASKS, EPISODES + 1, root, progress=False)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"episodes": 1.5}, "episodes must be a positive int, got 1.5"),
        ({"max_attempts_factor": 0}, "max_attempts_factor must be a positive int, got 0"),
        ({"max_steps": 0}, r"max_steps must be an int in 1\.\.500, got 0"),
        ({"size": 33.5, "images": True}, "size must be an int >= 8, got 33.5"),
        ({"images": "yes"}, "images"),
        ({"action_noise": -0.1}, r"action_noise must be a finite number >= 0, got -0\.1"),
        ({"action_noise": 1.5}, r"action_noise must be at most 1 \(actions span \[-1, 1\]\), got 1\.5"),
        ({"action_noise": float("nan")}, "action_noise must be a finite number >= 0, got nan"),
        ({"action_noise": 0.1, "noisy_tasks": "reach-v3"}, "noisy_tasks must be a list of task names, got the string"),
        ({"action_noise": 0.1, "noisy_tasks": []}, "noisy_tasks is empty"),
        ({"action_noise": 0.1, "noisy_tasks": ["reach-v3"] * 2}, "noisy_tasks: reach-v3 named more than once"),
        ({"noisy_tasks": ["reach-v3"]}, r"need action_noise > 0"),
        ({"action_noise": 0.1, "noisy_tasks": ["push-v3"]}, r"noisy_tasks: 'push-v3' not among the tasks collected"),
    ],
)
def test_bad_collection_settings_are_refused_before_the_folder_is_made(tmp_path: Path, setting, message) -> None:
    settings = {"episodes": 1, **setting}
    with pytest.raises((TypeError, ValueError), match=message):
        collect(TASKS, root=tmp_path / "new", progress=False, **settings)
    assert not (tmp_path / "new").exists()


def test_action_noise_stores_the_experts_labels_and_what_the_robot_received(reference: dict, tmp_path: Path) -> None:
    """With action noise the robot receives the expert's action plus a correlated perturbation:
    ``action`` holds the expert's action at every state visited (the same rule as the clean
    collection's, so its first label matches it), ``action.executed`` what was sent, inside [-1, 1],
    off the labels by about the noise's spread and correlated from step to step. A folder is
    resumed only with its own noise."""
    import numpy as np

    from flowforge.envs.metaworld import MetaWorldEnv

    root = tmp_path / "noisy"
    assert collect(TASKS, 1, root, progress=False, action_noise=0.2)["reach-v3"]["succeeded"] == 1
    data = EpisodeDataset(root)
    assert data.features["action.executed"] == data.features["action"]
    columns = data.episode_columns(0)
    labels = np.asarray(columns["action"], dtype=np.float64)
    executed = np.asarray(columns["action.executed"], dtype=np.float64)
    assert np.abs(executed).max() <= 1.0
    noise = executed - labels
    inside = (np.abs(executed) < 1).all(1)  # where clipping did not cut the perturbation
    assert 0.08 < noise[inside].std() < 0.35
    assert np.corrcoef(noise[inside][:-1, 0], noise[inside][1:, 0])[0, 1] > 0.5  # rho = exp(-1/8) = 0.88
    # the labels are the expert's answers to the states actually visited
    env = MetaWorldEnv("reach-v3", seed=0)
    expert = env.expert()
    states = np.asarray(columns["observation.environment_state"])
    for frame in (0, len(states) // 2, len(states) - 1):
        np.testing.assert_allclose(labels[frame], np.clip(expert.get_action(states[frame]), -1, 1), atol=1e-6)
    env.close()
    np.testing.assert_allclose(labels[0], np.asarray(reference["actions"][0][0]), atol=1e-6)  # same first state
    assert "action.executed" not in EpisodeDataset(reference["root"]).features  # clean folders are unchanged
    assert "action noise (DART): 0.2 on every task;" in describe(root)
    assert "action noise" not in describe(reference["root"])
    with pytest.raises(DataError, match=r"action_noise 0\.2 \(now not set\)"):
        collect(TASKS, 1, root, progress=False)


def test_noisy_tasks_perturb_only_the_tasks_named(reference: dict, tmp_path: Path) -> None:
    """With ``noisy_tasks`` the other tasks are collected as the expert acts: their episodes equal a
    clean collection's, and what the robot received equals the labels; the tasks named get the
    noise. The folder resumes only with the same tasks named."""
    import numpy as np

    root = tmp_path / "targeted"
    counts = collect(["reach-v3", "push-v3"], 1, root, progress=False, action_noise=0.2, noisy_tasks=["push-v3"])
    assert counts["reach-v3"]["succeeded"] == counts["push-v3"]["succeeded"] == 1
    data = EpisodeDataset(root)
    reach, push = data.episode_columns(0), data.episode_columns(1)
    np.testing.assert_array_equal(np.asarray(reach["action"]), np.asarray(reference["actions"][0]))
    np.testing.assert_array_equal(np.asarray(reach["action.executed"]), np.asarray(reach["action"]))
    noise = np.asarray(push["action.executed"]) - np.asarray(push["action"])
    assert np.abs(noise).max() > 0.05
    assert "action noise (DART): 0.2 on push-v3;" in describe(root)
    with pytest.raises(DataError, match="noisy_tasks"):
        collect(["reach-v3", "push-v3"], 1, root, progress=False, action_noise=0.2)


def test_a_collection_with_images_resumed_between_episodes_is_byte_identical(tmp_path: Path) -> None:
    """Each episode's frames, its first included, are a function of its seed alone: a collection
    stopped after one episode and resumed writes the files an uninterrupted one writes."""
    settings = {"images": True, "size": 32, "progress": False}
    collect(["push-v3"], 1, tmp_path / "resumed", **settings)
    collect(["push-v3"], 2, tmp_path / "resumed", **settings)
    collect(["push-v3"], 2, tmp_path / "straight", **settings)
    data = sorted(p.relative_to(tmp_path / "straight") for p in (tmp_path / "straight" / "data").rglob("*.parquet"))
    assert len(data) == 2
    for name in data:
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name
