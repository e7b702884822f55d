r"""Base distributions for flows.

Each is an ``nn.Module`` (so learnable parameters train with the flow and buffers follow
``.to(device, dtype)``) with

* ``event_shape``: the shape of one draw,
* ``log_prob(x) -> (batch,)`` for ``x`` of shape ``(batch, *event_shape)``,
* ``rsample(n) -> (n, *event_shape)`` (reparametrised where the math allows) and
  ``sample(n)`` (the same without gradients).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from numbers import Integral

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowforge.config import MAX_SEED
from flowforge.validation import check_batched, check_bool, check_count, check_real, check_sample_count, is_count

_LOG_2PI = math.log(2 * math.pi)


def _event_shape(shape: int | Sequence[int]) -> torch.Size:
    dims = (shape,) if isinstance(shape, Integral) else tuple(shape) if isinstance(shape, Sequence) else ()
    if not dims or not all(is_count(s) for s in dims):
        raise ValueError(f"event shape must be a positive int or a tuple of positive ints, got {shape!r}")
    return torch.Size(int(s) for s in dims)


class BaseDistribution(nn.Module, ABC):
    """The interface a flow needs from its base distribution."""

    event_shape: torch.Size

    @abstractmethod
    def log_prob(self, x: Tensor) -> Tensor:
        """Log-density of ``x`` of shape (batch, *event_shape); returns shape (batch,)."""

    @abstractmethod
    def rsample(self, n: int) -> Tensor:
        """Draw ``n`` samples of shape (n, *event_shape), differentiable where possible."""

    def sample(self, n: int) -> Tensor:
        """Draw ``n`` samples without building a graph."""
        with torch.no_grad():
            return self.rsample(n)

    def check(self, x: Tensor) -> Tensor:
        """Raise a ValueError unless ``x`` has shape (batch, *event_shape)."""
        return check_batched("x", x, self.event_shape)


class StandardNormal(BaseDistribution):
    r""":math:`\mathcal N(0, I)` over ``shape``.

    >>> import torch
    >>> StandardNormal(2).log_prob(torch.zeros(1, 2))
    tensor([-1.8379])
    """

    def __init__(self, shape: int | Sequence[int]) -> None:
        super().__init__()
        self.event_shape = _event_shape(shape)
        self.register_buffer("_device_dtype", torch.zeros(()), persistent=False)

    def log_prob(self, x: Tensor) -> Tensor:
        self.check(x)
        return -0.5 * (x.flatten(1).square().sum(1) + self.event_shape.numel() * _LOG_2PI)

    def rsample(self, n: int) -> Tensor:
        n = check_sample_count(n)
        ref = self._device_dtype
        return torch.randn((n, *self.event_shape), device=ref.device, dtype=ref.dtype)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.event_shape)}"


class DiagNormal(BaseDistribution):
    r"""Gaussian with a learnable mean and diagonal scale, :math:`\mathcal N(\mu, \mathrm{diag}(\sigma^2))`.

    Starts at :math:`\mathcal N(0, I)`; :math:`\sigma = e^{\log\sigma}` keeps it positive.
    """

    def __init__(self, shape: int | Sequence[int], learnable: bool = True) -> None:
        super().__init__()
        self.event_shape = _event_shape(shape)
        loc, log_scale = torch.zeros(self.event_shape), torch.zeros(self.event_shape)
        if check_bool("learnable", learnable):
            self.loc, self.log_scale = nn.Parameter(loc), nn.Parameter(log_scale)
        else:
            self.register_buffer("loc", loc)
            self.register_buffer("log_scale", log_scale)

    def log_prob(self, x: Tensor) -> Tensor:
        self.check(x)
        standard = (x - self.loc) * torch.exp(-self.log_scale)
        log_norm = self.log_scale.sum() + 0.5 * self.event_shape.numel() * _LOG_2PI
        return -0.5 * standard.flatten(1).square().sum(1) - log_norm

    def rsample(self, n: int) -> Tensor:
        n = check_sample_count(n)
        eps = torch.randn((n, *self.event_shape), device=self.loc.device, dtype=self.loc.dtype)
        return self.loc + torch.exp(self.log_scale) * eps

    def extra_repr(self) -> str:
        return f"shape={tuple(self.event_shape)}"


class GaussianMixture(BaseDistribution):
    r"""Mixture of ``components`` diagonal Gaussians over ``features``, all learnable.

    .. math:: p(x) = \sum_k \pi_k\, \mathcal N(x;\ \mu_k, \mathrm{diag}(\sigma_k^2)),
              \quad \pi = \mathrm{softmax}(\ell).

    ``rsample`` picks a component (a discrete, non-differentiable choice) and reparametrises
    the Gaussian draw, so gradients reach the means and scales but not the weights.

    >>> import torch
    >>> gmm = GaussianMixture(2, components=3, seed=0)
    >>> gmm.rsample(5).shape
    torch.Size([5, 2])
    """

    def __init__(self, features: int, components: int = 8, spread: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        self.event_shape = _event_shape(features)
        if len(self.event_shape) != 1:
            raise ValueError(f"GaussianMixture is defined over vectors: features must be an int, got {features!r}")
        features = self.event_shape[0]
        components = check_count("components", components)
        spread = check_real("spread", spread, positive=True)
        generator = torch.Generator().manual_seed(check_count("seed", seed, low=0, high=MAX_SEED))
        loc = spread * torch.randn(components, features, generator=generator)
        if not bool(torch.isfinite(loc.square().sum(-1)).all()):  # log_prob squares the distances
            raise ValueError(f"spread = {spread!r}: the means' squared norms overflow {loc.dtype}; give a smaller one")
        self.logits = nn.Parameter(torch.zeros(components))
        self.loc = nn.Parameter(loc)
        self.log_scale = nn.Parameter(torch.zeros(components, features))

    def log_prob(self, x: Tensor) -> Tensor:
        self.check(x)
        standard = (x.unsqueeze(1) - self.loc) * torch.exp(-self.log_scale)  # (batch, K, D)
        component = -0.5 * standard.square().sum(2) - self.log_scale.sum(1) - 0.5 * x.shape[1] * _LOG_2PI
        return torch.logsumexp(F.log_softmax(self.logits, 0) + component, dim=1)

    def rsample(self, n: int) -> Tensor:
        n = check_sample_count(n)
        which = torch.multinomial(F.softmax(self.logits.detach(), 0), n, replacement=True)
        eps = torch.randn(n, self.event_shape[0], device=self.loc.device, dtype=self.loc.dtype)
        return self.loc[which] + torch.exp(self.log_scale[which]) * eps

    def extra_repr(self) -> str:
        return f"features={self.event_shape[0]}, components={self.logits.numel()}"


class BoxUniform(BaseDistribution):
    r"""Uniform over the box :math:`\prod_i [\mathrm{low}_i, \mathrm{high}_i)`.

    ``log_prob`` is :math:`-\sum_i \log(\mathrm{high}_i - \mathrm{low}_i)` inside and
    :math:`-\infty` outside.

    >>> import torch
    >>> BoxUniform(torch.zeros(2), 2 * torch.ones(2)).log_prob(torch.tensor([[1.0, 1.0], [3.0, 1.0]]))
    tensor([-1.3863,    -inf])
    """

    def __init__(self, low: Tensor | Sequence[float], high: Tensor | Sequence[float]) -> None:
        super().__init__()
        low_t = torch.as_tensor(low, dtype=torch.get_default_dtype())
        high_t = torch.as_tensor(high, dtype=torch.get_default_dtype())
        if low_t.shape != high_t.shape or low_t.dim() == 0:
            raise ValueError(
                f"low and high must be tensors of one shape, got {tuple(low_t.shape)} and {tuple(high_t.shape)}"
            )
        for name, bound in (("low", low_t), ("high", high_t)):
            if not bool(torch.isfinite(bound).all()):
                raise ValueError(f"{name} must be finite in every dimension, got {bound.tolist()}")
        if not bool(torch.isfinite(high_t - low_t).all()):
            raise ValueError(f"high - low must be finite in {low_t.dtype}, got {low_t.tolist()} to {high_t.tolist()}")
        if not bool((high_t > low_t).all()):
            raise ValueError(
                f"high must exceed low in every dimension, got low {low_t.tolist()}, high {high_t.tolist()}"
            )
        self.event_shape = low_t.shape
        self.register_buffer("low", low_t)
        self.register_buffer("high", high_t)

    def log_prob(self, x: Tensor) -> Tensor:
        self.check(x)
        inside = ((x >= self.low) & (x < self.high)).flatten(1).all(1)
        log_volume = torch.log(self.high - self.low).sum()
        return torch.where(inside, -log_volume, torch.full_like(log_volume, -math.inf))

    def rsample(self, n: int) -> Tensor:
        n = check_sample_count(n)
        u = torch.rand((n, *self.event_shape), device=self.low.device, dtype=self.low.dtype)
        # low + (high - low) u can round up to high, outside [low, high): keep it below.
        return torch.minimum(self.low + (self.high - self.low) * u, torch.nextafter(self.high, self.low))

    def extra_repr(self) -> str:
        return f"shape={tuple(self.event_shape)}"
