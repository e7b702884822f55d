r"""What a training run carries from step to step, and the checkpoint that resumes it exactly.

* :class:`ExponentialMovingAverage`: shadow weights :math:`\bar\theta`.
* :class:`TrainingState`: the step, the validation record and the logged history.
* :func:`rng_state` / :func:`set_rng_state`: the random-number states of this process (torch,
  the model's CUDA device, Python's ``random`` and NumPy's global generator), and their
  JSON-plus-tensors form in a checkpoint.
* :func:`save_training_state` / :func:`load_training_state`: a resumable checkpoint (weights,
  optimizer, schedule, gradient scaler, EMA, best weights, the objective's own state, every
  process's random state and the step), written atomically by :mod:`flowforge.checkpoint`.

The minibatch order is not stored: it is a function of the seed and the step
(:class:`~flowforge.train.distributed.ShardedBatches`), so a resumed run continues in the epoch,
and at the position inside it, where the checkpoint was taken. With the random states restored
as well, a run killed at any moment and resumed ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import random
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from flowforge.checkpoint import (
    decode_state,
    encode_state,
    load_state_dict_checked,
    load_tensors,
    model_manifest,
    read_manifest,
    save_checkpoint,
    verify_files,
)
from flowforge.config import check_range
from flowforge.errors import CheckpointError, RebuildError


class ExponentialMovingAverage:
    r"""Shadow weights :math:`\bar\theta \leftarrow \beta\bar\theta + (1-\beta)\theta` after every
    step (floating-point parameters and buffers; integer buffers are copied), the first update a copy.

    The first update copies the weights after the first step instead of averaging them with the
    initial ones: a layer initialised from the first batch (ActNorm) would otherwise sit in the
    shadow near its unfitted start for about :math:`1/(1-\beta)` steps, and a model ending with its
    average would be scored with it. Later updates average as usual.

    >>> model = nn.Linear(1, 1, bias=False)
    >>> ema = ExponentialMovingAverage(model, decay=0.5)
    >>> with torch.no_grad():
    ...     _ = model.weight.fill_(ema.shadow["weight"].item() + 2.0)
    >>> ema.update(model)  # the first update copies
    >>> with torch.no_grad():
    ...     _ = model.weight.add_(2.0)
    >>> ema.update(model)  # then half of the way
    >>> float(model.weight.detach() - ema.shadow["weight"])
    1.0
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_range("decay", decay, low=0, high=1, low_open=True, high_open=True)
        self.decay = float(decay)
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}
        #: updates made so far (a resumed trainer sets it to its step: one update per step)
        self.updates = 0

    def current_decay(self) -> float:
        """The decay of the next update: 0 for the first (a copy), ``decay`` after it."""
        return 0.0 if self.updates == 0 else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        weight = 1 - self.current_decay()
        for name, value in model.state_dict().items():
            if value.is_floating_point():
                self.shadow[name].lerp_(value, weight)
            else:
                self.shadow[name].copy_(value)
        self.updates += 1


@dataclass
class TrainingState:
    """The counters of a run: optimizer steps taken, the best validation value so far, validations
    since it improved, and the history (``{"step", "loss", "lr"}`` and ``{"step", "validation"}`` rows)."""

    step: int = 0
    best_validation: float = math.inf
    evaluations_without_improvement: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


# ---------------------------------------------------------------- random-number states
def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """This process's random states: torch (CPU), the CUDA ``device``'s (when it is one), Python's, NumPy's."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": _python_rng_state(),
        "numpy": _numpy_rng_state(),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore what :func:`rng_state` returned (a CUDA state only onto a CUDA ``device``)."""
    torch.set_rng_state(state["torch"])
    random.setstate(_python_rng_from(state["python"]))
    np.random.set_state(_numpy_rng_from(state["numpy"]))
    if state.get("cuda") is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _python_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _python_rng_from(value: list) -> tuple:
    version, internal, gauss = value
    return version, tuple(internal), gauss


def _numpy_rng_state() -> dict:
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "name": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "position": int(position),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }


def _numpy_rng_from(value: dict) -> tuple:
    keys = value["keys"].numpy().astype(np.uint32)
    return value["name"], keys, value["position"], value["has_gauss"], value["cached"]


