"""The one config reader: TOML files (plus ``--set`` overrides) into typed, checked dataclasses.

Every run config (``flowforge train``) and policy config (``flowforge policy train``) is a
dataclass of tables, each table a dataclass of settings. :func:`read_config` reads the file,
applies overrides, and builds the dataclasses field by field against their type hints:

* ``int`` takes integers only (not ``1.5``, not ``true``); ``float`` takes integers and floats;
  ``str`` takes strings only (``--set policy.width='"64"'`` is refused, not passed on);
  ``bool`` takes ``true``/``false`` only; ``X | None`` also takes an absent value;
  ``list[X]`` and ``tuple[X, ...]`` check every element; nested dataclasses are nested tables;
  ``dict`` takes any table (model options, checked by the model they are given to).
* An unknown table or key is refused with the closest known name as a hint.
* Ranges are checked where each dataclass is built (its ``__post_init__``), whose messages
  start with the key; the reader prefixes the file and the table.

Every problem is a :class:`~flowforge.errors.ConfigError` whose one-line message names the file,
the table, the key, the value and what is allowed, raised before anything is written.

>>> from dataclasses import field, make_dataclass
>>> Train = make_dataclass("Train", [("steps", int, 10), ("lr", float, 1e-3)])
>>> Run = make_dataclass("Run", [("train", Train, field(default_factory=Train))])
>>> parse_config(Run, "[train]\\nsteps = 5", "run.toml", ["train.lr=0.01"]).train
Train(steps=5, lr=0.01)
>>> parse_config(Run, "[train]\\nstep = 5", "run.toml")
Traceback (most recent call last):
    ...
flowforge.errors.ConfigError: run.toml: [train] has no setting 'step' (did you mean 'steps'?)
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

from flowforge.errors import ConfigError
from flowforge.validation import is_count

T = TypeVar("T")


def read_document(path: str | Path) -> dict[str, Any]:
    """The TOML document in ``path`` (a :class:`ConfigError` for a missing, binary or malformed file)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: a folder, not a config file; give a .toml file")
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not a text file (byte {error.start} is not UTF-8); give a TOML config") from error
    return parse_document(text, str(path))


def parse_document(text: str, source: str) -> dict[str, Any]:
    """Parse TOML text, naming ``source`` in the error."""
    if "\x00" in text:
        raise ConfigError(f"{source}: not a text file (it holds NUL bytes); give a TOML config")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{source}: not valid TOML ({error})") from error


def apply_overrides(document: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``table.key=value`` overrides (value in TOML syntax; a bare word is a string).

    Deeper paths set entries of inline tables: ``model.options.hidden=[32]``. A path through a
    setting that is not a table (``train.steps.x=1``) is refused.
    """
    for override in overrides or []:
        if not isinstance(override, str) or "=" not in override:
            raise ConfigError(f"override {override!r} must look like table.key=value, e.g. train.steps=100")
        path, raw = (part.strip() for part in override.split("=", 1))
        keys = path.split(".")
        if len(keys) < 2 or not all(keys):
            raise ConfigError(f"override {override!r} must look like table.key=value, e.g. train.steps=100")
        try:
            value = tomllib.loads(f"value = {raw}")["value"]
        except tomllib.TOMLDecodeError:
            if not raw or any(c in raw for c in "[]{}\"'="):
                raise ConfigError(f"override {override!r}: {raw!r} is not a TOML value") from None
            value = raw  # a bare word is a string
        target = document
        for depth, key in enumerate(keys[:-1]):
            inner = target.setdefault(key, {})
            if not isinstance(inner, dict):
                where = ".".join(keys[: depth + 1])
                raise ConfigError(f"override {override!r}: {where} is a setting ({inner!r}), not a table")
            target = inner
        target[keys[-1]] = value
    return document


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin in (list, tuple):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if annotation is type(None):
        return "none"
    if dataclasses.is_dataclass(annotation):
        return "a table"
    if annotation is dict or origin is dict:
        return "a table"
    return getattr(annotation, "__name__", str(annotation))


def _coerce(annotation: Any, value: Any, where: str) -> Any:
    """``value`` checked against ``annotation`` (and converted: int -> float, list -> tuple)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where} = {value!r}: expected {_type_name(annotation)}")
    if annotation is Any:
        return value
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} = {value!r}: expected a table")
        return build_dataclass(annotation, value, where)
    if origin in (list, tuple) or annotation in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"{where} = {value!r}: expected {_type_name(annotation)}")
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        items = [_coerce(args[0], v, f"{where}[{i}]") if args else v for i, v in enumerate(value)]
        return tuple(items) if (origin or annotation) is tuple else items
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} = {value!r}: expected a table")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} = {value!r}: expected true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} = {value!r}: expected an integer")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} = {value!r}: expected a number")
        try:
            return float(value)
        except OverflowError:  # an integer beyond any float
            raise ConfigError(
                f"{where} = {_short(value)}: expected a number of a float's range (|value| < 1.8e308)"
            ) from None
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} = {value!r}: expected a string (in quotes)")
        return value
    raise ConfigError(f"{where}: settings of type {annotation!r} cannot be read from a config")  # pragma: no cover


