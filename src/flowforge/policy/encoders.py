r"""The observation encoder: state, camera images and the task instruction to prefix tokens.

:class:`ObservationEncoder` turns one observation window into the *prefix* the action expert
attends to, a sequence of tokens of the model width:

* **state**: one token per frame, an MLP on the normalised state;
* **images** (optional), one token group per camera: an image encoder of its own per camera
  (:mod:`flowforge.policy.vision`: ``"conv"``, one token per cell of its output grid, 84x84 -> 7x7 =
  49 tokens per frame; or ``"resnet-keypoints"``, one token per spatial-softmax keypoint), after
  the training-only augmentation (random shift or crop, colour jitter);
* **language** (optional): one token, a linear projection of the frozen MiniLM embedding of the
  task instruction. The embeddings of the training instructions live in the weights (the
  instruction table, a buffer), so evaluating on those needs no language model; another
  instruction is embedded once with MiniLM and remembered.

The prefix is ``[state tokens, camera 1's tokens, camera 2's tokens, ..., language token]``; a
learned position embedding per prefix token tells the tokens apart, so each camera's group has
positions of its own.

Pixels reach the encoders scaled to [-1, 1] (``image_normalization = "fixed"``) or standardised per
camera and colour channel with the training frames' mean and standard deviation (``"mean_std"``,
buffers set by :meth:`ObservationEncoder.set_image_statistics`).

>>> import torch
>>> encoder = ObservationEncoder(state_dim=3, width=16, obs_horizon=2)
>>> encoder({"state": torch.zeros(5, 2, 3)}).shape, encoder.tokens
(torch.Size([5, 2, 16]), 2)
>>> encoder = ObservationEncoder(3, 16, 1, image_shape=[3, 48, 48], cameras=2)
>>> images = [torch.zeros(5, 1, 3, 48, 48, dtype=torch.uint8)] * 2
>>> encoder({"state": torch.zeros(5, 1, 3), "images": images}).shape  # 1 state token + 2 cameras x 2x2 grid tokens
torch.Size([5, 9, 16])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from flowforge.policy.language import EMBEDDING_SIZE, encode_instructions
from flowforge.policy.vision import MIN_IMAGE_SIZE, ImageAugmentation, ImageEncoder, build_image_encoder

Batch = dict[str, Any]
#: How pixels reach the image encoders (``policy.image_normalization``).
IMAGE_NORMALIZATIONS = ("fixed", "mean_std")


def _upgrade_single_camera_keys(state_dict: dict[str, Tensor], prefix: str, *args: Any) -> None:
    """Checkpoints written before several cameras hold the one camera's encoder as ``image_encoder.``."""
    old = prefix + "image_encoder."
    for key in [k for k in state_dict if k.startswith(old)]:
        state_dict[prefix + "image_encoders.0." + key[len(old) :]] = state_dict.pop(key)


