r"""What every action-chunk policy shares: observation prefix, action expert, execution.

A policy maps an observation to a *chunk* of :math:`H` future actions. Every policy here is built
the same way, so that comparisons between them are about the action head alone:

* **Prefix** (the observation, encoded once per chunk): one token per observation frame from the
  normalised state (an MLP); with images, 49 tokens per frame from a small conv net trained from
  scratch (84x84 -> 7x7); with language, one token from the frozen MiniLM embedding of the
  task instruction. Learned position embeddings tell the tokens apart.
* **Action expert**: :math:`H` suffix tokens through
  :class:`~flowforge.nn.transformer.PrefixSuffixTransformer`, which attends to the prefix with
  pi0's block-causal mask. The prefix's keys and values are computed once per chunk and reused
  at every denoising step (``use_cache=True``).
* **Execution**: :meth:`ChunkPolicy.select_action` keeps the last ``obs_horizon`` observations,
  predicts a chunk when its queue is empty and executes ``n_action_steps`` actions of it before
  replanning; with ``temporal_ensemble`` it predicts at every step and averages all predictions
  for the current step with weights :math:`e^{-m i}` (oldest first, ACT's scheme).

States and actions are normalised inside the model with the data set's statistics (buffers, so
a checkpoint carries them); inputs and outputs are always in the data's own units.

Subclasses (:mod:`flowforge.policy.flow_policy`, :mod:`flowforge.policy.baselines`) define the
suffix tokens, the loss and the sampler.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from flowforge.nn.transformer import PrefixCache, PrefixSuffixTransformer
from flowforge.nn.velocity import SinusoidalTimeEmbedding
from flowforge.policy.language import EMBEDDING_SIZE, encode_instructions

Batch = dict[str, Any]


@dataclass
class PolicyConfig:
    """Everything that rebuilds a policy (kept as JSON in its checkpoint).

    Arguments:
        kind: ``"flow"``, ``"hierarchical"``, ``"mse"`` or ``"ddpm"``.
        state_dim, action_dim: sizes of the state and action vectors.
        horizon: :math:`H`, actions per chunk.
        obs_horizon: observation frames the policy sees (the current one and those before it).
        n_action_steps: actions executed from each chunk before replanning (``None``: half the chunk).
        width, layers, heads: the transformer's size.
        image_shape: ``(3, 84, 84)`` to use images, ``None`` for state only.
        language: add an instruction token (frozen MiniLM embedding).
        instructions: the instructions seen in training; their embeddings live in the weights.
        sampling_steps, method: the flow's integration (``euler`` by default; any flowforge solver).
        noise_scale: the flow policies' sampling temperature tau: integration starts from
            tau * eps with eps ~ N(0, I). 1 samples the learned distribution; below 1 concentrates
            the samples towards its mode (Glow's temperature), which suits near-deterministic
            demonstrations; 0 makes the policy deterministic.
        keyframe_stride: hierarchical policies plan every ``keyframe_stride``-th action first.
        diffusion_steps, inference_steps, sampler: the DDPM baseline (``"ddim"`` or ``"ddpm"``).
        state_normalization, action_normalization: ``"mean_std"`` or ``"min_max"``.
    """

    kind: str = "flow"
    state_dim: int = 39
    action_dim: int = 4
    horizon: int = 16
    obs_horizon: int = 1
    n_action_steps: int | None = None
    width: int = 128
    layers: int = 4
    heads: int = 4
    image_shape: list[int] | None = None
    language: bool = True
    instructions: list[str] = field(default_factory=list)
    sampling_steps: int = 10
    method: str = "euler"
    noise_scale: float = 1.0
    keyframe_stride: int = 4
    diffusion_steps: int = 100
    inference_steps: int = 10
    sampler: str = "ddim"
    state_normalization: str = "mean_std"
    action_normalization: str = "min_max"

    def __post_init__(self) -> None:
        if self.kind not in ("flow", "hierarchical", "mse", "ddpm"):
            raise ValueError(f"kind must be 'flow', 'hierarchical', 'mse' or 'ddpm', got {self.kind!r}")
        for name in ("state_dim", "action_dim", "horizon", "obs_horizon", "width", "layers", "heads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_action_steps is None:
            self.n_action_steps = max(1, self.horizon // 2)
        if not 1 <= self.n_action_steps <= self.horizon:
            raise ValueError(f"n_action_steps must be in 1..horizon={self.horizon}, got {self.n_action_steps}")
        if self.image_shape is not None:
            self.image_shape = [int(s) for s in self.image_shape]
            if len(self.image_shape) != 3 or self.image_shape[0] != 3:
                raise ValueError(f"image_shape must be (3, H, W), got {self.image_shape}")
        if self.kind == "hierarchical" and self.horizon % self.keyframe_stride:
            raise ValueError(f"horizon {self.horizon} must be a multiple of keyframe_stride {self.keyframe_stride}")
        if not (isinstance(self.noise_scale, int | float) and self.noise_scale >= 0.0):
            raise ValueError(f"noise_scale must be a number >= 0, got {self.noise_scale!r}")
        if self.sampler not in ("ddim", "ddpm"):
            raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {self.sampler!r}")
        for name in ("state_normalization", "action_normalization"):
            if getattr(self, name) not in ("mean_std", "min_max"):
                raise ValueError(f"{name} must be 'mean_std' or 'min_max', got {getattr(self, name)!r}")


class ImageEncoder(nn.Module):
    """Conv net trained from scratch: a uint8 image (3, 84, 84) to a 7x7 grid of tokens.

    ``conv 8x8 /4 -> GELU -> conv 4x4 /2 -> GELU -> conv 3x3 -> tokens``; other sizes give other
    grids. Pixels are scaled to [-1, 1] first.
    """

    def __init__(self, image_shape: list[int], width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 8, stride=4),
            nn.GELU(),
            nn.Conv2d(32, 64, 4, stride=2),
            nn.GELU(),
            nn.Conv2d(64, width, 3),
        )
        with torch.no_grad():
            self.tokens = int(self.net(torch.zeros(1, *image_shape)).flatten(2).shape[-1])

    def forward(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` uint8 to ``(B, tokens, width)``."""
        x = images.float() / 127.5 - 1.0
        return self.net(x).flatten(2).transpose(1, 2)


def _normalizer_buffers(module: nn.Module, name: str, size: int) -> None:
    module.register_buffer(f"{name}_shift", torch.zeros(size))
    module.register_buffer(f"{name}_scale", torch.ones(size))


class ChunkPolicy(nn.Module):
    """Base class: prefix encoding, normalisation, execution. See the module docstring."""

    def __init__(self, config: PolicyConfig) -> None:
        super().__init__()
        self.policy_config = config
        self.config = asdict(config)  # what the Trainer's checkpoints keep
        width = config.width
        self.state_encoder = nn.Sequential(nn.Linear(config.state_dim, width), nn.GELU(), nn.Linear(width, width))
        self.image_encoder = ImageEncoder(config.image_shape, width) if config.image_shape is not None else None
        prefix = config.obs_horizon * (1 + (self.image_encoder.tokens if self.image_encoder is not None else 0))
        if config.language:
            self.language_projection = nn.Linear(EMBEDDING_SIZE, width)
            self.register_buffer("instruction_embeddings", torch.zeros(len(config.instructions), EMBEDDING_SIZE))
            prefix += 1
        self.prefix_tokens = prefix
        self.prefix_position = nn.Parameter(0.02 * torch.randn(prefix, width))
        _normalizer_buffers(self, "state", config.state_dim)
        _normalizer_buffers(self, "action", config.action_dim)
        self._runtime_embeddings: dict[str, Tensor] = {}
        #: network evaluations of the action expert in the last :meth:`predict_chunk`.
        self.last_nfe = 0
        #: seconds the last :meth:`predict_chunk` took.
        self.last_latency = 0.0
        #: ``(seconds, NFE)`` of every chunk predicted since it was last cleared (rollouts read it).
        self.chunk_log: list[tuple[float, int]] = []
        self.temporal_ensemble: float | None = None
        self.reset()

    # ---------------------------------------------------------------- set-up from data
    def set_statistics(self, stats: dict[str, dict[str, Any]]) -> None:
        """Normalisers from a data set's ``stats.json`` (keys ``observation.state`` and ``action``)."""
        for name, key, mode in (
            ("state", "observation.state", self.policy_config.state_normalization),
            ("action", "action", self.policy_config.action_normalization),
        ):
            s = {k: torch.as_tensor(np.asarray(v), dtype=torch.float32) for k, v in stats[key].items()}
            if mode == "mean_std":
                shift, scale = s["mean"], s["std"]
            else:
                shift, scale = (s["max"] + s["min"]) / 2, (s["max"] - s["min"]) / 2
            getattr(self, f"{name}_shift").copy_(shift)
            getattr(self, f"{name}_scale").copy_(scale.clamp_min(1e-4))

    def set_instruction_embeddings(self, embeddings: Tensor | None = None) -> None:
        """Store the embeddings of ``config.instructions`` (computed with MiniLM when not given)."""
        if not self.policy_config.language:
            return
        if embeddings is None:
            embeddings = encode_instructions(self.policy_config.instructions)
        self.instruction_embeddings.copy_(embeddings)

    # ---------------------------------------------------------------- normalisation
    def normalize_state(self, state: Tensor) -> Tensor:
        return (state - self.state_shift) / self.state_scale

    def normalize_action(self, action: Tensor) -> Tensor:
        return (action - self.action_shift) / self.action_scale

    def unnormalize_action(self, action: Tensor) -> Tensor:
        return action * self.action_scale + self.action_shift

    # ---------------------------------------------------------------- the prefix
    def _language(self, batch: Batch, rows: int) -> Tensor:
        if "task_index" in batch:
            return self.instruction_embeddings[batch["task_index"]]
        texts = batch.get("instruction")
        if texts is None:
            raise ValueError("a language-conditioned policy needs 'task_index' or 'instruction' in the batch")
        if isinstance(texts, str):
            texts = [texts] * rows
        known = {text: i for i, text in enumerate(self.policy_config.instructions)}
        vectors = []
        for text in texts:
            if text in known:
                vectors.append(self.instruction_embeddings[known[text]])
            else:
                if text not in self._runtime_embeddings:
                    with torch.inference_mode(False):  # an ordinary tensor, usable in training too
                        self._runtime_embeddings[text] = encode_instructions([text])[0]
                vectors.append(self._runtime_embeddings[text].to(self.instruction_embeddings))
        return torch.stack(vectors)

    def prefix(self, batch: Batch) -> Tensor:
        """The observation tokens ``(B, prefix_tokens, width)`` of a batch (raw state, uint8 images)."""
        state = batch["state"]
        if state.dim() != 3 or state.shape[1:] != (self.policy_config.obs_horizon, self.policy_config.state_dim):
            cfg = self.policy_config
            raise ValueError(
                f"state must have shape (batch, {cfg.obs_horizon}, {cfg.state_dim}), got {tuple(state.shape)}"
            )
        rows = state.shape[0]
        tokens = [self.state_encoder(self.normalize_state(state))]
        if self.image_encoder is not None:
            images = batch["image"]
            frames = self.image_encoder(images.flatten(0, 1))  # (B * obs_horizon, tokens, width)
            tokens.append(frames.reshape(rows, -1, self.policy_config.width))
        if self.policy_config.language:
            tokens.append(self.language_projection(self._language(batch, rows))[:, None])
        return torch.cat(tokens, dim=1) + self.prefix_position

    # ---------------------------------------------------------------- training and sampling (subclasses)
    def loss(self, batch: Batch) -> Tensor:
        """The training loss of a batch with ``action`` (B, H, A) and ``action_is_pad`` (B, H)."""
        raise NotImplementedError

    def sample_normalized(self, batch: Batch, use_cache: bool = True, noise: Tensor | None = None) -> Tensor:
        """A chunk in normalised units, ``(B, H, A)``; sets :attr:`last_nfe`."""
        raise NotImplementedError

    def target_actions(self, batch: Batch) -> Tensor:
        """The normalised chunk ``(B, H, A)`` with every padded step replaced by the last real action
        before it, so that whatever a data set stores past an episode's end cannot reach the model
        (padded steps are also left out of the loss: :meth:`masked_mean`)."""
        actions = self.normalize_action(batch["action"])
        pad = batch.get("action_is_pad")
        if pad is None:
            return actions
        steps = torch.arange(actions.shape[1], device=actions.device).expand(actions.shape[0], -1)
        last_real = torch.where(pad, torch.zeros_like(steps), steps).cummax(dim=1).values
        return actions.gather(1, last_real[..., None].expand(-1, -1, actions.shape[2]))

    @staticmethod
    def masked_mean(squared_error: Tensor, action_is_pad: Tensor | None) -> Tensor:
        """Mean of ``(B, H, A)`` errors over the steps that are not padding (past an episode's end)."""
        if action_is_pad is None:
            return squared_error.mean()
        keep = (~action_is_pad).to(squared_error.dtype)[..., None]
        return (squared_error * keep).sum() / (keep.sum() * squared_error.shape[-1]).clamp_min(1.0)

    @torch.inference_mode()
    def predict_chunk(self, batch: Batch, use_cache: bool = True, noise: Tensor | None = None) -> Tensor:
        """Actions ``(B, H, A)`` in the data's units for a batch of observations.

        Runs under ``torch.inference_mode`` (no autograd bookkeeping at all: at batch 1 most of a
        step is per-operation overhead, and this removes about a quarter of it).

        ``use_cache=False`` recomputes the whole observation prefix (encoders and transformer) at
        every denoising step, as a policy without a KV cache would. ``noise``: the initial noise,
        ``(B, H, A)``, for reproducible comparisons.
        """
        start = time.perf_counter()
        chunk = self.unnormalize_action(self.sample_normalized(batch, use_cache=use_cache, noise=noise))
        self.last_latency = time.perf_counter() - start
        self.chunk_log.append((self.last_latency, self.last_nfe))
        return chunk

    # ---------------------------------------------------------------- execution in an environment
    def reset(self) -> None:
        """Forget the observation history and the queued actions (call at every episode start)."""
        self._history: deque[dict[str, Any]] = deque(maxlen=self.policy_config.obs_horizon)
        self._queue: deque[np.ndarray] = deque()
        self._ensemble: list[tuple[int, np.ndarray]] = []  # (step predicted at, chunk)
        self._step = 0

    def _observation_batch(self, observation: dict[str, Any]) -> Batch:
        self._history.append(observation)
        while len(self._history) < self.policy_config.obs_horizon:
            self._history.appendleft(self._history[0])  # pad the episode start by repetition
        device = self.state_shift.device
        frames = list(self._history)
        batch: Batch = {
            "state": torch.as_tensor(np.stack([f["state"] for f in frames]), dtype=torch.float32, device=device)[None]
        }
        if self.image_encoder is not None:
            images = np.stack([np.asarray(f["image"]).transpose(2, 0, 1) for f in frames])
            batch["image"] = torch.as_tensor(images, device=device)[None]
        if self.policy_config.language:
            batch["instruction"] = [observation["instruction"]]
        return batch

    def select_action(self, observation: dict[str, Any]) -> np.ndarray:
        """The next action for an observation dict (``state``, ``image`` when used, ``instruction``)."""
        batch = self._observation_batch(observation)
        if self.temporal_ensemble is not None:
            chunk = self.predict_chunk(batch)[0].cpu().numpy()
            self._ensemble = [(s, c) for s, c in self._ensemble if self._step - s < len(c)] + [(self._step, chunk)]
            weights = np.array([math.exp(-self.temporal_ensemble * i) for i in range(len(self._ensemble))])
            actions = np.stack([c[self._step - s] for s, c in self._ensemble])
            self._step += 1
            return ((weights[:, None] * actions).sum(0) / weights.sum()).astype(np.float32)
        if not self._queue:
            chunk = self.predict_chunk(batch)[0].cpu().numpy()
            self._queue.extend(chunk[: self.policy_config.n_action_steps])
        self._step += 1
        return self._queue.popleft()


class ActionTokens(nn.Module):
    """Suffix tokens for a noisy chunk at time t: pi0's MLP on ``[action embedding, time embedding]``
    per action token, plus a learned position per step of the chunk."""

    def __init__(self, action_dim: int, horizon: int, width: int) -> None:
        super().__init__()
        self.action_embedding = nn.Linear(action_dim, width)
        self.time_embedding = SinusoidalTimeEmbedding(width, max_frequency=100.0)
        self.mix = nn.Sequential(nn.Linear(2 * width, width), nn.SiLU(), nn.Linear(width, width))
        self.position = nn.Parameter(0.02 * torch.randn(horizon, width))

    def forward(self, actions: Tensor, t: Tensor) -> Tensor:
        embedded = self.action_embedding(actions)
        times = self.time_embedding(t)[:, None].expand(-1, actions.shape[1], -1)
        return self.mix(torch.cat([embedded, times], dim=-1)) + self.position[: actions.shape[1]]


class DenoisingPolicy(ChunkPolicy):
    """A chunk policy whose action expert maps ``(noisy chunk, time, observation)`` to a chunk-shaped
    output (a velocity for flow matching, a noise estimate for DDPM)."""

    def __init__(self, config: PolicyConfig, horizon: int | None = None) -> None:
        super().__init__(config)
        self.chunk_horizon = horizon or config.horizon
        self.transformer = PrefixSuffixTransformer(config.width, config.layers, config.heads)
        self.action_tokens = ActionTokens(config.action_dim, self.chunk_horizon, config.width)
        self.action_head = nn.Linear(config.width, config.action_dim)

    def encode(self, prefix: Tensor) -> PrefixCache:
        """The prefix's KV cache (the prefix never attends to the actions, so it is computed once)."""
        return self.transformer.encode_prefix(prefix)

    def denoise(self, noisy: Tensor, t: Tensor, cache: PrefixCache) -> Tensor:
        """The expert's output for a noisy chunk at times ``t`` (B,), against a cached prefix."""
        return self.action_head(self.transformer.decode_suffix(self.action_tokens(noisy, t), cache))

    def denoise_uncached(self, noisy: Tensor, t: Tensor, prefix: Tensor) -> Tensor:
        """The same output from one joint pass with the explicit block-causal mask."""
        return self.action_head(self.transformer(prefix, self.action_tokens(noisy, t))[0])
