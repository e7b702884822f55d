r"""Multi-scale architecture for image flows (RealNVP, Glow): squeeze and split.

* :class:`Squeeze` trades resolution for channels: every 2x2 block of pixels becomes 4 channels,
  :math:`(C, H, W) \to (4C, H/2, W/2)`. A permutation of the entries: log-det 0.
* :class:`Split` factors out half of the channels at each scale. They are normalized by a
  Gaussian whose mean and log-scale a small conv net predicts from the kept channels (and the
  context), :math:`z_2 = (x_2 - \mu(x_1, c))\, e^{-\log\sigma(x_1, c)}`, so that a standard normal
  on :math:`z_2` is the learned conditional prior :math:`\mathcal N(x_2; \mu, \sigma^2)`:

  .. math:: \log \mathcal N(x_2; \mu, \sigma^2) = \log \mathcal N(z_2; 0, I) - \textstyle\sum \log\sigma.

  The kept channels go on through the ``inner`` transform (the coarser scales); the output has
  the input's shape, so a whole multi-scale flow maps :math:`(C, H, W)` to :math:`(C, H, W)` and
  sits over a standard normal base of that shape.

References:
    Dinh, Sohl-Dickstein, Bengio. Density estimation using Real NVP. ICLR 2017.
    Kingma, Dhariwal. Glow: Generative Flow with Invertible 1x1 Convolutions. NeurIPS 2018.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowforge.nn.conv import ConvConditioner
from flowforge.transforms.base import Transform
from flowforge.transforms.coupling import check_image
from flowforge.transforms.elementwise import soft_clamp
from flowforge.validation import check_count, check_real


def _check_squeezable(name: str, value: Tensor) -> None:
    if not isinstance(value, Tensor) or value.dim() != 4:
        raise ValueError(f"{name} must have shape (batch, C, H, W), got {tuple(getattr(value, 'shape', ()))}")
    if value.shape[2] % 2 or value.shape[3] % 2:
        raise ValueError(f"{name} needs an even height and width to squeeze, got {tuple(value.shape[2:])}")


class Squeeze(Transform):
    """Space-to-channel reshaping, :math:`(B, C, H, W) \\to (B, 4C, H/2, W/2)`; log-det 0.

    Channel ``4c + 2i + j`` of the output holds pixel ``(2h + i, 2w + j)`` of input channel ``c``.

    >>> import torch
    >>> x = torch.arange(16.0).reshape(1, 1, 4, 4)
    >>> z, _ = Squeeze()(x)
    >>> z.shape, z[0, :, 0, 0].tolist()
    (torch.Size([1, 4, 2, 2]), [0.0, 1.0, 4.0, 5.0])
    """

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        _check_squeezable("x", x)
        b, c, h, w = x.shape
        z = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)
        return z, x.new_zeros(b)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if not isinstance(z, Tensor) or z.dim() != 4 or z.shape[1] % 4:
            raise ValueError(f"z must have shape (batch, 4C, H, W), got {tuple(getattr(z, 'shape', ()))}")
        b, c4, h, w = z.shape
        c = c4 // 4
        x = z.reshape(b, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c, 2 * h, 2 * w)
        return x, z.new_zeros(b)


class Split(Transform):
    r"""Factor out the last ``channels // 2`` channels under a learned conditional Gaussian prior.

    Arguments:
        channels: channels of the input.
        inner: the transform applied to the kept channels (the coarser scales), or ``None``.
        context: size of the context vector the prior (and ``inner``) sees.
        hidden_channels: hidden channels of the prior's conv net.
        scale_bound: soft clamp on the prior's log-scale.

    The prior's net starts at zero (a standard normal prior).

    >>> import torch
    >>> split = Split(4)
    >>> x = torch.randn(2, 4, 3, 3)
    >>> z, ladj = split(x)
    >>> torch.allclose(split.inverse(z)[0], x), ladj.shape
    (True, torch.Size([2]))
    """

    def __init__(
        self,
        channels: int,
        inner: Transform | None = None,
        context: int = 0,
        hidden_channels: int = 64,
        scale_bound: float = 3.0,
    ) -> None:
        super().__init__()
        channels = check_count("channels", channels)
        if channels < 2:
            raise ValueError(f"Split needs at least 2 channels, got {channels}")
        context = check_count("context", context, low=0)
        hidden_channels = check_count("hidden_channels", hidden_channels)
        if inner is not None and not isinstance(inner, Transform):
            raise TypeError(f"inner must be a flowforge Transform or None, got {type(inner).__name__}")
        self.channels = channels
        self.kept_channels = channels - channels // 2
        inner_context = inner.context_features if inner is not None else 0
        if context and inner_context and inner_context != context:
            raise ValueError(
                f"inner takes a context of {inner_context} features but Split's context is {context}; "
                "one context feeds both"
            )
        self.inner = inner
        self.context_features = max(context, inner_context)
        self.scale_bound = check_real("scale_bound", scale_bound, positive=True)
        self.prior = ConvConditioner(self.kept_channels, 2 * (channels // 2), hidden_channels, context)
        self._prior_context = int(context)

    def _prior(self, kept: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        mean, raw = self.prior(kept, context if self._prior_context else None).chunk(2, dim=1)
        return mean, soft_clamp(raw, self.scale_bound)

    def _check(self, name: str, value: Tensor, context: Tensor | None) -> None:
        check_image(name, value, self.channels)
        self.check_context(name, value, context)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check("x", x, context)
        kept, factored = x[:, : self.kept_channels], x[:, self.kept_channels :]
        mean, log_scale = self._prior(kept, context)
        z_factored = (factored - mean) * torch.exp(-log_scale)
        logdet = -log_scale.flatten(1).sum(1)
        if self.inner is not None:
            kept, inner_logdet = self.inner(kept, context)
            logdet = logdet + inner_logdet
        return torch.cat([kept, z_factored], dim=1), logdet

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check("z", z, context)
        kept, z_factored = z[:, : self.kept_channels], z[:, self.kept_channels :]
        logdet = z.new_zeros(z.shape[0])
        if self.inner is not None:
            kept, logdet = self.inner.inverse(kept, context)
        mean, log_scale = self._prior(kept, context)
        factored = z_factored * torch.exp(log_scale) + mean
        return torch.cat([kept, factored], dim=1), logdet + log_scale.flatten(1).sum(1)

    def inverse_without_logdet(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        self._check("z", z, context)
        kept, z_factored = z[:, : self.kept_channels], z[:, self.kept_channels :]
        if self.inner is not None:  # the coarser scales sample without their log-dets too
            kept = self.inner.inverse_without_logdet(kept, context)
        mean, log_scale = self._prior(kept, context)
        return torch.cat([kept, z_factored * torch.exp(log_scale) + mean], dim=1)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kept={self.kept_channels}"
