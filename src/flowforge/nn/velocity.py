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
from collections.abc import Callable, Iterable, Sequence
from numbers import Real

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _torch_module

from flowforge.nn.mlp import MLP
from flowforge.registry import refuse_unread, register
from flowforge.validation import (
    check_activation,
    check_batched,
    check_bool,
    check_count,
    check_real,
    check_widths,
    is_count,
)


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
        if not is_count(dim, low=2) or dim % 2:
            raise ValueError(f"the time embedding size dim must be an even int >= 2, got {dim!r}")
        dim = int(dim)
        max_frequency = check_real("max_frequency", max_frequency, positive=True)
        self.dim = dim
        angular = 2 * math.pi * torch.logspace(0.0, math.log10(max_frequency), dim // 2)
        # cos(a) = sin(a + pi/2): one fused multiply-add and one sine give both halves.
        self.register_buffer("angular", torch.cat([angular, angular]), persistent=False)
        self.register_buffer(
            "shift", torch.cat([torch.zeros(dim // 2), torch.full((dim // 2,), math.pi / 2)]), persistent=False
        )

    def forward(self, t: Tensor) -> Tensor:
        shift, angular = self.shift, self.angular
        if shift.dtype != t.dtype:
            shift, angular = shift.to(t.dtype), angular.to(t.dtype)
        return torch.addcmul(shift, t[:, None], angular).sin()


def _check_sizes(features: object, context: object) -> tuple[int, int]:
    """``features`` a positive int and ``context`` an int >= 0 (0: no context), as Python ints."""
    return check_count("features", features), check_count("context", context, low=0)


def network_context(context: object, size: int, x: Tensor) -> Tensor | None:
    """A velocity network's context: ``(batch, size)`` for a conditional network, ``None`` for one
    built with ``context=0`` (shape and type only: the samplers call networks at every step)."""
    if size:
        if context is None:
            raise ValueError(f"this network is conditional: pass a context of shape (batch, {size})")
        return check_batched("context", context, (size,), batch=x.shape[0], dtype=x.dtype)
    if context is not None:
        raise ValueError("this network takes no context (built with context=0); got one")
    return None


class _TimeInputs(nn.Module):
    """The time (and optional step-size) features a velocity network sees, shared by both networks.

    The networks call :meth:`forward` directly, not through ``nn.Module.__call__``: samplers call
    them on small batches many times, where the call machinery costs as much as the arithmetic.
    """

    def __init__(self, time_embedding: int, step_input: bool) -> None:
        super().__init__()
        time_embedding = check_count("time_embedding", time_embedding, low=0)
        if time_embedding and time_embedding % 2:
            raise ValueError(f"time_embedding must be 0 (raw t) or an even int >= 2, got {time_embedding!r}")
        check_bool("step_input", step_input)
        self.embedding = SinusoidalTimeEmbedding(time_embedding) if time_embedding else None
        self.step_input = step_input
        self.size = (time_embedding or 1) * (2 if step_input else 1)

    def forward(self, x: Tensor, t: Tensor, step: Tensor | float | None) -> list[Tensor]:
        if not isinstance(t, Tensor) or t.shape != (x.shape[0],):
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"t must have shape ({x.shape[0]},) (a tensor: one time per sample), got {shape}")
        if not t.is_floating_point():
            raise TypeError(f"t must be a floating-point tensor of times in [0, 1], got dtype {t.dtype}")
        times = [t if t.dtype == x.dtype else t.to(x.dtype)]
        if self.step_input:
            if step is None:
                step = 0.0
            elif isinstance(step, bool) or (
                not isinstance(step, Tensor) and not (isinstance(step, Real) and 0 <= step < math.inf)
            ):
                raise ValueError(
                    f"step must be a finite step size >= 0 or a tensor of shape ({x.shape[0]},), got {step!r}"
                )
            step = torch.as_tensor(step, dtype=x.dtype, device=x.device)
            if step.dim() != 0 and step.shape != (x.shape[0],):
                raise ValueError(f"step must have shape () or ({x.shape[0]},), got {tuple(step.shape)}")
            times.append(step.expand(x.shape[0]) if step.dim() == 0 else step)
        elif step is not None:
            raise ValueError("this network has no step-size input; build it with step_input=True")
        if self.embedding is None:
            return [s[:, None] for s in times]
        return [self.embedding.forward(s) for s in times]

    def network_input(self, x: Tensor, t: Tensor, context: Tensor | None, step: Tensor | float | None) -> Tensor:
        """``[x, time (and step) features, context]``: the first layer's input in both networks."""
        parts = [x, *self.forward(x, t, step)]
        if context is not None:
            parts.append(context)
        return torch.cat(parts, dim=1)


@register("velocity-mlp", "velocity")
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
        features, context = _check_sizes(features, context)
        hidden = check_widths("hidden", hidden)
        activation = check_activation("activation", activation)
        if not hidden:
            refuse_unread(
                VelocityMLP, {"activation": activation}, "hidden = [] makes one linear map, with no activation"
            )
        self.features, self.context_features = features, context
        self.time_inputs = _TimeInputs(time_embedding, step_input)
        self.net = MLP(features + self.time_inputs.size + context, features, hidden, activation)

    def forward(
        self, x: Tensor, t: Tensor, context: Tensor | None = None, step: Tensor | float | None = None
    ) -> Tensor:
        x = check_batched("x", x, (self.features,), dtype=self.net[0].weight.dtype)
        context = network_context(context, self.context_features, x)
        return _run_layers(self.net, self.time_inputs.network_input(x, t, context, step))

    def time_conditioning(
        self, times: Tensor, context: Tensor | None = None, step: float | None = None
    ) -> Callable[[Tensor, int], Tensor]:
        r"""Precompute everything but ``x`` for a fixed list of times; returns ``velocity(x, k)`` at ``times[k]``.

        The first layer is affine in its input :math:`[x, \gamma(t), c]`, so
        :math:`W [x, \gamma(t), c] + b = W_x x + (W_t \gamma(t_k) + W_c c + b)`. The bracket is
        computed once for all K times (and the whole batch of contexts), and each call costs one
        ``addmm`` plus the remaining layers. Used by the fixed-step samplers (their time grid
        is known in advance); equal to ``forward(x, times[k].expand(batch), context, step)``.
        """
        first = self.net[0]
        if type(first) is not nn.Linear:
            raise TypeError("time_conditioning needs the network to start with an nn.Linear")
        d = self.features
        t_width = self.time_inputs.size
        dummy = times.new_zeros(times.shape[0], d)
        time_features = torch.cat(self.time_inputs.forward(dummy, times, step), dim=1)
        offsets = F.linear(time_features, first.weight[:, d : d + t_width], first.bias)  # (K, H)
        weight_x = first.weight[:, :d].t()
        rest = list(self.net)[1:]
        if self.context_features:
            context_part = F.linear(context, first.weight[:, d + t_width :])  # (B, H)

            def velocity(x: Tensor, k: int) -> Tensor:
                return _run_layers(rest, torch.addmm(context_part + offsets[k], x, weight_x))

        else:

            def velocity(x: Tensor, k: int) -> Tensor:
                return _run_layers(rest, torch.addmm(offsets[k], x, weight_x))

        return velocity


def check_step_input(velocity: object, model: str) -> None:
    """Refuse a flowforge velocity network built without a step-size input (``step_input=False``) for
    the few-step ``model`` that needs one, where the network enters rather than at its first loss.
    A network of the user's own is taken as it is: its call fails on a ``step`` it cannot take."""
    inputs = getattr(velocity, "time_inputs", None)
    if isinstance(inputs, _TimeInputs) and not inputs.step_input:
        raise ValueError(
            f"velocity: a {model} model tells its network the step size, and this {type(velocity).__name__} "
            "has no step-size input; build it with step_input=True"
        )


_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


def _own_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks
    )


def _global_hooks() -> bool:
    """Whether a module hook is registered for every module (``register_module_forward_hook`` and kin)."""
    return any(getattr(_torch_module, name, None) for name in _GLOBAL_HOOKS)


def _run_layers(layers: Iterable[nn.Module], h: Tensor) -> Tensor:
    """``layers(h)`` without the per-module call machinery for plain Linear and SiLU layers.

    Samplers call the velocity many times on small batches, where ``nn.Module.__call__`` costs
    about as much as the matrix products. Hooks are honoured: ``layers`` (a module) with any hook
    of its own, or any module hook registered globally, is called normally, and so is each layer
    with a hook (forward, forward-pre or backward).
    """
    if _global_hooks() or (isinstance(layers, nn.Module) and _own_hooks(layers)):
        return layers(h)
    for layer in layers:
        if _own_hooks(layer):
            h = layer(h)
        elif type(layer) is nn.Linear:
            h = F.linear(h, layer.weight, layer.bias)
        elif type(layer) is nn.SiLU:
            h = F.silu(h)
        else:
            h = layer(h)
    return h


class _ResidualBlock(nn.Module):
    """``h + W2 act(W1 act(LayerNorm(h)))``: pre-norm residual block."""

    def __init__(self, width: int, activation: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.LayerNorm(width), activation(), nn.Linear(width, width), activation(), nn.Linear(width, width)
        )

    def forward(self, h: Tensor) -> Tensor:
        return h + self.body(h)


@register("residual-velocity-mlp", "velocity")
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
        features, context = _check_sizes(features, context)
        width = check_count("width", width)
        blocks = check_count("blocks", blocks, low=0)
        activation = check_activation("activation", activation)
        self.features, self.context_features = features, context
        self.time_inputs = _TimeInputs(time_embedding, step_input)
        self.input = nn.Linear(features + self.time_inputs.size + context, width)
        self.blocks = nn.Sequential(*(_ResidualBlock(width, activation) for _ in range(blocks)))
        self.output = nn.Sequential(nn.LayerNorm(width), activation(), nn.Linear(width, features))

    def forward(
        self, x: Tensor, t: Tensor, context: Tensor | None = None, step: Tensor | float | None = None
    ) -> Tensor:
        x = check_batched("x", x, (self.features,), dtype=self.input.weight.dtype)
        context = network_context(context, self.context_features, x)
        return self.output(self.blocks(self.input(self.time_inputs.network_input(x, t, context, step))))


__all__ = ["ResidualVelocityMLP", "SinusoidalTimeEmbedding", "VelocityMLP"]