class ObservationEncoder(nn.Module):
    """An observation window to prefix tokens (see the module docstring).

    Arguments:
        state_dim: size of the state vector.
        width: token width.
        obs_horizon: observation frames per window.
        image_shape: ``[3, H, W]`` to see images, ``None`` for state only.
        instructions: the training instructions (the rows of the instruction table) when the
            policy is language-conditioned, ``None`` when it is not.
        cameras: how many cameras (token groups, each with its own image encoder).
        image_encoder: ``"conv"`` or ``"resnet-keypoints"``; ``keypoints`` and ``image_channels``
            size the latter.
        augmentation, augmentation_pixels, color_jitter: the training-only augmentation
            (:class:`~flowforge.policy.vision.ImageAugmentation`).
        image_normalization: ``"fixed"`` or ``"mean_std"``.
    """

    def __init__(
        self,
        state_dim: int,
        width: int,
        obs_horizon: int,
        image_shape: list[int] | None = None,
        instructions: list[str] | None = None,
        *,
        cameras: int = 1,
        image_encoder: str = "conv",
        keypoints: int = 32,
        image_channels: Sequence[int] = (16, 32, 64),
        augmentation: str = "none",
        augmentation_pixels: int = 4,
        color_jitter: float = 0.0,
        image_normalization: str = "fixed",
    ) -> None:
        super().__init__()
        if image_normalization not in IMAGE_NORMALIZATIONS:
            raise ValueError(
                f"image_normalization {image_normalization!r} is not one of {', '.join(IMAGE_NORMALIZATIONS)}"
            )
        self.width, self.obs_horizon = width, obs_horizon
        self.state_encoder = nn.Sequential(nn.Linear(state_dim, width), nn.GELU(), nn.Linear(width, width))
        self.augmentation = ImageAugmentation(augmentation, augmentation_pixels, color_jitter)
        self.image_normalization = image_normalization
        self.image_encoders = nn.ModuleList()
        tokens = obs_horizon
        if image_shape is not None:
            seen = [image_shape[0], *self.augmentation.output_size(*image_shape[1:])]
            for _ in range(cameras):
                encoder = build_image_encoder(image_encoder, seen, width, keypoints, image_channels)
                self.image_encoders.append(encoder)
                tokens += obs_horizon * encoder.tokens
            if image_normalization == "mean_std":
                self.register_buffer("image_mean", torch.full((cameras, 3, 1, 1), 0.5))
                self.register_buffer("image_std", torch.full((cameras, 3, 1, 1), 0.5))
        self.instructions = None if instructions is None else list(instructions)
        if self.instructions is not None:
            self.language_projection = nn.Linear(EMBEDDING_SIZE, width)
            self.register_buffer("instruction_embeddings", torch.zeros(len(self.instructions), EMBEDDING_SIZE))
            tokens += 1
        #: prefix tokens per observation window.
        self.tokens = tokens
        self.position = nn.Parameter(0.02 * torch.randn(tokens, width))
        self._runtime_embeddings: dict[str, Tensor] = {}
        # The table is filled at its first use unless set or loaded before: a policy built in
        # Python must not train with every instruction read as the same zero vector.
        self._instructions_embedded = not self.instructions
        self._register_load_state_dict_pre_hook(_upgrade_single_camera_keys)

    @property
    def sees_images(self) -> bool:
        return len(self.image_encoders) > 0

    @property
    def cameras(self) -> int:
        """How many cameras (token groups) the encoder sees."""
        return len(self.image_encoders)

    def set_image_statistics(self, stats: Sequence[dict[str, Any]]) -> None:
        """Per-camera ``mean`` and ``std`` of the pixels in [0, 1] (each 3 numbers, or (3, 1, 1) as in
        ``stats.json``), for ``image_normalization = "mean_std"``
        (:func:`~flowforge.policy.vision.image_statistics`)."""
        if self.image_normalization != "mean_std":
            raise ValueError("image statistics are for image_normalization = 'mean_std'")
        if len(stats) != self.cameras:
            raise ValueError(f"image statistics for {len(stats)} cameras; the encoder sees {self.cameras}")
        for camera, entry in enumerate(stats):
            for name, buffer in (("mean", self.image_mean), ("std", self.image_std)):
                if name not in entry or torch.as_tensor(entry[name]).numel() != 3:
                    raise ValueError(f"image statistics of camera {camera}: {name!r} must be 3 numbers (R, G, B)")
                value = torch.as_tensor(entry[name], dtype=buffer.dtype).reshape(3, 1, 1)
                if not bool(torch.isfinite(value).all()) or (name == "std" and bool((value < 0).any())):
                    raise ValueError(
                        f"image statistics {name!r} of camera {camera}: {value.flatten().tolist()}; expected finite "
                        "numbers (a std >= 0)"
                    )
                buffer[camera].copy_(value.clamp_min(1e-3) if name == "std" else value)  # a flat channel: no blow-up

    def _pixels(self, images: Tensor, camera: int, frames: int, augment: bool | None) -> Tensor:
        """uint8 (or float, 0-255) images ``(N, 3, H, W)`` of one camera to the encoder's input:
        augmented (``augment``; in training mode when ``None``), scaled to [-1, 1] or standardised."""
        images = self.augmentation.geometric(images, frames, augment)
        dtype = self.position.dtype
        x = images.to(dtype)
        if self.augmentation.jitters(augment):
            x = self.augmentation.color(x / 255.0, frames, augment)
            return x * 2.0 - 1.0 if self.image_normalization == "fixed" else self._standardize(x, camera)
        if self.image_normalization == "fixed":
            return x / 127.5 - 1.0
        return self._standardize(x / 255.0, camera)

    def _standardize(self, x: Tensor, camera: int) -> Tensor:
        return (x - self.image_mean[camera].to(x.dtype)) / self.image_std[camera].to(x.dtype)

    @property
    def reads_language(self) -> bool:
        return self.instructions is not None

    def set_instruction_embeddings(self, embeddings: Tensor | None = None) -> None:
        """Fill the instruction table (MiniLM embeddings of ``instructions`` when not given): a finite
        floating-point tensor of shape ``(len(instructions), embedding size)``. A table neither set
        nor loaded is filled with MiniLM's embeddings when the policy first reads an instruction."""
        if self.instructions is None:
            if embeddings is not None:
                raise ValueError("embeddings given to a policy without language input (language = false)")
            return
        if embeddings is None:
            embeddings = encode_instructions(self.instructions)
        expected = tuple(self.instruction_embeddings.shape)
        embeddings = torch.as_tensor(embeddings)
        if not embeddings.is_floating_point() or tuple(embeddings.shape) != expected:
            raise ValueError(
                f"embeddings must be a floating-point tensor of shape {expected} (one row per instruction), got "
                f"{embeddings.dtype} of shape {tuple(embeddings.shape)}"
            )
        if not bool(torch.isfinite(embeddings).all()):
            raise ValueError("embeddings hold NaN or inf; expected finite values")
        with torch.no_grad(), torch.inference_mode(False):
            self.instruction_embeddings.copy_(embeddings)
        self._instructions_embedded = True

    def fill_instruction_table(self) -> None:
        """Fill the instruction table with MiniLM's embeddings unless they were set or loaded; the
        policy calls it where it checks a batch, before any compiled computation reads the table."""
        if not self._instructions_embedded:
            self.set_instruction_embeddings()

    def _load_from_state_dict(self, state_dict: dict[str, Tensor], prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        if prefix + "instruction_embeddings" in state_dict:
            self._instructions_embedded = True

    def _language(self, observation: Batch, rows: int) -> Tensor:
        # The inputs were checked by ChunkPolicy.checked_batch: nothing here reads a value back to
        # the host, so a compiled or graph-captured sampling loop runs in one piece.
        self.fill_instruction_table()
        if "task_index" in observation:
            index = torch.as_tensor(observation["task_index"])
            return self.instruction_embeddings[index.to(self.instruction_embeddings.device)]
        texts = observation.get("instruction")
        if texts is None:
            raise ValueError("a language-conditioned policy needs 'task_index' or 'instruction' in the batch")
        if isinstance(texts, str):
            texts = [texts] * rows
        known = {text: i for i, text in enumerate(self.instructions)}
        vectors = []
        for text in texts:
            if text in known:
                vectors.append(self.instruction_embeddings[known[text]])
                continue
            if text not in self._runtime_embeddings:
                with torch.inference_mode(False):  # an ordinary tensor, usable in training too
                    self._runtime_embeddings[text] = encode_instructions([text])[0]
            vectors.append(self._runtime_embeddings[text].to(self.instruction_embeddings))
        return torch.stack(vectors)

    def forward(self, observation: Batch, augment: bool | None = None) -> Tensor:
        """Prefix tokens ``(B, tokens, width)`` of a batch whose ``state`` is already normalised and
        whose ``images`` list each camera's frames ``(B, obs_horizon, 3, H, W)`` in order (uint8;
        ``image`` stands for a one-camera list). Images are augmented when ``augment`` says so, or
        in training mode when it is ``None``."""
        state = observation["state"]
        rows = state.shape[0]
        tokens = [self.state_encoder(state)]
        if self.sees_images:
            images = observation["images"] if "images" in observation else [observation["image"]]
            if len(images) != self.cameras:
                raise ValueError(f"the encoder sees {self.cameras} cameras, got images of {len(images)}")
            for camera, (encoder, frames) in enumerate(zip(self.image_encoders, images, strict=True)):
                x = self._pixels(frames.flatten(0, 1), camera, frames.shape[1], augment)
                tokens.append(encoder(x).reshape(rows, -1, self.width))  # (B, obs_horizon * tokens, width)
        if self.instructions is not None:
            tokens.append(self.language_projection(self._language(observation, rows))[:, None])
        return torch.cat(tokens, dim=1) + self.position


__all__ = ["IMAGE_NORMALIZATIONS", "MIN_IMAGE_SIZE", "ImageEncoder", "ObservationEncoder"]
