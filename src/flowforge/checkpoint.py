"""Checkpoint directories: safetensors for tensors, JSON for everything else, never pickle.

A checkpoint is a directory holding

* ``checkpoint.json``, the manifest: a format tag, the config that rebuilds the model (its
  registered name and every constructor argument, :mod:`flowforge.registry`), its dtype, any JSON
  metadata, and for every tensor file its name and SHA-256;
* tensor files (``model-<hash>.safetensors``, ``optimizer-<hash>.safetensors``, ...), named by
  their content so that a new save never overwrites a file the current manifest points to.

Every file is written to a temporary name, flushed to disk and renamed into place, and the
manifest is written last, so a process killed at any moment leaves either the previous
checkpoint or the new one, never a mix; stale tensor files are removed after the manifest is in
place. Loading checks the format tag and every file's hash, so a truncated, tampered or foreign
file fails with a :class:`CheckpointError` naming the file, and nothing is ever unpickled.

Non-tensor state that is not plain JSON (optimizer state dicts have integer keys and tuples) is
encoded losslessly by :func:`encode_state` and restored by :func:`decode_state`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import Tensor

from flowforge import registry
from flowforge.errors import CheckpointError

FORMAT = "flowforge-checkpoint"
VERSION = 2  # 2: the model is stored as a registry config under "model"; 1: "class" + "config"
MANIFEST = "checkpoint.json"


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and a rename."""
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def encode_state(value: Any, tensors: dict[str, Tensor], prefix: str = "t") -> Any:
    """Turn a nested state (dicts, lists, tuples, numbers, strings, tensors) into JSON plus named tensors.

    Tensors are moved into ``tensors`` and replaced by ``{"__tensor__": name}``; tuples and dicts
    with non-string keys are tagged so that :func:`decode_state` restores them exactly.
    """
    if isinstance(value, Tensor):
        name = f"{prefix}{len(tensors)}"
        tensors[name] = value.detach().cpu().contiguous()
        return {"__tensor__": name}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: encode_state(v, tensors, prefix) for k, v in value.items()}
        return {
            "__items__": [
                [encode_state(k, tensors, prefix), encode_state(v, tensors, prefix)] for k, v in value.items()
            ]
        }
    if isinstance(value, tuple):
        return {"__tuple__": [encode_state(v, tensors, prefix) for v in value]}
    if isinstance(value, list):
        return [encode_state(v, tensors, prefix) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint (only tensors and JSON-like values)")


def decode_state(value: Any, tensors: dict[str, Tensor]) -> Any:
    """Inverse of :func:`encode_state`."""
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return tensors[value["__tensor__"]]
        if set(value) == {"__items__"}:
            return {decode_state(k, tensors): decode_state(v, tensors) for k, v in value["__items__"]}
        if set(value) == {"__tuple__"}:
            return tuple(decode_state(v, tensors) for v in value["__tuple__"])
        return {k: decode_state(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_state(v, tensors) for v in value]
    return value


def save_checkpoint(
    directory: str | Path, tensor_files: dict[str, dict[str, Tensor]], manifest: dict[str, Any]
) -> Path:
    """Write a checkpoint directory: one safetensors file per entry of ``tensor_files``, then the manifest.

    Arguments:
        directory: created if needed.
        tensor_files: ``{"model": state_dict, "optimizer": {...}, ...}``: named groups of tensors.
        manifest: JSON-serialisable description (class, config, metadata); the file list is added.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for group, tensors in tensor_files.items():
        data = save_safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        digest = hashlib.sha256(data).hexdigest()
        name = f"{group}-{digest[:16]}.safetensors"
        if not (directory / name).exists():
            write_atomic(directory / name, data)
        files[group] = {"file": name, "sha256": digest}
    document = {"format": FORMAT, "version": VERSION, **manifest, "files": files}
    write_atomic(directory / MANIFEST, (json.dumps(document, indent=2, allow_nan=True) + "\n").encode())
    keep = {entry["file"] for entry in files.values()}
    for stale in directory.glob("*.safetensors"):
        if stale.name not in keep:
            stale.unlink(missing_ok=True)
    return directory


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The checkpoint's manifest, after checking that it is one of ours."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a flowforge checkpoint: {MANIFEST} is missing")
    try:
        document = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}); the file is truncated or not ours") from error
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a flowforge checkpoint (no format tag {FORMAT!r})")
    if document.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} has format version {document['version']}; this flowforge reads up to {VERSION}")
    return document


def load_tensors(directory: str | Path, group: str, manifest: dict[str, Any] | None = None) -> dict[str, Tensor]:
    """The tensors of ``group`` (e.g. ``"model"``), after checking the file's SHA-256 against the manifest."""
    directory = Path(directory)
    manifest = manifest if manifest is not None else read_manifest(directory)
    entry = manifest.get("files", {}).get(group)
    if entry is None:
        raise CheckpointError(f"checkpoint {directory} holds no {group!r} tensors")
    path = directory / entry["file"]
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise CheckpointError(f"{path} does not match its recorded SHA-256: the file is truncated or was modified")
    try:
        return load_safetensors_bytes(data)
    except SafetensorError as error:  # pragma: no cover - a matching hash makes this unreachable in practice
        raise CheckpointError(f"{path} is not a valid safetensors file ({error})") from error


def load_state_dict_checked(module: torch.nn.Module, state: dict[str, Tensor], source: str | Path) -> None:
    """``module.load_state_dict(state)`` with a message naming the checkpoint when the shapes or keys differ."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"the weights in {source} do not fit this {type(module).__name__}: {error}") from error


def model_manifest(model: torch.nn.Module) -> dict[str, Any]:
    """The manifest entries that rebuild ``model``: ``model`` (its registry config) and ``dtype``.

    Raises :class:`~flowforge.errors.RebuildError` when the model cannot be rebuilt from a config.
    """
    parameter = next(model.parameters(), None)
    dtype = parameter.dtype if parameter is not None else torch.get_default_dtype()
    return {"model": registry.to_config(model), "dtype": str(dtype).removeprefix("torch.")}


def save_model(directory: str | Path, model: torch.nn.Module, metadata: dict | None = None) -> Path:
    """Save a registered model's weights and the config that rebuilds it (see :func:`load_model`)."""
    manifest = {**model_manifest(model), "metadata": metadata or {}}
    return save_checkpoint(directory, {"model": model.state_dict()}, manifest)


def _legacy_config(manifest: dict[str, Any], directory: Path) -> dict[str, Any]:
    """A version-1 manifest ("class": a Python class name, "config": plain keyword arguments) as a registry config."""
    name, config = manifest.get("class"), manifest.get("config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{directory}: the manifest holds no model config to rebuild from")
    for category in ("model", "policy"):
        for registered in registry.names(category):
            if registry.lookup(category, registered).__name__ == name:
                return {"__object__": registered, "arguments": config}
    raise CheckpointError(f"{directory} holds a {name!r}, which is not a registered model")


def load_model(
    directory: str | Path, expected: type | None = None, map_location: str | torch.device | None = None
) -> torch.nn.Module:
    """Rebuild the model saved in ``directory`` (by :func:`save_model` or a Trainer) with its weights.

    Arguments:
        directory: the checkpoint folder.
        expected: refuse a model that is not an instance of this class (``None``: any).
        map_location: device to move the model to.

    Raises :class:`~flowforge.errors.CheckpointError` for a missing, truncated, tampered or foreign
    checkpoint, a config that does not build, or weights that do not fit.
    """
    return load_model_from_manifest(directory, read_manifest(directory), expected, map_location)


def load_model_from_manifest(
    directory: str | Path,
    manifest: dict[str, Any],
    expected: type | None = None,
    map_location: str | torch.device | None = None,
) -> torch.nn.Module:
    """:func:`load_model` with the manifest already read (and possibly converted from an older layout)."""
    directory = Path(directory)
    config = manifest.get("model") if "model" in manifest else _legacy_config(manifest, directory)
    if config is None:
        raise CheckpointError(f"{directory} holds weights of a model with no registered config; rebuild it in code")
    model = registry.from_config(config, where=f"{directory / MANIFEST}: model")
    if expected is not None and not isinstance(model, expected):
        raise CheckpointError(f"{directory} holds a {type(model).__name__}, not a {expected.__name__}")
    dtype = getattr(torch, str(manifest.get("dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CheckpointError(f"{directory} records dtype {manifest.get('dtype')!r}; expected a floating-point dtype")
    model = model.to(dtype)
    load_state_dict_checked(model, load_tensors(directory, "model", manifest), directory)
    return model.to(map_location) if map_location is not None else model


__all__ = [
    "CheckpointError",
    "decode_state",
    "encode_state",
    "load_model",
    "load_model_from_manifest",
    "load_state_dict_checked",
    "load_tensors",
    "model_manifest",
    "read_manifest",
    "save_checkpoint",
    "save_model",
    "write_atomic",
]
