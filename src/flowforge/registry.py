"""One table of named things, and the one way a saved model is rebuilt.

**The table.** Every model a run or a checkpoint can name (flow recipes, flow matchers, policies),
every part passed to a model's constructor (velocity networks, probability paths, couplings, time
samplers) and every activation class has a registered name in a category:

>>> from flowforge import registry
>>> registry.lookup("model", "realnvp").__name__
'RealNVP'
>>> "tanh" in registry.names("activation")
True

The command line (``flowforge list``), the run layer and every ``load`` read this table; nothing
keeps a list of its own. A class joins the table when its module is imported: ``import flowforge``
registers every density model and its parts; policies join with ``import flowforge.policy``.

**The rebuild contract.** Registering a class with :func:`register` records, at the end of each
construction, *every* argument its constructor was called with, defaults applied (the signature is
bound, so no argument can be left out by hand). :func:`to_config` turns them into JSON:

* numbers, strings, booleans and ``None`` as they are; tuples and lists as lists; dicts with string keys;
* a class given as an argument (``activation=torch.nn.Tanh``) by its registered name,
  ``{"__class__": "tanh"}``;
* an instance of a registered class (a velocity network inside a matcher, a flow inside
  :class:`~flowforge.flows.Dequantized`) by its own config, ``{"__object__": name, "arguments": {...}}``;
* a registered dataclass by its fields.

Anything else (an unregistered activation, a hand-written network) is refused when the model is
saved, by a :class:`~flowforge.errors.RebuildError` naming the argument and its type, never
dropped. :func:`from_config` calls the constructors again with the decoded arguments. A
constructor refuses settings it would not read (another head's in a policy config, the flow
posterior's in a Gaussian VAE) with :func:`refuse_unread`, which lets them pass while
:func:`from_config` runs (:func:`rebuilding`): a model saved before it refused them still
rebuilds, and such settings never did anything.

>>> import torch
>>> from flowforge.flows import RealNVP
>>> flow = RealNVP(2, transforms=2, hidden=(16,), activation=torch.nn.Tanh)
>>> config = registry.to_config(flow)
>>> config["__object__"], config["arguments"]["activation"], config["arguments"]["hidden"]
('realnvp', {'__class__': 'tanh'}, [16])
>>> type(registry.from_config(config)).__name__
'RealNVP'
"""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from flowforge.errors import CheckpointError, ConfigError, RebuildError

T = TypeVar("T", bound=type)

#: category -> name -> class. Categories: model, policy, velocity, path, coupling, time, activation, config.
_TABLE: dict[str, dict[str, type]] = {}
#: class -> (category, name), for encoding.
_NAMES: dict[type, tuple[str, str]] = {}
_ARGUMENTS = "_rebuild_arguments"


def _add(cls: type, category: str, name: str) -> None:
    table = _TABLE.setdefault(category, {})
    if name in table and table[name] is not cls:
        raise ValueError(f"{category} name {name!r} is already registered for {table[name].__qualname__}")
    table[name] = cls
    _NAMES[cls] = (category, name)


def register_class(cls: type, name: str, category: str = "activation") -> type:
    """Give ``cls`` a name under which it is stored when passed as an argument (activations)."""
    _add(cls, category, name)
    return cls


def register(name: str, category: str = "model") -> Callable[[T], T]:
    """Class decorator: name the class and record its constructor arguments (see the module docstring).

    Dataclasses are stored by their fields and need no recording.
    """

    def decorate(cls: T) -> T:
        _add(cls, category, name)
        if dataclasses.is_dataclass(cls):
            return cls
        init = cls.__init__  # the effective constructor, possibly inherited
        signature = inspect.signature(init)

        @functools.wraps(init)
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            init(self, *args, **kwargs)
            if type(self).__init__ is __init__:  # the outermost registered constructor records
                bound = signature.bind(self, *args, **kwargs)
                bound.apply_defaults()
                arguments = {k: _snapshot(v) for k, v in list(bound.arguments.items())[1:]}  # without self
                object.__setattr__(self, _ARGUMENTS, (signature, arguments))

        cls.__init__ = __init__
        return cls

    return decorate


def names(category: str) -> tuple[str, ...]:
    """The registered names of a category, in registration order."""
    return tuple(_TABLE.get(category, {}))


