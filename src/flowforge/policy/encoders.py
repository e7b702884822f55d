r"""The observation encoder: state, camera images and the task instruction to prefix tokens.

:class:`ObservationEncoder` turns one observation window into the *prefix* the action expert
attends to, a sequence of tokens of the model width:

* **state**: one token per frame, an MLP on the normalised state;
* **image** (optional): a conv net trained from scratch, one token per cell of its output grid
  per frame (84x84 -> 7x7 = 49 tokens);
* **language** (optional): one token, a linear projection of the frozen MiniLM embedding of the
  task instruction. The embeddings of the training instructions live in the weights (the
  instruction table, a buffer), so evaluating on those needs no language model; another
  instruction is embedded once with MiniLM and remembered.

A learned position embedding per prefix token tells the tokens apart.

>>> import torch
>>> encoder = ObservationEncoder(state_dim=3, width=16, obs_horizon=2)
>>> encoder({"state": torch.zeros(5, 2, 3)}).shape, encoder.tokens
(torch.Size([5, 2, 16]), 2)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from flowforge.policy.language import EMBEDDING_SIZE, encode_instructions

Batch = dict[str, Any]
#: The smallest image side the conv encoder takes (its three layers need 36 pixels).
MIN_IMAGE_SIZE = 36


class ImageEncoder(nn.Module):
    """Conv net trained from scratch: a uint8 image (3, 84, 84) to a 7x7 grid of tokens.

    ``conv 8x8 /4 -> GELU -> conv 4x4 /2 -> GELU -> conv 3x3 -> tokens``; other sizes give other
    grids. Pixels are scaled to [-1, 1] first.
    """

    def __init__(self, image_shape: list[int], width: int) -> None:
        """``image_shape``: ``[3, H, W]`` with H, W >= :data:`MIN_IMAGE_SIZE` (``PolicyConfig`` checks it)."""
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
        x = images.to(self.net[0].weight.dtype) / 127.5 - 1.0
        return self.net(x).flatten(2).transpose(1, 2)


class ObservationEncoder(nn.Module):
    """An observation window to prefix tokens (see the module docstring).

    Arguments:
        state_dim: size of the state vector.
        width: token width.
        obs_horizon: observation frames per window.
        image_shape: ``[3, H, W]`` to see images, ``None`` for state only.
        instructions: the training instructions (the rows of the instruction table) when the
            policy is language-conditioned, ``None`` when it is not.
    """

    def __init__(
        self,
        state_dim: int,
        width: int,
        obs_horizon: int,
        image_shape: list[int] | None = None,
        instructions: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.width, self.obs_horizon = width, obs_horizon
        self.state_encoder = nn.Sequential(nn.Linear(state_dim, width), nn.GELU(), nn.Linear(width, width))
        self.image_encoder = ImageEncoder(image_shape, width) if image_shape is not None else None
        tokens = obs_horizon * (1 + (self.image_encoder.tokens if self.image_encoder is not None else 0))
        self.instructions = None if instructions is None else list(instructions)
        if self.instructions is not None:
            self.language_projection = nn.Linear(EMBEDDING_SIZE, width)
            self.register_buffer("instruction_embeddings", torch.zeros(len(self.instructions), EMBEDDING_SIZE))
            tokens += 1
        #: prefix tokens per observation window.
        self.tokens = tokens
        self.position = nn.Parameter(0.02 * torch.randn(tokens, width))
        self._runtime_embeddings: dict[str, Tensor] = {}

    @property
    def sees_images(self) -> bool:
        return self.image_encoder is not None

    @property
    def reads_language(self) -> bool:
        return self.instructions is not None

    def set_instruction_embeddings(self, embeddings: Tensor | None = None) -> None:
        """Fill the instruction table (MiniLM embeddings of ``instructions`` when not given)."""
        if self.instructions is None:
            return
        if embeddings is None:
            embeddings = encode_instructions(self.instructions)
        self.instruction_embeddings.copy_(embeddings)

    def _language(self, observation: Batch, rows: int) -> Tensor:
        if "task_index" in observation:
            return self.instruction_embeddings[observation["task_index"]]
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

    def forward(self, observation: Batch) -> Tensor:
        """Prefix tokens ``(B, tokens, width)`` of a checked batch whose ``state`` is already normalised."""
        state = observation["state"]
        rows = state.shape[0]
        tokens = [self.state_encoder(state)]
        if self.image_encoder is not None:
            frames = self.image_encoder(observation["image"].flatten(0, 1))  # (B * obs_horizon, tokens, width)
            tokens.append(frames.reshape(rows, -1, self.width))
        if self.instructions is not None:
            tokens.append(self.language_projection(self._language(observation, rows))[:, None])
        return torch.cat(tokens, dim=1) + self.position


__all__ = ["MIN_IMAGE_SIZE", "ImageEncoder", "ObservationEncoder"]