def _kinds(annotation: Any) -> tuple[Any, ...]:
    """The types a setting of this annotation may take: its own, and each of a union's."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    return (annotation, *typing.get_args(annotation)) if union else (annotation,)


def _numeric(annotation: Any) -> bool:
    """Whether a setting of this type is a number (an int, a float, or either or none)."""
    return int in _kinds(annotation) or float in _kinds(annotation)


def _nan_refused(where: str, key: str, annotation: Any) -> ConfigError:
    """The refusal of ``nan`` for a setting whose type takes no nan (an integer, an optional number)."""
    kinds = _kinds(annotation)
    expected = "a finite number" if float in kinds else "an integer"
    return ConfigError(f"{where} {key} = nan: expected {expected}{' (or none)' if type(None) in kinds else ''}")


def build_dataclass(cls: type[T], values: dict[str, Any], where: str) -> T:
    """Build ``cls`` from a table, checking every key and value (``where``: e.g. ``run.toml: [train]``)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a table, got {values!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    checked, nan_keys = {}, []
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known: {', '.join(fields)}"
            raise ConfigError(f"{where} has no setting {key!r}{hint}")
        if isinstance(value, float) and math.isnan(value) and hints[key] is not float:
            if not _numeric(hints[key]):
                raise ConfigError(f"{where} {key} = nan: expected {_type_name(hints[key])}")
            # TOML's nan for an integer or an optional number: the dataclass's own check names its range.
            nan_keys.append(key)
            checked[key] = value
            continue
        checked[key] = _coerce(hints[key], value, f"{where} {key}")
    try:
        built = cls(**checked)
    except (ConfigError, ValueError, TypeError) as error:
        if nan_keys and not any(key in str(error) for key in nan_keys):
            raise _nan_refused(where, nan_keys[0], hints[nan_keys[0]]) from error
        raise ConfigError(f"{where} {error}") from error
    if nan_keys:  # no check of the dataclass's looked at it
        raise _nan_refused(where, nan_keys[0], hints[nan_keys[0]])
    # After the dataclass's own checks (their bounds say more): an integer no check bounded must
    # still fit TOML's 64 bits, or it overflows torch's sizes later (inside tables and lists too).
    for key, value in checked.items():
        for path, number in _integers(key, value):
            if not -(2**63) <= number < 2**63:
                raise ConfigError(
                    f"{where} {path} = {_short(number)}: expected integers of at most 64 bits (|value| < 2**63)"
                )
    return built


def _integers(path: str, value: Any) -> typing.Iterator[tuple[str, int]]:
    """Every integer in ``value`` (a setting, a table of settings, lists), with its path (``options.hidden[0]``)."""
    if isinstance(value, bool):
        return
    if isinstance(value, int):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _integers(f"{path}.{key}", item)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _integers(f"{path}[{index}]", item)


def _finite(value: int | float) -> bool:
    """Finite as a float: NaN, inf and an integer beyond a float's range are not."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _short(value: Any) -> str:
    """A value for a message, a huge integer shortened (401 digits say nothing more than 30)."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} digits)"


def parse_config(cls: type[T], text: str, source: str = "config", overrides: list[str] | None = None) -> T:
    """Build the config dataclass ``cls`` (a dataclass whose fields are tables) from TOML text."""
    document = apply_overrides(parse_document(text, source), overrides)
    return build_config(cls, document, source)


def read_config(cls: type[T], path: str | Path, overrides: list[str] | None = None) -> T:
    """Build the config dataclass ``cls`` from a TOML file plus ``table.key=value`` overrides."""
    document = apply_overrides(read_document(path), overrides)
    return build_config(cls, document, str(path))


def build_config(cls: type[T], document: dict[str, Any], source: str) -> T:
    """Build the config dataclass ``cls``, whose fields are tables, from a parsed document."""
    hints = get_type_hints(cls)
    tables = [f.name for f in dataclasses.fields(cls)]
    for name, value in document.items():
        if name not in tables:
            close = difflib.get_close_matches(name, tables, n=1)
            hint = f" (did you mean [{close[0]}]?)" if close else ""
            raise ConfigError(f"{source}: unknown table [{name}]{hint}; known: {', '.join(tables)}")
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {name} = {value!r} must be a table [{name}]")
    built = {name: build_dataclass(hints[name], document.get(name, {}), f"{source}: [{name}]") for name in tables}
    try:
        return cls(**built)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{source}: {error}") from error


def check_choice(key: str, value: Any, allowed: typing.Iterable[Any]) -> None:
    """Refuse ``value`` unless it is one of ``allowed``: ``key = 'x' is not one of a, b (did you mean ...)``."""
    allowed = list(allowed)
    if value in allowed:
        return
    close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"{key} = {value!r} is not one of {', '.join(map(str, allowed))}{hint}")