def lookup(category: str, name: str) -> type:
    """The class registered as ``name`` in ``category``; a ``ValueError`` with close matches otherwise."""
    table = _TABLE.get(category, {})
    if name not in table:
        close = difflib.get_close_matches(str(name), list(table), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown {category} {name!r}{hint}; known: {', '.join(table)}")
    return table[name]


def name_of(obj: object) -> tuple[str, str] | None:
    """``(category, name)`` of a registered class or of an instance's class; ``None`` if unregistered."""
    cls = obj if isinstance(obj, type) else type(obj)
    return _NAMES.get(cls)


# ---------------------------------------------------------------- encoding
def constructor_repr(obj: object) -> str:
    """``Name(argument=value, ...)``: a registered object shown by the arguments it was built with
    (its public attributes when none were recorded)."""
    recorded = getattr(obj, _ARGUMENTS, None)
    if recorded is None:
        fields = {k: v for k, v in vars(obj).items() if not k.startswith("_")}
    else:
        signature, arguments = recorded
        variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        fields = {k: v for k, v in arguments.items() if v or signature.parameters[k].kind not in variadic}
    return f"{type(obj).__name__}({', '.join(f'{k}={v!r}' for k, v in fields.items())})"


def _snapshot(value: Any) -> Any:
    """An argument as recorded: containers copied (a list the caller changes later must not change
    the saved model), NumPy scalars and arrays and one-number tensors as the Python values they
    stand for (constructors accept them; a checkpoint stores JSON). Parts stay as they are."""
    if isinstance(value, list | tuple):
        return type(value)(_snapshot(v) for v in value) if type(value) in (list, tuple) else [*map(_snapshot, value)]
    if isinstance(value, range):
        return list(value)
    if isinstance(value, dict):
        return {k: _snapshot(v) for k, v in value.items()}
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dim() <= 1:
        return value.item() if value.dim() == 0 else [value.item()]
    return value


def _describe_type(value: object) -> str:
    cls = value if isinstance(value, type) else type(value)
    return f"{cls.__module__}.{cls.__qualname__}"


def _encode(value: Any, where: str) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, tuple | list):
        return [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if not all(isinstance(k, str) and not k.startswith("__") for k in value):
            raise RebuildError(f"argument {where} is a dict whose keys are not plain strings; it cannot be stored")
        return {k: _encode(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, type):
        registered = _NAMES.get(value)
        if registered is None:
            raise RebuildError(
                f"argument {where} is the class {_describe_type(value)}, which has no registered name; "
                "register it with flowforge.registry.register_class(cls, name) before saving"
            )
        return {"__class__": registered[1]}
    registered = _NAMES.get(type(value))
    if registered is not None:
        return _encode_object(value, registered[1], where)
    raise RebuildError(
        f"argument {where} is a {_describe_type(value)}, which has no registered name, so the model could not be "
        "rebuilt from its checkpoint; use a registered part (flowforge list) or register the class with "
        "flowforge.registry.register(name, category)"
    )


def _encode_object(value: Any, name: str, where: str) -> dict[str, Any]:
    if dataclasses.is_dataclass(value):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value) if f.init}
        return {"__object__": name, "arguments": {k: _encode(v, f"{where}.{k}") for k, v in fields.items()}}
    recorded = getattr(value, _ARGUMENTS, None)
    if recorded is None:
        raise RebuildError(
            f"{where} is a {type(value).__qualname__} built without its registered constructor; it cannot be stored"
        )
    signature, arguments = recorded
    variadic = {p.name for p in signature.parameters.values() if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    arguments = {k: v for k, v in arguments.items() if not (k in variadic and not v)}  # no empty *args
    return {"__object__": name, "arguments": {k: _encode(v, f"{where}.{k}") for k, v in arguments.items()}}


def to_config(model: object) -> dict[str, Any]:
    """The JSON config that rebuilds ``model`` with :func:`from_config` (every constructor argument).

    Raises :class:`~flowforge.errors.RebuildError` when the model's class or one of its arguments
    has no registered name.
    """
    registered = _NAMES.get(type(model))
    if registered is None or not (dataclasses.is_dataclass(model) or hasattr(model, _ARGUMENTS)):
        raise RebuildError(
            f"a {_describe_type(model)} cannot be saved so that it rebuilds: its class is not registered "
            "(flowforge list shows what is); save its state_dict with flowforge.checkpoint.save_checkpoint "
            "and rebuild it in code"
        )
    return _encode_object(model, registered[1], type(model).__qualname__)


def _decode(value: Any, where: str) -> Any:
    if isinstance(value, list):
        return [_decode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if set(value) == {"__class__"}:
            return _lookup_any(value["__class__"], where)
        if "__object__" in value:
            return from_config(value, where)
        return {k: _decode(v, f"{where}.{k}") for k, v in value.items()}
    return value


def _lookup_any(name: Any, where: str) -> type:
    for table in _TABLE.values():
        if name in table:
            return table[name]
    raise CheckpointError(f"{where} names {name!r}, which is not a registered name (flowforge list)")


def from_config(config: dict[str, Any], where: str = "config") -> Any:
    """Build the object a :func:`to_config` dict describes (a :class:`CheckpointError` if it cannot)."""
    if not isinstance(config, dict) or not isinstance(config.get("__object__"), str):
        raise CheckpointError(f"{where} is not a flowforge model config (no '__object__' name)")
    arguments = config.get("arguments", {})
    if not isinstance(arguments, dict):
        raise CheckpointError(f"{where}: 'arguments' must be a JSON object, got {type(arguments).__name__}")
    cls = _lookup_any(config["__object__"], where)
    decoded = {k: _decode(v, f"{where}.{k}") for k, v in arguments.items()}
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    if dataclasses.is_dataclass(cls):
        kwargs = decoded
    else:
        parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
        # Arguments before a *args parameter must be passed by position.
        variadic = next((i for i, p in enumerate(parameters) if p.kind is p.VAR_POSITIONAL), -1)
        for index, parameter in enumerate(parameters):
            if parameter.name not in decoded:
                continue
            value = decoded.pop(parameter.name)
            if parameter.kind is parameter.VAR_POSITIONAL:
                args.extend(value)
            elif parameter.kind is parameter.VAR_KEYWORD:
                kwargs.update(value)
            elif parameter.kind is parameter.POSITIONAL_ONLY or index < variadic:
                args.append(value)
            else:
                kwargs[parameter.name] = value
        if decoded:
            raise CheckpointError(f"{where}: {cls.__qualname__} takes no argument(s) {', '.join(sorted(decoded))}")
    token = _REBUILDING.set(True)
    try:
        return cls(*args, **kwargs)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{where} does not build a {cls.__qualname__}: {error}") from error
    finally:
        _REBUILDING.reset(token)


_REBUILDING = contextvars.ContextVar("flowforge_rebuilding", default=False)


def record_arguments(model: object, **changes: Any) -> None:
    """Record changed constructor arguments of a registered ``model`` (a setting changed after it
    was built, through a method that checks it), so that a saved model rebuilds with them."""
    recorded = getattr(model, _ARGUMENTS, None)
    if recorded is not None:
        signature, arguments = recorded
        arguments.update({name: value for name, value in changes.items() if name in signature.parameters})


def rebuilding() -> bool:
    """Whether the constructor running now is :func:`from_config` rebuilding a saved config."""
    return _REBUILDING.get()


def _signature_default(cls: type, name: str) -> Any:
    """The default of constructor argument ``name`` in ``cls`` or the nearest base that takes it."""
    for klass in cls.__mro__[:-1]:  # not object
        parameter = inspect.signature(klass).parameters.get(name)
        if parameter is not None:
            return parameter.default
    raise KeyError(f"{cls.__qualname__} takes no argument {name!r}")


def refuse_unread(cls: type, given: dict[str, Any], why: str) -> None:
    """Refuse settings a ``cls`` being built would not read: the first of ``given`` (name -> value)
    that is not its default raises ``ConfigError("name = value: why; leave it out")``. The default
    is read from the signature of ``cls`` or, for a subclass whose own constructor does not name
    the setting, of the nearest base that does. Skipped while :func:`from_config` rebuilds a saved
    config (see the module docstring); the values themselves are checked by the constructor either
    way."""
    if rebuilding():
        return
    factories = {f.name: f.default_factory for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
    for name, value in given.items():
        factory = factories.get(name, dataclasses.MISSING)
        default = _signature_default(cls, name) if factory is dataclasses.MISSING else factory()
        same = list(value) == list(default) if isinstance(default, tuple | list) else value == default
        if not same:
            shown = repr(_NAMES[value][1]) if isinstance(value, type) and value in _NAMES else repr(value)
            raise ConfigError(f"{name} = {shown}: {why}; leave it out")


class Rebuildable:
    """Mixin: ``model.to_config()`` and ``Class.from_config(config)`` through this module."""

    def to_config(self) -> dict[str, Any]:
        """The JSON config that rebuilds this model (see :func:`flowforge.registry.to_config`)."""
        return to_config(self)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Any:
        """Rebuild a model from :meth:`to_config`'s output; refuses a config of another class."""
        model = from_config(config)
        if not isinstance(model, cls):
            raise CheckpointError(f"the config describes a {type(model).__qualname__}, not a {cls.__qualname__}")
        return model


for _name, _activation in (
    ("relu", nn.ReLU),
    ("tanh", nn.Tanh),
    ("gelu", nn.GELU),
    ("silu", nn.SiLU),
    ("elu", nn.ELU),
    ("leaky-relu", nn.LeakyReLU),
    ("softplus", nn.Softplus),
    ("sigmoid", nn.Sigmoid),
    ("mish", nn.Mish),
):
    register_class(_activation, _name, "activation")

__all__ = [
    "Rebuildable",
    "constructor_repr",
    "from_config",
    "lookup",
    "name_of",
    "names",
    "rebuilding",
    "record_arguments",
    "refuse_unread",
    "register",
    "register_class",
    "to_config",
]
