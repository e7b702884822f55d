"""The command line: the demo trains, reports a test NLL and writes its plot."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from flowforge import __version__
from flowforge.cli import app
from tests.invariants import edit_checkpoint

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
        data = None if config.objective_kind() == "reverse-kl" else runs.load_data(config.data)
        model = runs.build_model(config, data)
        assert sum(p.numel() for p in model.parameters()) > 0, path.name


def test_every_shipped_config_saves_and_reloads_as_the_run_it_describes(tmp_path: Path) -> None:
    """A run folder reloads through ``load_run``'s cross-checks of config against model for every kind."""
    from flowforge import runs
    from flowforge.checkpoint import save_model
    from flowforge.runs.density import _run_metadata

    for path in CONFIGS.glob("*.toml"):
        config = runs.load_config(path)
        data = None if config.objective_kind() == "reverse-kl" else runs.load_data(config.data)
        model = runs.build_model(config, data)
        save_model(tmp_path / path.stem, model, metadata=_run_metadata(config, data))
        run = runs.load_run(tmp_path / path.stem)
        assert type(run.model) is type(model) and run.config == config, path.name


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
    assert "note" not in result.stderr
    more = runner.invoke(app, ["eval", str(run), "--samples", "1000000"])  # more than the held-out data has
    assert more.exit_code == 0 and "note: --samples 1000000: the held-out data has" in more.stderr, more.output
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
    trained = re.search(r"kl (-?[\d.]+)", result.output).group(1)
    assert float(trained) < 0.05  # see test_trainer.test_reverse_kl_learns_the_banana for the threshold
    for _ in range(2):  # the Monte-Carlo KL is drawn with --seed's samples: the same figure every time
        again = runner.invoke(app, ["eval", str(tmp_path / "kl")])
        assert again.exit_code == 0 and re.search(r"kl (-?[\d.]+)", again.output).group(1) == trained, again.output
    assert (tmp_path / "kl" / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_every_flow_matching_family_config_trains_evaluates_and_samples(tmp_path: Path) -> None:
    for name in (
        "flow_matching_checkerboard.toml",
        "shortcut_8gaussians.toml",
        "meanflow_8gaussians.toml",
        "consistency_8gaussians.toml",
    ):
        result = _train(CONFIGS / name, tmp_path / name, "--set", "model.options.hidden=[16]")
        assert result.exit_code == 0, result.output
        assert "mmd" in result.output
        # A consistency model has no density: its evaluation reports sample metrics only.
        assert ("nll" in result.output) == (name != "consistency_8gaussians.toml"), result.output
        result = runner.invoke(app, ["sample", str(tmp_path / name), "-n", "4", "-o", str(tmp_path / f"{name}.npy")])
        assert result.exit_code == 0, result.output
    # The residual velocity network takes its own options (width, blocks), not the MLP's defaults.
    residual = ["--set", 'model.options={velocity = "residual-velocity-mlp", width = 16, blocks = 1}']
    result = _train(CONFIGS / "shortcut_8gaussians.toml", tmp_path / "residual", *residual)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[train]\nstepz = 3\n", "has no setting 'stepz' (did you mean 'steps'?)"),
        ('[train]\nsteps = "many"\n', "[train] steps = 'many': expected an integer"),
        ('[model]\nkind = "glow9"\n', "[model] kind = 'glow9' is not one of"),
        ('[data]\nname = "mnist"\n', "[data] name = 'mnist' is not one of"),
        ("[extra]\nx = 1\n", "unknown table [extra]"),
        ("[train\n", "not valid TOML"),
        (
            '[model]\nkind = "flow-matching"\n[objective]\nkind = "maximum-likelihood"\n',
            "[model] kind = 'flow-matching' trains with [objective] kind = 'flow-matching'",
        ),
        ('[train]\nschedule = "linear"\n', "[train] schedule = 'linear' is not one of constant, cosine"),
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
    assert result.exit_code != 0 and "expected a .npy or .csv file name" in result.output
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


@pytest.fixture
def quick_digits_classifier(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Evaluation's digits classifier cached in a temporary folder and trained for one epoch only."""
    from flowforge.eval.image_quality import train_digits_classifier
    from flowforge.runs import density

    monkeypatch.setenv(density.CACHE_VARIABLE, str(tmp_path / "cache"))
    monkeypatch.setattr(density, "train_digits_classifier", lambda **kw: train_digits_classifier(epochs=1, **kw))


SMALL_UNET = ["--set", "model.options.channels=8", "--set", "model.options.groups=4", "--set", "train.batch_size=16"]


def test_conditional_flow_matching_on_digit_images_trains_samples_evaluates_and_plots(
    tmp_path: Path, quick_digits_classifier: None
) -> None:
    run = tmp_path / "fm"
    result = _train(CONFIGS / "flow_matching_digits.toml", run, *SMALL_UNET)
    assert result.exit_code == 0, result.output
    for metric in ("frechet_distance", "conditional_accuracy", "classifier_accuracy"):
        assert metric in result.output
    assert (run / "plot.png").read_bytes()[:4] == b"\x89PNG"

    result = runner.invoke(app, ["sample", str(run), "-n", "12", "--steps", "2", "-o", str(tmp_path / "x.npy")])
    assert result.exit_code == 0, result.output
    assert "row i is of class i mod 10" in result.output
    drawn = np.load(tmp_path / "x.npy")
    assert drawn.shape == (12, 1, 8, 8) and np.array_equal(drawn, np.round(drawn))
    assert drawn.min() >= 0 and drawn.max() <= 16  # pixel counts, not the model's [-1, 1) units
    result = runner.invoke(app, ["sample", str(run), "-n", "2", "--label", "3", "-o", str(tmp_path / "y.npy")])
    assert result.exit_code == 0 and "all of class 3" in result.output
    result = CliRunner().invoke(app, ["sample", str(run), "-n", "2", "--label", "10", "-o", str(tmp_path / "z.npy")])
    assert result.exit_code == 2 and "--label 10: expected a class 0..9" in result.stderr
    assert not (tmp_path / "z.npy").exists()

    result = runner.invoke(app, ["eval", str(run), "--samples", "40", "--steps", "1"])
    assert result.exit_code == 0, result.output
    accuracy = float(re.search(r"conditional_accuracy ([\d.]+)", result.output).group(1))
    assert 0 <= accuracy <= 1
    result = runner.invoke(app, ["plot", str(run), "-o", str(tmp_path / "classes.png")])
    assert result.exit_code == 0 and (tmp_path / "classes.png").read_bytes()[:4] == b"\x89PNG"


def test_every_few_step_family_samples_digits_in_one_and_two_steps(tmp_path: Path, quick_digits_classifier) -> None:
    for kind in ("shortcut", "meanflow", "consistency"):
        run = tmp_path / kind
        result = _train(CONFIGS / "meanflow_digits.toml", run, *SMALL_UNET, "--set", f'model.kind="{kind}"')
        assert result.exit_code == 0, (kind, result.output)
        for steps in ("1", "2"):
            out = tmp_path / f"{kind}-{steps}.npy"
            result = runner.invoke(app, ["sample", str(run), "-n", "5", "--steps", steps, "-o", str(out)])
            assert result.exit_code == 0, (kind, steps, result.output)
            drawn = np.load(out)
            assert drawn.shape == (5, 1, 8, 8) and drawn.min() >= 0 and drawn.max() <= 16


def test_list_names_everything() -> None:
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0
    for word in ("realnvp", "flow-matching", "reverse-kl", "checkerboard", "digits", "banana"):
        assert word in result.output
    models = next(line for line in result.output.splitlines() if line.startswith("models:"))
    assert "dequantized" not in models  # not a kind a config can name: the run wraps its model itself


def test_a_malformed_data_file_fails_before_anything_is_written(tmp_path: Path) -> None:
    (tmp_path / "points.csv").write_text("a,b\n1,2\n3,oops\n")
    config = tmp_path / "bad_data.toml"
    config.write_text(f'[model]\nkind = "realnvp"\n[data]\npath = "{tmp_path / "points.csv"}"\n')
    result = runner.invoke(app, ["train", str(config), "--out", str(tmp_path / "run"), *TINY])
    assert result.exit_code != 0
    assert "points.csv, row 3, column 2: 'oops' is not a number" in result.output
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- one wrong value at a time
VAE_CONFIG = '[model]\nkind = "vae"\n[data]\nname = "digits"\n[train]\nsteps = 10\n'
BAD_VALUES = [
    # (override or None, file content or None, key the message must name)
    (["train.lr=nan"], None, "lr"),
    (["train.log_every=0"], None, "log_every"),
    (["train.log_every=-1"], None, "log_every"),
    (["train.checkpoint_every=-1"], None, "checkpoint_every"),
    (["train.eval_every=-1"], None, "eval_every"),
    (["train.patience=-1"], None, "patience"),
    (["train.seed=-1"], None, "seed"),
    (["train.max_grad_norm=0"], None, "max_grad_norm"),
    (["train.max_grad_norm=-1"], None, "max_grad_norm"),
    (["train.weight_decay=-0.1"], None, "weight_decay"),
    (['train.precision="fp16"'], None, "precision"),
    (["model.options.transforms=-1"], None, "transforms"),
    (["model.options.hidden=[0]"], None, "hidden"),
    (["model.options.activation=swish9"], None, "activation"),
    (["data.size=0"], None, "size"),
    (["data.conditional=true"], None, "conditional"),  # moons have no classes
    (["train.steps.x=1"], None, "train.steps"),
    (["train.seed=4294967296"], None, "seed"),  # NumPy takes 32-bit seeds
    (["data.seed=-1"], None, "seed"),
    (None, '[model]\nkind = "cnf"\noptions = { method = "bogus" }\n[data]\nname = "moons"\n', "method"),
    (None, b"\x89PNG\r\n\x1a\n\x00\x00binary", "not a text file"),
    (["model.options.transforms=true"], None, "transforms"),
    (["model.options.hidden=[1.5]"], None, "hidden"),
    (['objective.target="banana"'], None, "target"),  # not read by maximum likelihood
    (['data.path=""'], None, "path = ''"),  # replaces the config's built-in set, and is empty
    (["objective.kl_warmup_steps=100"], None, "kl_warmup_steps"),  # a VAE's alone
    (None, VAE_CONFIG + "[objective]\nkl_warmup_steps = -1\n", "kl_warmup_steps"),
    (None, VAE_CONFIG + "[objective]\nkl_warmup_steps = 11\n", "kl_warmup_steps = 11 is longer"),
    (None, '[model]\nkind = "realnvp"\n[data]\nname = "moons"\n[objective]\nkind = "reverse-kl"\n', "[data]"),
    (["data.size=1180591620717411303424"], None, "size = 1180591620717411303424: expected integers of at most 64"),
    (["model.options.hiden=[8]"], None, "options.hiden: a realnvp model takes no such option (did you mean 'hidden'?)"),
    (["model.options.hidden=[99999999999999999999]"], None, "options.hidden[0] = 99999999999999999999: expected"),
    ([f"train.lr={10**400}"], None, "lr = 10000000000000000000...(401 digits)"),
    (["model.options.seed=4294967296"], None, "seed must be an int in 0..4294967295, got 4294967296"),
    (['model.options.activation=["relu"]'], None, "options.activation = ['relu']: expected a name"),
    (["data.path=."], None, f"{Path.cwd()}: a folder, not a file"),  # named as the absolute path the run keeps
    (
        ['data.name="digits-images"', 'model.kind="glow"', "data.test_fraction=0.0001"],
        None,
        "test_fraction = 0.0001 holds out 0 of the 1797 digits",
    ),
    (['data.name="digits-images"', 'model.kind="glow"', "data.test_fraction=0.9999"], None, "holds out 1797"),
    (['model.dequantization="variational"'], None, "dequantization = 'variational': the data are not integer"),
    (
        ['data.name="digits"', 'model.kind="flow-matching"', 'model.dequantization="variational"'],
        None,
        "dequantization = 'variational': a flow matcher dequantizes each batch uniformly",
    ),
    # Options that do not fit the data, refused before training (they failed in its first step).
    (["model.options.context=3"], None, "options.context = 3: a realnvp run trains on its data alone"),
    (['model.kind="vae"', "model.options={}"], None, "'vae' models integer counts 0..16 (options.levels = 17)"),
    (['model.kind="nsf"', "model.options.bound=1e300"], None, r"bound must be in (0, 1e+08]"),
    # Sizes the run would not read.
    (["data.test_fraction=0.9"], None, "test_fraction = 0.9: a 2-D set (moons) is tested on 5000 points"),
    (['data.name="wine"', "data.size=100"], None, "size = 100: only a 2-D set is drawn at a size"),
]


@pytest.mark.parametrize(("overrides", "content", "key"), BAD_VALUES, ids=[k for _, _, k in BAD_VALUES])
def test_each_bad_value_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, overrides, content, key: str) -> None:
    config = CONFIGS / "realnvp_moons.toml"
    if content is not None:
        config = tmp_path / "run.toml"
        config.write_bytes(content if isinstance(content, bytes) else content.encode())
    args = ["train", str(config), "--out", str(tmp_path / "run"), "--no-progress"]
    for override in overrides or []:
        args += ["--set", override]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert result.stdout == ""  # nothing announced, nothing written
    assert not (tmp_path / "run").exists()


PARSER_REFUSALS = [
    (["demo", "--steps", "-1", "--out", "OUT"], "'--steps'", "'-1'"),
    (["demo", "--steps=abc", "--out", "OUT"], "'--steps'", "'abc'"),
    (["demo", "--steps", "5", "--steps", "0", "--out", "OUT"], "'--steps'", "'0'"),  # the value read
    (["demo", "--seed", "4294967296", "--out", "OUT"], "'--seed'", "4294967295"),
    (["sample", "OUT", "-n", "0"], "'-n'", "'0'"),
    (["sample", "OUT", "--steps", "5000"], "'--steps'", "'5000'"),
    (["policy", "eval", "OUT", "--steps", "1001"], "'--steps'", "'1001'"),
    (["data", "collect", "--out", "OUT", "--seed", "-1"], "'--seed'", "'-1'"),
    (["data", "collect", "--out", "OUT", "--images", "--size", "100000"], "'--size'", "'100000'"),
    (["policy", "eval", "OUT", "--delay", "99999999999999999999"], "--delay", "0..1000"),
    (["policy", "eval", "OUT", "--delay", "5-2"], "--delay", "'5-2'"),
    (["policy", "eval", "OUT", "--delay", "1-\u00b2"], "--delay", "'1-\u00b2'"),  # a digit to str.isdigit only
    (["policy", "eval", "OUT", "--max-steps", "501"], "'--max-steps'", "'501'"),  # MetaWorld stops at 500
    (["policy", "eval", "OUT", "--episodes", "10001"], "'--episodes'", "'10001'"),
    (["data", "collect", "--out", "OUT", "--tasks", "reach-v3", "--episodes", "10001"], "'--episodes'", "'10001'"),
    (["demo", "--bogus", "3"], "--bogus", "--bogus"),
    (["nonsense"], "No such command", "'nonsense'"),
]


@pytest.mark.parametrize(
    ("args", "option", "value"), PARSER_REFUSALS, ids=[" ".join(a[:3]) for a, _, _ in PARSER_REFUSALS]
)
def test_the_parsers_refusals_are_one_line_exit_2_and_write_nothing(tmp_path: Path, args, option, value) -> None:
    """An option the parser refuses (out of its range, not a number, unknown) is reported like every
    other user error: one line naming the option and the value given, exit code 2, nothing written."""
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [str(out) if a == "OUT" else a for a in args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert option in lines[0] and value in lines[0], lines[0]
    assert result.stdout == "" and not out.exists()


def test_output_paths_are_checked_before_anything_is_written(tmp_path: Path) -> None:
    existing = tmp_path / "a_file"
    existing.write_text("keep me")
    result = CliRunner().invoke(app, ["train", str(CONFIGS / "nice_moons.toml"), "--out", str(existing), *TINY])
    assert result.exit_code == 2 and "--out" in result.stderr and str(existing) in result.stderr
    assert existing.read_text() == "keep me" and result.stdout == ""
    run = tmp_path / "run"
    assert _train(CONFIGS / "nice_moons.toml", run).exit_code == 0
    folder = tmp_path / "folder.npy"
    folder.mkdir()
    result = CliRunner().invoke(app, ["sample", str(run), "-o", str(folder)])
    assert result.exit_code == 2 and "-o" in result.stderr and "folder" in result.stderr
    assert list(folder.iterdir()) == []


def test_an_output_under_a_file_or_of_another_kind_is_refused_before_any_work(tmp_path: Path) -> None:
    existing = tmp_path / "a_file"
    existing.write_text("keep me")
    under = existing / "inside"
    run = tmp_path / "run"
    assert _train(CONFIGS / "nice_moons.toml", run).exit_code == 0
    policy_config = CONFIGS / "policy" / "mt10.toml"
    cases = [
        (["demo", "--out", under, "--steps", "1"], "--out"),
        (["train", CONFIGS / "nice_moons.toml", "--out", under, *TINY], "--out"),
        (["train", CONFIGS / "nice_moons.toml", "--out", tmp_path / "a\nb", *TINY], "--out"),
        (["sample", run, "-o", under / "s.npy"], "-o"),
        (["plot", run, "-o", under / "p.png"], "-o"),
        (["plot", run, "-o", tmp_path / "p.txt"], "-o"),
        (["data", "collect", "--out", under, "--tasks", "reach-v3"], "--out"),
        (["policy", "train", policy_config, "--out", under], "--out"),
        (["policy", "eval", run, "--out", under / "r.json"], "--out"),
        (["policy", "eval", run, "--out", tmp_path / "r.txt"], "--out"),
        (["policy", "eval", run, "--video", under], "--video"),
    ]
    for args, option in cases:
        result = CliRunner().invoke(app, [str(a) for a in args])
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {option} "), (args, lines)
        assert result.stdout == "" and existing.read_text() == "keep me", args
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "run"]
    # a folder that holds a run continues with --resume only; a data set's folder never takes a run
    dataset = tmp_path / "data"
    (dataset / "meta").mkdir(parents=True)
    (dataset / "meta" / "info.json").write_text("{}")
    refused = [
        (["train", CONFIGS / "nice_moons.toml", "--out", run, *TINY], "holds a trained run already"),
        (["policy", "train", policy_config, "--out", run], "holds a trained run already"),
        (["policy", "train", policy_config, "--out", dataset], "is an episode data set"),
    ]
    if Path("/proc").is_dir():  # exists, but nothing can be made in it
        refused.append((["policy", "eval", run, "--out", "/proc/r.json"], "cannot write in /proc"))
        cache = ["--set", 'data.cache="/proc/frames"']
        refused.append(
            (
                ["policy", "train", CONFIGS / "policy" / "mt10_images.toml", "--out", tmp_path / "p", *cache],
                "[data] cache /proc/frames: cannot write in /proc",
            )
        )
    before = (run / "checkpoint.json").read_bytes()
    for args, message in refused:
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 2 and message in result.stderr and result.stdout == "", (args, result.output)
    assert (run / "checkpoint.json").read_bytes() == before
    result = CliRunner().invoke(app, ["plot", str(run), "-o", str(tmp_path / "p.svg")])
    assert result.exit_code == 0 and (tmp_path / "p.svg").read_text().lstrip().startswith("<?xml")


def test_eval_refuses_points_the_run_does_not_model(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert _train(CONFIGS / "nice_moons.toml", run).exit_code == 0
    np.save(tmp_path / "wide.npy", np.zeros((10, 3), dtype=np.float32))
    for data, found in ((tmp_path / "wide.npy", "3"), ("iris", "4")):
        result = CliRunner().invoke(app, ["eval", str(run), "--data", str(data)])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert f"points of shape {found}; this run models points of shape 2" in result.stderr
    result = CliRunner().invoke(app, ["eval", str(run), "--data", str(tmp_path)])
    assert result.exit_code == 2 and ": a folder; give a data file" in result.stderr, result.output
    result = CliRunner().invoke(app, ["eval", str(run), "--data", "no-such-set"])
    assert result.exit_code == 2 and "--data 'no-such-set': neither a file" in result.stderr
    np.save(tmp_path / "one.npy", np.zeros((1, 2), dtype=np.float32))
    result = CliRunner().invoke(app, ["eval", str(run), "--data", str(tmp_path / "one.npy")])
    assert result.exit_code == 2 and "one.npy: 1 point; evaluation needs at least 2" in result.stderr, result.output
    np.save(tmp_path / "few.npy", np.random.default_rng(0).normal(size=(50, 2)).astype(np.float32))
    result = CliRunner().invoke(app, ["eval", str(run), "--data", str(tmp_path / "few.npy")])
    assert result.exit_code == 0 and "note" not in result.stderr, result.output  # the default asked for nothing
    result = CliRunner().invoke(app, ["eval", str(run), "--data", str(tmp_path / "few.npy"), "--samples", "60"])
    assert result.exit_code == 0 and "note: --samples 60: the held-out data has 50 points" in result.stderr


def test_steps_are_refused_for_a_model_that_samples_in_one_pass(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert _train(CONFIGS / "nice_moons.toml", run).exit_code == 0
    for args in (
        ["sample", str(run), "--steps", "7", "-o", str(tmp_path / "s.npy")],
        ["eval", str(run), "--steps", "3"],
    ):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and "a nice model samples without a step count" in result.stderr, result.output
        assert result.stdout == "" and not (tmp_path / "s.npy").exists()


def test_weights_holding_nan_are_refused_on_load_naming_the_weight(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from flowforge.checkpoint import read_manifest

    run = tmp_path / "run"
    assert _train(CONFIGS / "nice_moons.toml", run).exit_code == 0
    manifest = read_manifest(run)
    path = run / manifest["files"]["model"]["file"]
    weights = load_file(path)
    name = next(k for k, v in weights.items() if v.is_floating_point() and v.numel() > 1)
    weights[name][0] = float("nan")
    save_file(weights, path)
    record = json.loads((run / "checkpoint.json").read_text())
    record["files"]["model"]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (run / "checkpoint.json").write_text(json.dumps(record))
    for args in (["eval", str(run)], ["sample", str(run), "-o", str(tmp_path / "s.npy")]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and "hold NaN or inf (" in result.stderr, result.output
        assert not (tmp_path / "s.npy").exists()


def test_resume_from_a_truncated_tensor_file_is_refused_before_anything_is_announced(tmp_path: Path) -> None:
    from flowforge.checkpoint import read_manifest

    out = tmp_path / "r"
    assert CliRunner().invoke(app, ["train", str(CONFIGS / "nice_moons.toml"), "--out", str(out), *TINY]).exit_code == 0
    for group in ("model", "trainer"):
        path = out / read_manifest(out)["files"][group]["file"]
        kept = path.read_bytes()
        path.write_bytes(kept[:100])
        result = CliRunner().invoke(
            app, ["train", str(CONFIGS / "nice_moons.toml"), "--out", str(out), "--resume", *TINY]
        )
        assert result.exit_code == 2 and result.stdout == "", result.output
        assert "does not match its recorded SHA-256" in result.stderr and len(result.stderr.splitlines()) == 1
        path.write_bytes(kept)


def test_a_checkpoints_standardisation_is_checked_on_load(tmp_path: Path) -> None:
    import json

    run = tmp_path / "run"
    assert _train(CONFIGS / "maf_wine.toml", run).exit_code == 0
    manifest = json.loads((run / "checkpoint.json").read_text())
    for change, message in (
        (lambda stats: stats["std"].__setitem__(0, float("nan")), "metadata.standardizer: std holds NaN or inf"),
        (lambda stats: stats["std"].__setitem__(0, 0.0), "metadata.standardizer: std must be > 0 in every column"),
        (lambda stats: stats["mean"].__setitem__(1, float("inf")), "metadata.standardizer: mean holds NaN or inf"),
        (lambda stats: stats["mean"].pop(), "has mean [12] and std [13]; the model's points are [13]"),
    ):
        metadata = json.loads(json.dumps(manifest["metadata"]))
        change(metadata["standardizer"])
        edit_checkpoint(run, lambda record, metadata=metadata: record.__setitem__("metadata", metadata))
        result = CliRunner().invoke(app, ["sample", str(run), "-o", str(tmp_path / "s.npy")])
        assert result.exit_code == 2 and message in result.stderr, result.stderr
        assert not (tmp_path / "s.npy").exists()


def test_resume_without_a_checkpoint_says_it_starts_from_step_0(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["train", str(CONFIGS / "nice_moons.toml"), "--out", str(tmp_path / "r"), "--resume", *TINY]
    )
    assert result.exit_code == 0, result.output
    assert "--resume: no checkpoint in" in result.stderr and "training from step 0" in result.stderr
    result = CliRunner().invoke(
        app, ["train", str(CONFIGS / "nice_moons.toml"), "--out", str(tmp_path / "r"), "--resume", *TINY]
    )
    assert result.exit_code == 0 and "no checkpoint" not in result.stderr
    assert "into " + str(tmp_path / "r") + ": finished at step 3, nothing left to train" in result.stdout


def test_resume_under_another_data_set_is_one_line_naming_it(tmp_path: Path) -> None:
    out = str(tmp_path / "r")
    result = CliRunner().invoke(app, ["train", str(CONFIGS / "nice_moons.toml"), "--out", out, *TINY])
    assert result.exit_code == 0, result.output
    before = (tmp_path / "r" / "checkpoint.json").read_bytes()
    result = CliRunner().invoke(
        app,
        ["train", str(CONFIGS / "nice_moons.toml"), "--out", out, "--resume", *TINY, "--set", 'data.name="spirals"'],
    )
    assert result.exit_code == 2 and result.stdout == "", result.output  # no "training ..." before the refusal
    assert 'metadata.run.data.name: "moons" -> "spirals"' in result.stderr and len(result.stderr.splitlines()) == 1
    assert (tmp_path / "r" / "checkpoint.json").read_bytes() == before


def test_a_data_file_given_with_set_replaces_the_configs_built_in_set(tmp_path: Path) -> None:
    points = tmp_path / "points.npy"
    np.save(points, np.random.default_rng(0).normal(size=(300, 2)).astype(np.float32))
    out = tmp_path / "r"
    args = ["train", str(CONFIGS / "nice_moons.toml"), "--out", str(out), *TINY, "--set", f'data.path="{points}"']
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "checkpoint.json").read_text())["metadata"]["run"]["data"]
    assert data["path"] == str(points) and data["name"] is None
    both = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "s"), "--set", 'data.name="moons"'])
    assert both.exit_code == 2 and "give exactly one of name" in both.stderr


