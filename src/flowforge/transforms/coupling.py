r"""Coupling layers (NICE, Dinh et al. 2014; RealNVP, Dinh et al. 2016).

A binary ``mask`` splits the features into a part :math:`x_A` (``mask`` True) that passes
unchanged and conditions the map of the rest, :math:`x_B`:

.. math::
    z_A = x_A, \qquad z_B = \tau\big(x_B;\ \theta(x_A, c)\big),

where :math:`\theta` is the conditioner network (fed the context :math:`c` concatenated to
:math:`x_A`) and :math:`\tau` an elementwise transformer. The Jacobian is block triangular,
so :math:`\log|\det J| = \sum_{i \in B} \log|\partial\tau_i/\partial x_i|` and the inverse
costs one conditioner pass, like the forward.

References:
    Dinh, Krueger, Bengio. NICE: Non-linear Independent Components Estimation. 2014.
    Dinh, Sohl-Dickstein, Bengio. Density estimation using Real NVP. ICLR 2017.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from flowforge.nn import MLP
from flowforge.nn.conv import ConvConditioner
from flowforge.transforms.base import Transform
from flowforge.transforms.elementwise import (
    AdditiveElementwise,
    AffineElementwise,
    ElementwiseTransformer,
    soft_clamp,
)
from flowforge.validation import check_count, check_real


def _as_mask(mask: Sequence[bool] | Tensor) -> Tensor:
    m = torch.as_tensor(mask)
    if m.dim() != 1 or m.dtype != torch.bool:
        raise ValueError(f"mask must be a 1-D boolean tensor, got shape {tuple(m.shape)} and dtype {m.dtype}")
    kept = int(m.sum())
    if kept == 0 or kept == m.numel():
        raise ValueError(
            "mask must hold at least one True (features that pass unchanged) and one False "
            f"(features that are transformed), got {m.int().tolist()}; a coupling needs at least two features"
        )
    return m.clone()  # own copy: layers built from one mask must not share (or alias) storage


class Coupling(Transform):
    """A coupling layer with any binary mask and any elementwise transformer.

    Arguments:
        mask: boolean vector of length ``features``; True marks the features that pass
            unchanged and feed the conditioner, False those that are transformed.
        transformer: the elementwise map applied to the masked-out features.
        context: size of the context vector (0 for an unconditional layer).
        hidden: hidden widths of the conditioner MLP.
        activation: activation constructor of the conditioner MLP.

    The conditioner's last layer starts at zero, so a freshly built layer is the identity.
    """

    def __init__(
        self,
        mask: Sequence[bool] | Tensor,
        transformer: ElementwiseTransformer,
        context: int = 0,
        hidden: Sequence[int] = (64, 64),
        activation: Callable[[], nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        mask = _as_mask(mask)
        context = check_count("context", context, low=0)
        if not isinstance(transformer, ElementwiseTransformer):
            raise TypeError(
                "transformer must be an ElementwiseTransformer (e.g. AffineElementwise()), "
                f"got {type(transformer).__name__}"
            )
        self.features = mask.numel()
        self.context_features = context
        self.transformer = transformer
        kept = mask.nonzero().flatten()
        changed = (~mask).nonzero().flatten()
        self.register_buffer("mask", mask)
        self.register_buffer("kept_index", kept)
        self.register_buffer("changed_index", changed)
        # Output column j of cat([kept, changed]) holds feature order[j]; this undoes that order.
        self.register_buffer("merge_index", torch.argsort(torch.cat([kept, changed])))
        self.conditioner = MLP(
            kept.numel() + self.context_features,
            changed.numel() * transformer.params_per_feature,
            hidden=hidden,
            activation=activation,
            zero_init_output=True,
        )

    def _params(self, kept: Tensor, context: Tensor | None) -> Tensor:
        inputs = kept if self.context_features == 0 else torch.cat([kept, context], dim=1)
        return self.conditioner(inputs).unflatten(1, (self.changed_index.numel(), -1))

    def _couple(self, name: str, value: Tensor, context: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        self.check_input(name, value, context)
        kept = value.index_select(1, self.kept_index)
        changed = value.index_select(1, self.changed_index)
        params = self._params(kept, context)
        step = self.transformer.inverse if inverse else self.transformer.forward
        changed, log_derivative = step(changed, params)
        out = torch.cat([kept, changed], dim=1).index_select(1, self.merge_index)
        return out, log_derivative.sum(1)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._couple("x", x, context, inverse=False)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._couple("z", z, context, inverse=True)

    def extra_repr(self) -> str:
        return f"mask={self.mask.int().tolist()}, context={self.context_features}"


class AffineCoupling(Coupling):
    r"""RealNVP coupling: :math:`z_B = x_B \odot e^{s(x_A, c)} + t(x_A, c)`.

    The log-scale goes through a soft clamp :math:`b\tanh(\tilde s/b)` (``scale_bound``),
    so deep stacks cannot blow up; ``log|det J| = sum(s)``.

    >>> import torch
    >>> layer = AffineCoupling(torch.tensor([True, False, True]), context=2)
    >>> x, c = torch.randn(4, 3), torch.randn(4, 2)
    >>> z, ladj = layer(x, c)
    >>> torch.allclose(layer.inverse(z, c)[0], x), ladj.shape
    (True, torch.Size([4]))
    """

    def __init__(
        self,
        mask: Sequence[bool] | Tensor,
        context: int = 0,
        hidden: Sequence[int] = (64, 64),
        activation: Callable[[], nn.Module] = nn.ReLU,
        scale_bound: float = 3.0,
    ) -> None:
        super().__init__(mask, AffineElementwise(scale_bound), context, hidden, activation)


class AdditiveCoupling(Coupling):
    r"""NICE coupling: :math:`z_B = x_B + t(x_A, c)`; volume preserving, ``log|det J| = 0``."""

    def __init__(
        self,
        mask: Sequence[bool] | Tensor,
        context: int = 0,
        hidden: Sequence[int] = (64, 64),
        activation: Callable[[], nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__(mask, AdditiveElementwise(), context, hidden, activation)


def check_image(name: str, value: Tensor, channels: int) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` has shape (batch, channels, H, W)."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (batch, {channels}, H, W), got {type(value).__name__}")
    if value.dim() != 4 or value.shape[1] != channels:
        raise ValueError(f"{name} must have shape (batch, {channels}, H, W), got ({', '.join(map(str, value.shape))})")


class ImageAffineCoupling(Transform):
    r"""Affine coupling on images (RealNVP, Glow) with a convolutional conditioner.

    .. math:: z = m \odot x + (1 - m) \odot \big(x \odot e^{s(m \odot x, c)} + t(m \odot x, c)\big),
        \qquad \log|\det J| = \sum (1 - m) \odot s,

    with a binary mask :math:`m` that is either

    * ``"channel"``: one half of the channels passes (the first half for ``parity=0``, the
      second for ``parity=1``) and only it is fed to the conditioner; or
    * ``"checkerboard"``: the pixels with :math:`(i + j) \bmod 2 =` ``parity`` pass, in every
      channel; the conditioner sees the image with the other pixels zeroed.

    The log-scale is soft-clamped to :math:`(-b, b)` (``scale_bound``); the conditioner's last
    layer starts at zero, so a new layer is the identity. A context vector is broadcast over
    the image into the conditioner (:class:`flowforge.nn.ConvConditioner`).

    >>> import torch
    >>> layer = ImageAffineCoupling(4, mask="channel", context=2)
    >>> x, c = torch.randn(3, 4, 6, 6), torch.randn(3, 2)
    >>> z, ladj = layer(x, c)
    >>> torch.allclose(layer.inverse(z, c)[0], x), ladj.shape
    (True, torch.Size([3]))
    """

    def __init__(
        self,
        channels: int,
        mask: str = "channel",
        parity: int = 0,
        context: int = 0,
        hidden_channels: int = 64,
        scale_bound: float = 3.0,
    ) -> None:
        super().__init__()
        if mask not in ("channel", "checkerboard"):
            raise ValueError(f"mask must be 'channel' or 'checkerboard', got {mask!r}")
        parity = check_count("parity", parity, low=0, high=1)
        channels = check_count("channels", channels)
        if mask == "channel" and channels < 2:
            raise ValueError(f"a channel coupling needs at least 2 channels, got {channels}")
        self.channels, self.mask, self.parity = channels, mask, parity
        self.context_features = check_count("context", context, low=0)
        hidden_channels = check_count("hidden_channels", hidden_channels)
        self.scale_bound = check_real("scale_bound", scale_bound, positive=True)
        if mask == "channel":
            first = channels // 2
            self.kept = slice(0, first) if parity == 0 else slice(first, channels)
            self.changed = slice(first, channels) if parity == 0 else slice(0, first)
            kept_count = first if parity == 0 else channels - first
            self.conditioner = ConvConditioner(kept_count, 2 * (channels - kept_count), hidden_channels, context)
        else:
            self.conditioner = ConvConditioner(channels, 2 * channels, hidden_channels, context)

    def _checkerboard(self, like: Tensor) -> Tensor:
        rows = torch.arange(like.shape[2], device=like.device)[:, None]
        cols = torch.arange(like.shape[3], device=like.device)[None, :]
        return ((rows + cols) % 2 == self.parity).to(like.dtype)[None, None]

    def _couple(self, name: str, value: Tensor, context: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        check_image(name, value, self.channels)
        self.check_context(name, value, context)
        if self.mask == "channel":
            kept, changed = value[:, self.kept], value[:, self.changed]
            shift, raw = self.conditioner(kept, context).chunk(2, dim=1)
            log_scale = soft_clamp(raw, self.scale_bound)
            changed = (changed - shift) * torch.exp(-log_scale) if inverse else changed * torch.exp(log_scale) + shift
            parts = (kept, changed) if self.parity == 0 else (changed, kept)
            out = torch.cat(parts, dim=1)
        else:
            mask = self._checkerboard(value)
            shift, raw = self.conditioner(value * mask, context).chunk(2, dim=1)
            log_scale = soft_clamp(raw, self.scale_bound) * (1 - mask)
            shift = shift * (1 - mask)
            out = (value - shift) * torch.exp(-log_scale) if inverse else value * torch.exp(log_scale) + shift
        logdet = log_scale.flatten(1).sum(1)
        return out, -logdet if inverse else logdet

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._couple("x", x, context, inverse=False)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._couple("z", z, context, inverse=True)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, mask={self.mask!r}, parity={self.parity}, context={self.context_features}"
