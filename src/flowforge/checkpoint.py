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
place. Temporary files left by a write that was killed (``.checkpoint.json.*.tmp``,
``.model-*.safetensors.*.tmp``) are never read, and the next save removes them.

Loading validates the manifest's whole schema (:func:`read_manifest`, and
:func:`check_training_manifest` for a resumable training run) and every file's hash, so a truncated,
tampered, foreign or hostile file fails with a :class:`CheckpointError` naming the file, the key,
the value and what is allowed; nothing is ever unpickled. A file entry must be a plain file name
inside the checkpoint folder: no ``/``, no ``..``, not absolute, not hidden, and no symlink leading
out of the folder.

Non-tensor state that is not plain JSON (optimizer state dicts have integer keys and tuples) is
encoded losslessly by :func:`encode_state` and restored by :func:`decode_state`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, NoReturn

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

#: The floating-point dtypes a manifest may record, by the names torch gives them (``"float32"``, ``"double"``, ...).
FLOATING_DTYPES: dict[str, torch.dtype] = {
    name: value for name, value in vars(torch).items() if isinstance(value, torch.dtype) and value.is_floating_point
}
#: The counters of a training run (the fields of :class:`flowforge.train.state.TrainingState`) and their JSON types.
TRAINING_STATE_FIELDS: dict[str, tuple[type, ...]] = {
    "step": (int,),
    "best_validation": (int, float),
    "evaluations_without_improvement": (int,),
    "history": (list,),
}
#: Temporary files of :func:`write_atomic` in a checkpoint folder: what a killed save leaves behind.
TEMPORARY_PATTERNS = (f".{MANIFEST}.*.tmp", ".*.safetensors.*.tmp")
_MISSING = object()
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


@functools.cache  # read once: reading the umask sets it for an instant, which other threads could see
def _file_mode() -> int:
    """The permissions ``open`` gives a new file under the process's umask (mkstemp's are 0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and a rename; the
    file gets the permissions an ordinary write would give it."""
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(descriptor, _file_mode())
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
    """Inverse of :func:`encode_state`.

    Raises :class:`CheckpointError` for a reference to a tensor that ``tensors`` does not hold or a
    malformed tag (a damaged or hostile manifest), never a ``KeyError`` or ``TypeError``.
    """
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            name = value["__tensor__"]
            if not isinstance(name, str) or name not in tensors:
                raise CheckpointError(f"the checkpoint refers to tensor {_show(name)}, which its tensor file lacks")
            return tensors[name]
        if set(value) == {"__items__"}:
            items = value["__items__"]
            if not isinstance(items, list) or not all(isinstance(i, list) and len(i) == 2 for i in items):
                raise CheckpointError(f"the checkpoint holds a malformed '__items__' entry: {_show(items)}")
            decoded = [(decode_state(k, tensors), decode_state(v, tensors)) for k, v in items]
            try:
                return dict(decoded)
            except TypeError as error:  # a key that is a dict or list
                raise CheckpointError(f"the checkpoint holds an unusable '__items__' key ({error})") from error
        if set(value) == {"__tuple__"}:
            if not isinstance(value["__tuple__"], list):
                malformed = _show(value["__tuple__"])
                raise CheckpointError(f"the checkpoint holds a malformed '__tuple__' entry: {malformed}")
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
    for group in tensor_files:
        if not isinstance(group, str) or not _is_plain_name(group):
            raise ValueError(f"tensor_files: group {group!r} must be a plain name (no '/', not hidden)")
    # Everything is serialised before anything is written: a bad value leaves the folder as it was.
    # The settings the weights were saved with travel inside the model's tensor file (hashed with
    # it), so an edit of checkpoint.json that would rebuild another model is refused on load.
    described = {_SETTINGS_DIGEST: settings_digest(json.loads(json.dumps(manifest, allow_nan=True)))}
    serialised = {}
    for group, tensors in tensor_files.items():
        for key, value in tensors.items():
            if not isinstance(value, Tensor):
                raise TypeError(f"tensor_files[{group!r}][{key!r}] must be a torch.Tensor, got {type(value).__name__}")
        metadata = described if group == "model" else None
        serialised[group] = save_safetensors_bytes(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata
        )
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(directory)
    files = {}
    for group, data in serialised.items():
        digest = hashlib.sha256(data).hexdigest()
        name = f"{group}-{digest[:16]}.safetensors"
        target = directory / name
        if not _holds(target, digest):  # a file of exactly these bytes is kept; anything else is replaced
            write_atomic(target, data)
        files[group] = {"file": name, "sha256": digest}
    document = {"format": FORMAT, "version": VERSION, **manifest, "files": files}
    write_atomic(directory / MANIFEST, (json.dumps(document, indent=2, allow_nan=True) + "\n").encode())
    keep = {entry["file"] for entry in files.values()}
    for stale in directory.glob("*.safetensors"):
        # only tensor files of earlier saves (named <group>-<hash>): a user's own files stay
        if stale.name not in keep and _TENSOR_FILE.fullmatch(stale.name):
            stale.unlink(missing_ok=True)
    return directory


