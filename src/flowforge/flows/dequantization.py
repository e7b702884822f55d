r"""Flows over discrete data (pixel counts) through dequantization.

Integer data :math:`k \in \{0, \dots, L-1\}^D` have no density. With continuous noise
:math:`u \in [0, 1)^D` and :math:`y = (k + u)/L`, any density :math:`p` on :math:`[0, 1)^D` gives
a lower bound on the discrete log-likelihood (Theis et al. 2016; Ho et al. 2019):

.. math::
    \log P(k) \;\ge\; \mathbb E_{u \sim q(u \mid k)}
    \big[\log p\big((k + u)/L\big) - \log q(u \mid k)\big] - D \log L.

* **Uniform** dequantization: :math:`q = U(0, 1)^D`, :math:`\log q = 0`.
* **Variational** dequantization (Flow++): :math:`q(u \mid k)` is learned with the flow, which
  tightens the bound. Here :math:`q` is a conditional logistic-normal,
  :math:`u = \mathrm{sigmoid}(\mu(k) + \sigma(k)\,\varepsilon)`, :math:`\varepsilon \sim \mathcal N(0, I)`,
  with :math:`\mu, \log\sigma` from a small network of :math:`k` (conv net for images, MLP for
  vectors), factorized over dimensions given :math:`k`.

Bits per dimension: :math:`-\log_2 P(k) / D`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowforge.flows.base import Flow
from flowforge.nn import MLP
from flowforge.nn.conv import ConvConditioner
from flowforge.registry import Rebuildable, refuse_unread, register
from flowforge.transforms.elementwise import soft_clamp
from flowforge.validation import check_bool, check_count, model_dtype


@register("dequantized")
class Dequantized(Rebuildable, nn.Module):
    r"""A :class:`~flowforge.flows.Flow` on :math:`[0, 1)^D` turned into a model of integer data.

    Arguments:
        flow: the density over dequantized data :math:`y = (k + u)/L`, any event shape.
        levels: the number of values :math:`L` of each entry (17 for the 8x8 digits).
        variational: learn :math:`q(u \mid k)` (True) or use uniform noise (False).
        hidden: hidden channels (images) or width (vectors) of the variational network.

    ``log_prob(k)`` returns one draw of the lower bound above, in nats, per row; it is what
    :class:`~flowforge.train.MaximumLikelihood` maximises. ``k`` may be an integer tensor of counts
    (int64, uint8, ...) or a floating-point one holding whole numbers; either is cast to the flow's
    dtype on entry (the input rule of :mod:`flowforge.validation`, with integers allowed because
    here they are the data). ``sample(n)`` returns integer-valued
    tensors :math:`\lfloor L y \rfloor`.

    >>> import torch
    >>> from flowforge.flows import Glow
    >>> model = Dequantized(Glow((1, 8, 8), levels=2, steps=1, hidden_channels=8), levels=17, variational=True)
    >>> pixels = torch.randint(0, 17, (4, 1, 8, 8)).float()
    >>> model.log_prob(pixels).shape, model.sample(2).shape
    (torch.Size([4]), torch.Size([2, 1, 8, 8]))
    """

    def __init__(self, flow: Flow, levels: int, variational: bool = False, hidden: int = 32) -> None:
        super().__init__()
        if not isinstance(flow, Flow):
            raise TypeError(f"flow must be a flowforge Flow, got {type(flow).__name__}")
        levels = check_count("levels", levels, low=2)
        self.flow = flow
        self.levels = levels
        self.variational = check_bool("variational", variational)
        hidden = check_count("hidden", hidden)
        if not self.variational:
            refuse_unread(
                Dequantized, {"hidden": hidden}, "uniform dequantization (variational = false) has no noise network"
            )
        self.event_shape = flow.event_shape
        self.dims = math.prod(self.event_shape)
        self.noise_net: nn.Module | None = None
        if self.variational:
            if len(self.event_shape) == 3:
                channels = self.event_shape[0]
                self.noise_net = ConvConditioner(channels, 2 * channels, hidden)
            else:
                self.noise_net = MLP(self.dims, 2 * self.dims, hidden=(hidden, hidden), zero_init_output=True)

    def _check(self, k: Tensor) -> Tensor:
        """``k`` checked (shape, whole numbers in range) and cast to the flow's dtype."""
        if not isinstance(k, Tensor):
            raise TypeError(f"k must be a torch.Tensor of counts, got {type(k).__name__}")
        if tuple(k.shape[1:]) != tuple(self.event_shape) or k.dim() < 2:
            raise ValueError(
                f"k must have shape (batch, {', '.join(map(str, self.event_shape))}), "
                f"got {tuple(getattr(k, 'shape', ()))}"
            )
        if k.dtype == torch.bool or k.dtype.is_complex:
            raise TypeError(f"k must hold counts as an integer or floating-point tensor, got dtype {k.dtype}")
        k = k.to(model_dtype(self.flow))
        bad = ~((k >= 0) & (k <= self.levels - 1) & (k == k.round()))  # NaN fails every comparison
        if bool(bad.any()):
            index = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"k must hold integers in 0..{self.levels - 1}: k[{', '.join(map(str, index))}] is {float(k[index])}"
            )
        return k

    def dequantize(self, k: Tensor) -> tuple[Tensor, Tensor]:
        """One draw :math:`u \\sim q(u \\mid k)`; returns :math:`y = (k + u)/L` and
        :math:`\\log q(u \\mid k)` of shape (batch,)."""
        if not k.is_floating_point():  # integer counts: computed in the flow's dtype
            k = k.to(model_dtype(self.flow))
        if self.noise_net is None:
            u = torch.rand_like(k)
            return (k + u) / self.levels, k.new_zeros(k.shape[0])
        centred = k / (self.levels - 1) - 0.5
        if len(self.event_shape) == 3:
            mean, raw = self.noise_net(centred).chunk(2, dim=1)
        else:
            mean, raw = self.noise_net(centred.flatten(1)).view(k.shape[0], 2, *self.event_shape).unbind(1)
        log_scale = soft_clamp(raw, 3.0)
        eps = torch.randn_like(k)
        h = mean + log_scale.exp() * eps
        u = torch.sigmoid(h)
        # log q(u) = log N(eps) - log sigma - log sigmoid'(h), with log sigmoid'(h) = -softplus(h) - softplus(-h).
        log_q = -0.5 * eps.square() - 0.5 * math.log(2 * math.pi) - log_scale + F.softplus(h) + F.softplus(-h)
        return (k + u) / self.levels, log_q.flatten(1).sum(1)

    def log_prob(self, k: Tensor, context: Tensor | None = None) -> Tensor:
        """One draw of the lower bound on :math:`\\log P(k \\mid c)` in nats, shape (batch,)."""
        k = self._check(k)
        y, log_q = self.dequantize(k)
        return self.flow.log_prob(y, context) - log_q - self.dims * math.log(self.levels)

    def forward(self, k: Tensor, context: Tensor | None = None) -> Tensor:
        return self.log_prob(k, context)

    @torch.no_grad()
    def bits_per_dim(self, k: Tensor, context: Tensor | None = None, draws: int = 1) -> float:
        """Mean of :math:`-\\log_2 P(k) / D` over the rows (at least one), the bound averaged over
        ``draws`` (>= 1) noise draws."""
        draws = check_count("draws", draws)
        if isinstance(k, Tensor) and k.dim() and k.shape[0] == 0:
            raise ValueError(
                f"k has 0 rows (shape {tuple(k.shape)}): bits per dimension is a mean over rows and needs one"
            )
        total = sum(float(self.log_prob(k, context).mean()) for _ in range(draws)) / draws
        return -total / (self.dims * math.log(2))

    @torch.no_grad()
    def sample(self, n: int, context: Tensor | None = None) -> Tensor:
        """Integer-valued samples ``floor(L y)`` in 0..L-1, shaped as :meth:`Flow.sample`."""
        y = self.flow.sample(n, context)
        return (y * self.levels).floor().clamp(0, self.levels - 1)