def test_policy_train_says_nothing_before_its_data_is_checked(tmp_path: Path) -> None:
    config = CONFIGS / "policy" / "mt10.toml"
    missing = tmp_path / "no-data"
    result = CliRunner().invoke(
        app, ["policy", "train", str(config), "--out", str(tmp_path / "p"), "--set", f'data.root="{missing}"']
    )
    assert result.exit_code == 2 and result.stdout == "" and str(missing) in result.stderr, result.output
    assert not (tmp_path / "p").exists()


def test_policy_config_values_are_typed(tmp_path: Path) -> None:
    config = Path(__file__).resolve().parents[1] / "configs" / "policy" / "mt10.toml"
    for override, key in [
        ('policy.width="64"', "width"),  # a string where a number belongs (shell: --set policy.width='"64"')
        ("policy.sampling_steps=0", "sampling_steps"),
        ('policy.method="bogus"', "method"),
        ("policy.diffusion_steps=0", "diffusion_steps"),
        ("policy.noise_scale=inf", "noise_scale"),
        ("policy.state_dim=5", "[policy] state_dim = 5: a policy run takes state_dim from its data set"),
        ("policy.action_dim=7", "[policy] action_dim = 7: a policy run takes action_dim"),
        ("policy.diffusion_steps=1180591620717411303424", "diffusion_steps = 1180591620717411303424"),
        ("policy.width=64000000", "width = 64000000: expected an integer in [1, 16384]"),
        ("policy.heads=256", "heads = 256: expected an integer in [1, 64] (at most width = 64)"),
        ("policy.obs_horizon=1000000", "obs_horizon = 1000000: expected an integer in [1, 1000]"),
        ("data.workers=100000", "workers = 100000: expected an integer in [0, 256] (DataLoader processes)"),
    ]:
        args = ["policy", "train", str(config), "--out", str(tmp_path / "p"), "--set", override]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, (override, result.output)
        assert key in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not (tmp_path / "p").exists()


