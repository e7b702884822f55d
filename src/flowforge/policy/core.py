r"""What every action-chunk policy shares: observation prefix, action expert, sampling records.

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
* **Sampling**: :meth:`ChunkPolicy.predict_chunk` takes the sampling settings as arguments and
  returns a :class:`ChunkResult`. Executing chunks in an environment (history, queue, temporal
  ensembling) is :class:`flowforge.policy.execution.ChunkExecutor`'s job, not the model's.

States and actions are normalised inside the model with the data set's statistics (buffers, so
a checkpoint carries them); inputs and outputs are always in the data's own units.

Subclasses (:mod:`flowforge.policy.flow_policy`, :mod:`flowforge.policy.baselines`) define the
suffix tokens, the loss and the sampler.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from flowforge.config import check_choice, check_range
from flowforge.data.normalize import Normalizer
from flowforge.errors import ConfigError, DataError
from flowforge.matching.functional import masked_mean
from flowforge.nn.transformer import PrefixCache, PrefixSuffixTransformer
from flowforge.nn.velocity import SinusoidalTimeEmbedding
from flowforge.policy.language import EMBEDDING_SIZE, encode_instructions
from flowforge.registry import Rebuildable, register
from flowforge.validation import check_choice as check_argument_choice
from flowforge.validation import check_count, check_real

Batch = dict[str, Any]


@register("policy-config", "config")
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
        from flowforge.ode import ADAPTIVE_METHODS, TABLEAUS
        from flowforge.registry import names

        check_choice("kind", self.kind, names("policy"))
        for name in ("state_dim", "action_dim", "horizon", "obs_horizon", "width", "layers", "heads"):
            _check_count(name, getattr(self, name))
        if self.width % self.heads:
            raise ConfigError(f"width = {self.width}: expected a multiple of heads = {self.heads}")
        if self.n_action_steps is None:
            self.n_action_steps = max(1, self.horizon // 2)
        _check_count("n_action_steps", self.n_action_steps)
        if self.n_action_steps > self.horizon:
            raise ConfigError(f"n_action_steps = {self.n_action_steps}: expected at most horizon = {self.horizon}")
        if self.image_shape is not None:
            self.image_shape = [int(s) for s in self.image_shape]
            if len(self.image_shape) != 3 or self.image_shape[0] != 3 or min(self.image_shape) < 1:
                raise ConfigError(f"image_shape = {self.image_shape}: expected [3, H, W] (RGB) or none")
        _check_count("sampling_steps", self.sampling_steps)
        check_choice("method", self.method, (*TABLEAUS, *ADAPTIVE_METHODS))
        check_range("noise_scale", self.noise_scale, low=0)
        _check_count("keyframe_stride", self.keyframe_stride)
        if self.kind == "hierarchical" and self.horizon % self.keyframe_stride:
            raise ConfigError(
                f"keyframe_stride = {self.keyframe_stride}: expected a divisor of horizon = {self.horizon}"
            )
        _check_count("diffusion_steps", self.diffusion_steps)
        _check_count("inference_steps", self.inference_steps)
        if self.inference_steps > self.diffusion_steps:
            raise ConfigError(
                f"inference_steps = {self.inference_steps}: expected at most diffusion_steps = {self.diffusion_steps}"
            )
        check_choice("sampler", self.sampler, ("ddim", "ddpm"))
        check_choice("state_normalization", self.state_normalization, ("mean_std", "min_max"))
        check_choice("action_normalization", self.action_normalization, ("mean_std", "min_max"))


@dataclass(frozen=True)
class Sampling:
    """How one chunk is sampled, resolved from a call's arguments and the config's defaults.

    ``steps``: solver steps (flow policies) or denoising steps (DDPM/DDIM); ``method``: a flowforge
    solver (flow policies) or ``"ddim"``/``"ddpm"``; ``noise_scale``: the flow policies' temperature.
    """

    steps: int
    method: str
    noise_scale: float


@dataclass(frozen=True)
class ChunkResult:
    """What :meth:`ChunkPolicy.predict_chunk` returns: ``actions`` (B, H, A) in the data's units, the
    action expert's evaluations ``nfe`` and the wall time ``seconds``."""

    actions: Tensor
    nfe: int
    seconds: float


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} = {value!r}: expected an integer >= 1")


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