#: The largest seed: NumPy's generators and MetaWorld's tasks take 32-bit seeds.
MAX_SEED = 2**32 - 1


def plain_numbers(config: Any) -> None:
    """Replace the NumPy scalars among a config dataclass's fields (and in its lists) by the Python
    numbers they hold, before its checks: ``np.int64(3)`` from a data set's shape is the integer 3
    to every check, and a saved config names only Python types."""

    def plain(value: Any) -> Any:
        if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
            return value.item()
        if isinstance(value, list):
            return [plain(item) for item in value]
        return value

    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        converted = plain(value)
        if converted is not value:
            object.__setattr__(config, field.name, converted)


def check_integer(key: str, value: Any, *, low: int = 1, high: int | None = None, note: str = "") -> int:
    """Refuse anything but an integer in ``[low, high]`` (bools excluded): ``key = v: expected an integer >= 1``;
    ``note`` says where ``high`` comes from. Returns it as a Python int."""
    if not is_count(value, low, high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"{key} = {value!r}: expected an integer {allowed}{note}")
    return int(value)


def check_flag(key: str, value: Any, optional: bool = False) -> None:
    """Refuse anything but ``True`` or ``False`` (``None`` too where ``optional``):
    ``key = v: expected true or false``."""
    if not isinstance(value, bool) and not (optional and value is None):
        raise ConfigError(f"{key} = {value!r}: expected true or false" + (" (or none)" if optional else ""))


def check_seed(key: str, value: Any) -> int:
    """Check a seed: an integer in ``[0, MAX_SEED]``, bools excluded."""
    return check_integer(key, value, low=0, high=MAX_SEED, note=" (2**32 - 1)")


def check_range(
    key: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
) -> None:
    """Refuse a number outside ``[low, high]`` (open ends where asked), NaN and inf: ``key = v: expected ...``."""
    if value is None and optional:
        return
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        bounds.append(f"{'<' if high_open else '<='} {high:g}")
    expected = "a finite number" + (" " + " and ".join(bounds) if bounds else "")
    if optional:
        expected += " (or none)"
    if isinstance(value, bool) or not isinstance(value, int | float) or not _finite(value):
        raise ConfigError(f"{key} = {_short(value)}: expected {expected}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ConfigError(f"{key} = {value!r}: expected {expected}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ConfigError(f"{key} = {value!r}: expected {expected}")


def name_list(option: str, text: str, allowed: typing.Iterable[str], kind: str) -> list[str]:
    """A comma-separated option (``--tasks``, ``--cameras``) as its names, each non-empty, one of
    ``allowed`` and given once; a :class:`ConfigError` names the option, its text and the fault.
    ``kind`` says what a name is (``"MetaWorld v3 task"``)."""
    allowed = list(allowed)
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise ConfigError(f"{option} {text!r}: an empty name; give comma-separated names, e.g. {','.join(allowed[:2])}")
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise ConfigError(f"{option} {text!r}: unknown {kind} {unknown[0]!r}; known: {', '.join(allowed)}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"{option} {text!r}: {', '.join(repeated)} named more than once; name each once")
    return names


__all__ = [
    "apply_overrides",
    "build_config",
    "build_dataclass",
    "check_choice",
    "check_integer",
    "check_range",
    "check_seed",
    "name_list",
    "parse_config",
    "parse_document",
    "read_config",
    "read_document",
]