def test_image_flows_train_on_digits_with_fresh_dequantization_noise(tmp_path: Path) -> None:
    """Glow, multi-scale RealNVP and a dequantized NSF train from `flowforge train`; sample/eval/plot work."""
    for name, kind, options in [
        ("glow", "glow", "{ levels = 2, steps = 1, hidden_channels = 8 }"),
        ("multiscale", "multiscale-realnvp", "{ levels = 2, steps = 1, hidden_channels = 8 }"),
    ]:
        config = tmp_path / f"{name}.toml"
        config.write_text(
            f'[model]\nkind = "{kind}"\noptions = {options}\ndequantization = "variational"\n'
            '[data]\nname = "digits-images"\n[train]\nsteps = 3\nbatch_size = 16\nlog_every = 1\n'
        )
        run = tmp_path / name
        result = CliRunner().invoke(app, ["train", str(config), "--out", str(run), "--no-progress"])
        assert result.exit_code == 0, result.output
        bits = float(re.search(r"bits_per_dim (-?[\d.]+)", result.output).group(1))
        assert 0 < bits < 12
        assert (run / "plot.png").read_bytes()[:4] == b"\x89PNG"
        result = CliRunner().invoke(app, ["sample", str(run), "-n", "3", "-o", str(tmp_path / f"{name}.npy")])
        assert result.exit_code == 0, result.output
        drawn = np.load(tmp_path / f"{name}.npy")
        assert drawn.shape == (3, 1, 8, 8) and np.array_equal(drawn, np.round(drawn)) and drawn.max() <= 16
        assert CliRunner().invoke(app, ["eval", str(run), "--samples", "50"]).exit_code == 0


