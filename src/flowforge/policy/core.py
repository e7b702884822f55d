r"""A chunk policy as parts: observation encoder, action expert, head and normalisers.

A policy maps an observation to a *chunk* of :math:`H` future actions. :class:`ChunkPolicy` is the
composition every kind shares, so that comparisons between kinds are about the head alone:

* :class:`~flowforge.policy.encoders.ObservationEncoder`: the normalised state, camera images and
  the instruction to prefix tokens;
* :class:`~flowforge.policy.expert.ActionExpert`: pi0's prefix/suffix transformer; the prefix's
  keys and values are computed once per chunk (``use_cache=True``) and reused at every denoising
  step;
* a head from :mod:`flowforge.policy.heads`, chosen by ``policy.kind``: ``loss(target, cache,
  pad)`` in training and ``sample(cache, noise, ...)`` at run time;
* two :class:`~flowforge.data.normalize.Normalizer` (states and actions; buffers, so a checkpoint
  carries the data set's statistics); inputs and outputs are always in the data's own units.

:meth:`ChunkPolicy.predict_chunk` takes the sampling settings as arguments and returns a
:class:`ChunkResult`. Executing chunks in an environment (history, queue, temporal ensembling) is
:class:`flowforge.policy.execution.ChunkExecutor`'s job, not the model's.

>>> import torch
>>> policy = ChunkPolicy(PolicyConfig(state_dim=3, action_dim=2, horizon=4, width=32, layers=1, language=False))
>>> pad = torch.zeros(5, 4, dtype=torch.bool)
>>> batch = {"state": torch.randn(5, 1, 3), "action": torch.randn(5, 4, 2), "action_is_pad": pad}
>>> result = policy.predict_chunk(batch, steps=4)
>>> policy.loss(batch).shape, result.actions.shape, result.nfe
(torch.Size([]), torch.Size([5, 4, 2]), 4)
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from flowforge.data.normalize import Normalizer
from flowforge.errors import DataError, NumericalError
from flowforge.matching.consistency import DISTILLATION_METHODS
from flowforge.policy.config import DERIVED_FEATURES, PolicyConfig
from flowforge.policy.encoders import Batch, ObservationEncoder
from flowforge.policy.expert import ActionExpert
from flowforge.policy.heads import HEAD_CATEGORY, ChunkGuide, ChunkPrefix, Sampling
from flowforge.registry import Rebuildable, lookup, names, register
from flowforge.validation import check_bool, check_choice, finite_checks_enabled


@dataclass(frozen=True)
class ChunkResult:
    """What :meth:`ChunkPolicy.predict_chunk` returns: ``actions`` (B, H, A) in the data's units, the
    action expert's evaluations ``nfe`` and the wall time ``seconds``."""

    actions: Tensor
    nfe: int
    seconds: float


# State-dict keys of checkpoints written before the policy was split into parts, to today's keys
# (the first matching prefix wins). ``fine.`` held a whole second policy of which the hierarchical
# head keeps only the expert; ``alpha_bar`` is derived from the config.
_RELEASED_KEYS = (
    ("fine.transformer.", "head.fine_expert.transformer."),
    ("fine.action_tokens.", "head.fine_expert.action_tokens."),
    ("fine.action_head.", "head.fine_expert.output."),
    ("fine.", None),
    ("alpha_bar", None),
    ("state_encoder.", "encoder.state_encoder."),
    ("image_encoder.", "encoder.image_encoder."),
    ("language_projection.", "encoder.language_projection."),
    ("instruction_embeddings", "encoder.instruction_embeddings"),
    ("prefix_position", "encoder.position"),
    ("state_shift", "state_normalizer.shift"),
    ("state_scale", "state_normalizer.scale"),
    ("action_shift", "action_normalizer.shift"),
    ("action_scale", "action_normalizer.scale"),
    ("transformer.", "expert.transformer."),
    ("action_tokens.", "expert.action_tokens."),
    ("action_head.", "expert.output."),
    ("queries", "expert.queries"),
    ("keyframe_embedding.", "head.keyframe_embedding."),
    ("keyframe_position", "head.keyframe_position"),
)


