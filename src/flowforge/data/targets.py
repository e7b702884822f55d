r"""Built-in unnormalized 2-D target densities for variational inference / reverse-KL training.

Each target is a callable ``log_density(x) -> (batch,)`` for ``x`` of shape (batch, 2), with a
known normaliser where one exists (``log_normalizer``; ``None`` when only a numerical one is
available), so that a trained sampler's KL divergence can be measured exactly:

.. math:: \mathrm{KL}(q \,\|\, p) = \mathbb E_{x \sim q}\big[\log q(x) - \log \tilde p(x)\big] + \log Z.

* ``banana``: a Gaussian bent by a shear, :math:`x_1 \sim \mathcal N(0, 2^2)`,
  :math:`x_2 \mid x_1 \sim \mathcal N(b (x_1^2 - 4), 1)` with :math:`b = 0.5`. The shear has unit
  Jacobian, so :math:`Z = 1` exactly.
* ``mixture``: four well-separated Gaussians (std 0.5) at :math:`(\pm 2, \pm 2)`, equal weights;
  normalised. Mode-seeking reverse KL tends to miss modes here.
* ``ring``: :math:`\tilde p(x) = \exp(-(\|x\| - 2)^2 / (2 \cdot 0.3^2))`, unnormalised
  (:math:`Z = 2\pi \int_0^\infty r\, e^{-(r-2)^2/0.18}\, dr`, evaluated numerically).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

_LOG_2PI = math.log(2 * math.pi)


class Target:
    """A named unnormalized log-density on R^2 with, when known, its log-normaliser."""

    def __init__(self, name: str, log_density: Callable[[Tensor], Tensor], log_normalizer: float | None) -> None:
        self.name, self._log_density, self.log_normalizer = name, log_density, log_normalizer
        self.features = 2

    def __call__(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != 2:
            raise ValueError(f"target {self.name!r} is 2-D: x must have shape (batch, 2), got {tuple(x.shape)}")
        return self._log_density(x)

    def __repr__(self) -> str:
        return f"Target({self.name!r})"


def _banana(x: Tensor) -> Tensor:
    x1, x2 = x[:, 0], x[:, 1]
    first = -0.5 * (x1 / 2) ** 2 - math.log(2) - 0.5 * _LOG_2PI
    second = -0.5 * (x2 - 0.5 * (x1.square() - 4)) ** 2 - 0.5 * _LOG_2PI
    return first + second


_MIXTURE_CENTRES = ((2.0, 2.0), (2.0, -2.0), (-2.0, 2.0), (-2.0, -2.0))


def _mixture(x: Tensor) -> Tensor:
    centres = torch.tensor(_MIXTURE_CENTRES, dtype=x.dtype, device=x.device)
    squared = (x[:, None, :] - centres).square().sum(-1) / (2 * 0.25)
    return torch.logsumexp(-squared, dim=1) - math.log(4) - _LOG_2PI - 2 * math.log(0.5)


def _ring(x: Tensor) -> Tensor:
    return -((x.norm(dim=1) - 2.0) ** 2) / (2 * 0.3**2)


def _ring_log_normalizer() -> float:
    r = torch.linspace(0.0, 6.0, 200_001, dtype=torch.float64)
    integrand = r * torch.exp(-((r - 2.0) ** 2) / (2 * 0.3**2))
    return math.log(2 * math.pi * float(torch.trapezoid(integrand, r)))


TARGETS: dict[str, Target] = {
    "banana": Target("banana", _banana, 0.0),
    "mixture": Target("mixture", _mixture, 0.0),
    "ring": Target("ring", _ring, _ring_log_normalizer()),
}


def target(name: str) -> Target:
    """A built-in target by name (``banana``, ``mixture``, ``ring``).

    >>> import torch
    >>> float(target("banana")(torch.zeros(1, 2)).exp()) > 0
    True
    """
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}")
    return TARGETS[name]


__all__ = ["TARGETS", "Target", "target"]
