"""Policy runs from TOML configs: train on an episode data set, save, load, evaluate.

A config has three tables::

    [policy]            # PolicyConfig: kind = "flow" | "hierarchical" | "mse" | "ddpm", sizes, sampler
    kind = "flow"
    horizon = 16

    [data]
    root = "data/mt10"  # a LeRobot-v3 folder (flowforge data collect writes one)

    [train]             # TrainerConfig: steps, batch_size, lr, ema_decay, ...
    steps = 20000

The checkpoint is the Trainer's (safetensors + JSON manifest): :func:`load_policy` rebuilds the
policy from the ``config`` it records, with its normalisers and instruction embeddings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from flowforge.checkpoint import load_model_from_manifest, read_manifest
from flowforge.config import parse_config, read_config
from flowforge.data.episodes import EpisodeDataset
from flowforge.errors import CheckpointError, ConfigError
from flowforge.policy import POLICY_KINDS, build_policy
from flowforge.policy.core import ChunkPolicy, PolicyConfig
from flowforge.policy.data import policy_tensors
from flowforge.train import PolicyObjective, Trainer, TrainerConfig


@dataclass
class PolicyDataConfig:
    """``root``: the episode data set folder (required)."""

    root: str = ""


@dataclass
class PolicyRunConfig:
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    data: PolicyDataConfig = field(default_factory=PolicyDataConfig)
    train: TrainerConfig = field(default_factory=TrainerConfig)

    def __post_init__(self) -> None:
        if not self.data.root:
            raise ConfigError("[data] root (the episode data set folder) is required")


def parse_policy_config(text: str, source: str = "config", overrides: list[str] | None = None) -> PolicyRunConfig:
    """Parse a policy run config (TOML), with ``table.key=value`` overrides in TOML syntax."""
    return parse_config(PolicyRunConfig, text, source, overrides)


def load_policy_config(path: str | Path, overrides: list[str] | None = None) -> PolicyRunConfig:
    """Read and check a policy run config file (the one reader of :mod:`flowforge.config`)."""
    return read_config(PolicyRunConfig, path, overrides)


def prepare_policy(
    config: PolicyConfig, dataset: EpisodeDataset, progress: bool = True
) -> tuple[ChunkPolicy, dict[str, torch.Tensor]]:
    """Build a policy for a data set: sizes, image shape, instructions, normalisers and embeddings
    come from the data; returns the policy and its training tensors."""
    tensors, instructions = policy_tensors(dataset, progress=progress, state_key=config.state_key)
    state_dim = int(tensors["state"].shape[-1])
    action_dim = int(tensors["action"].shape[-1])
    image_shape = list(tensors["image"].shape[2:]) if "image" in tensors and config.image_shape is not None else None
    if config.image_shape is not None and "image" not in tensors:
        raise ConfigError(f"{dataset.root}: the policy uses images but the data set has none")
    config = dataclasses.replace(
        config, state_dim=state_dim, action_dim=action_dim, image_shape=image_shape, instructions=instructions
    )
    if "image" in tensors and image_shape is None:
        del tensors["image"]
    policy = build_policy(config)
    policy.set_statistics(dataset.stats)
    policy.set_instruction_embeddings()
    return policy, tensors


def train_policy(
    config: PolicyRunConfig, directory: str | Path, resume: bool = False
) -> tuple[ChunkPolicy, dict[str, torch.Tensor]]:
    """Train the run's policy into ``directory`` (checkpoint and metrics); returns it and its data."""
    torch.manual_seed(config.train.seed)
    dataset = EpisodeDataset(config.data.root, config.policy.obs_horizon, config.policy.horizon)
    policy, tensors = prepare_policy(config.policy, dataset, progress=config.train.progress is not False)
    metadata = {"policy_run": {"data": asdict(config.data), "train": asdict(config.train)}}
    trainer = Trainer(policy, PolicyObjective(), config.train, data=tensors, directory=directory, metadata=metadata)
    trainer.fit(resume=resume)
    return policy, tensors


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
