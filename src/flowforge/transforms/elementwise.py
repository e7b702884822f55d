r"""Elementwise (scalar) bijections whose parameters come from a conditioner.

A coupling or autoregressive layer is a *conditioner* network, which produces parameters for
each transformed feature, and one of these *elementwise transformers*, which applies a monotone
scalar map with those parameters. Keeping the two apart makes swapping affine for additive (or,
later, spline) a constructor argument.

Each transformer takes ``x`` of shape ``(batch, n)`` and ``params`` of shape
``(batch, n, params_per_feature)`` and returns the output and the elementwise log-derivative,
both of shape ``(batch, n)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from flowforge.validation import check_real


class ElementwiseTransformer(nn.Module, ABC):
    """Base class: a monotone scalar map per feature, parametrised by a conditioner's output."""

    params_per_feature: int

    @abstractmethod
    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """Map ``x`` (batch, n) with ``params`` (batch, n, p); return output and log-derivative."""

    @abstractmethod
    def inverse(self, z: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        """Undo :meth:`forward`; the log-derivative returned is that of the inverse map."""


def soft_clamp(raw: Tensor, bound: float) -> Tensor:
    r"""Smoothly squash ``raw`` into :math:`(-b, b)`: :math:`b \tanh(raw / b)`.

    Close to the identity near zero, so small log-scales are left as they are, while a deep
    stack can never multiply its scales past :math:`e^{\pm b}` per layer.

    >>> import torch
    >>> soft_clamp(torch.tensor([0.0, 100.0]), 3.0)
    tensor([0., 3.])
    """
    return bound * torch.tanh(raw / bound)


class AffineElementwise(ElementwiseTransformer):
    r"""Affine map :math:`z = x\,e^{s} + t` with :math:`s = \mathrm{softclamp}(\tilde s)`.

    Parameters per feature: ``(t, s~)``. ``log|dz/dx| = s``.

    Arguments:
        scale_bound: the soft clamp bound :math:`b` on the log-scale (must be positive).
    """

    params_per_feature = 2

    def __init__(self, scale_bound: float = 3.0) -> None:
        super().__init__()
        self.scale_bound = check_real("scale_bound", scale_bound, positive=True)

    def _shift_log_scale(self, params: Tensor) -> tuple[Tensor, Tensor]:
        shift, raw = params.unbind(-1)
        return shift, soft_clamp(raw, self.scale_bound)

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        shift, log_scale = self._shift_log_scale(params)
        return x * torch.exp(log_scale) + shift, log_scale

    def inverse(self, z: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        shift, log_scale = self._shift_log_scale(params)
        return (z - shift) * torch.exp(-log_scale), -log_scale

    def extra_repr(self) -> str:
        return f"scale_bound={self.scale_bound}"


class AdditiveElementwise(ElementwiseTransformer):
    r"""Shift :math:`z = x + t` (NICE): volume preserving, ``log|dz/dx| = 0``."""

    params_per_feature = 1

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        return x + params[..., 0], torch.zeros_like(x)

    def inverse(self, z: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        return z - params[..., 0], torch.zeros_like(z)
