"""The one config reader: types, lists, nested tables, overrides, hints, and where each error points."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from flowforge.config import apply_overrides, check_choice, check_range, parse_config, read_config
from flowforge.errors import ConfigError, FlowforgeError
from flowforge.train import TrainerConfig


@dataclass
class Inner:
    depth: int = 1


@dataclass
class Model:
    width: int = 8
    scale: float = 1.0
    name: str = "a"
    enabled: bool = True
    hidden: list[int] = field(default_factory=lambda: [4])
    shape: tuple[int, ...] = (1, 2)
    limit: float | None = None
    options: dict = field(default_factory=dict)
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self) -> None:
        check_range("scale", self.scale, low=0, low_open=True)
        check_choice("name", self.name, ("a", "b", "alpha"))


@dataclass
class Run:
    model: Model = field(default_factory=Model)


@dataclass
class Training:
    train: TrainerConfig = field(default_factory=TrainerConfig)


def test_values_are_typed_and_converted() -> None:
    text = (
        '[model]\nwidth = 3\nscale = 2\nname = "b"\nenabled = false\nhidden = [1, 2]\nshape = [3, 4]\n'
        "limit = 0.5\noptions = { a = 1 }\ninner = { depth = 5 }\n"
    )
    model = parse_config(Run, text, "r.toml").model
    assert model == Model(3, 2.0, "b", False, [1, 2], (3, 4), 0.5, {"a": 1}, Inner(5))
    assert isinstance(model.scale, float) and isinstance(model.shape, tuple)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[model]\nwidth = 1.5", "r.toml: [model] width = 1.5: expected an integer"),
        ("[model]\nwidth = true", "r.toml: [model] width = True: expected an integer"),
        ('[model]\nwidth = "64"', "r.toml: [model] width = '64': expected an integer"),
        ("[model]\nname = 3", "r.toml: [model] name = 3: expected a string (in quotes)"),
        ("[model]\nenabled = 1", "r.toml: [model] enabled = 1: expected true or false"),
        ('[model]\nhidden = [1, "x"]', "r.toml: [model] hidden[1] = 'x': expected an integer"),
        ("[model]\nhidden = 3", "r.toml: [model] hidden = 3: expected a list of int"),
        ('[model]\nlimit = "x"', "r.toml: [model] limit = 'x': expected float or none"),
        ("[model]\ninner = { deep = 2 }", "r.toml: [model] inner has no setting 'deep' (did you mean 'depth'?)"),
        ("[model]\nwidht = 2", "r.toml: [model] has no setting 'widht' (did you mean 'width'?)"),
        ("[modle]\nwidth = 2", "r.toml: unknown table [modle] (did you mean [model]?)"),
        ("model = 3", "r.toml: model = 3 must be a table [model]"),
        ("[model]\nscale = nan", "r.toml: [model] scale = nan: expected a finite number > 0"),
        ("[model]\nwidth = nan", "r.toml: [model] width = nan: expected an integer"),
        ("[model]\nlimit = nan", "r.toml: [model] limit = nan: expected a finite number (or none)"),
        ("[model]\ninner = nan", "r.toml: [model] inner = nan: expected a table"),
        ("[model]\nscale = -1", "r.toml: [model] scale = -1.0: expected a finite number > 0"),
        ('[model]\nname = "alpah"', "r.toml: [model] name = 'alpah' is not one of a, b, alpha (did you mean 'alpha'?)"),
        ("[model\n", "r.toml: not valid TOML"),
    ],
)
def test_each_error_names_file_table_key_value_and_what_is_allowed(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(Run, text, "r.toml")
    assert str(caught.value).startswith(message), str(caught.value)
    assert "\n" not in str(caught.value) and isinstance(caught.value, FlowforgeError)


def test_nan_for_an_integer_or_optional_number_is_refused_with_the_settings_range() -> None:
    """TOML's nan reaches the dataclass's own check, which names the range; nothing is built."""
    for setting, message in (
        ("ema_decay", "ema_decay = nan: expected a finite number > 0 and < 1 (or none)"),
        ("max_grad_norm", "max_grad_norm = nan: expected a finite number > 0 (or none)"),
        ("steps", "steps = nan: expected an integer >= 1"),
    ):
        with pytest.raises(ConfigError, match=re.escape(f"r.toml: [train] {message}")):
            parse_config(Training, f"[train]\n{setting} = nan", "r.toml")


def test_overrides_set_nested_values_and_refuse_paths_through_settings() -> None:
    model = parse_config(Run, "[model]\nwidth = 3", "r.toml", ["model.width=5", "model.inner.depth=7", "model.name=b"])
    assert (model.model.width, model.model.inner.depth, model.model.name) == (5, 7, "b")
    with pytest.raises(ConfigError, match=r"model\.width is a setting \(3\), not a table"):
        apply_overrides({"model": {"width": 3}}, ["model.width.x=1"])
    for bad in ("width=3", "model.=3", "model.width", "model.width=[1,"):
        with pytest.raises(ConfigError, match="override"):
            apply_overrides({}, [bad])


def test_files_that_are_missing_or_not_text_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        read_config(Run, tmp_path / "none.toml")
    with pytest.raises(ConfigError, match=r"a folder, not a config file; give a \.toml file"):
        read_config(Run, tmp_path)
    binary = tmp_path / "b.toml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(ConfigError, match="not a text file"):
        read_config(Run, binary)
    nul = tmp_path / "n.toml"
    nul.write_bytes(b"[model]\x00")
    with pytest.raises(ConfigError, match="not a text file"):
        read_config(Run, nul)


def test_range_checks() -> None:
    check_range("p", 0.5, low=0, high=1)
    check_range("p", None, low=0, optional=True)
    for value in (float("inf"), -0.1, 1.5, True, "1"):
        with pytest.raises(ConfigError, match=r"^p = .*: expected a finite number >= 0 and <= 1$"):
            check_range("p", value, low=0, high=1)


def test_an_integer_beyond_a_float_or_64_bits_is_refused_naming_it_wherever_it_sits() -> None:
    huge = 10**400
    with pytest.raises(ConfigError, match=r"lr = 1000.*\(401 digits\): expected a finite number > 0"):
        TrainerConfig(lr=huge)
    with pytest.raises(ConfigError, match=r"x = 1000.*401 digits.*expected a finite number"):
        check_range("x", huge)
    from flowforge.runs.density import RunConfig as DensityRunConfig

    text = '[data]\nname = "moons"\n[model]\nkind = "realnvp"\n[train]\nsteps = 1\n'
    with pytest.raises(ConfigError, match=r"\[train\] lr = .*expected a number of a float's range"):
        parse_config(DensityRunConfig, text, overrides=[f"train.lr={huge}"])
    with pytest.raises(ConfigError, match=r"options\.hidden\[0\] = 9{20}: expected integers of at most 64"):
        parse_config(DensityRunConfig, text, overrides=["model.options.hidden=[99999999999999999999]"])