def _upgrade_released_keys(state_dict: dict[str, Tensor], prefix: str, *args: Any) -> None:
    """Rename (or drop) the keys of a checkpoint of the earlier layout, in place."""
    for key in list(state_dict):
        if not key.startswith(prefix):
            continue
        local = key[len(prefix) :]
        for old, new in _RELEASED_KEYS:
            if local.startswith(old):
                value = state_dict.pop(key)
                if new is not None:
                    state_dict[prefix + new + local[len(old) :]] = value
                break


@register("chunk-policy", "policy")
class ChunkPolicy(Rebuildable, nn.Module):
    """Encoder + action expert + head + normalisers, built from a :class:`PolicyConfig` (see the
    module docstring)."""

    def __init__(self, config: PolicyConfig) -> None:
        super().__init__()
        if not isinstance(config, PolicyConfig):
            raise TypeError(f"config must be a PolicyConfig (PolicyConfig(**settings)), got {type(config).__name__}")
        config.check_state_layout()
        self.policy_config = config
        self.encoder = ObservationEncoder(
            config.state_dim,
            config.width,
            config.obs_horizon,
            config.image_shape,
            config.instructions if config.language else None,
            cameras=len(config.image_keys) or 1,
            image_encoder=config.image_encoder,
            keypoints=config.keypoints,
            image_channels=config.image_channels,
            augmentation=config.augmentation,
            augmentation_pixels=config.augmentation_pixels,
            color_jitter=config.color_jitter,
            image_normalization=config.image_normalization,
        )
        self.head = lookup(HEAD_CATEGORY, config.kind)(config)
        self.expert = ActionExpert(
            config.action_dim,
            self.head.expert_horizon,
            config.width,
            config.layers,
            config.heads,
            queries=self.head.queries,
            interval=self.head.interval,
            time_frequency=config.time_embedding_frequency,
        )
        self.state_normalizer = Normalizer(config.state_dim, config.state_normalization)
        self.action_normalizer = Normalizer(config.action_dim, config.action_normalization)
        self._register_load_state_dict_pre_hook(_upgrade_released_keys)

    # ---------------------------------------------------------------- set-up from data
    def set_statistics(self, stats: dict[str, dict[str, Any]]) -> None:
        """Normalisers from a data set's ``stats.json`` (keys ``config.state_key`` and ``action``;
        ``goal_key`` too, or the feature it derives from). Both are checked before either is set."""
        state = self.state_normalizer.shift_and_scale(state_statistics(stats, self.policy_config))
        if "action" not in stats:
            raise DataError("the data set's statistics have no 'action' entry")
        action = self.action_normalizer.shift_and_scale(stats["action"])
        self.state_normalizer.set_shift_and_scale(*state)
        self.action_normalizer.set_shift_and_scale(*action)

    def set_image_statistics(self, stats: list[dict[str, Any]]) -> None:
        """Per-camera pixel statistics (``mean``, ``std`` in [0, 1]) for ``image_normalization = "mean_std"``,
        computed on the view evaluation gives the encoder (:func:`~flowforge.policy.vision.image_statistics`)."""
        self.encoder.set_image_statistics(stats)

    def set_instruction_embeddings(self, embeddings: Tensor | None = None) -> None:
        """Store the embeddings of ``config.instructions`` (computed with MiniLM when not given); see
        :meth:`~flowforge.policy.encoders.ObservationEncoder.set_instruction_embeddings`."""
        self.encoder.set_instruction_embeddings(embeddings)

    # ---------------------------------------------------------------- normalisation
    def normalize_state(self, state: Tensor) -> Tensor:
        return self.state_normalizer.normalize(state)

    def normalize_action(self, action: Tensor) -> Tensor:
        return self.action_normalizer.normalize(action)

    def unnormalize_action(self, action: Tensor) -> Tensor:
        return self.action_normalizer.unnormalize(action)

    # ---------------------------------------------------------------- training and sampling
    def prefix(self, batch: Batch, augment: bool | None = None) -> Tensor:
        """The observation tokens ``(B, prefix tokens, width)`` of a batch (raw state, uint8 images).
        Images are augmented (``policy.augmentation``) when ``augment`` is true, or in training mode
        when it is ``None``; :meth:`predict_chunk` and :meth:`log_prob` never augment."""
        state = batch["state"]
        cfg = self.policy_config
        if state.dim() != 3 or state.shape[1:] != (cfg.obs_horizon, cfg.state_dim):
            raise ValueError(
                f"state must have shape (batch, {cfg.obs_horizon}, {cfg.state_dim}), got {tuple(state.shape)}"
            )
        state = state.to(self.state_normalizer.shift)  # the one dtype rule: float inputs take the model's dtype
        observation = {**batch, "state": self.normalize_state(state)}
        if self.encoder.sees_images:
            observation["images"] = camera_images(batch, cfg)
        return self.encoder(observation, augment)

    def loss(self, batch: Batch) -> Tensor:
        """The head's training loss on a batch with ``action`` (B, H, A) and ``action_is_pad`` (B, H),
        checked as :meth:`checked_training_batch` says."""
        batch = self.checked_training_batch(batch)
        cache = self.expert.encode(self.prefix(batch))
        return self.head.loss(self.normalize_action(batch["action"]), cache, batch.get("action_is_pad"))

    def checked_training_batch(self, batch: Batch) -> Batch:
        """:meth:`checked_batch` (``training=True``), and ``action`` a finite floating-point
        ``(B, horizon, action_dim)`` tensor (in the model's dtype) and ``action_is_pad``, when given,
        a bool ``(B, horizon)`` one. The NaN/inf scans of a training batch follow the process-wide
        switch (:func:`flowforge.validation.checks`); those of :meth:`predict_chunk` never do."""
        checked = self.checked_batch(batch, training=True)
        if "action" not in batch:
            raise ValueError("batch needs 'action' (batch, horizon, action_dim): the demonstrated chunks")
        cfg = self.policy_config
        rows = checked["state"].shape[0]
        action = _as_tensor("action", batch["action"])
        expected = (rows, cfg.horizon, cfg.action_dim)
        if not action.is_floating_point() or tuple(action.shape) != expected:
            raise ValueError(
                f"action must be a float tensor of shape {expected}, got {action.dtype} of shape {tuple(action.shape)}"
            )
        checked["action"] = action.to(self.action_normalizer.shift)
        if batch.get("action_is_pad") is not None:
            pad = _as_tensor("action_is_pad", batch["action_is_pad"])
            if pad.dtype != torch.bool or tuple(pad.shape) != expected[:2]:
                raise ValueError(
                    f"action_is_pad must be a bool tensor of shape {expected[:2]}, got {pad.dtype} of shape "
                    f"{tuple(pad.shape)}"
                )
            if bool(pad[:, 0].any()):
                row = int(pad[:, 0].nonzero()[0])
                raise ValueError(
                    f"action_is_pad[{row}, 0] is True: a window's first action is real (padding fills the "
                    "steps past an episode's end)"
                )
            checked["action_is_pad"] = pad.to(checked["action"].device)
        if finite_checks_enabled():
            # Padded steps never reach the model (the heads fill them first): what they hold is not scanned.
            pad = checked.get("action_is_pad")
            real = checked["action"] if pad is None else checked["action"].masked_fill(pad[..., None], 0.0)
            given = action if pad is None else action.masked_fill(pad[..., None].to(action.device), 0.0)
            _refuse_non_finite("action", real, given)
        return checked

    def distillation_loss(
        self, batch: Batch, teacher: ChunkPolicy, method: str = "consistency", intervals: int = 18
    ) -> Tensor:
        """Distillation of this policy's ``consistency`` head from ``teacher``, a trained ``flow``
        policy with the same normalisers, for the batch's observations: ``method = "consistency"``,
        the head's :meth:`~flowforge.policy.heads.ConsistencyHead.distillation_loss` on a grid of
        ``intervals``; ``"trajectory"``,
        :meth:`~flowforge.policy.heads.ConsistencyHead.trajectory_distillation_loss` along the
        teacher's own Euler steps (its ``sampling_steps``). The teacher sees the evaluation view (no
        augmentation) and gets no gradient; this policy sees its training view."""
        check_choice("method", method, DISTILLATION_METHODS)
        if self.policy_config.kind != "consistency":
            kind = self.policy_config.kind
            raise ValueError(f"distillation trains a 'consistency' head; this policy's kind is {kind!r}")
        if not isinstance(teacher, ChunkPolicy) or teacher.policy_config.kind != "flow":
            kind = teacher.policy_config.kind if isinstance(teacher, ChunkPolicy) else type(teacher).__name__
            raise ValueError(f"the teacher must be a 'flow' ChunkPolicy (an ODE to follow), got {kind!r}")
        mine, theirs = self.policy_config, teacher.policy_config
        if (mine.horizon, mine.action_dim) != (theirs.horizon, theirs.action_dim):
            raise ValueError(
                f"the teacher predicts chunks of {theirs.horizon} x {theirs.action_dim}; this policy's are "
                f"{mine.horizon} x {mine.action_dim}"
            )
        mine_actions, their_actions = self.action_normalizer, teacher.action_normalizer
        if not (
            torch.allclose(mine_actions.shift, their_actions.shift.to(mine_actions.shift))
            and torch.allclose(mine_actions.scale, their_actions.scale.to(mine_actions.scale))
        ):
            raise ValueError(
                "the teacher normalises actions otherwise than this policy (shift "
                f"{their_actions.shift.tolist()} and scale {their_actions.scale.tolist()} against "
                f"{mine_actions.shift.tolist()} and {mine_actions.scale.tolist()}): its velocities would act on "
                "chunks in other units; give the student the teacher's normalisers (a [distill] run copies them)"
            )
        batch = self.checked_training_batch(batch)
        cache = self.expert.encode(self.prefix(batch))
        observation = teacher.checked_batch(batch, training=True)  # its own state size, cameras and instructions
        with torch.no_grad():
            teacher_cache = teacher.expert.encode(teacher.prefix(observation, augment=False))
        action = self.normalize_action(batch["action"])
        pad = batch.get("action_is_pad")
        teacher_velocity = teacher.head.velocity(teacher_cache)
        if method == "trajectory":
            steps = teacher.policy_config.sampling_steps
            return self.head.trajectory_distillation_loss(action, cache, pad, teacher_velocity, steps)
        return self.head.distillation_loss(action, cache, pad, teacher_velocity, intervals)

    def log_prob(
        self,
        batch: Batch,
        *,
        trace: str = "auto",
        method: str = "dopri5",
        steps: int | None = None,
        noise_scale: float = 1.0,
    ) -> Tensor:
        r"""Log-density (B,) of each chunk ``batch["action"]`` (B, H, A), in the data's units, given its
        observation: the head's (:meth:`~flowforge.policy.heads.FlowHead.log_prob`) in normalised
        units minus :math:`H \sum_j \log s_j`, the log-determinant of the action normaliser
        (scales :math:`s_j`). Flow heads only; ``trace``: ``"exact"``, ``"hutchinson"`` or ``"auto"``
        (exact up to 64 numbers per chunk); ``steps`` only for a fixed-step ``method``. Each chunk
        is scored whole: ``action_is_pad`` is not read, and padded steps (a data set's last action
        repeated) count like any other. An adaptive ``method`` chooses its steps for the whole batch,
        so a chunk's value moves by the solver's error with the chunks beside it (up to 0.04 nats
        at the default tolerances on MT10, log-densities about 45 in size); a fixed-step method
        (``method="rk4", steps=20``) gives each chunk the same value in any batch."""
        if not hasattr(self.head, "log_prob"):
            kinds = [kind for kind in names(HEAD_CATEGORY) if hasattr(lookup(HEAD_CATEGORY, kind), "log_prob")]
            raise ValueError(
                f"a {self.policy_config.kind!r} head has no chunk likelihood: log_prob needs a head that integrates a "
                f"velocity field (policy.kind = {', '.join(map(repr, kinds))})"
            )
        checked = self.checked_training_batch({k: v for k, v in batch.items() if k != "action_is_pad"})
        with torch.no_grad():
            cache = self.expert.encode(self.prefix(checked, augment=False))
        normalized = self.normalize_action(checked["action"])
        log_density = self.head.log_prob(
            normalized, cache, trace=trace, method=method, steps=steps, noise_scale=noise_scale
        )
        if bool(log_density.isnan().any()):
            rows = log_density.isnan().nonzero().flatten().tolist()
            raise NumericalError(
                f"log_prob is NaN for rows {rows[:5]}: their states or actions are too large for the model's "
                "numbers (normalised, they overflow); -inf would be the density of a merely far chunk"
            )
        return log_density - self.policy_config.horizon * self.action_normalizer.scale.log().sum()

    def sampling(
        self, steps: int | None = None, method: str | None = None, noise_scale: float | None = None
    ) -> Sampling:
        """The sampling settings of one call: each argument, or the config's default when ``None``,
        checked by the head. Nothing is stored: the config stays as it was built."""
        return self.head.sampling(steps, method, noise_scale)

    def predict_chunk(
        self,
        batch: Batch,
        steps: int | None = None,
        method: str | None = None,
        noise_scale: float | None = None,
        *,
        use_cache: bool = True,
        noise: Tensor | None = None,
        guide: ChunkGuide | None = None,
        prefix: ChunkPrefix | None = None,
    ) -> ChunkResult:
        """A chunk of actions for a batch of observations, as a :class:`ChunkResult`.

        ``steps``, ``method`` and ``noise_scale`` override the config's sampling settings for this
        call only (:meth:`sampling`). Runs under ``torch.inference_mode`` (no autograd bookkeeping
        at all: at batch 1 most of a step is per-operation overhead, and this removes about a
        quarter of it).

        ``use_cache=False`` recomputes the whole observation prefix (encoders and transformer) at
        every denoising step, as a policy without a KV cache would. ``noise``: the initial noise,
        ``(B, H, A)``, for reproducible comparisons. ``guide``: inpaint the chunk towards given
        actions (real-time chunking, :class:`~flowforge.policy.heads.ChunkGuide`; flow heads only).
        ``prefix``: complete a chunk whose first actions are given (training-time real-time
        chunking, :class:`~flowforge.policy.heads.ChunkPrefix`; a flow policy trained with
        ``rtc_training_delay``). Given both, the prefix is completed and the guide pulls the rest
        (the guide's error on the given actions is zero: there each prediction is the action itself).
        """
        sampling = self.sampling(steps, method, noise_scale)
        batch = self.checked_batch(batch)
        rows = batch["state"].shape[0]
        shape = (rows, self.policy_config.horizon, self.policy_config.action_dim)
        check_bool("use_cache", use_cache)
        for name, value, cls in (("guide", guide, ChunkGuide), ("prefix", prefix, ChunkPrefix)):
            if value is not None and not isinstance(value, cls):
                raise TypeError(f"{name} must be a {cls.__name__} or None, got {type(value).__name__}")
        if guide is not None and not getattr(self.head, "guidable", False):
            kind = self.policy_config.kind
            raise ValueError(f"a {kind!r} head cannot be guided: real-time chunking needs a flow head")
        if prefix is not None and not self.policy_config.rtc_training_delay:
            raise ValueError("prefix: this policy was not trained to complete given actions (rtc_training_delay = 0)")
        # Guidance differentiates through the expert, which inference mode forbids: tensors the
        # caller made under torch.inference_mode() enter it as ordinary copies.
        with torch.inference_mode(guide is None), torch.no_grad():
            if guide is not None:
                batch, noise = {key: _ordinary(value) for key, value in batch.items()}, _ordinary(noise)
                guide = dataclasses.replace(guide, actions=_ordinary(guide.actions), weights=_ordinary(guide.weights))
                if prefix is not None:
                    prefix = dataclasses.replace(prefix, actions=_ordinary(prefix.actions))
            return self._predict(batch, sampling, shape, use_cache, noise, guide, prefix)

    def _predict(
        self,
        batch: Batch,
        sampling: Sampling,
        shape: tuple[int, int, int],
        use_cache: bool,
        noise: Tensor | None,
        guide: ChunkGuide | None,
        prefix: ChunkPrefix | None = None,
    ) -> ChunkResult:
        rows = shape[0]
        if noise is not None:
            noise = self._checked_noise(noise, rows, batch["state"])
        elif self.head.samples_from_noise:
            noise = torch.randn(shape).to(batch["state"])
        else:  # one pass: the random state stays untouched
            noise = batch["state"].new_zeros(shape)
        settings = {}

        def to_model(actions: Tensor) -> Tensor:  # a guide or prefix from the host joins the model's device
            return self.normalize_action(actions.to(batch["state"]))

        if guide is not None:
            settings["guide"] = guide.normalized(to_model, shape)
        if prefix is not None:
            settings["prefix"] = prefix.normalized(to_model, shape, self.policy_config.rtc_training_delay)
        start = time.perf_counter()
        actions, nfe = self.chunk_from_noise(batch, noise, sampling, use_cache=use_cache, **settings)
        finite = torch.isfinite(actions).flatten(1).all(1)
        if not bool(finite.all()):
            # Finite but absurd inputs (a state of 1e20) can overflow inside the network.
            row = int((~finite).nonzero()[0])
            state = batch["state"][row]
            raise NumericalError(
                f"the policy's chunk for observation row {row} is not finite (its state spans "
                f"{float(state.min()):.3g} to {float(state.max()):.3g}, noise_scale = {sampling.noise_scale}); "
                "refusing to act on it: the weights may have diverged, or the temperature is too large"
            )
        return ChunkResult(actions, nfe, time.perf_counter() - start)

    def chunk_from_noise(
        self, batch: Batch, noise: Tensor, sampling: Sampling, *, use_cache: bool = True, **settings: Any
    ) -> tuple[Tensor, int]:
        """The computation of :meth:`predict_chunk` alone: the chunk (B, H, A) in action units
        sampled from ``noise`` (B, H, A) for a batch already on the model's device, and its NFE.

        Nothing is checked and no value leaves the device, so with tensors of fixed shapes it can
        be captured as a CUDA graph or compiled (``torch.compile``), and replayed with new
        observations and noise copied into the same tensors (``benchmarks/policy_latency_devices.py``).
        Call it without gradients (``torch.inference_mode()``); ``sampling`` from :meth:`sampling`;
        ``settings``: a normalised ``guide`` or ``prefix``, as :meth:`predict_chunk` makes them.
        """
        # Without a cache the policy re-encodes the observation (encoder and prefix) at every step.
        prefix = self.prefix(batch, False) if use_cache else (lambda: self.prefix(batch, False))
        result = self.head.sample(
            self.expert.encode(prefix, use_cache),
            noise,
            steps=sampling.steps,
            method=sampling.method,
            noise_scale=sampling.noise_scale,
            **settings,
        )
        return self.unnormalize_action(result.x), result.nfe

    # ---------------------------------------------------------------- input checks
    def checked_batch(self, batch: Batch, training: bool = False) -> Batch:
        """``batch`` with NumPy arrays as tensors, after refusing what must never become an action.

        ``state`` must be a finite floating-point array of shape ``(batch, obs_horizon, state_dim)``
        with at least one row, and ``image`` (when the policy uses images) uint8 of shape
        ``(batch, obs_horizon, 3, H, W)``. With ``training`` (:meth:`checked_training_batch`) images may
        also be finite floats in 0-255 (training may differentiate through the pixels), and the
        NaN/inf scans follow the process-wide switch. A ``ValueError`` names the key and what was wrong.
        """
        if not isinstance(batch, dict) or "state" not in batch:
            raise ValueError("batch must be a dict with a 'state' entry of shape (batch, obs_horizon, state_dim)")
        cfg = self.policy_config
        checked = dict(batch)
        state = _as_tensor("state", batch["state"])
        if not state.is_floating_point() or state.is_complex():
            raise ValueError(f"state must hold floating-point numbers, got dtype {state.dtype}")
        if state.dim() != 3 or state.shape[1:] != (cfg.obs_horizon, cfg.state_dim):
            raise ValueError(
                f"state must have shape (batch, {cfg.obs_horizon}, {cfg.state_dim}), got {tuple(state.shape)}"
            )
        if state.shape[0] == 0:
            raise ValueError("state has 0 rows: a chunk is predicted for at least one observation")
        checked["state"] = state.to(self.state_normalizer.shift)
        if not training or finite_checks_enabled():  # a prediction's state is always scanned
            _refuse_non_finite("state", checked["state"], state)  # after the cast: 1e300 is inf in float32
        if self.encoder.sees_images:
            expected = (state.shape[0], cfg.obs_horizon, *cfg.image_shape)
            for key, image in zip(cfg.image_keys, camera_images(batch, cfg), strict=True):
                image = torch.as_tensor(image)
                allowed = image.dtype == torch.uint8 or (training and image.is_floating_point())
                if not allowed or tuple(image.shape) != expected:
                    raise ValueError(
                        f"{key} must be uint8 of shape {expected}, got {image.dtype} of shape {tuple(image.shape)}"
                    )
                if image.is_floating_point() and finite_checks_enabled():
                    _refuse_non_finite(key, image)
                    if bool(((image < 0) | (image > 255)).any()):
                        raise ValueError(
                            f"{key} holds values outside 0-255 ({image.min().item()} to {image.max().item()}); "
                            "float images are pixel values in 0-255"
                        )
                checked.pop("image", None)
                checked[key] = image.to(self.state_normalizer.shift.device)
        if self.encoder.instructions is not None:
            self._check_language(checked, state.shape[0])
            self.encoder.fill_instruction_table()
        return checked

    def _check_language(self, batch: Batch, rows: int) -> None:
        """Refuse a ``task_index`` that is not one index per row into the policy's instructions (a
        negative one would pick an instruction from the end; always scanned, NaN scan or not), an
        ``instruction`` that is not one string, or one per row, and the two given together where
        they name different instructions (the index would win unseen)."""
        instructions = self.encoder.instructions
        texts = batch.get("instruction")
        if (
            texts is not None
            and not isinstance(texts, str)
            and (
                not isinstance(texts, list | tuple) or len(texts) != rows or not all(isinstance(t, str) for t in texts)
            )
        ):
            raise ValueError(f"instruction must be a string or {rows} strings (one per row), got {texts!r}")
        if "task_index" in batch:
            index = _as_tensor("task_index", batch["task_index"])
            if index.dtype not in (torch.int32, torch.int64) or tuple(index.shape) != (rows,):
                raise ValueError(
                    f"task_index must be {rows} integers (one per row), got {index.dtype} {tuple(index.shape)}"
                )
            if bool(((index < 0) | (index >= len(instructions))).any()):
                raise ValueError(
                    f"task_index must index the {len(instructions)} instructions (0..{len(instructions) - 1}), "
                    f"got {index.tolist()}"
                )
            batch["task_index"] = index
            if texts is not None:
                given = [texts] * rows if isinstance(texts, str) else list(texts)
                named = [instructions[i] for i in index.tolist()]
                for row, (text, indexed) in enumerate(zip(given, named, strict=True)):
                    if text != indexed:
                        raise ValueError(
                            f"task_index and instruction disagree at row {row}: task_index {index[row].item()} is "
                            f"{indexed!r}, instruction is {text!r}; give one of them"
                        )

    def _checked_noise(self, noise: Tensor, rows: int, like: Tensor) -> Tensor:
        """The supplied draw on ``like``'s device and dtype (it may live elsewhere), refused where it
        is not finite there (a float64 number past float32's range included)."""
        noise = torch.as_tensor(noise)
        expected = (rows, self.policy_config.horizon, self.policy_config.action_dim)  # the whole chunk
        if not noise.is_floating_point() or tuple(noise.shape) != expected:
            raise ValueError(
                f"noise must be a floating-point tensor of shape {expected}, got {noise.dtype} of shape "
                f"{tuple(noise.shape)}"
            )
        cast = noise.to(like)
        _refuse_non_finite("noise", cast, noise)
        return cast