# ---------------------------------------------------------------- checkpoints
@dataclass
class TrainingParts:
    """The stateful pieces of a training run that a checkpoint saves and a resume restores in place."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    objective: object
    ema: ExponentialMovingAverage | None = None

    def unpacked(self) -> tuple:
        """``(model, optimizer, scheduler, scaler, objective, ema)``, the same objects (no copies)."""
        return self.model, self.optimizer, self.scheduler, self.scaler, self.objective, self.ema


def save_training_state(
    directory: str | Path,
    parts: TrainingParts,
    *,
    state: TrainingState,
    config: dict[str, Any],
    rng_states: list[dict[str, Any]],
    best_weights: dict[str, Tensor] | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write a resumable checkpoint of a training run to ``directory`` (atomically).

    ``rng_states`` holds :func:`rng_state` of every process, rank 0 first. ``config`` is the
    trainer config as a dict; :func:`load_training_state` refuses to resume under another one.
    The model is recorded with the config that rebuilds it when it is a registered model (so the
    folder is also a model checkpoint: ``Flow.load`` reads it), and as weights only otherwise.
    """
    model, optimizer, scheduler, scaler, objective, ema = parts.unpacked()
    tensors: dict[str, Tensor] = {}
    objective_state = objective.state_dict() if hasattr(objective, "state_dict") else None
    trainer_state = {
        "optimizer": encode_state(optimizer.state_dict(), tensors, "optimizer."),
        "scheduler": encode_state(scheduler.state_dict(), tensors, "scheduler."),
        "scaler": encode_state(scaler.state_dict(), tensors, "scaler.") if scaler is not None else None,
        "rng": encode_state(rng_states, tensors, "rng."),
        "state": asdict(state),
        "objective": None if objective_state is None else encode_state(objective_state, tensors, "objective."),
        "objective_classes": _objective_classes(objective),
    }
    groups = {"model": model.state_dict(), "trainer": tensors}
    if ema is not None:
        groups["ema"] = ema.shadow
    if best_weights is not None:
        groups["best"] = best_weights
    try:
        rebuild = model_manifest(model)
    except RebuildError as error:  # a hand-built model still resumes; it is rebuilt in code, not from the folder
        warnings.warn(f"the checkpoint records no config to rebuild the model from: {error}", stacklevel=2)
        parameter = next(model.parameters())
        rebuild = {"model": None, "dtype": str(parameter.dtype).removeprefix("torch.")}
    manifest: dict[str, Any] = {
        **rebuild,
        "class": type(model).__name__,
        "trainer_config": config,
        "trainer": trainer_state,
        "metadata": metadata or {},
    }
    return save_checkpoint(directory, groups, manifest)


@dataclass
class LoadedTrainingState:
    """What :func:`load_training_state` restores beyond the modules it loads in place."""

    state: TrainingState
    best_weights: dict[str, Tensor] | None