#: The name of a tensor file :func:`save_checkpoint` writes: its group and the start of its SHA-256.
_TENSOR_FILE = re.compile(r"[^.][^/]*-[0-9a-f]{16}\.safetensors")


def _holds(path: Path, digest: str) -> bool:
    """Whether ``path`` is a regular file whose bytes have the SHA-256 ``digest``."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() == digest
    except OSError:
        return False


#: The key, in the model tensor file's safetensors metadata, of the SHA-256 of the manifest's settings.
_SETTINGS_DIGEST = "flowforge_settings_sha256"
#: The manifest entries that describe what the weights are (the file list and format aside).
_SETTINGS = ("model", "class", "config", "dtype", "metadata", "trainer_config", "trainer")


def settings_digest(manifest: dict[str, Any]) -> str:
    """SHA-256 of the manifest entries that describe the weights (model config, dtype, run metadata,
    trainer config and state), as they read back from JSON."""
    described = {key: manifest[key] for key in _SETTINGS if key in manifest}
    return hashlib.sha256(json.dumps(described, sort_keys=True, allow_nan=True).encode()).hexdigest()


def _saved_digest(data: bytes) -> str | None:
    """The settings digest in a safetensors file's metadata (``None`` in files written before it)."""
    try:
        length = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + length])
    except (ValueError, UnicodeDecodeError):
        return None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata.get(_SETTINGS_DIGEST) if isinstance(metadata, dict) else None


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Remove the temporary files that a killed save left in the checkpoint ``directory``; returns them.

    A save that is killed between creating its temporary file and renaming it into place leaves
    ``.checkpoint.json.<random>.tmp`` or ``.<group>-<hash>.safetensors.<random>.tmp`` behind; nothing
    ever reads them (a manifest cannot name a hidden file), and :func:`save_checkpoint` calls this
    first, so they do not pile up. Only one process may save into a checkpoint folder at a time.
    """
    directory = Path(directory)
    removed = []
    for pattern in TEMPORARY_PATTERNS:
        for path in directory.glob(pattern):
            if path.is_symlink() or path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def _show(value: Any) -> str:
    """``value`` for a message: its repr (shortened) and, when that may not say it, its type."""
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return text if value is None or isinstance(value, str | dict | list) else f"{text} ({type(value).__name__})"


def _refuse(path: Path, key: str, value: Any, expected: str) -> NoReturn:
    shown = "missing" if value is _MISSING else _show(value)
    raise CheckpointError(f"{path}: {key} is {shown}; expected {expected}")


def _key(parent: str, name: str) -> str:
    return f"{parent}.{name}" if name.isidentifier() else f"{parent}[{name!r}]"


def _is_plain_name(name: str) -> bool:
    """A file name with no directory part: no separator, not absolute, not ``.``/``..`` or hidden."""
    return (
        name != ""
        and "/" not in name
        and "\\" not in name
        and (os.altsep is None or os.altsep not in name)
        and "\0" not in name
        and not name.startswith(".")
        and Path(name).name == name
        and not Path(name).is_absolute()
    )


def _check_file_entry(entry: Any, key: str, path: Path) -> None:
    """One entry of ``files``: ``{"file": plain file name, "sha256": 64 hex digits}``."""
    if not isinstance(entry, dict):
        _refuse(path, key, entry, 'an object {"file": name, "sha256": digest}')
    unknown = sorted(set(entry) - {"file", "sha256"})
    if unknown:
        raise CheckpointError(f"{path}: {key} has an unknown key {unknown[0]!r}; expected only file and sha256")
    name = entry.get("file", _MISSING)
    if not isinstance(name, str) or not _is_plain_name(name):
        expected = "a plain file name inside the checkpoint folder (no '/', not absolute, no leading '.')"
        _refuse(path, f"{key}.file", name, expected)
    digest = entry.get("sha256", _MISSING)
    if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= _HEX_DIGITS:
        _refuse(path, f"{key}.sha256", digest, "64 hex digits")


def _check_files(files: Any, path: Path) -> None:
    if not isinstance(files, dict):
        _refuse(path, "files", files, 'an object {group: {"file": name, "sha256": digest}}')
    for group, entry in files.items():
        _check_file_entry(entry, _key("files", group), path)


def _check_dtype(dtype: Any, path: Path) -> torch.dtype:
    if not isinstance(dtype, str) or dtype not in FLOATING_DTYPES:
        _refuse(path, "dtype", dtype, "a floating-point torch dtype (float32, float64, float16, bfloat16, ...)")
    return FLOATING_DTYPES[dtype]


def check_manifest(document: Any, path: str | Path) -> dict[str, Any]:
    """Check a parsed manifest against the checkpoint schema; returns it. ``path``: the manifest file, for messages.

    The schema: an object with ``format`` == :data:`FORMAT`; ``version`` an integer from 1 to
    :data:`VERSION`; ``files`` an object of ``group -> {"file": plain file name, "sha256": 64 hex
    digits}``; ``dtype``, if present, a floating-point torch dtype's name; ``metadata``, if present,
    an object; ``model``, if present, ``null`` or an object (a registry config); ``class`` (version 1),
    if present, a string. Other keys belong to whoever wrote the checkpoint (e.g. ``trainer``, see
    :func:`check_training_manifest`). Raises :class:`CheckpointError` naming the file and the key.
    """
    path = Path(path)
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a flowforge checkpoint (no format tag {FORMAT!r})")
    version = document.get("version", _MISSING)
    if type(version) is not int or not 1 <= version <= VERSION:
        expected = f"an integer from 1 to {VERSION}"
        if type(version) is int and version > VERSION:
            expected += " (a newer flowforge wrote this checkpoint; upgrade to read it)"
        _refuse(path, "version", version, expected)
    _check_files(document.get("files", _MISSING), path)
    if "dtype" in document:
        _check_dtype(document["dtype"], path)
    if "metadata" in document and not isinstance(document["metadata"], dict):
        _refuse(path, "metadata", document["metadata"], "an object")
    if "model" in document and document["model"] is not None and not isinstance(document["model"], dict):
        _refuse(path, "model", document["model"], "null or an object (a registry config)")
    if "class" in document and not isinstance(document["class"], str):
        _refuse(path, "class", document["class"], "a class name (a string)")
    return document


def check_training_manifest(manifest: dict[str, Any], directory: str | Path) -> dict[str, Any]:
    """Check that a manifest (already through :func:`check_manifest`) holds a resumable training state.

    What :func:`flowforge.train.state.load_training_state` reads: ``trainer_config`` an object;
    ``trainer`` an object with ``optimizer`` and ``scheduler`` (objects), ``scaler`` and
    ``objective`` (``null`` or objects), ``rng`` (a list of objects; checkpoints from before
    per-process states hold ``torch_rng``, ``python_rng`` and ``numpy_rng`` instead) and
    ``state`` (an object with only the keys of :data:`TRAINING_STATE_FIELDS`); ``files`` with
    ``model`` and ``trainer`` entries. Returns the manifest; raises :class:`CheckpointError` naming
    the file and the key.
    """
    path = Path(directory) / MANIFEST
    trainer = manifest.get("trainer", _MISSING)
    if trainer is _MISSING:
        raise CheckpointError(
            f"{path}: trainer is missing; {directory} holds weights only, not a resumable training state"
        )
    if not isinstance(trainer, dict):
        _refuse(path, "trainer", trainer, "an object (the optimizer, schedule, random and counter states)")
    config = manifest.get("trainer_config", _MISSING)
    if not isinstance(config, dict):
        _refuse(path, "trainer_config", config, "an object (the trainer config the run was trained under)")
    _check_files(manifest.get("files", _MISSING), path)
    for group in ("model", "trainer"):
        if group not in manifest["files"]:
            _refuse(path, f"files.{group}", _MISSING, f'the {group} tensors {{"file": name, "sha256": digest}}')
    for name in ("optimizer", "scheduler"):
        if not isinstance(trainer.get(name, _MISSING), dict):
            _refuse(path, f"trainer.{name}", trainer.get(name, _MISSING), f"an object (the {name}'s state)")
    for name in ("scaler", "objective"):
        value = trainer.get(name, None if name == "objective" else _MISSING)
        if value is not None and not isinstance(value, dict):
            _refuse(path, f"trainer.{name}", value, f"null or an object (the {name}'s state)")
    if "rng" in trainer or not {"torch_rng", "python_rng", "numpy_rng"} <= set(trainer):
        rng = trainer.get("rng", _MISSING)
        if not isinstance(rng, list) or not rng or not all(isinstance(r, dict) for r in rng):
            _refuse(path, "trainer.rng", rng, "a non-empty list of objects (each process's random states)")
        for rank, states in enumerate(rng):
            for generator in ("torch", "python", "numpy"):
                if generator not in states:
                    _refuse(path, f"trainer.rng[{rank}].{generator}", _MISSING, f"the {generator} random state")
    state = trainer.get("state", _MISSING)
    if not isinstance(state, dict):
        _refuse(path, "trainer.state", state, "an object (the run's counters)")
    for key, value in state.items():
        if key not in TRAINING_STATE_FIELDS:
            known = ", ".join(TRAINING_STATE_FIELDS)
            raise CheckpointError(f"{path}: trainer.state has an unknown key {key!r}; expected only {known}")
        types = TRAINING_STATE_FIELDS[key]
        if isinstance(value, bool) or not isinstance(value, types):
            _refuse(path, f"trainer.state.{key}", value, " or ".join(t.__name__ for t in types))
    return manifest


def read_manifest(directory: str | Path, *, training: bool = False) -> dict[str, Any]:
    """The checkpoint's manifest, after checking its whole schema (:func:`check_manifest`).

    With ``training=True``, also that it holds a resumable training state (:func:`check_training_manifest`).
    Raises :class:`CheckpointError` naming the file and the key for anything wrong.
    """
    path = Path(directory) / MANIFEST
    if not path.is_file():
        found = "is a folder, not a file" if path.exists() else "is missing"
        raise CheckpointError(f"{directory} is not a flowforge checkpoint: {MANIFEST} {found}")
    try:
        document = json.loads(path.read_bytes())
    except (UnicodeDecodeError, ValueError, RecursionError) as error:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path} is not valid JSON ({error}); the file is truncated or not ours") from error
    except OSError as error:
        raise CheckpointError(f"{path} cannot be read ({error})") from error
    check_manifest(document, path)
    if training:
        check_training_manifest(document, directory)
    return document


def load_tensors(directory: str | Path, group: str, manifest: dict[str, Any] | None = None) -> dict[str, Tensor]:
    """The tensors of ``group`` (e.g. ``"model"``), after checking the file's SHA-256 against the manifest.

    The file must be a plain name inside ``directory`` whose resolved path (symlinks followed) stays inside it.
    """
    data, path = _verified_bytes(Path(directory), group, manifest)
    try:
        return load_safetensors_bytes(data)
    except SafetensorError as error:  # pragma: no cover - a matching hash makes this unreachable in practice
        raise CheckpointError(f"{path} is not a valid safetensors file ({error})") from error


def verify_files(directory: str | Path, manifest: dict[str, Any] | None = None) -> None:
    """Check every tensor file of a checkpoint against its recorded SHA-256 without decoding any
    (what a resume does before it announces anything); a :class:`CheckpointError` names the file."""
    directory = Path(directory)
    manifest = manifest if manifest is not None else read_manifest(directory)
    files = manifest.get("files", {})
    for group in files if isinstance(files, dict) else [None]:
        _verified_bytes(directory, group, manifest)


def _verified_bytes(directory: Path, group: Any, manifest: dict[str, Any] | None) -> tuple[bytes, Path]:
    """The bytes of ``group``'s tensor file and its path, checked (see :func:`load_tensors`)."""
    manifest = manifest if manifest is not None else read_manifest(directory)
    where = directory / MANIFEST
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        _refuse(where, "files", files, 'an object {group: {"file": name, "sha256": digest}}')
    entry = files.get(group)
    if entry is None:
        raise CheckpointError(f"checkpoint {directory} holds no {group!r} tensors")
    key = _key("files", group)
    _check_file_entry(entry, key, where)
    path = directory / entry["file"]
    resolved, root = path.resolve(), directory.resolve()
    if resolved == root or not resolved.is_relative_to(root):
        _refuse(where, f"{key}.file", entry["file"], f"a file inside {directory}, but it leads to {resolved}")
    if not resolved.is_file():
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete")
    try:
        data = resolved.read_bytes()
    except OSError as error:
        raise CheckpointError(f"{path} cannot be read ({error})") from error
    if hashlib.sha256(data).hexdigest() != entry["sha256"].lower():
        raise CheckpointError(f"{path} does not match its recorded SHA-256: the file is truncated or was modified")
    saved = _saved_digest(data) if group == "model" else None  # files written before the digest hold none
    if saved is not None and saved != settings_digest(manifest):
        raise CheckpointError(
            f"{where}: its settings (model config, dtype, run metadata or trainer state) are not the ones "
            f"{path.name} was saved with: the manifest was edited; retrain, or restore the original file"
        )
    return data, path