def test_dequantization_noise_is_fresh_in_every_batch() -> None:
    from flowforge import runs

    config = runs.RunConfig(
        model=runs.ModelConfig(kind="nsf", options={"transforms": 1, "hidden": [8]}),
        data=runs.DataConfig(name="digits"),
    )
    data = runs.load_data(config.data)
    assert torch.equal(data.train, data.train.round()) and data.levels == 17  # counts, not pre-noised values
    model = runs.build_model(config, data)
    rows = data.train[:4]
    assert not torch.equal(model.log_prob(rows), model.log_prob(rows))  # a new noise draw per call


def _commands(group, path=()):
    for name, command in group.commands.items():
        yield (*path, name)
        if hasattr(command, "commands"):  # a sub-group (typer ships its own click classes)
            yield from _commands(command, (*path, name))


def test_every_help_text_renders_its_brackets() -> None:
    """Help texts print literally: `[policy]` and `table.key=value` reach the terminal as written."""
    from typer.main import get_command

    root = get_command(app)
    commands = list(_commands(root))
    assert ("policy", "train") in commands and ("data", "collect") in commands
    for command in [(), *commands]:
        result = CliRunner().invoke(app, [*command, "--help"])
        assert result.exit_code == 0, (command, result.output)
        assert "Usage:" in result.output
    policy_help = CliRunner().invoke(app, ["policy", "train", "--help"]).output
    assert "[policy], [data], [train]" in policy_help