def camera_images(batch: Batch, config: PolicyConfig) -> list[Tensor]:
    """The images of each of the policy's cameras in ``batch``, in order: ``image.<camera>``
    (``image`` is taken for the only camera of a one-camera policy). A ``ValueError`` names the
    policy's cameras and those of the batch when one is missing or another camera's images come."""
    keys = config.image_keys
    given = sorted(k for k in batch if k == "image" or k.startswith("image."))
    # "image" stands for the only camera of a one-camera policy; beside named cameras it is another's
    foreign = [k for k in given if k not in keys and (k != "image" or len(keys) > 1 or keys[0] in batch)]
    missing = [k for k in keys if k not in batch and not (len(keys) == 1 and "image" in batch)]
    if foreign or missing:
        trained = ", ".join(config.cameras) if config.cameras is not None else "one unnamed camera ('image')"
        problem = f"no {missing[0]!r}" if missing else f"images of another camera, {foreign[0]!r}"
        raise ValueError(
            f"the batch has {problem}: this policy sees the cameras {trained} (batch keys "
            f"{', '.join(keys)}, each (batch, obs_horizon, 3, H, W) uint8); the batch's images: "
            f"{', '.join(given) or 'none'}"
        )
    return [torch.as_tensor(batch[key] if key in batch else batch["image"]) for key in keys]


