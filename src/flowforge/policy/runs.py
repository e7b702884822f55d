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
from typing import Any

import torch

from flowforge.checkpoint import CheckpointError, load_state_dict_checked, load_tensors, read_manifest
from flowforge.data.episodes import EpisodeDataset
from flowforge.policy import POLICY_KINDS, build_policy
from flowforge.policy.core import ChunkPolicy, PolicyConfig
from flowforge.policy.data import policy_tensors
from flowforge.runs import ConfigError, read_config_document
from flowforge.train import PolicyObjective, Trainer, TrainerConfig

#: A policy run config that cannot be used: the same error as for the other run configs.
PolicyConfigError = ConfigError


@dataclass
class PolicyDataConfig:
    """``root``: the episode data set folder."""

    root: str = ""


@dataclass
class PolicyRunConfig:
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    data: PolicyDataConfig = field(default_factory=PolicyDataConfig)
    train: TrainerConfig = field(default_factory=TrainerConfig)


def _section(name: str, cls: type, values: Any, source: str) -> Any:
    if not isinstance(values, dict):
        raise PolicyConfigError(f"{source}: [{name}] must be a table")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise PolicyConfigError(
            f"{source}: [{name}] has no setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        raise PolicyConfigError(f"{source}: [{name}]: {error}") from error


def parse_policy_config(text: str, source: str = "config", overrides: list[str] | None = None) -> PolicyRunConfig:
    """Parse a policy run config (TOML), with ``table.key=value`` overrides in TOML syntax."""
    document = read_config_document(text, source, overrides)
    unknown = set(document) - {"policy", "data", "train"}
    if unknown:
        raise PolicyConfigError(f"{source}: unknown table(s) {', '.join(sorted(unknown))}; known: policy, data, train")
    config = PolicyRunConfig(
        _section("policy", PolicyConfig, document.get("policy", {}), source),
        _section("data", PolicyDataConfig, document.get("data", {}), source),
        _section("train", TrainerConfig, document.get("train", {}), source),
    )
    if not config.data.root:
        raise PolicyConfigError(f"{source}: [data] root (the episode data set folder) is required")
    return config


def load_policy_config(path: str | Path, overrides: list[str] | None = None) -> PolicyRunConfig:
    path = Path(path)
    if not path.is_file():
        raise PolicyConfigError(f"{path}: no such config file")
    return parse_policy_config(path.read_text(), str(path), overrides)


def prepare_policy(
    config: PolicyConfig, dataset: EpisodeDataset, progress: bool = True
) -> tuple[ChunkPolicy, dict[str, torch.Tensor]]:
    """Build a policy for a data set: sizes, image shape, instructions, normalisers and embeddings
    come from the data; returns the policy and its training tensors."""
    tensors, instructions = policy_tensors(dataset, progress=progress)
    state_dim = int(tensors["state"].shape[-1])
    action_dim = int(tensors["action"].shape[-1])
    image_shape = list(tensors["image"].shape[2:]) if "image" in tensors and config.image_shape is not None else None
    if config.image_shape is not None and "image" not in tensors:
        raise PolicyConfigError(f"{dataset.root}: the policy uses images but the data set has none")
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
    """Rebuild a trained policy from its checkpoint folder (weights checked by hash)."""
    manifest = read_manifest(directory)
    config = manifest.get("config")
    if not isinstance(config, dict) or config.get("kind") not in POLICY_KINDS:
        raise CheckpointError(f"{directory} does not hold a flowforge policy (class {manifest.get('class')!r})")
    try:
        policy = build_policy(PolicyConfig(**config))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"the config in {directory} does not build a policy: {error}") from error
    load_state_dict_checked(policy, load_tensors(directory, "model", manifest), directory)
    policy.eval()
    return policy.to(map_location) if map_location is not None else policy