def test_a_vae_config_trains_on_its_elbo_and_reports_its_iwae_likelihood(tmp_path: Path) -> None:
    result = _train(
        CONFIGS / "vae_digits.toml",
        tmp_path / "vae",
        "--set",
        "model.options.transforms=1",
        "--set",
        "objective.kl_warmup_steps=2",
    )
    assert result.exit_code == 0, result.output
    assert "training vae (negative-elbo)" in result.output and "nll" in result.output
    trainer = json.loads((tmp_path / "vae" / "checkpoint.json").read_text())["trainer"]
    assert trainer["objective"] == {"steps_taken": 3}  # the warm-up's counter, for a resumed run
    config = tmp_path / "mixed.toml"
    config.write_text('[model]\nkind = "realnvp"\n[data]\nname = "moons"\n[objective]\nkind = "negative-elbo"\n')
    result = runner.invoke(app, ["train", str(config), "--out", str(tmp_path / "mixed"), *TINY])
    assert result.exit_code == 2 and "a vae trains with 'negative-elbo', and only a vae does" in result.output
    assert not (tmp_path / "mixed").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--images", "--cameras", " , "], "--cameras ' , ': an empty name"),
        (["--cameras", "corner"], "--camera, --cameras and --size describe the images of --images: add --images"),
        (["--camera", "corner"], "--camera, --cameras and --size describe the images of --images: add --images"),
        (["--images", "--cameras", "corner,bogusCam"], "--cameras 'corner,bogusCam': unknown MetaWorld camera"),
        (["--images", "--cameras", "corner,corner"], "--cameras 'corner,corner': corner named more than once"),
        (["--images", "--camera", "topview", "--cameras", "corner"], "give one camera or the list, not both"),
        (["--images", "--camera", "bogus"], "--camera 'bogus': unknown MetaWorld camera 'bogus'; known: topview"),
        (["--size", "32"], "--camera, --cameras and --size describe the images of --images: add --images"),
        (["--tasks", "reach-v3,,push-v3"], "--tasks 'reach-v3,,push-v3': an empty name"),
        (["--tasks", "reach-v3,reach"], "--tasks 'reach-v3,reach': unknown MetaWorld v3 task 'reach'"),
        (["--action-noise", "1.5"], "Invalid value for '--action-noise'"),
        (["--action-noise", "-0.1"], "Invalid value for '--action-noise'"),
        (["--action-noise", "abc"], "Invalid value for '--action-noise'"),
        (["--action-noise", "nan"], "'--action-noise': expected a finite number >= 0 and <= 1 (got 'nan')"),
        (["--action-noise=-inf"], "'--action-noise': expected a finite number >= 0 and <= 1 (got '-inf')"),
        (["--images", "--size", "nan"], "Invalid value for '--size'"),
        (["--noisy-tasks", "reach-v3"], "--noisy-tasks 'reach-v3': names the tasks that get --action-noise"),
        (["--action-noise", "0.1", "--noisy-tasks", "push-v3"], "--noisy-tasks 'push-v3': push-v3 not among --tasks"),
        (["--action-noise", "0.1", "--noisy-tasks", "reach"], "--noisy-tasks 'reach': unknown MetaWorld v3 task"),
        (["--action-noise", "0.1", "--noisy-tasks", ""], "--noisy-tasks '': an empty value"),
    ],
)
def test_data_collect_refuses_bad_options_naming_the_option(tmp_path: Path, extra, message) -> None:
    out = tmp_path / "demos"
    result = runner.invoke(app, ["data", "collect", "--out", str(out), "--tasks", "reach-v3", *extra])
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert result.stdout == "" and not out.exists()