def state_statistics(stats: dict[str, dict[str, Any]], config: PolicyConfig) -> dict[str, Any]:
    """The statistics of a policy's state vector from a data set's per-feature ones: ``state_key``'s
    (twice with ``previous_state``), then ``goal_key``'s (sliced from the feature it derives from
    when the data set has no statistics of its own for it). A ``DataError`` names a missing entry."""
    parts = []
    for position, key in enumerate(config.state_features):
        if key in stats:
            entry = stats[key]
        elif key in DERIVED_FEATURES and DERIVED_FEATURES[key][0] in stats:
            source, start, end = DERIVED_FEATURES[key]
            entry = {
                name: list(np.asarray(value, dtype=np.float64).reshape(-1)[start:end])
                for name, value in stats[source].items()
                if name != "count"
            }
        else:
            derived = f" (nor {DERIVED_FEATURES[key][0]!r}, which holds it)" if key in DERIVED_FEATURES else ""
            raise DataError(f"the data set's statistics have no {key!r} entry{derived}")
        parts.append(entry)
        if position == 0 and config.previous_state:
            parts.append(entry)
    if len(parts) == 1:
        return parts[0]
    names = set.intersection(*(set(p) for p in parts)) - {"count"}
    return {name: np.concatenate([np.asarray(p[name], dtype=np.float64).reshape(-1) for p in parts]) for name in names}


def _ordinary(value: Any) -> Any:
    """A tensor made under ``torch.inference_mode()`` as an ordinary copy (autograd may save it);
    anything else as it is."""
    return value.clone() if isinstance(value, Tensor) and value.is_inference() else value


def _as_tensor(name: str, value: Any) -> Tensor:
    """``value`` as a tensor; a ``ValueError`` naming ``name`` for what cannot be one (a string, None)."""
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{name} must be a tensor or array of numbers, got {type(value).__name__}") from error


def _refuse_non_finite(name: str, value: Tensor, given: Tensor | None = None) -> None:
    """Refuse NaN or inf in ``value``; ``given``: the tensor before its cast to the model's dtype, to
    name a finite number too large for that dtype."""
    finite = torch.isfinite(value)
    if not bool(finite.all()):
        index = tuple(int(i) for i in (~finite).nonzero()[0])
        original = value[index].item() if given is None else given[index].item()
        beyond = "" if math.isinf(original) or math.isnan(original) else f" (beyond the range of {value.dtype})"
        raise ValueError(f"{name} holds {original} at index {index}{beyond}; expected finite values")


__all__ = ["ChunkPolicy", "ChunkResult", "PolicyConfig", "Sampling", "camera_images", "state_statistics"]