def load_state_dict_checked(module: torch.nn.Module, state: dict[str, Tensor], source: str | Path) -> None:
    """``module.load_state_dict(state)`` with a message naming the checkpoint when the shapes or keys
    differ, when a weight holds NaN or inf, or a buffer NaN (such a model's every output would be NaN)."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"the weights in {source} do not fit this {type(module).__name__}: {error}") from error
    for name, parameter in module.named_parameters():
        if not bool(torch.isfinite(parameter).all()):
            raise CheckpointError(
                f"the weights in {source} hold NaN or inf ({name}): the model diverged before it was saved; "
                "train again, or from an earlier checkpoint"
            )
    for name, buffer in module.named_buffers():  # statistics, normalisers (a mask may hold -inf: NaN only)
        if buffer.is_floating_point() and bool(torch.isnan(buffer).any()):
            raise CheckpointError(
                f"the buffers in {source} hold NaN ({name}): every output would be NaN; train again, or from an "
                "earlier checkpoint"
            )


def model_manifest(model: torch.nn.Module) -> dict[str, Any]:
    """The manifest entries that rebuild ``model``: ``model`` (its registry config) and ``dtype``.

    Raises :class:`~flowforge.errors.RebuildError` when the model cannot be rebuilt from a config.
    """
    parameter = next(model.parameters(), None)
    dtype = parameter.dtype if parameter is not None else torch.get_default_dtype()
    return {"model": registry.to_config(model), "dtype": str(dtype).removeprefix("torch.")}


def save_model(directory: str | Path, model: torch.nn.Module, metadata: dict | None = None) -> Path:
    """Save a registered model's weights and the config that rebuilds it (see :func:`load_model`);
    ``metadata``: a dict of JSON values (string keys, lists, finite numbers), kept in the manifest."""
    if metadata is not None:
        _check_metadata(metadata)
    manifest = {**model_manifest(model), "metadata": metadata or {}}
    return save_checkpoint(directory, {"model": model.state_dict()}, manifest)


def _check_metadata(metadata: object) -> None:
    """Refuse metadata that would not read back from the manifest as it was given."""
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict of JSON values, got {type(metadata).__name__}")
    try:
        read_back = json.loads(json.dumps(metadata, allow_nan=False))
    except (TypeError, ValueError) as error:  # an object JSON cannot hold, NaN or inf
        raise ValueError(f"metadata must hold JSON values (finite numbers, strings, lists, dicts): {error}") from error
    if read_back != metadata:
        raise ValueError(
            "metadata would not read back as given: its keys must be strings and its sequences lists "
            f"(it would load as {read_back!r})"
        )


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

    The model comes back in training mode, as a freshly built module does (dropout active): call
    ``.eval()`` before sampling or scoring with it.

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
    dtype = _check_dtype(manifest.get("dtype", "float32"), directory / MANIFEST)  # before building anything
    config = manifest.get("model") if "model" in manifest else _legacy_config(manifest, directory)
    if config is None:
        raise CheckpointError(f"{directory} holds weights of a model with no registered config; rebuild it in code")
    # The weights first: their hashes and the settings digest they carry refuse an edited manifest
    # before its config builds anything (an edited width could ask for any amount of memory).
    state = load_tensors(directory, "model", manifest)
    model = registry.from_config(config, where=f"{directory / MANIFEST}: model")
    if not isinstance(model, torch.nn.Module):
        raise CheckpointError(f"{directory} holds a {type(model).__name__}, which is not a model with weights")
    if expected is not None and not isinstance(model, expected):
        raise CheckpointError(f"{directory} holds a {type(model).__name__}, not a {expected.__name__}")
    model = model.to(dtype)
    # A part kept in another dtype (a float64 prior in a float32 model) comes back in its own.
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        saved = state.get(name)
        if saved is not None and saved.is_floating_point() and tensor.is_floating_point():
            tensor.data = tensor.data.to(saved.dtype)
    load_state_dict_checked(model, state, directory)
    return model.to(map_location) if map_location is not None else model


__all__ = [
    "FLOATING_DTYPES",
    "TEMPORARY_PATTERNS",
    "TRAINING_STATE_FIELDS",
    "CheckpointError",
    "check_manifest",
    "check_training_manifest",
    "decode_state",
    "encode_state",
    "load_model",
    "load_model_from_manifest",
    "load_state_dict_checked",
    "load_tensors",
    "model_manifest",
    "read_manifest",
    "remove_stale_temporaries",
    "save_checkpoint",
    "save_model",
    "verify_files",
    "write_atomic",
]