def test_data_collect_with_two_cameras_stores_each_cameras_frames(tmp_path: Path) -> None:
    """`data collect --images --cameras corner,gripperPOV`: one image feature per camera, every
    frame of each, and the two views differ (the gripper camera is not the corner one)."""
    from flowforge.data.episodes import EpisodeDataset

    out = tmp_path / "demos"
    args = ["data", "collect", "--out", str(out), "--tasks", "reach-v3", "--episodes", "1", "--images"]
    result = runner.invoke(app, [*args, "--cameras", "corner,gripperPOV", "--size", "24"])
    assert result.exit_code == 0, result.output
    info = json.loads((out / "meta" / "info.json").read_text())
    cameras = {name: info["features"][f"observation.images.{name}"]["shape"] for name in ("corner", "gripperPOV")}
    assert cameras == {"corner": [24, 24, 3], "gripperPOV": [24, 24, 3]}  # LeRobot's height, width, channels
    data = EpisodeDataset(out)
    assert len(data) == info["total_frames"] > 1
    for index in (0, len(data) - 1):
        corner, gripper = (data[index][f"observation.images.{name}"] for name in ("corner", "gripperPOV"))
        assert corner.shape == gripper.shape == (1, 3, 24, 24) and corner.dtype == torch.uint8  # one frame of history
        assert (corner.float() - gripper.float()).abs().mean() > 5


