r"""Training-time distributions for flow matching (time 0 = noise, 1 = data).

Where the loss spends its samples matters: the regression is hardest at intermediate and noisy
times, and several successful models reweight towards them.

* :class:`UniformTime`: :math:`t \sim U(0, 1)` (rectified flow, CFM).
* :class:`LogitNormalTime`: :math:`t = \operatorname{sigmoid}(m + s\,\varepsilon)` (Esser et al.
  2024, SD3), favouring the middle of the path.
* :class:`ShiftedBetaTime`: pi0's choice (Black et al. 2024): :math:`t = s\,(1 - u)` with
  :math:`u \sim \mathrm{Beta}(1.5, 1)` and :math:`s = 0.999`, which favours noisy times (small
  :math:`t`) and never reaches the data end exactly.

Each sampler is called as ``sampler(n, device=None, dtype=None, generator=None) -> (n,)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowforge.registry import constructor_repr, register
from flowforge.validation import check_real


class TimeSampler:
    """Base class of the training-time distributions."""

    def __call__(
        self,
        n: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return constructor_repr(self)


@register("uniform", "time")
class UniformTime(TimeSampler):
    """:math:`t \\sim U(0, 1)`.

    >>> UniformTime()(4).shape
    torch.Size([4])
    """

    def __call__(self, n, device=None, dtype=None, generator=None) -> Tensor:
        return torch.rand(n, generator=generator, dtype=dtype).to(device)


@register("logit-normal", "time")
class LogitNormalTime(TimeSampler):
    r""":math:`t = \operatorname{sigmoid}(\text{mean} + \text{std}\cdot\varepsilon)`,
    :math:`\varepsilon \sim \mathcal N(0, 1)`."""

    def __init__(self, mean: float = 0.0, std: float = 1.0) -> None:
        self.mean = check_real("mean", mean)
        self.std = check_real("std", std, positive=True)

    def __call__(self, n, device=None, dtype=None, generator=None) -> Tensor:
        return torch.sigmoid(self.mean + self.std * torch.randn(n, generator=generator, dtype=dtype)).to(device)


@register("shifted-beta", "time")
class ShiftedBetaTime(TimeSampler):
    r"""pi0's time distribution: :math:`t = s\,(1 - u)`, :math:`u \sim \mathrm{Beta}(a, b)`.

    With the defaults :math:`a = 1.5, b = 1` the density of :math:`t` is proportional to
    :math:`(1 - t/s)^{1/2}` on :math:`[0, s]`: highest at the noise end, zero at :math:`t = s`.

    >>> t = ShiftedBetaTime()(10_000, generator=torch.Generator().manual_seed(0))
    >>> bool(t.max() <= 0.999), bool((t < 0.5).float().mean() > 0.6)
    (True, True)
    """

    def __init__(self, alpha: float = 1.5, beta: float = 1.0, scale: float = 0.999) -> None:
        self.alpha = check_real("alpha", alpha, positive=True)
        self.beta = check_real("beta", beta, positive=True)
        self.scale = check_real("scale", scale, positive=True)
        if self.scale > 1:
            raise ValueError(f"scale must be a finite number in (0, 1], got {scale!r}")

    def __call__(self, n, device=None, dtype=None, generator=None) -> Tensor:
        # Beta(a, b) as X / (X + Y) with Gamma draws, so that a torch.Generator can seed it.
        gamma_a = torch._standard_gamma(torch.full((n,), self.alpha, dtype=torch.float64), generator=generator)
        gamma_b = torch._standard_gamma(torch.full((n,), self.beta, dtype=torch.float64), generator=generator)
        u = gamma_a / (gamma_a + gamma_b)
        return (self.scale * (1 - u)).to(device=device, dtype=dtype or torch.get_default_dtype())


__all__ = ["LogitNormalTime", "ShiftedBetaTime", "TimeSampler", "UniformTime"]
