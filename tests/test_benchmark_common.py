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
