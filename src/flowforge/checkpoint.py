"""Checkpoint directories: safetensors for tensors, JSON for everything else, never pickle.

A checkpoint is a directory holding

* ``checkpoint.json``, the manifest: a format tag, the model's class and the config that rebuilds
  it, any JSON metadata, and for every tensor file its name and SHA-256;
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

FORMAT = "flowforge-checkpoint"
VERSION = 1
MANIFEST = "checkpoint.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, tampered with, from another program or does not fit the model."""


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


__all__ = [
    "CheckpointError",
    "decode_state",
    "encode_state",
    "load_state_dict_checked",
    "load_tensors",
    "read_manifest",
    "save_checkpoint",
    "write_atomic",
]
