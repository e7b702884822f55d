"""Policy runs from TOML configs: train on an episode data set, save, load, evaluate.

A config has three tables, and an optional fourth::

    [policy]            # PolicyConfig: kind = "flow" | "hierarchical" | "mse" | "ddpm" | ..., sizes, sampler
    kind = "flow"
    horizon = 16

    [data]
    root = "data/mt10"  # a LeRobot-v3 folder (flowforge data collect writes one)
    frames = "cache"    # camera frames: "tensors" (default), "memory", "cache" (uint8 on disk), "decode"
    workers = 2         # DataLoader processes reading the next batches (not for "tensors")

    [train]             # TrainerConfig: steps, batch_size, lr, ema_decay, ...
    steps = 20000

    [distill]           # optional, with kind = "consistency": distil the head from a trained flow policy
    teacher = "runs/flow"

The checkpoint is the Trainer's (safetensors + JSON manifest): :func:`load_policy` rebuilds the
policy from the ``config`` it records, with its normalisers and instruction embeddings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from flowforge.checkpoint import load_model_from_manifest, read_manifest
from flowforge.config import (
    apply_overrides,
    build_config,
    check_choice,
    check_integer,
    parse_document,
    plain_numbers,
    read_document,
)
from flowforge.data.episodes import EpisodeDataset, data_set_or_run_holding
from flowforge.data.episodes import image_shape as image_shape_of
from flowforge.errors import CheckpointError, ConfigError, is_out_of_memory, memory_asked
from flowforge.matching.consistency import DISTILLATION_METHODS
from flowforge.policy import POLICY_KINDS, build_policy
from flowforge.policy.core import ChunkPolicy, PolicyConfig
from flowforge.policy.data import (
    CAMERA_PREFIX,
    PolicyWindows,
    camera_features,
    check_observation_mode,
    policy_tensors,
    policy_windows,
)
from flowforge.policy.vision import image_statistics
from flowforge.train import PolicyDistillation, PolicyObjective, Trainer, TrainerConfig
from flowforge.validation import MAX_WORKERS

#: How a policy run's camera frames reach training (``[data] frames``).
FRAME_SOURCES = ("tensors", "memory", "cache", "decode")


@dataclass
class PolicyDataConfig:
    """Where a policy run's data comes from, and how its camera frames reach training.

    Arguments:
        root: the episode data set folder (required).
        frames: ``"tensors"``: every window's frames decoded up front and stacked in memory
            (obs_horizon copies of each frame; what earlier versions did); ``"memory"``: each frame
            decoded once into memory, windows gathered per batch; ``"cache"``: each frame decoded
            once into a uint8 cache on disk (``cache``), memory-mapped, resumed when interrupted;
            ``"decode"``: the PNG files decoded per batch (in the ``workers``).
        cache: the frame cache folder (``""``: ``<root>.frames`` beside the data set).
        workers: ``torch.utils.data.DataLoader`` worker processes that read and decode the next
            batches while the model trains (``frames`` other than ``"tensors"``; 0: none).
    """

    root: str = ""
    frames: str = "tensors"
    cache: str = ""
    workers: int = 0

    def __post_init__(self) -> None:
        plain_numbers(self)
        check_choice("frames", self.frames, FRAME_SOURCES)
        check_integer("workers", self.workers, low=0, high=MAX_WORKERS, note=" (DataLoader processes)")
        if self.workers and self.frames == "tensors":
            raise ConfigError(
                f"workers = {self.workers}: frames = 'tensors' are indexed in memory; workers serve "
                "frames = 'memory', 'cache' or 'decode'"
            )
        if self.cache and self.frames != "cache":
            raise ConfigError(
                f"cache = {self.cache!r}: only frames = 'cache' reads a frame cache, got frames = {self.frames!r}; "
                "leave it out"
            )

    def cache_folder(self) -> Path:
        """The frame cache folder: ``cache``, or ``<root>.frames`` beside the data set."""
        root = Path(self.root)
        if root.name in ("", ".."):  # "." and ".." have no name to put ".frames" after: use the folder's own
            root = root.resolve()
        if not self.cache and not root.name:
            raise ConfigError(f"[data] root = {self.root!r}: give the frame cache a folder (cache = ...)")
        folder = Path(self.cache) if self.cache else root.with_name(root.name + ".frames")
        if self.frames == "cache" and any(p.exists() and not p.is_dir() for p in (folder, *folder.parents)):
            where = f"cache = {self.cache!r}" if self.cache else f"the frame cache beside root, {str(folder)!r},"
            raise ConfigError(f"[data] {where} is a file or lies under one: the cache needs a folder")
        holder = data_set_or_run_holding(folder) if self.frames == "cache" else None
        if holder is not None:
            raise ConfigError(
                f"[data] cache = {str(folder)!r}: lies inside the {holder[1]} {holder[0]}; give a folder outside it"
            )
        return folder


@dataclass
class PolicyDistillConfig:
    """Distillation of a run's consistency head from a trained flow policy (``[distill]``).

    The student (``policy.kind = "consistency"``, one segment) starts as a copy of the teacher's
    weights, normalisers included: its one-step map is then the teacher's one Euler step, which
    distillation bends onto the teacher's ODE map
    (:meth:`~flowforge.policy.core.ChunkPolicy.distillation_loss`), as the digits benchmark's
    student starts from the flow matcher's U-Net. The student's network and inputs must be the
    teacher's; head and sampling settings may differ (:data:`HEAD_SETTINGS`).

    Arguments:
        teacher: the folder of a trained ``flow`` policy run (``""``: no distillation, the head's
            own loss).
        method: ``"consistency"`` (consistency distillation: the two ends of one Heun step of the
            teacher made to agree) or ``"trajectory"`` (the teacher's own Euler trajectories
            regressed onto their ends). On MT10, 5,000 steps each, trajectory regression brought
            the one-step chunks within 2 points of the teacher's 10-step success (96.2% against
            97.4%) and consistency distillation did not (94.8%): the README's figures.
        intervals: :math:`N`, consistency distillation's uniform grid of time intervals.
    """

    teacher: str = ""
    method: str = "consistency"
    intervals: int = 18

    def __post_init__(self) -> None:
        plain_numbers(self)
        check_choice("method", self.method, DISTILLATION_METHODS)
        check_integer("intervals", self.intervals)


#: Policy settings a distilled student may change from its teacher: how the head trains and samples.
HEAD_SETTINGS = frozenset(
    {
        "kind",
        "n_action_steps",
        "sampling_steps",
        "method",
        "noise_scale",
        "time_sampler",
        "prediction",
        "keyframe_stride",
        "shortcut_fraction",
        "shortcut_halvings",
        "meanflow_fraction",
        "meanflow_adaptive_power",
        "consistency_delta",
        "consistency_velocity_weight",
        "consistency_segments",
        "rtc_training_delay",
        "rtc_prefix_noise",
        "rtc_unprefixed_fraction",
        "diffusion_steps",
        "inference_steps",
        "sampler",
    }
)


@dataclass
class PolicyRunConfig:
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    data: PolicyDataConfig = field(default_factory=PolicyDataConfig)
    train: TrainerConfig = field(default_factory=TrainerConfig)
    distill: PolicyDistillConfig = field(default_factory=PolicyDistillConfig)

    def __post_init__(self) -> None:
        if not self.data.root:
            raise ConfigError("[data] root (the episode data set folder) is required")
        if not self.policy.image_keys:
            defaults = PolicyDataConfig(root=self.data.root)
            for name in ("frames", "cache", "workers"):
                if getattr(self.data, name) != getattr(defaults, name):
                    raise ConfigError(
                        f"[data] {name} = {getattr(self.data, name)!r}: this policy reads no camera frames "
                        "(policy.image_shape is not set); leave it out"
                    )
        # A policy run trains on every window: there is no validation split to evaluate or stop on.
        if self.train.eval_every:
            raise ConfigError(
                f"[train] eval_every = {self.train.eval_every}: a policy run has no validation split; "
                "evaluate with `flowforge policy eval` (leave eval_every at 0)"
            )
        if self.train.patience is not None:
            raise ConfigError(
                f"[train] patience = {self.train.patience}: early stopping needs a validation split, "
                "which a policy run has not; leave patience out"
            )
        if self.train.gradient_checkpointing:
            raise ConfigError(
                "[train] gradient_checkpointing = true: it recomputes the layers of flow stacks; a policy's "
                "transformer does not use it; leave it out"
            )
        if self.distill.teacher and (self.policy.kind != "consistency" or self.policy.consistency_segments != 1):
            raise ConfigError(
                f"[distill] teacher = {self.distill.teacher!r}: distillation trains a one-segment consistency "
                f"head; got policy.kind = {self.policy.kind!r}, consistency_segments = "
                f"{self.policy.consistency_segments}"
            )


#: ``[policy]`` settings a run takes from its data set (:func:`prepare_policy`), never from the config.
DATA_SETTINGS = ("state_dim", "action_dim", "instructions")


def parse_policy_config(text: str, source: str = "config", overrides: list[str] | None = None) -> PolicyRunConfig:
    """Parse a policy run config (TOML), with ``table.key=value`` overrides in TOML syntax."""
    return _policy_run_config(apply_overrides(parse_document(text, source), overrides), source)


def load_policy_config(path: str | Path, overrides: list[str] | None = None) -> PolicyRunConfig:
    """Read and check a policy run config file (the one reader of :mod:`flowforge.config`)."""
    return _policy_run_config(apply_overrides(read_document(path), overrides), str(path))


def _policy_run_config(document: dict[str, Any], source: str) -> PolicyRunConfig:
    """Build the run config, refusing a ``[policy]`` setting the data set decides (it would be replaced)."""
    table = document.get("policy")
    given = [key for key in DATA_SETTINGS if isinstance(table, dict) and key in table]
    if given:
        raise ConfigError(
            f"{source}: [policy] {given[0]} = {table[given[0]]!r}: a policy run takes {given[0]} from its data "
            "set; leave it out"
        )
    config = build_config(PolicyRunConfig, document, source)
    # Kept as absolute paths: a run resumes, and its cache is found, from any working folder.
    data = config.data
    absolute = {key: str(Path(getattr(data, key)).resolve()) for key in ("root", "cache") if getattr(data, key)}
    return dataclasses.replace(config, data=dataclasses.replace(data, **absolute)) if absolute else config


def prepare_policy(
    config: PolicyConfig,
    dataset: EpisodeDataset,
    progress: bool = True,
    *,
    frames: str = "tensors",
    cache: str | Path | None = None,
) -> tuple[ChunkPolicy, dict[str, torch.Tensor] | PolicyWindows]:
    """Build a policy for a data set: sizes, image shape, camera names, instructions, normalisers
    and embeddings come from the data; returns the policy and its training data: tensors
    (``frames="tensors"``) or :class:`~flowforge.policy.data.PolicyWindows` that read the camera
    frames per batch (``"memory"``, ``"cache"`` with the cache folder ``cache``, ``"decode"``).

    A config that reads what the data set lacks (a state or goal feature, a camera) is refused with
    a :class:`ConfigError` before anything is decoded; so is an image size the encoder cannot take.
    """
    check_choice("frames", frames, FRAME_SOURCES)
    check_observation_mode(dataset, config)
    if config.image_shape is not None and config.cameras is None:
        first = dataset.camera_keys[0]
        if first.startswith(CAMERA_PREFIX):  # record the camera's name: evaluation renders that one
            config = dataclasses.replace(config, cameras=[first.removeprefix(CAMERA_PREFIX)])
    if config.image_shape is not None:
        # The data's image size, from its metadata, before a frame is decoded or cached: a config
        # asking for another size is refused (the frames are not resized).
        key = camera_features(dataset, config.cameras)[0]
        height, width, channels = image_shape_of(dataset.features[key])
        if list(config.image_shape) != [channels, height, width]:
            raise ConfigError(
                f"image_shape = {list(config.image_shape)}: the data's {key} frames are "
                f"{[channels, height, width]}; set image_shape = {[channels, height, width]} "
                "(frames are used at the size they were collected at)"
            )
    if frames == "tensors":
        data, instructions = policy_tensors(dataset, progress=progress, config=config)
        tensors = data
    else:
        data, instructions = policy_windows(
            dataset, config, frames, None if cache is None else str(cache), progress=progress
        )
        tensors = data.tensors
    state_dim = int(tensors["state"].shape[-1])
    action_dim = int(tensors["action"].shape[-1])
    config = dataclasses.replace(config, state_dim=state_dim, action_dim=action_dim, instructions=instructions)
    try:
        policy = build_policy(config)
    except (MemoryError, RuntimeError) as error:
        if not is_out_of_memory(error):
            raise
        raise ConfigError(
            f"[policy] width = {config.width}, layers = {config.layers}, horizon = {config.horizon}: a policy too "
            f"large for this machine's memory{memory_asked(error)}; lower them"
        ) from error
    policy.set_statistics(dataset.stats)
    policy.set_instruction_embeddings()
    if config.image_shape is not None and config.image_normalization == "mean_std":
        augmentation = policy.encoder.augmentation
        policy.set_image_statistics(
            [image_statistics(_sample_frames(data, key), augmentation) for key in config.image_keys]
        )
    return policy, data


def _sample_frames(data: dict[str, torch.Tensor] | PolicyWindows, key: str, count: int = 1000) -> torch.Tensor:
    """Up to ``count`` evenly spaced training frames of camera ``key`` (the windows' last frames)."""
    if isinstance(data, PolicyWindows):
        return data.sample_frames(key, count)
    images = data[key][:, -1]
    index = torch.linspace(0, len(images) - 1, min(len(images), count)).round().long().unique()
    return images[index]


@dataclass
class PreparedPolicyRun:
    """A policy run built and checked against its data, nothing written yet: the policy, its
    training data (tensors, or windows that read the camera frames per batch) and the trainer."""

    policy: ChunkPolicy
    data: dict[str, torch.Tensor] | PolicyWindows
    trainer: Trainer

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """The training tensors (without the camera frames when they are read per batch)."""
        return self.data.tensors if isinstance(self.data, PolicyWindows) else self.data


def prepare_policy_run(
    config: PolicyRunConfig, directory: str | Path, start_from: str | Path | None = None
) -> PreparedPolicyRun:
    """Read the run's data set and build its policy, objective and trainer; every refusal (a
    missing teacher, a feature or camera the data lacks) comes before anything is written (a frame
    cache, ``frames = "cache"``, aside: that is made here, once the config has passed).

    ``start_from``: the folder of a trained policy run whose learned weights the policy starts from
    (fine-tuning on another data set). Only parameters are taken; the buffers stay the new run's
    own, so the policy normalises states, actions and pixels with the statistics of the data it is
    now trained on. Its kind, network and inputs must be the policy's (sampling settings may differ).
    A resumed run continues from its own checkpoint instead."""
    teacher_folder = config.distill.teacher
    if teacher_folder and not (Path(teacher_folder) / "checkpoint.json").is_file():  # before the data is read
        raise ConfigError(f"[distill] teacher = {teacher_folder!r}: no trained policy there (no checkpoint.json)")
    if start_from is not None and (not isinstance(start_from, str | os.PathLike) or not str(start_from)):
        raise ConfigError(f"start_from must name the folder of a trained policy run, got {start_from!r}")
    if start_from is not None and not (Path(start_from) / "checkpoint.json").is_file():
        raise ConfigError(f"start_from = {str(start_from)!r}: no trained policy there (no checkpoint.json)")
    # Both trained runs are read, and their settings compared, before the data set is (or a frame cache made).
    teacher = _load_teacher(config.policy, teacher_folder) if teacher_folder else None
    base = _load_base(config.policy, start_from) if start_from is not None else None
    torch.manual_seed(config.train.seed)
    dataset = EpisodeDataset(config.data.root, config.policy.obs_horizon, config.policy.horizon)
    progress = config.train.progress is not False
    policy, data = prepare_policy(
        config.policy, dataset, progress=progress, frames=config.data.frames, cache=config.data.cache_folder()
    )
    metadata = {"policy_run": {"data": asdict(config.data), "train": asdict(config.train)}}
    if not _saved_without_fingerprint(Path(directory)):  # runs started before it resume as they were
        metadata["data_set"] = data_set_fingerprint(dataset)
    objective = PolicyObjective()
    if teacher is not None:
        _follow_teacher(policy, teacher, teacher_folder)
        objective = PolicyDistillation(teacher, config.distill.method, config.distill.intervals)
        metadata["policy_run"]["distill"] = asdict(config.distill)
    if base is not None:
        _start_from(policy, base, start_from)  # before the trainer copies the weights into its average
        metadata["started_from"] = str(start_from)
    trainer = Trainer(
        policy,
        objective,
        config.train,
        data=data,
        directory=directory,
        metadata=metadata,
        workers=config.data.workers,
    )
    return PreparedPolicyRun(policy, data, trainer)


def check_resume_tables(config: PolicyRunConfig, directory: str | Path) -> None:
    """Refuse, before the data set is read (or a frame cache made), resuming ``directory``'s run with
    other ``[data]``, ``[train]`` or ``[policy]`` settings (those the data fills in aside); the
    trainer checks the rest once the policy is built."""
    directory = Path(directory)
    if not (directory / "checkpoint.json").is_file():
        return
    metadata = read_manifest(directory, training=True).get("metadata")
    saved = metadata.get("policy_run") if isinstance(metadata, dict) else None
    if not isinstance(saved, dict):
        raise CheckpointError(f"cannot resume {directory}: it was not written by `flowforge policy train`")
    current = json.loads(json.dumps({"data": asdict(config.data), "train": asdict(config.train)}))
    for table, settings in current.items():
        before = saved.get(table) if isinstance(saved.get(table), dict) else {}
        for key in sorted(set(before) | set(settings)):
            if key != "progress" and before.get(key) != settings.get(key):
                raise CheckpointError(
                    f"cannot resume {directory}: the run was trained with other settings (metadata.policy_run."
                    f"{table}.{key}: {before.get(key)!r} -> {settings.get(key)!r}); resume with the settings it "
                    "was started with, or start a new run in another folder"
                )
    changed = _differences(config.policy, load_policy(directory).policy_config, _filled_in(config.policy))
    if changed:
        key, now, before = changed[0]
        raise CheckpointError(
            f"cannot resume {directory}: the run was trained with other settings (policy.{key}: {before!r} -> "
            f"{now!r}); resume with the settings it was started with, or start a new run in another folder"
        )


def _saved_without_fingerprint(directory: Path) -> bool:
    """Whether ``directory`` holds a policy run saved before runs recorded their data set's fingerprint."""
    if not (directory / "checkpoint.json").is_file():
        return False
    metadata = read_manifest(directory).get("metadata")
    return isinstance(metadata, dict) and "policy_run" in metadata and "data_set" not in metadata


def data_set_fingerprint(dataset: EpisodeDataset) -> dict[str, Any]:
    """What a resumed run must find again in its data set: its size and the statistics the policy
    normalises with (a SHA-256 of stats.json's content), so a data set collected anew under the same
    folder name is refused, not trained on with the old normalisers."""
    stats = json.dumps(dataset.stats, sort_keys=True).encode()
    return {"episodes": len(dataset.lengths), "frames": len(dataset), "stats_sha256": hashlib.sha256(stats).hexdigest()}


def train_policy(
    config: PolicyRunConfig, directory: str | Path, resume: bool = False, start_from: str | Path | None = None
) -> tuple[ChunkPolicy, dict[str, torch.Tensor]]:
    """Train the run's policy into ``directory`` (checkpoint and metrics); returns it and its
    training tensors (without the camera frames when they are read per batch). ``start_from``: a
    trained run whose learned weights it starts from (:func:`prepare_policy_run`)."""
    prepared = prepare_policy_run(config, directory, start_from)
    prepared.trainer.fit(resume=resume)
    return prepared.policy, prepared.tensors


#: Policy settings a run fills in from its data set: compared with a trained run's once the data is read.
DATA_SETTINGS = frozenset({"state_dim", "action_dim", "instructions"})


def _load_teacher(config: PolicyConfig, folder: str) -> ChunkPolicy:
    """The trained flow policy in ``folder``, refused with a :class:`ConfigError` unless the student's
    ``config`` shares its network and inputs (the settings the data fills in are compared later)."""
    teacher = load_policy(folder)
    if teacher.policy_config.kind != "flow":
        raise ConfigError(
            f"[distill] teacher = {folder!r} is a {teacher.policy_config.kind!r} policy; distillation follows a "
            "'flow' policy's ODE"
        )
    differing = _differing_settings(config, teacher.policy_config, HEAD_SETTINGS | _filled_in(config), "teacher")
    if differing:
        raise ConfigError(f"[distill] the student's network or inputs differ from the teacher's: {differing}")
    return teacher


def _follow_teacher(student: ChunkPolicy, teacher: ChunkPolicy, folder: str) -> None:
    """Give ``student`` (built from the data) the weights of ``teacher``, which is frozen."""
    differing = _differing_settings(student.policy_config, teacher.policy_config, HEAD_SETTINGS, "teacher")
    if differing:
        raise ConfigError(f"[distill] the student's network or inputs differ from the teacher's: {differing}")
    student.load_state_dict(teacher.state_dict())
    teacher.requires_grad_(False)


def _load_base(config: PolicyConfig, folder: str | Path) -> ChunkPolicy:
    """The trained policy in ``folder`` that a run starts from, refused with a :class:`ConfigError`
    unless ``config`` shares its kind, network and inputs (those the data fills in are compared later)."""
    base = load_policy(folder)
    free = (HEAD_SETTINGS - {"kind"}) | _filled_in(config)
    differing = _differing_settings(config, base.policy_config, free, "trained")
    if differing:
        raise ConfigError(f"start_from = {str(folder)!r}: its policy differs from this run's: {differing}")
    return base


def _start_from(policy: ChunkPolicy, base: ChunkPolicy, folder: str | Path) -> None:
    """Copy the learned weights (parameters, not buffers) of ``base`` into ``policy`` (built from the
    data); refused with a :class:`ConfigError` unless the two share kind, network and inputs."""
    differing = _differing_settings(policy.policy_config, base.policy_config, HEAD_SETTINGS - {"kind"}, "trained")
    if differing:
        raise ConfigError(f"start_from = {str(folder)!r}: its policy differs from this run's: {differing}")
    weights = dict(base.named_parameters())
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            parameter.copy_(weights[name])


def _filled_in(config: PolicyConfig) -> frozenset[str]:
    """The settings of ``config`` that building its policy from a data set fills in."""
    return DATA_SETTINGS | ({"cameras"} if config.cameras is None else set())


def _differences(mine: PolicyConfig, theirs: PolicyConfig, free: frozenset[str]) -> list[tuple[str, Any, Any]]:
    """``(key, mine, theirs)`` for every policy setting outside ``free`` in which the two differ, by key."""
    mine_settings, their_settings = asdict(mine), asdict(theirs)
    return [
        (key, value, their_settings.get(key))
        for key, value in sorted(mine_settings.items())
        if key not in free and value != their_settings.get(key)
    ]


def _differing_settings(mine: PolicyConfig, theirs: PolicyConfig, free: frozenset[str], label: str) -> str:
    """:func:`_differences` shown as ``key = mine (label theirs)``; empty when there are none."""
    return ", ".join(f"{key} = {value!r} ({label} {other!r})" for key, value, other in _differences(mine, theirs, free))


def load_policy(directory: str | Path, map_location: str | torch.device | None = None) -> ChunkPolicy:
    """Rebuild a trained policy from its checkpoint folder (weights checked by hash).

    Checkpoints of earlier releases load converted: those whose manifest holds the policy's fields
    under ``config`` (before policies were registered models) and those that name a policy class
    per kind (``"flow"``, ``"hierarchical"``, ``"mse"``, ``"ddpm"``, before the policy was split
    into encoder, expert and head); their weights are renamed on load (:mod:`flowforge.policy.core`).
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    model = manifest.get("model")
    config = None
    if model is None:
        released = manifest.get("config")
        if not isinstance(released, dict) or released.get("kind") not in POLICY_KINDS:
            raise CheckpointError(f"{directory} does not hold a flowforge policy (class {manifest.get('class')!r})")
        config = {"__object__": "policy-config", "arguments": released}
    elif isinstance(model, dict) and model.get("__object__") in POLICY_KINDS:
        arguments = model.get("arguments")
        if not isinstance(arguments, dict) or "config" not in arguments:
            raise CheckpointError(f"{directory}: the policy's model entry holds no 'config' argument")
        config = arguments["config"]
    if config is not None:
        manifest = {**manifest, "model": {"__object__": "chunk-policy", "arguments": {"config": config}}}
    policy = load_model_from_manifest(directory, manifest, ChunkPolicy, map_location)
    return policy.eval()
