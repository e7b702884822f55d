"""Velocity networks ``v(x, t, context)`` for continuous flows and flow matching."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from flowforge.nn.mlp import MLP


class VelocityMLP(nn.Module):
    """An MLP on ``[x, t, context]`` returning a velocity of the same shape as ``x``.

    Follows the velocity-field contract: ``net(x, t, context=None) -> v`` with ``t`` of shape
    (batch,). The default activation is smooth (SiLU), so ODE solvers see a smooth field.

    >>> import torch
    >>> net = VelocityMLP(2, context=3, hidden=(16,))
    >>> net(torch.randn(5, 2), torch.rand(5), torch.randn(5, 3)).shape
    torch.Size([5, 2])
    """

    def __init__(
        self,
        features: int,
        context: int = 0,
        hidden: Sequence[int] = (64, 64),
        activation: Callable[[], nn.Module] = nn.SiLU,
    ) -> None:
        super().__init__()
        self.features, self.context_features = int(features), int(context)
        self.net = MLP(features + 1 + context, features, hidden, activation)

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None) -> Tensor:
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape ({x.shape[0]},) (one time per sample), got {tuple(t.shape)}")
        parts = [x, t[:, None].to(x.dtype)]
        if self.context_features:
            parts.append(context)
        return self.net(torch.cat(parts, dim=1))
