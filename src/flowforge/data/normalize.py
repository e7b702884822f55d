r"""The one normaliser: a per-feature affine map from a data set's statistics, held as buffers.

.. math:: y = (x - \text{shift}) / \text{scale}, \qquad x = y \cdot \text{scale} + \text{shift},

with ``mode="mean_std"``: shift = mean, scale = std (zero mean, unit variance), or
``mode="min_max"``: shift = (max + min) / 2, scale = (max - min) / 2 ([min, max] to [-1, 1]). The
scale is floored at :data:`SCALE_FLOOR`, so a constant feature maps to 0 instead of dividing by 0.

It is an ``nn.Module`` whose ``shift`` and ``scale`` are buffers: a model that holds one carries
its statistics in every checkpoint. Policies normalise states and actions with it, and
:meth:`flowforge.data.EpisodeDataset.normalizer` builds one from ``meta/stats.json``.

>>> import torch
>>> n = Normalizer.from_statistics({"mean": [1.0], "std": [2.0], "min": [0.0], "max": [4.0]}, "min_max")
>>> n.normalize(torch.tensor([[4.0]])).tolist(), n.unnormalize(torch.tensor([[-1.0]])).tolist()
([[1.0]], [[0.0]])
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from flowforge.errors import DataError
from flowforge.validation import check_count

MODES = ("mean_std", "min_max")
#: The smallest scale: a feature whose spread is below it is divided by this floor instead (a constant
#: feature maps to 0, a nearly constant one is stretched at most 1/SCALE_FLOOR times).
SCALE_FLOOR = 1e-4


class Normalizer(nn.Module):
    """Per-feature affine normalisation (see the module docstring); the identity until statistics are set.

    Arguments:
        features: size of the last dimension it normalises.
        mode: ``"mean_std"`` or ``"min_max"``.
    """

    def __init__(self, features: int, mode: str = "mean_std") -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be 'mean_std' or 'min_max', got {mode!r}")
        features = check_count("features", features)
        self.features, self.mode = features, mode
        self.register_buffer("shift", torch.zeros(features))
        self.register_buffer("scale", torch.ones(features))

    @classmethod
    def from_statistics(cls, stats: dict[str, Any], mode: str = "mean_std") -> Normalizer:
        """A normaliser fitted to ``stats`` (``mean``, ``std``, ``min``, ``max`` lists, as in stats.json)."""
        read = "min" if mode == "min_max" else "mean"  # the statistic this mode reads fixes the size
        features = len(np.atleast_1d(np.asarray(stats.get(read, []))))
        normalizer = cls(max(features, 1), mode)
        normalizer.set_statistics(stats)
        return normalizer

    @torch.no_grad()
    def set_statistics(self, stats: dict[str, Any]) -> None:
        """Fit shift and scale to ``stats`` in place (a ``DataError`` names what is missing or wrong)."""
        self.set_shift_and_scale(*self.shift_and_scale(stats))

    def shift_and_scale(self, stats: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """The shift and scale ``stats`` give, checked, without changing this normaliser (so that
        several normalisers can be checked before any is set)."""
        needed = ("mean", "std") if self.mode == "mean_std" else ("min", "max")
        missing = [k for k in needed if k not in stats]
        if missing:
            raise DataError(f"statistics lack {', '.join(missing)} (needed for {self.mode} normalisation)")
        values = {k: torch.as_tensor(np.asarray(stats[k], dtype=np.float64)).reshape(-1) for k in needed}
        for key, value in values.items():
            if value.numel() != self.features or not bool(torch.isfinite(value).all()):
                raise DataError(f"statistics {key!r} must be {self.features} finite numbers, got {value.tolist()}")
        if self.mode == "mean_std" and bool((values["std"] < 0).any()):
            raise DataError(f"statistics 'std' must be >= 0, got {values['std'].tolist()}")
        if self.mode == "min_max" and bool((values["min"] > values["max"]).any()):
            raise DataError(
                f"statistics 'min' must be <= 'max', got min {values['min'].tolist()}, max {values['max'].tolist()}"
            )
        if self.mode == "mean_std":
            shift, scale = values["mean"], values["std"]
        else:
            shift, scale = (values["max"] + values["min"]) / 2, (values["max"] - values["min"]) / 2
        limit = torch.finfo(self.shift.dtype).max  # the buffers' numbers: a larger statistic would become inf
        if bool((shift.abs() > limit).any() or (scale.abs() > limit).any()):
            raise DataError(
                f"statistics too large for {self.shift.dtype} (at most {limit:.4g}): shift {shift.tolist()}, "
                f"scale {scale.tolist()}"
            )
        return shift, scale

    def set_shift_and_scale(self, shift: Tensor, scale: Tensor) -> None:
        """Set what :meth:`shift_and_scale` returned (a scale is floored at ``SCALE_FLOOR``)."""
        self.shift.copy_(shift)
        self.scale.copy_(scale.clamp_min(SCALE_FLOOR))

    def normalize(self, x: Tensor) -> Tensor:
        """``(x - shift) / scale`` over the last dimension (integers are read as the statistics' floats)."""
        x = self._checked("x", x)
        return (x - self.shift.to(x.dtype)) / self.scale.to(x.dtype)

    def unnormalize(self, y: Tensor) -> Tensor:
        """The inverse: ``y * scale + shift``."""
        y = self._checked("y", y)
        return y * self.scale.to(y.dtype) + self.shift.to(y.dtype)

    def _checked(self, name: str, value: Tensor) -> Tensor:
        """``value`` with this normaliser's features last, and floating (integers would truncate the statistics)."""
        if value.shape[-1:] != (self.features,):
            raise ValueError(
                f"{name} must have {self.features} numbers in its last dimension (the normaliser's features), "
                f"got shape {tuple(value.shape)}"
            )
        return value if value.is_floating_point() else value.to(self.shift.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.normalize(x)

    def extra_repr(self) -> str:
        return f"features={self.features}, mode={self.mode}"


__all__ = ["MODES", "SCALE_FLOOR", "Normalizer"]
