r"""A small U-Net velocity network ``v(x, t, context)`` for (C, H, W) images.

The velocity-field contract holds as for the MLP networks of :mod:`flowforge.nn.velocity`:
``net(x, t, context=None) -> v`` with ``x`` of shape (batch, C, H, W), ``t`` of shape (batch,) and
``v`` shaped like ``x``.

**What it computes.** One conditioning vector per sample,

.. math:: e = \mathrm{MLP}_t\big(\gamma(t)\big) \;+\; \mathrm{MLP}_s\big(\gamma(s)\big) \;+\; W_c\, c,

from the sinusoidal time embedding :math:`\gamma` (:class:`~flowforge.nn.SinusoidalTimeEmbedding`),
the step size :math:`s` of a few-step sampler (only with ``step_input=True``; ``step=None`` means
:math:`s = 0`, the instantaneous velocity) and the context :math:`c` (a one-hot class or any real
vector; only when ``context > 0``). Every residual block adds a projection of it to its feature maps:

.. math:: h = \mathrm{conv}\big(\mathrm{SiLU}(\mathrm{GN}(x))\big) + W\,\mathrm{SiLU}(e), \qquad
          \mathrm{block}(x) = \mathrm{skip}(x) + \mathrm{conv}\big(\mathrm{SiLU}(\mathrm{GN}(h))\big),

with GN a group normalisation and skip a 1x1 convolution when the width changes. The blocks are
arranged as a U-Net (Ronneberger et al. 2015; the diffusion variant of Ho et al. 2020): a 3x3
input convolution, then per resolution ``blocks`` residual blocks and a stride-2 convolution that
halves the resolution; a middle of two blocks at the lowest resolution (with multi-head
self-attention between them when ``attention=True``); then the mirror path, whose blocks also read
the saved activations of the way down (concatenated skip connections), nearest-neighbour
upsampling followed by a 3x3 convolution, and a GroupNorm, SiLU, 3x3 output convolution back to C
channels. With the defaults on 1x8x8 digits the resolutions are 8x8 and 4x4 (about 0.6M parameters);
``channel_multipliers=(1, 2, 2)`` adds 2x2.

Because FlowMatcher's classifier-free guidance replaces dropped rows' context by a learned null
vector (any real vector), the context enters through a linear map, never a table lookup.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowforge.nn.velocity import _TimeInputs, network_context
from flowforge.registry import refuse_unread, register
from flowforge.validation import check_batched, check_count, check_dropout, describe_shape, is_count, model_dtype


class _ResidualConvBlock(nn.Module):
    """``skip(x) + conv(drop(SiLU(GN(conv(SiLU(GN(x))) + W e))))``: a residual block fed the embedding ``e``."""

    def __init__(self, in_channels: int, out_channels: int, embedding: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.embedding = nn.Linear(embedding, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, embedding: Tensor) -> Tensor:
        """``x`` (batch, in, H, W); ``embedding`` (batch, E), already through the SiLU."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.embedding(embedding)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class _SelfAttention(nn.Module):
    """``x + W_o MultiHeadAttention(GN(x))`` over the H*W positions of a feature map."""

    def __init__(self, channels: int, heads: int, groups: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (batch, heads, positions, head width)
        attended = F.scaled_dot_product_attention(q, k, v)
        return x + self.out(attended.transpose(-1, -2).reshape(b, c, h, w))


class _Downsample(nn.Module):
    """A stride-2 3x3 convolution: half the height and width, same channels."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class _Upsample(nn.Module):
    """Nearest-neighbour upsampling by 2, then a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


@register("unet", "velocity")
class UNetVelocity(nn.Module):
    r"""A U-Net velocity field on (C, H, W) images, conditioned on time, a context and (optionally) a step size.

    See the module docstring for the computation.

    Arguments:
        features: the event shape ``(C, H, W)``; H and W must be divisible by
            ``2 ** (len(channel_multipliers) - 1)``.
        context: size of the context vector (a one-hot class label: the number of classes); 0 for none.
        channels: base width; resolution ``k`` has ``channels * channel_multipliers[k]`` channels.
            Must be divisible by ``groups``. The embedding width is ``4 * channels``.
        channel_multipliers: one entry per resolution, the first at full size, each next one at
            half the height and width.
        blocks: residual blocks per resolution on the way down (the way up has one more, which
            reads the skip connection of the downsampling).
        attention: add multi-head self-attention at the lowest resolution.
        heads: attention heads (must divide the lowest resolution's width).
        groups: GroupNorm groups.
        time_embedding: size of the sinusoidal embedding of ``t`` (and of ``step``); 0 feeds them raw.
        dropout: dropout probability inside the residual blocks (training only).
        step_input: also take the step size ``step`` of shortcut / MeanFlow models.

    Attributes ``features`` (the event shape, a tuple, read by :class:`~flowforge.matching.FlowMatcher`)
    and ``context_features``.

    >>> import torch
    >>> net = UNetVelocity((1, 8, 8), context=10, channels=8, groups=4)
    >>> x, t, c = torch.randn(3, 1, 8, 8), torch.rand(3), torch.eye(10)[[0, 4, 9]]
    >>> net(x, t, c).shape
    torch.Size([3, 1, 8, 8])
    """

    def __init__(
        self,
        features: Sequence[int],
        context: int = 0,
        channels: int = 32,
        channel_multipliers: Sequence[int] = (1, 2),
        blocks: int = 1,
        attention: bool = False,
        heads: int = 4,
        groups: int = 8,
        time_embedding: int = 64,
        dropout: float = 0.0,
        step_input: bool = False,
    ) -> None:
        super().__init__()
        shape = tuple(features) if isinstance(features, Sequence) and not isinstance(features, str) else ()
        if len(shape) != 3 or not all(is_count(s) for s in shape):
            raise ValueError(f"features must be an image shape (C, H, W) of positive ints, got {features!r}")
        multipliers = tuple(channel_multipliers) if isinstance(channel_multipliers, Sequence) else ()
        if not multipliers or not all(is_count(m) for m in multipliers):
            raise ValueError(f"channel_multipliers must be one or more positive ints, got {channel_multipliers!r}")
        for name, value, low in (
            ("context", context, 0),
            ("channels", channels, 1),
            ("blocks", blocks, 1),
            ("heads", heads, 1),
            ("groups", groups, 1),
            ("time_embedding", time_embedding, 0),
        ):
            check_count(name, value, low=low)
        for name, value in (("attention", attention), ("step_input", step_input)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false, got {value!r}")
        dropout = check_dropout("dropout", dropout)
        if not attention:
            refuse_unread(UNetVelocity, {"heads": heads}, "attention = False does not read it (attention = True does)")
        factor = 2 ** (len(multipliers) - 1)
        if shape[1] % factor or shape[2] % factor:
            raise ValueError(
                f"features {describe_shape(shape)}: height and width must be divisible by {factor} "
                f"(halved {len(multipliers) - 1} times for channel_multipliers={multipliers})"
            )
        if channels % groups:
            raise ValueError(f"channels ({channels}) must be divisible by groups ({groups}) for GroupNorm")
        if attention and (channels * multipliers[-1]) % heads:
            raise ValueError(
                f"heads ({heads}) must divide the lowest resolution's width "
                f"({channels} * {multipliers[-1]} = {channels * multipliers[-1]})"
            )
        self.features = shape
        self.context_features = int(context)
        self.step_input = bool(step_input)

        embedding = 4 * channels
        self.time_inputs = _TimeInputs(time_embedding, step_input)
        time_size = time_embedding or 1
        self.time_mlp = nn.Sequential(nn.Linear(time_size, embedding), nn.SiLU(), nn.Linear(embedding, embedding))
        self.step_mlp = (
            nn.Sequential(nn.Linear(time_size, embedding), nn.SiLU(), nn.Linear(embedding, embedding))
            if step_input
            else None
        )
        self.context_projection = nn.Linear(context, embedding) if context else None

        def block(in_channels: int, out_channels: int) -> _ResidualConvBlock:
            return _ResidualConvBlock(in_channels, out_channels, embedding, groups, dropout)

        self.input = nn.Conv2d(shape[0], channels, 3, padding=1)
        skip_widths = [channels]
        width = channels
        down: list[nn.Module] = []
        for level, multiplier in enumerate(multipliers):
            for _ in range(blocks):
                down.append(block(width, channels * multiplier))
                width = channels * multiplier
                skip_widths.append(width)
            if level < len(multipliers) - 1:
                down.append(_Downsample(width))
                skip_widths.append(width)
        self.down = nn.ModuleList(down)
        self.middle = nn.ModuleList([block(width, width), block(width, width)])
        self.attention = _SelfAttention(width, heads, groups) if attention else None
        up: list[nn.Module] = []
        for level in reversed(range(len(multipliers))):
            for _ in range(blocks + 1):
                up.append(block(width + skip_widths.pop(), channels * multipliers[level]))
                width = channels * multipliers[level]
            if level > 0:
                up.append(_Upsample(width))
        self.up = nn.ModuleList(up)
        self.output = nn.Sequential(nn.GroupNorm(groups, width), nn.SiLU(), nn.Conv2d(width, shape[0], 3, padding=1))

    def embedding(self, x: Tensor, t: Tensor, context: Tensor | None, step: Tensor | float | None) -> Tensor:
        """The conditioning vector ``e`` (batch, 4 * channels) of the module docstring (before the SiLU)."""
        times = self.time_inputs.forward(x, t, step)  # checks t's shape and step's use
        e = self.time_mlp(times[0])
        if self.step_mlp is not None:
            e = e + self.step_mlp(times[1])
        context = network_context(context, self.context_features, x)
        if context is not None:
            e = e + self.context_projection(context)
        return e

    def forward(
        self, x: Tensor, t: Tensor, context: Tensor | None = None, step: Tensor | float | None = None
    ) -> Tensor:
        x = check_batched("x", x, self.features, dtype=model_dtype(self))
        e = F.silu(self.embedding(x, t, context, step))
        h = self.input(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, e) if isinstance(layer, _ResidualConvBlock) else layer(h)
            skips.append(h)
        h = self.middle[0](h, e)
        if self.attention is not None:
            h = self.attention(h)
        h = self.middle[1](h, e)
        for layer in self.up:  # blocks read the skip connections in reverse order; upsamplings do not
            h = layer(torch.cat([h, skips.pop()], dim=1), e) if isinstance(layer, _ResidualConvBlock) else layer(h)
        return self.output(h)


__all__ = ["UNetVelocity"]
