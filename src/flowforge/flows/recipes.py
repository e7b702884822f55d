"""Ready-made flows built only from transforms and distributions.

Every recipe shares one signature, ``Recipe(features, context=0, transforms=..., hidden=...)``,
is a :class:`~flowforge.flows.Flow`, and is registered (:mod:`flowforge.registry`), so
``flow.to_config()`` holds every constructor argument that rebuilds it, activations included.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from flowforge.config import MAX_SEED
from flowforge.distributions import DiagNormal, StandardNormal
from flowforge.flows.base import Flow
from flowforge.registry import refuse_unread, register
from flowforge.transforms import (
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    AffineElementwise,
    BatchNorm,
    Compose,
    Coupling,
    ImageAffineCoupling,
    Invert,
    InvertibleConv1x1,
    LULinear,
    MaskedAutoregressive,
    Permutation,
    RationalQuadraticSpline,
    ResidualBlock,
    Split,
    Squeeze,
    Transform,
)
from flowforge.validation import (
    MAX_LAYERS,
    check_activation,
    check_bool,
    check_choice,
    check_count,
    check_real,
    is_count,
)


def _check_recipe_args(
    name: str, features: int, context: int, transforms: int, hidden: Sequence[int], coupling: bool = True
) -> None:
    if coupling and not is_count(features, 2):
        raise ValueError(
            f"{name} needs features >= 2 (a coupling splits the features into two non-empty parts), got {features!r}"
        )
    if not is_count(features):
        raise ValueError(f"{name} needs features >= 1, got {features!r}")
    check_count("context", context, low=0)
    check_count("transforms", transforms, high=MAX_LAYERS)
    if isinstance(hidden, str | bytes) or not isinstance(hidden, Sequence):
        raise ValueError(f"hidden must be a list of layer widths, e.g. [64, 64] ([] for linear), got {hidden!r}")
    if not all(is_count(width) for width in hidden):
        raise ValueError(f"hidden widths must be positive ints, got {list(hidden)!r}")


def _check_seed(seed: object) -> int:
    """The seed of a recipe's fixed permutations: an int in ``0..MAX_SEED`` (a float or None is
    refused); layer ``i`` draws its permutation from ``(seed + i) mod 2**32``."""
    return check_count("seed", seed, low=0, high=MAX_SEED)


def _coupling_stack(
    cls: type, features: int, transforms: int, seed: int, make_layer: Any, hidden: Sequence[int], activation: Any
) -> list[Transform]:
    """Couplings with alternating parity masks; above two features, a fixed random permutation
    after every pair of couplings, so that every feature comes to condition every other. A
    ``seed`` other than ``cls``'s default is refused where no permutation is drawn, and an
    ``activation`` where the conditioners have no hidden layer to apply it to."""
    if not hidden:
        given = {"activation": check_activation("activation", activation)}
        refuse_unread(cls, given, "hidden = [] makes each conditioner one linear map")
    if features <= 2 or transforms < 3:
        why = (
            f"no permutation is drawn ({features} features, {transforms} couplings; one follows every "
            "second coupling but the last, above two features)"
        )
        refuse_unread(cls, {"seed": seed}, why)
    layers: list[Transform] = []
    for i in range(transforms):
        layers.append(make_layer(torch.arange(features) % 2 == i % 2))
        if features > 2 and i % 2 == 1 and i < transforms - 1:
            layers.append(Permutation.random(features, seed=(seed + i) % (MAX_SEED + 1)))
    return layers


@register("realnvp")
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
        seed = _check_seed(seed)
        layers = _coupling_stack(
            RealNVP,
            features,
            transforms,
            seed,
            lambda mask: AffineCoupling(mask, context, hidden, activation, scale_bound),
            hidden,
            activation,
        )
        super().__init__(StandardNormal(features), Compose(layers))


@register("nice")
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
        seed = _check_seed(seed)
        layers = _coupling_stack(
            NICE,
            features,
            transforms,
            seed,
            lambda mask: AdditiveCoupling(mask, context, hidden, activation),
            hidden,
            activation,
        )
        super().__init__(DiagNormal(features), Compose(layers))


_MIXINGS = ("reverse", "lu")


def _autoregressive_stack(
    cls: type,
    features: int,
    transforms: int,
    make_layer: Any,
    mixing: str = "reverse",
    batch_norm: bool = False,
    invert: bool = False,
) -> list[Transform]:
    """Autoregressive layers with mixing between them.

    ``mixing="reverse"`` alternates the layers' orders between natural and reversed: the effect
    of a reverse permutation between layers, at no cost. ``mixing="lu"`` keeps the natural
    order and puts a learnable :class:`LULinear` between layers. ``batch_norm`` adds a
    :class:`BatchNorm` after every layer but the last (MAF paper). ``invert`` wraps each
    autoregressive layer in :class:`Invert` (IAF). With one layer there is nothing in between:
    ``mixing`` or ``batch_norm`` other than ``cls``'s defaults is refused.
    """
    check_choice("mixing", mixing, _MIXINGS)
    if transforms == 1:
        given = {"mixing": mixing} | ({"batch_norm": batch_norm} if batch_norm else {})
        refuse_unread(cls, given, "transforms = 1 leaves no gap between layers to fill")
    natural = torch.arange(features)
    layers: list[Transform] = []
    for i in range(transforms):
        order = natural.flip(0) if mixing == "reverse" and i % 2 == 1 else natural
        layer = make_layer(order)
        layers.append(Invert(layer) if invert else layer)
        if i < transforms - 1:
            if batch_norm:
                layers.append(BatchNorm(features))
            if mixing == "lu":
                layers.append(LULinear(features))
    return layers


@register("maf")
class MAF(Flow):
    """Masked autoregressive flow (Papamakarios et al. 2017): density in one pass per layer.

    Affine MADE layers with soft-clamped log-scales over N(0, I), mixed between layers by
    alternating the autoregressive order (or by learnable LU linear maps).

    Arguments:
        features: data dimension.
        context: size of the context vector (0 for an unconditional flow).
        transforms: number of autoregressive layers.
        hidden: hidden widths of every MADE.
        residual: masked residual blocks in the MADEs.
        mixing: ``"reverse"`` (alternate orders, free) or ``"lu"`` (LULinear between layers).
        batch_norm: a BatchNorm layer between autoregressive layers, as in the MAF paper (the
            flow then samples in eval mode only, see :class:`~flowforge.transforms.BatchNorm`).
        scale_bound: soft clamp on each layer's log-scale.
        activation: activation constructor.

    >>> import torch
    >>> flow = MAF(3, context=2, transforms=2, hidden=(16,))
    >>> flow.sample(4, torch.randn(5, 2)).shape
    torch.Size([4, 5, 3])
    """

    def __init__(
        self,
        features: int,
        context: int = 0,
        transforms: int = 5,
        hidden: Sequence[int] = (64, 64),
        *,
        residual: bool = False,
        mixing: str = "reverse",
        batch_norm: bool = False,
        scale_bound: float = 3.0,
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        name = type(self).__name__
        _check_recipe_args(name, features, context, transforms, hidden, coupling=False)
        check_bool("residual", residual)
        check_bool("batch_norm", batch_norm)
        if batch_norm and self._inverted:
            raise ValueError(
                f"{name} samples through the inverse of its layers, which BatchNorm allows in eval mode only"
            )
        layers = _autoregressive_stack(
            type(self),
            features,
            transforms,
            lambda order: MaskedAutoregressive(
                features, AffineElementwise(scale_bound), context, hidden, residual, activation, order
            ),
            mixing=mixing,
            batch_norm=batch_norm,
            invert=self._inverted,
        )
        super().__init__(StandardNormal(features), Compose(layers))

    _inverted = False

    def _check_sampling_mode(self) -> None:
        """Sampling inverts every layer; a BatchNorm layer has an inverse in eval mode only."""
        if self.training and any(isinstance(m, BatchNorm) for m in self.transform.modules()):
            raise ValueError(
                f"{type(self).__name__} with batch_norm=True samples in eval mode only: in training mode its "
                "BatchNorm layers normalise with the statistics of each batch, which cannot be inverted. "
                "Call .eval() before sampling (and .train() to resume training)"
            )

    def rsample(self, n: int, context: torch.Tensor | None = None) -> torch.Tensor:
        self._check_sampling_mode()
        return super().rsample(n, context)

    def sample_and_log_prob(self, n: int, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_sampling_mode()
        return super().sample_and_log_prob(n, context)


@register("iaf")
class IAF(MAF):
    """Inverse autoregressive flow (Kingma et al. 2016): MAF's layers inverted.

    Sampling costs one MADE pass per layer; density evaluation of arbitrary points is the
    sequential direction. Suited to variational inference and reverse-KL training, where
    samples and their densities come from :meth:`~flowforge.flows.Flow.sample_and_log_prob`.
    Arguments as :class:`MAF` (without ``batch_norm``).
    """

    _inverted = True


@register("nsf")
class NSF(Flow):
    """Neural spline flow (Durkan et al. 2019): rational-quadratic spline layers over N(0, I).

    Arguments:
        features: data dimension (at least 2 for coupling layers).
        context: size of the context vector (0 for an unconditional flow).
        transforms: number of spline layers.
        hidden: hidden widths of every conditioner.
        bins: spline bins per feature.
        bound: splines act on [-bound, bound], identity outside (linear tails).
        autoregressive: MADE conditioners (True) or coupling layers (False).
        residual: masked residual blocks in the MADEs (autoregressive only).
        mixing: between autoregressive layers, ``"reverse"`` (alternate orders) or ``"lu"``.
        activation: activation constructor.
        seed: seeds the coupling variant's permutations (features > 2).

    >>> import torch
    >>> NSF(2, transforms=2, hidden=(16,), autoregressive=False).log_prob(torch.randn(3, 2)).shape
    torch.Size([3])
    """

    def __init__(
        self,
        features: int,
        context: int = 0,
        transforms: int = 5,
        hidden: Sequence[int] = (64, 64),
        bins: int = 8,
        bound: float = 5.0,
        autoregressive: bool = True,
        *,
        residual: bool = False,
        mixing: str = "reverse",
        activation: type[nn.Module] = nn.ReLU,
        seed: int = 0,
    ) -> None:
        check_bool("autoregressive", autoregressive)
        check_bool("residual", residual)
        _check_recipe_args("NSF", features, context, transforms, hidden, coupling=not autoregressive)
        check_choice("mixing", mixing, _MIXINGS)
        seed = _check_seed(seed)
        if autoregressive:
            refuse_unread(NSF, {"seed": seed}, "autoregressive layers draw no permutation (they alternate orders)")
            layers = _autoregressive_stack(
                NSF,
                features,
                transforms,
                lambda order: MaskedAutoregressive(
                    features, RationalQuadraticSpline(bins, bound), context, hidden, residual, activation, order
                ),
                mixing=mixing,
            )
        else:
            why = "coupling layers (autoregressive = false) have no MADE and mix by permutations"
            refuse_unread(NSF, {"residual": residual, "mixing": mixing}, why)
            layers = _coupling_stack(
                NSF,
                features,
                transforms,
                seed,
                lambda mask: Coupling(mask, RationalQuadraticSpline(bins, bound), context, hidden, activation),
                hidden,
                activation,
            )
        super().__init__(StandardNormal(features), Compose(layers))


@register("residual")
class ResidualFlow(Flow):
    r"""Residual flow (Chen et al. 2019): ActNorm and invertible residual blocks over N(0, I).

    Each block is :math:`z = x + g(x, c)` with :math:`g` contractive (spectral-normalised
    :class:`~flowforge.transforms.LipschitzLinear` layers and LipSwish); its inverse is a
    fixed-point iteration and its log-determinant an unbiased Russian-roulette power series
    (``logdet="series"``), or the exact determinant for small ``features`` (``logdet="exact"``).
    See :class:`~flowforge.transforms.ResidualBlock`.

    Arguments:
        features: data dimension (1 or more).
        context: size of the context vector (0 for an unconditional flow).
        transforms: number of residual blocks.
        hidden: hidden widths of every residual branch.
        coefficient: spectral-norm bound of each layer, in (0, 1).
        logdet: ``"series"`` or ``"exact"``.
        actnorm: an ActNorm layer before every block (data-dependent initialisation).

    >>> import torch
    >>> flow = ResidualFlow(2, transforms=2, hidden=(16,), logdet="exact")
    >>> flow.log_prob(torch.randn(3, 2)).shape
    torch.Size([3])
    """

    def __init__(
        self,
        features: int,
        context: int = 0,
        transforms: int = 4,
        hidden: Sequence[int] = (64, 64),
        *,
        coefficient: float = 0.97,
        logdet: str = "series",
        actnorm: bool = True,
    ) -> None:
        _check_recipe_args("ResidualFlow", features, context, transforms, hidden, coupling=False)
        check_bool("actnorm", actnorm)
        layers: list[Transform] = []
        for _ in range(transforms):
            if actnorm:
                layers.append(ActNorm(features))
            layers.append(ResidualBlock(features, context, hidden, coefficient, logdet))
        super().__init__(StandardNormal(features), Compose(layers))


def _check_image_recipe(
    name: str,
    shape: Sequence[int],
    levels: int,
    steps: int,
    hidden_channels: int,
    context: int,
    scale_bound: float,
    squeezes_per_level: int,
) -> tuple[int, int, int]:
    """Check a multi-scale recipe's arguments; return the shape as ints. The image is squeezed
    ``levels + squeezes_per_level`` times (``squeezes_per_level``: 0 for Glow, -1 for RealNVP's)."""
    sizes = () if isinstance(shape, str | bytes) or not hasattr(shape, "__iter__") else tuple(shape)
    if len(sizes) != 3 or not all(is_count(s) for s in sizes):
        raise ValueError(f"{name} needs shape=(C, H, W), three positive ints, got {shape!r}")
    shape = tuple(int(s) for s in sizes)
    levels = check_count("levels", levels, high=MAX_LAYERS)
    check_count("steps", steps)
    check_count("hidden_channels", hidden_channels)
    check_count("context", context, low=0)
    check_real("scale_bound", scale_bound, positive=True)
    squeezes = levels + squeezes_per_level
    _, height, width = shape
    if height % 2**squeezes or width % 2**squeezes:
        raise ValueError(
            f"{name} with {levels} levels squeezes the image {squeezes} times, so H and W must be divisible by "
            f"{2**squeezes}; got H={height}, W={width}"
        )
    return shape


@register("glow")
class Glow(Flow):
    r"""Glow (Kingma & Dhariwal 2018): a multi-scale image flow over a standard normal of the image's shape.

    Each of the ``levels`` scales squeezes the image (:class:`~flowforge.transforms.Squeeze`),
    applies ``steps`` steps of ActNorm, an invertible 1x1 convolution and an affine coupling
    with a conv conditioner, and (except the last) factors out half of the channels under a
    learned conditional Gaussian prior (:class:`~flowforge.transforms.Split`). A context vector
    (a one-hot class, say) reaches every coupling and every prior: class-conditional Glow.

    Arguments:
        shape: the image shape ``(C, H, W)``; H and W divisible by ``2**levels``.
        levels: number of scales.
        steps: flow steps per scale.
        hidden_channels: hidden channels of the coupling and prior nets.
        context: size of the context vector (0 for an unconditional flow).
        scale_bound: soft clamp on every log-scale.

    The data are continuous images; for pixel counts, wrap the flow in
    :class:`~flowforge.flows.Dequantized`.

    >>> import torch
    >>> flow = Glow((1, 8, 8), levels=2, steps=2, hidden_channels=16)
    >>> flow.log_prob(torch.rand(3, 1, 8, 8)).shape, flow.sample(2).shape
    (torch.Size([3]), torch.Size([2, 1, 8, 8]))
    """

    def __init__(
        self,
        shape: Sequence[int],
        levels: int = 2,
        steps: int = 4,
        hidden_channels: int = 64,
        context: int = 0,
        *,
        scale_bound: float = 3.0,
    ) -> None:
        shape = _check_image_recipe(
            "Glow", shape, levels, steps, hidden_channels, context, scale_bound, squeezes_per_level=0
        )

        def level(channels: int, remaining: int) -> Transform:
            squeezed = 4 * channels
            layers: list[Transform] = [Squeeze()]
            for k in range(steps):
                layers += [
                    ActNorm(squeezed, image=True),
                    InvertibleConv1x1(squeezed),
                    ImageAffineCoupling(squeezed, "channel", k % 2, context, hidden_channels, scale_bound),
                ]
            if remaining > 1:
                kept = squeezed - squeezed // 2
                layers.append(Split(squeezed, level(kept, remaining - 1), context, hidden_channels, scale_bound))
            layers.append(Invert(Squeeze()))
            return Compose(layers)

        super().__init__(StandardNormal(shape), level(shape[0], levels))


@register("multiscale-realnvp")
class MultiscaleRealNVP(Flow):
    r"""RealNVP's multi-scale image flow (Dinh et al. 2016) over a standard normal of the image's shape.

    Each scale applies ``steps`` checkerboard affine couplings, squeezes, applies ``steps``
    channel-wise affine couplings and factors out half of the channels under a learned
    conditional Gaussian prior; the last scale applies checkerboard couplings only. Couplings
    alternate their masks and are separated by ActNorm (in place of the paper's batch norm, so
    that a row's density does not depend on its batch).

    Arguments:
        shape: the image shape ``(C, H, W)``; H and W divisible by ``2**(levels - 1)``.
        levels: number of scales.
        steps: couplings per mask type and scale.
        hidden_channels: hidden channels of the coupling and prior nets.
        context: size of the context vector (0 for an unconditional flow).
        scale_bound: soft clamp on every log-scale.

    >>> import torch
    >>> flow = MultiscaleRealNVP((1, 8, 8), levels=2, steps=2, hidden_channels=16)
    >>> flow.log_prob(torch.rand(3, 1, 8, 8)).shape
    torch.Size([3])
    """

    def __init__(
        self,
        shape: Sequence[int],
        levels: int = 2,
        steps: int = 3,
        hidden_channels: int = 64,
        context: int = 0,
        *,
        scale_bound: float = 3.0,
    ) -> None:
        shape = _check_image_recipe(
            "MultiscaleRealNVP", shape, levels, steps, hidden_channels, context, scale_bound, squeezes_per_level=-1
        )

        def couplings(channels: int, mask: str) -> list[Transform]:
            layers: list[Transform] = []
            for k in range(steps):
                layers += [
                    ActNorm(channels, image=True),
                    ImageAffineCoupling(channels, mask, k % 2, context, hidden_channels, scale_bound),
                ]
            return layers

        def level(channels: int, remaining: int) -> Transform:
            layers = couplings(channels, "checkerboard")
            if remaining > 1:
                squeezed = 4 * channels
                kept = squeezed - squeezed // 2
                layers += [Squeeze(), *couplings(squeezed, "channel")]
                layers.append(Split(squeezed, level(kept, remaining - 1), context, hidden_channels, scale_bound))
                layers.append(Invert(Squeeze()))
            return Compose(layers)

        super().__init__(StandardNormal(shape), level(shape[0], levels))
