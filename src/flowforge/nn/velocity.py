r"""Velocity networks ``v(x, t, context)`` for continuous flows and flow matching.

Both networks follow the velocity-field contract: ``net(x, t, context=None) -> v`` with ``t`` of
shape (batch,) and ``v`` shaped like ``x`` (batch, features). Time enters either raw (one input,
the cheapest choice for CNFs) or through a sinusoidal embedding

.. math:: \gamma(t) = \big[\sin(2\pi f_k t),\ \cos(2\pi f_k t)\big]_{k=1}^{m/2},
          \qquad f_k \text{ log-spaced in } [1, f_{\max}],

which lets a small network resolve fast changes in time (flow matching near the data end).
With ``step_input=True`` a network also takes the step size ``step`` of a few-step sampler (the
shortcut-model input, :class:`flowforge.matching.ShortcutMatcher`), embedded like the time;
``step=None`` means 0, the instantaneous velocity.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from flowforge.nn.mlp import MLP


class SinusoidalTimeEmbedding(nn.Module):
    """``t`` of shape (batch,) to ``[sin(2 pi f t), cos(2 pi f t)]`` features, shape (batch, dim).

    Arguments:
        dim: output size (even).
        max_frequency: the highest frequency ``f``; frequencies are log-spaced from 1 to it.
            Higher frequencies let the field change faster in time, and make adaptive solves
            (likelihoods) take more steps: at 100 an untrained 2-D field needed 4x the NFE of 16.

    >>> import torch
    >>> SinusoidalTimeEmbedding(8)(torch.rand(3)).shape
    torch.Size([3, 8])
    """

    def __init__(self, dim: int = 32, max_frequency: float = 16.0) -> None:
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"the time embedding size must be even and >= 2, got {dim}")
        self.dim = dim
        frequencies = torch.logspace(0.0, math.log10(max_frequency), dim // 2)
        self.register_buffer("angular", 2 * math.pi * frequencies, persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        phase = t[:, None] * self.angular.to(t.dtype)
        return torch.cat([phase.sin(), phase.cos()], dim=1)


class _TimeInputs(nn.Module):
    """The time (and optional step-size) features a velocity network sees, shared by both networks."""

    def __init__(self, time_embedding: int, step_input: bool) -> None:
        super().__init__()
        self.embedding = SinusoidalTimeEmbedding(time_embedding) if time_embedding else None
        self.step_input = step_input
        self.size = (time_embedding or 1) * (2 if step_input else 1)

    def forward(self, x: Tensor, t: Tensor, step: Tensor | float | None) -> list[Tensor]:
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape ({x.shape[0]},) (one time per sample), got {tuple(t.shape)}")
        times = [t.to(x.dtype)]
        if self.step_input:
            if step is None:
                step = 0.0
            step = torch.as_tensor(step, dtype=x.dtype, device=x.device)
            times.append(step.expand(x.shape[0]) if step.dim() == 0 else step)
        elif step is not None:
            raise ValueError("this network has no step-size input; build it with step_input=True")
        if self.embedding is None:
            return [s[:, None] for s in times]
        return [self.embedding(s) for s in times]


class VelocityMLP(nn.Module):
    """An MLP on ``[x, time features, context]`` returning a velocity of the same shape as ``x``.

    Arguments:
        features: size of ``x``.
        context: size of the context vector (0 for none).
        hidden: hidden widths.
        activation: activation constructor; the default SiLU is smooth, so ODE solvers see a smooth field.
        time_embedding: size of the sinusoidal time embedding, or 0 to feed ``t`` raw.
        step_input: also take the step size ``step`` (shortcut models).

    >>> import torch
    >>> net = VelocityMLP(2, context=3, hidden=(16,), time_embedding=8)
    >>> net(torch.randn(5, 2), torch.rand(5), torch.randn(5, 3)).shape
    torch.Size([5, 2])
    """

    def __init__(
        self,
        features: int,
        context: int = 0,
        hidden: Sequence[int] = (64, 64),
        activation: Callable[[], nn.Module] = nn.SiLU,
        time_embedding: int = 0,
        step_input: bool = False,
    ) -> None:
        super().__init__()
        self.features, self.context_features = int(features), int(context)
        self.time_inputs = _TimeInputs(time_embedding, step_input)
        self.net = MLP(features + self.time_inputs.size + context, features, hidden, activation)

    def forward(
        self, x: Tensor, t: Tensor, context: Tensor | None = None, step: Tensor | float | None = None
    ) -> Tensor:
        parts = [x, *self.time_inputs(x, t, step)]
        if self.context_features:
            parts.append(context)
        return self.net(torch.cat(parts, dim=1))


class _ResidualBlock(nn.Module):
    """``h + W2 act(W1 act(LayerNorm(h)))``: pre-norm residual block."""

    def __init__(self, width: int, activation: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.LayerNorm(width), activation(), nn.Linear(width, width), activation(), nn.Linear(width, width)
        )

    def forward(self, h: Tensor) -> Tensor:
        return h + self.body(h)


class ResidualVelocityMLP(nn.Module):
    """A small residual MLP velocity: input projection, ``blocks`` pre-norm residual blocks, output layer.

    The time (and step) features and the context enter the input projection, so every block
    sees them through the residual stream.

    Arguments:
        features: size of ``x``.
        context: size of the context (0 for none).
        width: width of the residual stream.
        blocks: number of residual blocks.
        activation: activation constructor.
        time_embedding: size of the sinusoidal time embedding (0: raw ``t``).
        step_input: also take the step size ``step`` (shortcut models).

    >>> import torch
    >>> net = ResidualVelocityMLP(2, width=16, blocks=2)
    >>> net(torch.randn(5, 2), torch.rand(5)).shape
    torch.Size([5, 2])
    """

    def __init__(
        self,
        features: int,
        context: int = 0,
        width: int = 128,
        blocks: int = 3,
        activation: Callable[[], nn.Module] = nn.SiLU,
        time_embedding: int = 32,
        step_input: bool = False,
    ) -> None:
        super().__init__()
        if width < 1 or blocks < 0:
            raise ValueError(f"width must be >= 1 and blocks >= 0, got width={width}, blocks={blocks}")
        self.features, self.context_features = int(features), int(context)
        self.time_inputs = _TimeInputs(time_embedding, step_input)
        self.input = nn.Linear(features + self.time_inputs.size + context, width)
        self.blocks = nn.Sequential(*(_ResidualBlock(width, activation) for _ in range(blocks)))
        self.output = nn.Sequential(nn.LayerNorm(width), activation(), nn.Linear(width, features))

    def forward(
        self, x: Tensor, t: Tensor, context: Tensor | None = None, step: Tensor | float | None = None
    ) -> Tensor:
        parts = [x, *self.time_inputs(x, t, step)]
        if self.context_features:
            parts.append(context)
        return self.output(self.blocks(self.input(torch.cat(parts, dim=1))))


__all__ = ["ResidualVelocityMLP", "SinusoidalTimeEmbedding", "VelocityMLP"]
