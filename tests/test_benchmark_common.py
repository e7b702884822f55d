"""The robot benchmarks' stored evaluations: reused only for the same weights, tasks and settings."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _common():
    """``benchmarks/common.py``, which the benchmark scripts import as ``common``."""
    spec = importlib.util.spec_from_file_location("benchmark_common", ROOT / "benchmarks" / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(tmp_path: Path, digest: str) -> Path:
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    (run / "checkpoint.json").write_text(json.dumps({"files": {"model": {"sha256": digest}}}))
    return run


SETTINGS = {"episodes": 50, "seed_base": 900_000_000, "max_steps": 500, "sampling": {"noise_scale": 0.5}}


@pytest.fixture
def stored(tmp_path: Path) -> tuple[Path, Path]:
    run = _run(tmp_path, "a" * 64)
    path = tmp_path / "eval-flow.json"
    report = {"tasks": {"reach-v3": {}, "push-v3": {}}, "settings": SETTINGS | {"execution": "sync"}}
    path.write_text(json.dumps(report | {"weights": "a" * 64}))
    return path, run


def test_a_stored_evaluation_of_the_same_weights_and_settings_is_reused(stored) -> None:
    path, run = stored
    result = _common().stored_evaluation(path, run, ["push-v3", "reach-v3"], **SETTINGS)
    assert result is not None and result["weights"] == "a" * 64


@pytest.mark.parametrize(
    "change",
    [
        {"episodes": 20},
        {"seed_base": 800_000_000},
        {"max_steps": 100},
        {"sampling": {"noise_scale": 1.0}},
        {"sampling": {}},
    ],
)
def test_a_stored_evaluation_made_with_other_settings_is_made_again(stored, change: dict, capsys) -> None:
    path, run = stored
    assert _common().stored_evaluation(path, run, ["reach-v3", "push-v3"], **(SETTINGS | change)) is None
    assert "evaluating again" in capsys.readouterr().out


def test_a_stored_evaluation_of_other_tasks_or_a_retrained_model_is_made_again(stored, tmp_path: Path) -> None:
    path, run = stored
    common = _common()
    assert common.stored_evaluation(path, run, ["reach-v3"], **SETTINGS) is None
    retrained = _run(tmp_path, "b" * 64)
    assert common.stored_evaluation(path, retrained, ["reach-v3", "push-v3"], **SETTINGS) is None
    assert common.stored_evaluation(tmp_path / "missing.json", run, ["reach-v3"], **SETTINGS) is None


def test_a_stored_evaluation_cut_short_is_made_again(stored, capsys) -> None:
    path, run = stored
    path.write_text(path.read_text()[:20])
    assert _common().stored_evaluation(path, run, ["reach-v3", "push-v3"], **SETTINGS) is None
    assert "not readable JSON" in capsys.readouterr().out


def test_results_are_written_whole_and_a_file_cut_short_reads_as_missing(tmp_path: Path) -> None:
    common = _common()
    path = tmp_path / "results" / "table.json"
    common.write_json(path, {"a": 1})
    assert common.read_json(path) == {"a": 1} and [p.name for p in path.parent.iterdir()] == ["table.json"]
    path.write_text('{"a": ')  # what a process killed while writing in place used to leave
    assert common.read_json(path) is None and common.read_json(tmp_path / "missing.json") is None


@pytest.mark.parametrize(
    ("kind", "text", "message"),
    [
        ("positive_int", "0", "expected an int >= 1, got '0'"),
        ("positive_int", "2.5", "expected an int >= 1, got '2.5'"),
        ("nonnegative_int", "-1", "expected an int >= 0, got '-1'"),
        ("seed_int", str(2**32), "expected an int in 0..4294967295"),
        ("positive_float", "nan", "expected a finite number > 0, got 'nan'"),
        ("positive_float", "0", "expected a finite number > 0, got '0'"),
        ("nonnegative_float", "-1", "expected a finite number >= 0, got '-1'"),
        ("nonnegative_float", "abc", "expected a finite number >= 0, got 'abc'"),
    ],
)
def test_option_types_refuse_values_before_any_work(kind: str, text: str, message: str, capsys) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--value", type=getattr(_common(), kind))
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(["--value", text])
    assert stop.value.code == 2 and f"argument --value: {message}" in capsys.readouterr().err


def test_a_finished_policy_run_names_the_settings_it_was_trained_with(tmp_path: Path) -> None:
    from types import SimpleNamespace

    common = _common()
    run = tmp_path / "run"
    run.mkdir()
    root = str(tmp_path / "mt10")
    trained = {"data": {"root": root}, "train": {"steps": 30, "progress": True}}
    (run / "checkpoint.json").write_text(json.dumps({"metadata": {"policy_run": trained}}))

    def asked(steps: int) -> SimpleNamespace:  # a PolicyRunConfig's two sections
        from dataclasses import make_dataclass

        data = make_dataclass("Data", [("root", str)])(root)
        train = make_dataclass("Train", [("steps", int), ("progress", bool)])(steps, False)
        return SimpleNamespace(data=data, train=train)

    assert common.policy_settings_changed(run, asked(30)) == []  # how it reported progress aside
    changed = common.policy_settings_changed(run, asked(60))
    assert changed == ["train.steps: 30 -> 60"]
    common.refuse_other_settings(run, [])  # nothing changed: the run is reused
    with pytest.raises(SystemExit, match=r"trained with other settings \(train\.steps: 30 -> 60\): move it away"):
        common.refuse_other_settings(run, changed)


def test_ctrl_c_in_a_resumable_script_is_one_line_and_exit_130(capsys) -> None:
    from flowforge.train import TrainingInterrupted

    def training():
        raise TrainingInterrupted(134, Path("runs/flow"))

    with pytest.raises(SystemExit) as stop:
        _common().run_resumable(training)
    assert stop.value.code == 130
    assert (
        capsys.readouterr().out == "interrupted: training stopped at step 134; run the same command again to resume\n"
    )
