"""The command line: the demo trains, reports a test NLL and writes its plot."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from flowforge import __version__
from flowforge.cli import app

runner = CliRunner()


def test_demo_trains_reports_and_plots(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["demo", "--steps", "150", "--transforms", "2", "--out", str(tmp_path), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    nll = float(re.search(r"test NLL = (-?[\d.]+) nats", result.output).group(1))
    assert nll < 2.5  # a fresh N(0, I) flow scores about 2.9 nats on these moons
    png = tmp_path / "realnvp_moons.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp.png"))


def test_demo_refuses_unknown_names(tmp_path: Path) -> None:
    result = runner.invoke(app, ["demo", "--dataset", "nope", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "unknown data set 'nope'" in result.output
    result = runner.invoke(app, ["demo", "--model", "glow9", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "unknown model" in result.output


def test_module_entry_point_and_version() -> None:
    out = subprocess.run([sys.executable, "-m", "flowforge", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"flowforge {__version__}"


# ---------------------------------------------------------------- config-driven runs
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = [
    "--set",
    "train.steps=3",
    "--set",
    "train.warmup_steps=0",
    "--set",
    "train.log_every=1",
    "--no-progress",
]


def _train(config: Path, out: Path, *extra: str):
    return runner.invoke(app, ["train", str(config), "--out", str(out), *TINY, *extra])


def test_every_shipped_config_parses_and_builds() -> None:
    from flowforge import runs

    names = sorted(p.name for p in CONFIGS.glob("*.toml"))
    assert len(names) >= 9
    for path in CONFIGS.glob("*.toml"):
        config = runs.load_config(path)
        data = runs.load_data(config)
        model = runs.build_model(config, runs.model_features(config, data))
        assert sum(p.numel() for p in model.parameters()) > 0, path.name


def test_train_sample_eval_plot_on_a_tiny_config(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = _train(CONFIGS / "realnvp_moons.toml", run)
    assert result.exit_code == 0, result.output
    assert "nll" in result.output and (run / "checkpoint.json").is_file() and (run / "metrics.csv").is_file()
    assert (run / "plot.png").read_bytes()[:4] == b"\x89PNG"

    result = runner.invoke(app, ["sample", str(run), "-n", "7", "-o", str(tmp_path / "x.csv")])
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "x.csv").read_text().splitlines()) == 7
    result = runner.invoke(app, ["sample", str(run), "-n", "5", "-o", str(tmp_path / "x.npy")])
    assert result.exit_code == 0 and np.load(tmp_path / "x.npy").shape == (5, 2)

    result = runner.invoke(app, ["eval", str(run), "--samples", "200"])
    assert result.exit_code == 0, result.output
    for metric in ("nll", "bits_per_dim", "mmd", "energy_distance", "sliced_w2"):
        assert metric in result.output
    result = runner.invoke(app, ["plot", str(run), "-o", str(tmp_path / "again.png")])
    assert result.exit_code == 0 and (tmp_path / "again.png").is_file()


def test_tabular_run_keeps_its_standardisation(tmp_path: Path) -> None:
    from flowforge import runs

    table = np.random.default_rng(0).normal(size=(300, 3)) * [1.0, 10.0, 0.1] + [0.0, 50.0, -3.0]
    np.save(tmp_path / "points.npy", table)
    config = tmp_path / "file.toml"
    model = '[model]\nkind = "maf"\noptions = { transforms = 2, hidden = [16] }\n'
    config.write_text(model + f'[data]\npath = "{tmp_path / "points.npy"}"\nname = "moons"\n')
    result = runner.invoke(app, ["train", str(config), "--out", str(tmp_path / "run"), *TINY])
    assert result.exit_code != 0 and "exactly one of name" in result.output
    config.write_text(model + f'[data]\npath = "{tmp_path / "points.npy"}"\n')
    result = runner.invoke(app, ["train", str(config), "--out", str(tmp_path / "run"), *TINY])
    assert result.exit_code == 0, result.output
    run = runs.load_run(tmp_path / "run")
    assert run.standardizer is not None
    assert abs(float(run.standardizer.mean[1]) - 50.0) < 3 and abs(float(run.standardizer.std[1]) - 10.0) < 2
    samples = runs.draw_samples(run, 2000)
    assert abs(float(samples[:, 1].mean()) - 50.0) < 15  # back in the data's own units


def test_reverse_kl_config_reports_a_kl(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["train", str(CONFIGS / "reverse_kl_banana.toml"), "--out", str(tmp_path / "kl"), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    kl = float(re.search(r"kl (-?[\d.]+)", result.output).group(1))
    assert kl < 0.05  # see test_trainer.test_reverse_kl_learns_the_banana for the threshold
    assert (tmp_path / "kl" / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_flow_matching_and_shortcut_configs_train_and_sample(tmp_path: Path) -> None:
    for name in ("flow_matching_checkerboard.toml", "shortcut_8gaussians.toml"):
        result = _train(CONFIGS / name, tmp_path / name, "--set", "model.options.hidden=[16]")
        assert result.exit_code == 0, result.output
        result = runner.invoke(app, ["sample", str(tmp_path / name), "-n", "4", "-o", str(tmp_path / f"{name}.npy")])
        assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[train]\nstepz = 3\n", "has no setting 'stepz' (did you mean 'steps'?)"),
        ('[train]\nsteps = "many"\n', "[train] steps must be int"),
        ('[model]\nkind = "glow9"\n', "kind 'glow9' is not one of"),
        ('[data]\nname = "mnist"\n', "is not a built-in set"),
        ("[extra]\nx = 1\n", "unknown table(s) extra"),
        ("[train\n", "not valid TOML"),
        (
            '[model]\nkind = "flow-matching"\n[objective]\nkind = "maximum-likelihood"\n',
            "trains with the flow-matching",
        ),
        ('[train]\nschedule = "linear"\n', "schedule must be"),
    ],
)
def test_bad_configs_fail_with_their_message_and_write_nothing(tmp_path: Path, content: str, message: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(content)
    result = runner.invoke(app, ["train", str(config), "--out", str(tmp_path / "run"), "--no-progress"])
    assert result.exit_code != 0
    assert message in result.output
    assert not (tmp_path / "run").exists()


def test_bad_checkpoints_and_outputs_fail_cleanly(tmp_path: Path) -> None:
    result = runner.invoke(app, ["sample", str(tmp_path / "missing"), "-o", str(tmp_path / "x.npy")])
    assert result.exit_code != 0 and "not a flowforge checkpoint" in result.output
    run = tmp_path / "run"
    assert _train(CONFIGS / "nice_moons.toml", run).exit_code == 0
    result = runner.invoke(app, ["sample", str(run), "-o", str(tmp_path / "x.txt")])
    assert result.exit_code != 0 and "write samples to a .npy or .csv file" in result.output
    assert not (tmp_path / "x.txt").exists()
    weights = next(run.glob("model-*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    result = runner.invoke(app, ["eval", str(run)])
    assert result.exit_code != 0 and "truncated or was modified" in result.output
    result = runner.invoke(app, ["train", str(tmp_path / "nope.toml")])
    assert result.exit_code != 0 and "no such config file" in result.output


def test_digits_run_reports_bits_per_dim_and_plots_image_grids(tmp_path: Path) -> None:
    result = _train(CONFIGS / "nsf_digits.toml", tmp_path / "digits", "--set", "model.options.hidden=[16]")
    assert result.exit_code == 0, result.output
    bits = float(re.search(r"bits_per_dim (-?[\d.]+)", result.output).group(1))
    assert 0 < bits < 10  # log2(17) = 4.09 bits for a uniform model; a 3-step model is near it
    result = runner.invoke(app, ["plot", str(tmp_path / "digits"), "-o", str(tmp_path / "digits.png")])
    assert result.exit_code == 0 and (tmp_path / "digits.png").read_bytes()[:4] == b"\x89PNG"


def test_list_names_everything() -> None:
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0
    for word in ("realnvp", "flow-matching", "reverse-kl", "checkerboard", "digits", "banana"):
        assert word in result.output


def test_a_malformed_data_file_fails_before_anything_is_written(tmp_path: Path) -> None:
    (tmp_path / "points.csv").write_text("a,b\n1,2\n3,oops\n")
    config = tmp_path / "bad_data.toml"
    config.write_text(f'[model]\nkind = "realnvp"\n[data]\npath = "{tmp_path / "points.csv"}"\n')
    result = runner.invoke(app, ["train", str(config), "--out", str(tmp_path / "run"), *TINY])
    assert result.exit_code != 0
    assert "points.csv, row 3, column 2: 'oops' is not a number" in result.output
    assert not (tmp_path / "run").exists()
