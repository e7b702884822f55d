r"""The Transform contract and the transforms that combine others.

A :class:`Transform` is a bijection :math:`f` between data :math:`x` and noise :math:`z`.

* ``forward(x, context) -> (z, log|det J_f(x)|)``: the normalizing direction, data -> noise.
* ``inverse(z, context) -> (x, log|det J_{f^{-1}}(z)|)``: the generative direction.

``logabsdet`` always has shape ``(batch,)``: the log-Jacobian of the direction just computed,
summed over the event dimensions, so that for a flow with base density :math:`p_Z`

.. math:: \log p_X(x) = \log p_Z(f(x)) + \log |\det J_f(x)|.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from flowforge.config import MAX_SEED
from flowforge.validation import check_batched, check_count, check_permutation, describe_shape


class Transform(nn.Module, ABC):
    """A bijection with a tractable log-determinant, possibly conditioned on a context.

    Subclasses set ``features`` (the size of the vector they act on, ``None`` when any size
    works) and ``context_features`` (0 when unconditional) and implement :meth:`forward`
    and :meth:`inverse`.
    """

    features: int | None = None
    context_features: int = 0

    @abstractmethod
    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Map data to noise; return ``(z, logabsdet)`` with ``logabsdet`` of shape (batch,)."""

    @abstractmethod
    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Map noise to data; return ``(x, logabsdet)`` with ``logabsdet`` of shape (batch,)."""

    def inverse_without_logdet(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        """Map noise to data when the log-determinant is not wanted (:meth:`Flow.sample`).

        The same ``x`` as :meth:`inverse`; transforms whose log-determinant costs work of its own
        override it (a continuous flow then integrates ``x`` alone, without the trace).
        """
        return self.inverse(z, context)[0]

    def check_input(self, name: str, value: Tensor, context: Tensor | None) -> None:
        """Raise a ValueError naming the argument when ``value`` or ``context`` has the wrong shape."""
        if self.features is not None:
            check_batched(name, value, (self.features,))
        elif not isinstance(value, Tensor) or value.dim() < 1:
            raise ValueError(f"{name} must be a tensor of shape (batch, ...)")
        self.check_context(name, value, context)

    def check_context(self, name: str, value: Tensor, context: Tensor | None) -> None:
        """Raise a ValueError unless a conditional transform got a context of shape (batch, context_features)."""
        if self.context_features > 0:
            if context is None:
                raise ValueError(
                    f"{type(self).__name__} is conditional: context of shape "
                    f"{describe_shape(('batch', self.context_features))} is required"
                )
            check_batched("context", context, (self.context_features,), batch=value.shape[0], batch_of=name)


class Compose(Transform):
    r"""Apply transforms one after the other: ``Compose(f1, f2)`` maps data ``x`` to ``f2(f1(x))``.

    The log-determinants add up; the inverse runs the parts in reverse order.

    >>> import torch
    >>> t = Compose(Permutation.reverse(3), Permutation.random(3, seed=0))
    >>> x = torch.randn(4, 3)
    >>> z, ladj = t(x)
    >>> torch.equal(t.inverse(z)[0], x), ladj.shape
    (True, torch.Size([4]))
    """

    def __init__(self, *transforms: Transform | Iterable[Transform]) -> None:
        super().__init__()
        if len(transforms) == 1 and not isinstance(transforms[0], Transform):
            transforms = tuple(transforms[0])
        if not transforms:
            raise ValueError("Compose needs at least one transform")
        for i, t in enumerate(transforms):
            if not isinstance(t, Transform):
                raise TypeError(f"transforms[{i}] must be a flowforge Transform, got {type(t).__name__}")
        self.transforms = nn.ModuleList(transforms)
        sizes = {t.features for t in transforms if t.features is not None}
        if len(sizes) > 1:
            raise ValueError(f"transforms act on different feature sizes: {sorted(sizes)}")
        self.features = sizes.pop() if sizes else None
        contexts = {t.context_features for t in transforms} - {0}  # unconditional layers ignore the context
        if len(contexts) > 1:
            raise ValueError(
                f"transforms take contexts of different sizes: {sorted(contexts)}; one context feeds them all"
            )
        self.context_features = contexts.pop() if contexts else 0

    #: Recompute each layer's activations in the backward pass instead of storing them
    #: (``torch.utils.checkpoint``): memory of one layer instead of the whole stack, for one
    #: more forward pass. Set by ``TrainerConfig(gradient_checkpointing=True)``. A layer that
    #: updates buffers in training (BatchNorm's running averages) sees the recomputation too.
    checkpointing: bool = False

    def _run_layer(self, layer: Callable[..., Any], x: Tensor, context: Tensor | None) -> Any:
        if self.checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(layer, x, context, use_reentrant=False)
        return layer(x, context)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        total = x.new_zeros(x.shape[0])
        for t in self.transforms:
            x, ladj = self._run_layer(t, x, context)
            total = total + ladj
        return x, total

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        total = z.new_zeros(z.shape[0])
        for t in reversed(self.transforms):
            z, ladj = self._run_layer(t.inverse, z, context)
            total = total + ladj
        return z, total

    def inverse_without_logdet(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        for t in reversed(self.transforms):
            z = self._run_layer(t.inverse_without_logdet, z, context)
        return z


class Invert(Transform):
    """Swap the two directions of a transform: ``Invert(t).forward`` is ``t.inverse``.

    This turns a transform whose cheap direction is density evaluation (MAF) into one whose
    cheap direction is sampling (IAF).

    >>> import torch
    >>> p = Permutation.random(5, seed=1)
    >>> x = torch.randn(2, 5)
    >>> torch.equal(Invert(p)(x)[0], p.inverse(x)[0])
    True
    """

    def __init__(self, transform: Transform) -> None:
        super().__init__()
        if not isinstance(transform, Transform):
            raise TypeError(f"transform must be a flowforge Transform, got {type(transform).__name__}")
        self.transform = transform
        self.features = transform.features
        self.context_features = transform.context_features

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check_input("x", x, context)  # here, so errors name the caller's argument
        return self.transform.inverse(x, context)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check_input("z", z, context)
        return self.transform.forward(z, context)


class Permutation(Transform):
    """A fixed permutation of the features (dimension 1); volume preserving, log-det 0.

    ``forward(x)[:, i] = x[:, permutation[i]]``. Build one with :meth:`reverse` or
    :meth:`random` (seeded, so a recipe rebuilt from its config is the same flow).

    >>> import torch
    >>> Permutation.reverse(3)(torch.tensor([[1.0, 2.0, 3.0]]))[0]
    tensor([[3., 2., 1.]])
    """

    def __init__(self, permutation: Sequence[int] | Tensor) -> None:
        super().__init__()
        perm = check_permutation("permutation", permutation)
        self.features = perm.numel()
        self.register_buffer("permutation", perm)
        self.register_buffer("inverse_permutation", torch.argsort(perm))

    @classmethod
    def reverse(cls, features: int) -> Permutation:
        """The permutation that reverses the order of ``features`` features."""
        return cls(torch.arange(check_count("features", features) - 1, -1, -1))

    @classmethod
    def random(cls, features: int, seed: int = 0) -> Permutation:
        """A uniformly random permutation drawn from a generator seeded with ``seed``."""
        generator = torch.Generator().manual_seed(check_count("seed", seed, low=0, high=MAX_SEED))
        return cls(torch.randperm(check_count("features", features), generator=generator))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check_input("x", x, None)
        return x.index_select(1, self.permutation), x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check_input("z", z, None)
        return z.index_select(1, self.inverse_permutation), z.new_zeros(z.shape[0])
