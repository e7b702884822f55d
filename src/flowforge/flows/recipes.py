"""Ready-made flows built only from transforms and distributions.

Every recipe shares one signature, ``Recipe(features, context=0, transforms=..., hidden=...)``,
is a :class:`~flowforge.flows.Flow`, and keeps the arguments that rebuild it in ``config``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from flowforge.distributions import DiagNormal, StandardNormal
from flowforge.flows.base import Flow
from flowforge.transforms import AdditiveCoupling, AffineCoupling, Compose, Permutation, Transform


def _check_recipe_args(name: str, features: int, context: int, transforms: int, hidden: Sequence[int]) -> None:
    if isinstance(features, bool) or not isinstance(features, int) or features < 2:
        raise ValueError(
            f"{name} needs features >= 2 (a coupling splits the features into two non-empty parts), got {features!r}"
        )
    if context < 0:
        raise ValueError(f"context must be >= 0, got {context}")
    if transforms < 1:
        raise ValueError(f"transforms must be >= 1, got {transforms}")
    if any(h < 1 for h in hidden):
        raise ValueError(f"hidden widths must be positive, got {tuple(hidden)}")


def _coupling_stack(features: int, transforms: int, seed: int, make_layer: Any) -> list[Transform]:
    """Couplings with alternating parity masks; above two features, a fixed random permutation
    after every pair of couplings, so that every feature comes to condition every other."""
    layers: list[Transform] = []
    for i in range(transforms):
        layers.append(make_layer(torch.arange(features) % 2 == i % 2))
        if features > 2 and i % 2 == 1 and i < transforms - 1:
            layers.append(Permutation.random(features, seed=seed + i))
    return layers


class RealNVP(Flow):
    """RealNVP (Dinh et al. 2016): affine couplings with soft-clamped log-scales over N(0, I).

    Arguments:
        features: data dimension (at least 2).
        context: size of the context vector (0 for an unconditional flow).
        transforms: number of coupling layers.
        hidden: hidden widths of every conditioner MLP.
        scale_bound: soft clamp on each layer's log-scale.
        activation: activation constructor of the conditioners.
        seed: seeds the fixed permutations (features > 2) so a config rebuilds the same flow.

    >>> import torch
    >>> flow = RealNVP(2, transforms=4)
    >>> flow.log_prob(torch.randn(8, 2)).shape
    torch.Size([8])
    """

    def __init__(
        self,
        features: int,
        context: int = 0,
        transforms: int = 8,
        hidden: Sequence[int] = (64, 64),
        *,
        scale_bound: float = 3.0,
        activation: type[nn.Module] = nn.ReLU,
        seed: int = 0,
    ) -> None:
        _check_recipe_args("RealNVP", features, context, transforms, hidden)
        layers = _coupling_stack(
            features,
            transforms,
            seed,
            lambda mask: AffineCoupling(mask, context, hidden, activation, scale_bound),
        )
        super().__init__(StandardNormal(features), Compose(layers))
        self.config = {
            "features": features,
            "context": context,
            "transforms": transforms,
            "hidden": list(hidden),
            "scale_bound": scale_bound,
            "seed": seed,
        }


class NICE(Flow):
    """NICE (Dinh et al. 2014): additive (volume-preserving) couplings.

    Additive couplings cannot change volume, so the base is a learnable diagonal Gaussian:
    the paper's final diagonal scaling layer, folded into the base.
    Arguments as :class:`RealNVP` (without ``scale_bound``).

    >>> import torch
    >>> NICE(3, context=2, transforms=4).sample(6, torch.zeros(2, 2)).shape
    torch.Size([6, 2, 3])
    """

    def __init__(
        self,
        features: int,
        context: int = 0,
        transforms: int = 8,
        hidden: Sequence[int] = (64, 64),
        *,
        activation: type[nn.Module] = nn.ReLU,
        seed: int = 0,
    ) -> None:
        _check_recipe_args("NICE", features, context, transforms, hidden)
        layers = _coupling_stack(
            features,
            transforms,
            seed,
            lambda mask: AdditiveCoupling(mask, context, hidden, activation),
        )
        super().__init__(DiagNormal(features), Compose(layers))
        self.config = {
            "features": features,
            "context": context,
            "transforms": transforms,
            "hidden": list(hidden),
            "seed": seed,
        }