def check_resumable(
    directory: str | Path, model: nn.Module, *, config: dict[str, Any], metadata: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The manifest of ``directory``'s training state, after checking that a run of ``model``
    under trainer ``config`` (and run ``metadata``) may continue it and that its tensor files are
    whole (their SHA-256); nothing is loaded.

    Raises :class:`~flowforge.errors.CheckpointError` as :func:`load_training_state` does.
    """
    directory = Path(directory)
    manifest = read_manifest(directory, training=True)
    if "trainer" not in manifest:
        raise CheckpointError(f"{directory} holds weights only, not a resumable training state")
    # The model's rebuild config and the run's metadata (its data, objective, statistics) must match
    # too: weights trained on one setting must not continue, or be relabelled, under another.
    parameter = next(model.parameters(), None)
    if parameter is not None and manifest.get("dtype") not in (None, str(parameter.dtype).removeprefix("torch.")):
        raise CheckpointError(
            f"cannot resume {directory}: the run was trained in {manifest['dtype']}, the model given is "
            f"{str(parameter.dtype).removeprefix('torch.')}; resume with the model in {manifest['dtype']}"
        )
    compared = [("model", manifest.get("model"), _rebuild_config(model))]
    if metadata is not None:
        compared.append(("metadata", manifest.get("metadata"), metadata))
    # Both named together: a model setting derived from a run setting (a curriculum's length from
    # [train] steps) shows next to the setting the user changed.
    changed = [change for where, before, now in compared for change in _changed_settings(before, _as_json(now), where)]
    if changed:
        shown = "; ".join(changed[:3]) + (f"; and {len(changed) - 3} more" if len(changed) > 3 else "")
        raise CheckpointError(
            f"cannot resume {directory}: the run was trained with other settings ({shown}); "
            "resume with the settings it was started with, or start a new run in another folder"
        )
    # After the model and run: another model or kind of run is the difference worth naming first.
    saved = {k: v for k, v in manifest["trainer_config"].items() if k not in NOT_COMPARED}
    current = {k: v for k, v in config.items() if k not in NOT_COMPARED}
    if saved != current:
        changed = sorted(k for k in current if saved.get(k) != current[k])
        raise CheckpointError(f"cannot resume {directory}: the trainer config differs in {', '.join(changed)}")
    verify_files(directory, manifest)
    return manifest


def load_training_state(
    directory: str | Path,
    parts: TrainingParts,
    *,
    config: dict[str, Any],
    rank: int = 0,
    world: int = 1,
    metadata: dict[str, Any] | None = None,
) -> LoadedTrainingState:
    """Restore a run saved by :func:`save_training_state`: the model, optimizer, schedule, scaler,
    EMA and objective in place, this process's random state, and the counters (returned).

    A process takes its own saved random state when the checkpoint was written by as many
    processes, rank 0's otherwise (a run resumed on another number of processes).

    Raises :class:`~flowforge.errors.CheckpointError` when the folder holds weights only, or was
    trained under another trainer config (:data:`NOT_COMPARED` aside), another model config, or, when
    ``metadata`` is given, other run metadata (the setting that changed is named).
    """
    directory = Path(directory)
    model, optimizer, scheduler, scaler, objective, ema = parts.unpacked()
    manifest = check_resumable(directory, model, config=config, metadata=metadata)
    weights = load_tensors(directory, "model", manifest)
    if set(weights) != set(model.state_dict()):
        # An earlier layout of the model: its weights load renamed, but the optimizer and EMA
        # states are keyed by the old parameters, so training cannot continue from them.
        raise CheckpointError(
            f"cannot resume {directory}: it was written by an earlier layout of {type(model).__name__}; "
            "load it for evaluation, or start a new run"
        )
    tensors = load_tensors(directory, "trainer", manifest)
    trainer = manifest["trainer"]
    _load_objective_state(directory, objective, trainer, tensors)  # first: a mismatch leaves the model as it was
    load_state_dict_checked(model, weights, directory)
    optimizer.load_state_dict(decode_state(trainer["optimizer"], tensors))
    scheduler.load_state_dict(decode_state(trainer["scheduler"], tensors))
    if scaler is not None and trainer["scaler"] is not None:
        scaler.load_state_dict(decode_state(trainer["scaler"], tensors))
    device = _device_of(model)
    if "rng" in trainer:
        states = decode_state(trainer["rng"], tensors)
        set_rng_state(states[rank] if len(states) == world else states[0], device)
    else:  # written before per-process random states were kept
        set_rng_state(
            {
                "torch": decode_state(trainer["torch_rng"], tensors),
                "python": decode_state(trainer["python_rng"], tensors),
                "numpy": decode_state(trainer["numpy_rng"], tensors),
            }
        )
    if ema is not None:
        live = model.state_dict()
        ema.shadow = {k: v.to(live[k].device) for k, v in load_tensors(directory, "ema", manifest).items()}
    best = load_tensors(directory, "best", manifest) if "best" in manifest["files"] else None
    state = TrainingState(**trainer["state"])
    steps, done = config.get("steps"), state.step
    if isinstance(steps, int) and (isinstance(done, bool) or not isinstance(done, int) or not 0 <= done <= steps):
        raise CheckpointError(
            f"{directory / 'checkpoint.json'}: trainer.state.step = {done!r}: expected an int in 0..{steps} "
            "(the run's steps); the checkpoint was edited"
        )
    return LoadedTrainingState(state, best)


def _objective_classes(objective: object) -> list[str]:
    """The objective's class and the classes it derives from, most derived first (the common base aside)."""
    return [c.__name__ for c in type(objective).__mro__ if c.__name__ not in ("Objective", "object")]


def _load_objective_state(directory: Path, objective: object, trainer: dict[str, Any], tensors: dict) -> None:
    """Restore the objective's own state (Flow-GAN's discriminator and its optimizer), refusing an
    objective of another class or shape than the run's."""
    saved_classes, current_classes = trainer.get("objective_classes"), _objective_classes(objective)
    current_class = current_classes[0]
    # A subclass of the run's objective (or the class it subclassed) may continue it.
    related = not saved_classes or saved_classes[0] in current_classes or current_class in saved_classes
    saved_state = trainer.get("objective")
    if not related or (saved_state is not None) != hasattr(objective, "load_state_dict"):
        saved_class = saved_classes[0] if saved_classes else "of another kind"
        raise CheckpointError(
            f"cannot resume {directory}: the run was trained with the objective {saved_class}, "
            f"not {current_class}; resume with the objective it was started with"
        )
    if saved_state is None:
        return
    try:
        objective.load_state_dict(decode_state(saved_state, tensors))
    except (RuntimeError, KeyError, ValueError) as error:
        said = " ".join(str(error).split()) or type(error).__name__
        said = said if len(said) <= 200 else said[:197] + "..."
        raise CheckpointError(
            f"cannot resume {directory}: the saved state of its {current_class} does not fit this one ({said}); "
            "build the objective with the arguments the run was started with"
        ) from error


def _device_of(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _rebuild_config(model: nn.Module) -> Any:
    try:
        return model_manifest(model)["model"]
    except RebuildError:
        return None


#: Settings a resumed run may change: they do not change what it trains (a progress bar, how often
#: it saves a checkpoint).
NOT_COMPARED = frozenset({"progress", "checkpoint_every"})


def _as_json(value: Any) -> Any:
    """``value`` as it reads back from a manifest (tuples as lists, keys as strings)."""
    return json.loads(json.dumps(value))


def _changed_settings(saved: Any, current: Any, where: str) -> list[str]:
    """Each ``where.key: saved -> current`` that differs between two JSON values (:data:`NOT_COMPARED` aside)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        changed = []
        for key in sorted(set(saved) | set(current)):
            if key not in NOT_COMPARED:
                changed += _changed_settings(saved.get(key), current.get(key), f"{where}.{key}")
        return changed
    if saved == current:
        return []
    return [f"{where}: {_short(saved)} -> {_short(current)}"]


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


__all__ = [
    "ExponentialMovingAverage",
    "LoadedTrainingState",
    "TrainingParts",
    "TrainingState",
    "check_resumable",
    "load_training_state",
    "rng_state",
    "save_training_state",
    "set_rng_state",
]