def _rename_legacy_normalizer_keys(state_dict: dict[str, Tensor], prefix: str, *args: Any) -> None:
    """Checkpoints written before the one Normalizer kept ``state_shift`` etc. on the policy itself."""
    for name in ("state", "action"):
        for part in ("shift", "scale"):
            old = f"{prefix}{name}_{part}"
            if old in state_dict:
                state_dict[f"{prefix}{name}_normalizer.{part}"] = state_dict.pop(old)


class ChunkPolicy(Rebuildable, nn.Module):
    """Base class: prefix encoding, normalisation, execution. See the module docstring."""

    def __init__(self, config: PolicyConfig) -> None:
        super().__init__()
        self.policy_config = config
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
        self.state_normalizer = Normalizer(config.state_dim, config.state_normalization)
        self.action_normalizer = Normalizer(config.action_dim, config.action_normalization)
        self._register_load_state_dict_pre_hook(_rename_legacy_normalizer_keys)
        self._runtime_embeddings: dict[str, Tensor] = {}

    # ---------------------------------------------------------------- set-up from data
    def set_statistics(self, stats: dict[str, dict[str, Any]]) -> None:
        """Normalisers from a data set's ``stats.json`` (keys ``observation.state`` and ``action``)."""
        for normalizer, key in ((self.state_normalizer, "observation.state"), (self.action_normalizer, "action")):
            if key not in stats:
                raise DataError(f"the data set's statistics have no {key!r} entry")
            normalizer.set_statistics(stats[key])

    def set_instruction_embeddings(self, embeddings: Tensor | None = None) -> None:
        """Store the embeddings of ``config.instructions`` (computed with MiniLM when not given)."""
        if not self.policy_config.language:
            return
        if embeddings is None:
            embeddings = encode_instructions(self.policy_config.instructions)
        self.instruction_embeddings.copy_(embeddings)

    # ---------------------------------------------------------------- normalisation
    def normalize_state(self, state: Tensor) -> Tensor:
        return self.state_normalizer.normalize(state)

    def normalize_action(self, action: Tensor) -> Tensor:
        return self.action_normalizer.normalize(action)

    def unnormalize_action(self, action: Tensor) -> Tensor:
        return self.action_normalizer.unnormalize(action)

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

    def sample_normalized(
        self, batch: Batch, sampling: Sampling, use_cache: bool = True, noise: Tensor | None = None
    ) -> tuple[Tensor, int]:
        """A chunk in normalised units ``(B, H, A)`` and the action expert's evaluations."""
        raise NotImplementedError

    def sampling(
        self, steps: int | None = None, method: str | None = None, noise_scale: float | None = None
    ) -> Sampling:
        """The sampling settings of one call: each argument, or the config's default when ``None``.

        The flow policies' version; DDPM and regression policies override it. Nothing is stored:
        the config stays as it was built.
        """
        from flowforge.ode import ADAPTIVE_METHODS, TABLEAUS

        cfg = self.policy_config
        sampling = Sampling(
            cfg.sampling_steps if steps is None else steps,
            cfg.method if method is None else method,
            cfg.noise_scale if noise_scale is None else noise_scale,
        )
        check_count("steps", sampling.steps)
        check_argument_choice("method", sampling.method, (*TABLEAUS, *ADAPTIVE_METHODS))
        check_real("noise_scale", sampling.noise_scale, non_negative=True)
        return sampling

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
        return masked_mean(squared_error, None if action_is_pad is None else ~action_is_pad)

    @torch.inference_mode()
    def predict_chunk(
        self,
        batch: Batch,
        steps: int | None = None,
        method: str | None = None,
        noise_scale: float | None = None,
        *,
        use_cache: bool = True,
        noise: Tensor | None = None,
    ) -> ChunkResult:
        """A chunk of actions for a batch of observations, as a :class:`ChunkResult`.

        ``steps``, ``method`` and ``noise_scale`` override the config's sampling settings for this
        call only (:meth:`sampling`). Runs under ``torch.inference_mode`` (no autograd bookkeeping
        at all: at batch 1 most of a step is per-operation overhead, and this removes about a
        quarter of it).

        ``use_cache=False`` recomputes the whole observation prefix (encoders and transformer) at
        every denoising step, as a policy without a KV cache would. ``noise``: the initial noise,
        ``(B, H, A)``, for reproducible comparisons.
        """
        sampling = self.sampling(steps, method, noise_scale)
        batch = self.checked_batch(batch)
        if noise is not None:
            noise = self._checked_noise(noise, batch["state"].shape[0])
        start = time.perf_counter()
        chunk, nfe = self.sample_normalized(batch, sampling, use_cache=use_cache, noise=noise)
        actions = self.unnormalize_action(chunk)
        return ChunkResult(actions, nfe, time.perf_counter() - start)

    # ---------------------------------------------------------------- input checks
    def checked_batch(self, batch: Batch) -> Batch:
        """``batch`` with NumPy arrays as tensors, after refusing what must never become an action.

        ``state`` must be a finite floating-point array of shape ``(batch, obs_horizon, state_dim)``
        with at least one row, and ``image`` (when the policy uses images) uint8 of shape
        ``(batch, obs_horizon, 3, H, W)``. A ``ValueError`` names the key and what was wrong.
        """
        if not isinstance(batch, dict) or "state" not in batch:
            raise ValueError("batch must be a dict with a 'state' entry of shape (batch, obs_horizon, state_dim)")
        cfg = self.policy_config
        checked = dict(batch)
        state = torch.as_tensor(batch["state"])
        if not state.is_floating_point():
            raise ValueError(f"state must hold floating-point numbers, got dtype {state.dtype}")
        if state.dim() != 3 or state.shape[1:] != (cfg.obs_horizon, cfg.state_dim):
            raise ValueError(
                f"state must have shape (batch, {cfg.obs_horizon}, {cfg.state_dim}), got {tuple(state.shape)}"
            )
        if state.shape[0] == 0:
            raise ValueError("state has 0 rows: a chunk is predicted for at least one observation")
        _refuse_non_finite("state", state)
        checked["state"] = state.to(self.state_normalizer.shift)
        if self.image_encoder is not None:
            if "image" not in batch:
                raise ValueError("this policy sees images: the batch needs 'image' (batch, obs_horizon, 3, H, W) uint8")
            image = torch.as_tensor(batch["image"])
            expected = (state.shape[0], cfg.obs_horizon, *cfg.image_shape)
            if image.dtype != torch.uint8 or tuple(image.shape) != expected:
                raise ValueError(
                    f"image must be uint8 of shape {expected}, got {image.dtype} of shape {tuple(image.shape)}"
                )
            checked["image"] = image.to(self.state_normalizer.shift.device)
        return checked

    def _checked_noise(self, noise: Tensor, rows: int) -> Tensor:
        noise = torch.as_tensor(noise)
        expected = (rows, self.policy_config.horizon, self.policy_config.action_dim)  # the whole chunk
        if not noise.is_floating_point() or tuple(noise.shape) != expected:
            raise ValueError(
                f"noise must be a floating-point tensor of shape {expected}, got {noise.dtype} of shape "
                f"{tuple(noise.shape)}"
            )
        _refuse_non_finite("noise", noise)
        return noise


def _refuse_non_finite(name: str, value: Tensor) -> None:
    finite = torch.isfinite(value)
    if not bool(finite.all()):
        index = tuple(int(i) for i in (~finite).nonzero()[0])
        raise ValueError(f"{name} holds {value[index].item()} at index {index}; expected finite values")


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
