"""Built-in 2-D data sets, generated on the fly (nothing is downloaded).

Each generator takes ``n`` and a ``seed`` and returns a tensor of shape ``(n, 2)`` in PyTorch's
default dtype (float32 unless changed), scaled to lie roughly within ``[-4, 4]^2``.

>>> two_moons(5, seed=0).shape
torch.Size([5, 2])
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from flowforge.config import MAX_SEED
from flowforge.validation import check_count, check_real


def _rng(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(check_count("seed", seed, low=0, high=MAX_SEED))


def _spread(name: str, value: float) -> float:
    """A noise level or width: a finite number >= 0."""
    return check_real(name, value, non_negative=True)


def _check_n(n: int) -> None:
    check_count("n", n)


def two_moons(n: int, seed: int = 0, noise: float = 0.1) -> Tensor:
    """Two interleaved half circles with Gaussian noise."""
    _check_n(n)
    g = _rng(seed)
    angle = math.pi * torch.rand(n, generator=g)
    upper = torch.rand(n, generator=g) < 0.5
    x = torch.where(upper, torch.cos(angle), 1.0 - torch.cos(angle))
    y = torch.where(upper, torch.sin(angle), 0.5 - torch.sin(angle))
    points = 1.5 * (torch.stack([x, y], 1) - torch.tensor([0.5, 0.25]))
    return points + _spread("noise", noise) * torch.randn(n, 2, generator=g)


def eight_gaussians(n: int, seed: int = 0, radius: float = 2.5, std: float = 0.25) -> Tensor:
    """Eight Gaussian blobs evenly spaced on a circle."""
    _check_n(n)
    g = _rng(seed)
    angle = (math.pi / 4) * torch.randint(0, 8, (n,), generator=g)
    centers = _spread("radius", radius) * torch.stack([torch.cos(angle), torch.sin(angle)], 1)
    return centers + _spread("std", std) * torch.randn(n, 2, generator=g)


def checkerboard(n: int, seed: int = 0) -> Tensor:
    """Uniform density on the dark squares of a 4x4 board over ``[-3, 3]^2`` (sharp edges)."""
    _check_n(n)
    g = _rng(seed)
    column = torch.randint(0, 4, (n,), generator=g)
    row = 2 * torch.randint(0, 2, (n,), generator=g) + (column % 2)
    cell = torch.stack([column, row], 1).float() + torch.rand(n, 2, generator=g)
    return 1.5 * (cell - 2.0)


def pinwheel(n: int, seed: int = 0, arms: int = 5) -> Tensor:
    """Gaussian blobs stretched radially and sheared into curved arms."""
    _check_n(n)
    arms = check_count("arms", arms)
    g = _rng(seed)
    arm = torch.randint(0, arms, (n,), generator=g)
    radial = 1.0 + 0.3 * torch.randn(n, generator=g)
    tangential = 0.08 * torch.randn(n, generator=g)
    angle = 2 * math.pi * arm / arms + 0.8 * radial
    rotated = torch.stack(
        [
            radial * torch.cos(angle) - tangential * torch.sin(angle),
            radial * torch.sin(angle) + tangential * torch.cos(angle),
        ],
        1,
    )
    return 2.0 * rotated


def two_spirals(n: int, seed: int = 0, noise: float = 0.1) -> Tensor:
    """Two interleaved Archimedean spirals."""
    _check_n(n)
    g = _rng(seed)
    turn = 3 * math.pi * torch.sqrt(torch.rand(n, generator=g))
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    points = sign[:, None] * torch.stack([-turn * torch.cos(turn), turn * torch.sin(turn)], 1) / 3.0
    return points + _spread("noise", noise) * torch.randn(n, 2, generator=g)


def rings(n: int, seed: int = 0, noise: float = 0.08) -> Tensor:
    """Four concentric circles, points spread in proportion to circumference."""
    _check_n(n)
    g = _rng(seed)
    radii = torch.tensor([0.75, 1.5, 2.25, 3.0])
    ring = torch.multinomial(radii / radii.sum(), n, replacement=True, generator=g)
    angle = 2 * math.pi * torch.rand(n, generator=g)
    points = radii[ring, None] * torch.stack([torch.cos(angle), torch.sin(angle)], 1)
    return points + _spread("noise", noise) * torch.randn(n, 2, generator=g)


def swiss_roll(n: int, seed: int = 0, noise: float = 0.1) -> Tensor:
    """The swiss roll seen from its axis: a 2-D spiral band."""
    _check_n(n)
    g = _rng(seed)
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g))
    points = torch.stack([t * torch.cos(t), t * torch.sin(t)], 1) / 4.5
    return points + _spread("noise", noise) * torch.randn(n, 2, generator=g)


TOY_DATASETS: dict[str, Callable[..., Tensor]] = {
    "moons": two_moons,
    "8gaussians": eight_gaussians,
    "checkerboard": checkerboard,
    "pinwheel": pinwheel,
    "spirals": two_spirals,
    "rings": rings,
    "swissroll": swiss_roll,
}


def toy_dataset(name: str, n: int, seed: int = 0) -> Tensor:
    """Draw ``n`` points of the built-in 2-D set ``name`` (one of :data:`TOY_DATASETS`).

    >>> toy_dataset("rings", 4, seed=1).shape
    torch.Size([4, 2])
    """
    if name not in TOY_DATASETS:
        raise ValueError(f"unknown 2-D data set {name!r}; choose one of {', '.join(TOY_DATASETS)}")
    return TOY_DATASETS[name](n, seed=seed)