def test_eval_refuses_pixel_counts_out_of_range(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert _train(CONFIGS / "nsf_digits.toml", run).exit_code == 0
    for value, shown in ((99, "99"), (2.5, "2.5"), (-1, "-1")):
        np.save(tmp_path / "bad.npy", np.full((10, 64), value, dtype=np.float32))
        result = CliRunner().invoke(app, ["eval", str(run), "--data", str(tmp_path / "bad.npy")])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert f"holds {shown}; this run models pixel counts, integers in 0..16" in result.stderr


def test_batches_of_one_are_refused_for_models_with_batch_statistics(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["demo", "--model", "residual", "--batch-size", "1", "--out", str(tmp_path / "d"), "--no-progress"]
    )
    assert result.exit_code == 2 and "--batch-size: batch_size = 1: the model's ActNorm layers" in result.stderr
    result = _train(CONFIGS / "residual_moons.toml", tmp_path / "r", "--set", "train.batch_size=1")
    assert result.exit_code == 2 and "batch_size = 1: the model's ActNorm layers" in result.stderr, result.output
    assert result.stdout == "" and not (tmp_path / "r").exists() and not (tmp_path / "d").exists()


def test_a_size_the_machine_cannot_allocate_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """A layer 10**12 wide asks the allocator for terabytes: a refused size, not a traceback."""
    out = tmp_path / "run"
    args = ["train", str(CONFIGS / "nice_moons.toml"), "--out", str(out), "--no-progress"]
    result = CliRunner().invoke(app, [*args, "--set", "model.options.hidden=[1000000000000]"])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "[model] options (transforms = 8, hidden = [1000000000000]) build a nice model too large" in lines[0]
    assert "GiB asked for one tensor" in lines[0] and "lower its widths" in lines[0]
    assert "Traceback" not in result.output and not out.exists()


def test_a_data_file_too_small_for_the_test_metrics_is_refused_before_training(tmp_path: Path) -> None:
    """The held-out split keeps at least two rows (MMD's within-sample terms need two); four rows train
    and evaluate, three are refused before anything is written."""
    config = tmp_path / "small.toml"
    for rows, works in ((3, False), (4, True)):
        np.save(tmp_path / "small.npy", np.random.default_rng(0).normal(size=(rows, 2)).astype(np.float32))
        config.write_text(f'[model]\nkind = "realnvp"\n[data]\npath = "{tmp_path / "small.npy"}"\n')
        out = tmp_path / f"run{rows}"
        result = _train(config, out, "--set", "train.batch_size=2")
        if works:
            assert result.exit_code == 0 and "mmd" in result.output, result.output
        else:
            assert result.exit_code == 2 and "3 rows leave too few to train on" in result.stderr, result.output
            assert not out.exists()


def test_a_run_whose_saved_config_was_edited_is_refused_on_load(tmp_path: Path) -> None:
    """A checkpoint's run config that no longer describes its model (other data, other kind, a
    standardisation it does not hold) is refused by sample and eval, saying what disagrees."""
    run = tmp_path / "run"
    assert _train(CONFIGS / "nice_moons.toml", run).exit_code == 0
    original = (run / "checkpoint.json").read_text()
    edits = [
        (("data", "name", "wine"), "names the data 'wine', points of shape [13]; the saved model's are [2]"),
        (("data", "name", "digits"), "models pixel counts, but the saved model is not dequantized"),
        (("model", "kind", "realnvp"), "names a realnvp model; the saved model is a nice"),
        (("data", "standardize", True), "metadata.standardizer is missing, but the run config's data is standardised"),
    ]
    edited = json.loads(original)
    edited["metadata"]["run"]["data"]["name"] = "wine"
    (run / "checkpoint.json").write_text(json.dumps(edited))  # a plain edit: the settings digest differs
    result = CliRunner().invoke(app, ["sample", str(run), "-n", "3", "--output", str(tmp_path / "s.csv")])
    assert result.exit_code == 2 and "the manifest was edited" in result.stderr, result.output
    for (table, key, value), message in edits:  # edits saved as flowforge would: the cross-checks behind it

        def change(record: dict, table=table, key=key, value=value) -> None:
            settings = json.loads(original)["metadata"]["run"]
            settings[table][key] = value
            record["metadata"]["run"] = settings

        edit_checkpoint(run, change)
        for command in (["eval", str(run)], ["sample", str(run), "-n", "3", "--output", str(tmp_path / "s.csv")]):
            result = CliRunner().invoke(app, command)
            assert result.exit_code == 2 and "Traceback" not in result.output, result.output
            assert message in result.stderr, (table, key, result.stderr)
            assert not (tmp_path / "s.csv").exists()


def test_sizes_beyond_the_bounds_are_refused_where_they_enter(tmp_path: Path) -> None:
    """Sizes that would overflow an index or loop for hours are refused naming the setting and its range."""
    huge = "99999999999999999999"
    cases = [
        (
            ["--set", f"train.batch_size={huge}"],
            "batch_size = 99999999999999999999: expected an integer in [1, 16777216]",
        ),
        (
            ["--set", f"model.options.transforms={huge}"],
            f"options.transforms = {huge}: expected integers of at most 64",
        ),
        (["--set", "model.options.transforms=1001"], "transforms must be an int in 1..1000"),
    ]
    for extra, message in cases:
        result = _train(CONFIGS / "realnvp_moons.toml", tmp_path / "run", *extra)
        assert result.exit_code == 2 and message in result.stderr, result.output
        assert not (tmp_path / "run").exists()
    result = runner.invoke(app, ["demo", "--batch-size", huge, "--out", str(tmp_path / "d")])
    assert result.exit_code == 2 and "--batch-size" in result.stderr and not (tmp_path / "d").exists()


def test_a_model_that_gives_nan_writes_no_samples_and_a_bad_metrics_file_is_named(tmp_path: Path) -> None:
    from flowforge import runs
    from flowforge.errors import NumericalError

    run_folder = tmp_path / "run"
    assert _train(CONFIGS / "nice_moons.toml", run_folder).exit_code == 0
    run = runs.load_run(run_folder)
    with torch.no_grad():
        for parameter in run.model.parameters():
            parameter.fill_(float("nan"))
    with pytest.raises(NumericalError, match="5 of the model's 5 samples hold NaN or inf"):
        runs.draw_samples(run, 5)
    with (run_folder / "metrics.csv").open("a") as handle:
        handle.write("9,abc,0.1,\n")
    result = CliRunner().invoke(app, ["plot", str(run_folder), "-o", str(tmp_path / "p.png")])
    assert result.exit_code == 2 and "metrics.csv, line" in result.stderr and "'abc' are not numbers" in result.stderr
    assert not (tmp_path / "p.png").exists()


def test_an_empty_argument_is_refused_instead_of_meaning_the_current_folder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    for args, message in (
        (["train", str(CONFIGS / "nice_moons.toml"), "--out", ""], "error: --out '': an empty value"),
        (["train", str(CONFIGS / "nice_moons.toml"), "--out="], "error: --out '': an empty value"),
        (["data", "collect", "--tasks", "reach-v3", "--out", ""], "error: --out '': an empty value"),
        (["train", ""], "error: an empty argument ''"),
    ):
        result = subprocess.run([sys.executable, "-m", "flowforge", *args], capture_output=True, text=True)
        assert result.returncode == 2 and result.stderr.startswith(message), (args, result.stderr)
        assert result.stdout == "" and list(tmp_path.iterdir()) == []


def test_progress_flag_and_progress_override_together_are_refused(tmp_path: Path) -> None:
    command = ["train", str(CONFIGS / "realnvp_moons.toml"), "--out", str(tmp_path / "run")]
    result = runner.invoke(app, [*command, "--no-progress", "--set", "train.progress=true"])
    assert result.exit_code == 2, result.output
    assert "--no-progress and --set train.progress=true: both set the progress bar; give one" in result.stderr
    assert not (tmp_path / "run").exists()


def test_sample_never_writes_over_the_runs_own_files(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert _train(CONFIGS / "nice_moons.toml", run).exit_code == 0
    history = (run / "metrics.csv").read_bytes()
    for target, message in (("metrics.csv", "is the training history of the run"), ("checkpoint.json", "-o")):
        result = runner.invoke(app, ["sample", str(run), "-n", "3", "-o", str(run / target)])
        assert result.exit_code == 2 and message in result.stderr, result.output
    assert (run / "metrics.csv").read_bytes() == history
    assert runner.invoke(app, ["sample", str(run), "-n", "3", "-o", str(run / "samples.csv")]).exit_code == 0


def test_resume_leaves_a_run_that_stopped_early_as_it_was(tmp_path: Path) -> None:
    from flowforge.checkpoint import read_manifest

    run = tmp_path / "run"
    settings = ["--set", "train.steps=2000", "--set", "train.eval_every=20", "--set", "train.patience=1"]
    first = runner.invoke(
        app, ["train", str(CONFIGS / "realnvp_moons.toml"), "--out", str(run), *settings, "--no-progress"]
    )
    assert first.exit_code == 0, first.output
    step = read_manifest(run)["trainer"]["state"]["step"]
    assert step < 2000  # it stopped early
    weights = sorted((p.name, p.read_bytes()) for p in run.glob("*.safetensors"))
    again = runner.invoke(
        app, ["train", str(CONFIGS / "realnvp_moons.toml"), "--out", str(run), *settings, "--no-progress", "--resume"]
    )
    assert again.exit_code == 0, again.output
    assert f"finished at step {step} (stopped early), nothing left to train" in again.output
    assert sorted((p.name, p.read_bytes()) for p in run.glob("*.safetensors")) == weights


def test_a_one_column_data_file_trains_and_plots_from_anywhere(tmp_path: Path, monkeypatch) -> None:
    """One-dimensional data get histograms and a density curve; the file's path is kept absolute, so
    eval and plot find it from another folder."""
    import numpy as np

    work = tmp_path / "work"
    work.mkdir()
    np.save(work / "one_col.npy", np.random.default_rng(0).normal(size=(200, 1)).astype(np.float32))
    (work / "one.toml").write_text(
        '[model]\nkind = "maf"\noptions = { transforms = 1, hidden = [8] }\n[data]\npath = "one_col.npy"\n'
    )
    monkeypatch.chdir(work)
    result = runner.invoke(app, ["train", "one.toml", "--out", str(tmp_path / "run"), *TINY])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "plot.png").is_file()
    monkeypatch.chdir(tmp_path)
    for args in (["eval", "run"], ["plot", "run", "-o", "again.png"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    assert (tmp_path / "again.png").is_file()
    # A file changed after training would give another held-out split: refused, saying so.
    np.save(work / "one_col.npy", np.random.default_rng(1).normal(size=(200, 1)).astype(np.float32))
    result = runner.invoke(app, ["eval", "run"])
    assert result.exit_code == 2 and "the data file changed since the run trained on it" in result.stderr
