r"""The Flow: a base distribution pushed through a transform.

With :math:`f` the transform (data -> noise) and :math:`p_Z` the base density,

.. math:: \log p(x \mid c) = \log p_Z\big(f(x; h(c))\big) + \log\big|\det J_f(x; h(c))\big|,

where :math:`h` is an optional context network that embeds the raw context :math:`c`
before every layer sees it. Samples are :math:`x = f^{-1}(z; h(c))` with :math:`z \sim p_Z`.

**Sample shapes.** Without a context, ``sample(n)`` returns ``(n, *event)``. With a context of
shape ``(B, c)``, ``sample(n, context)`` returns ``(n, B, *event)``: ``n`` draws for every
context row, sample dimension first, as ``torch.distributions`` does for
``flow.distribution(context).sample((n,))``. ``sample(1, context)[0]`` is one draw per row.
A context of 0 rows gives ``(n, 0, *event)``.

**Inputs** follow the input rule of :mod:`flowforge.validation`: a floating-point ``x`` or
``context`` of another dtype than the flow's is cast to the flow's dtype on entry (results come back
in the flow's dtype), integer tensors are refused with a ``TypeError``, and ``log_prob`` of 0 rows
is an empty ``(0,)`` tensor.
"""

from __future__ import annotations

from math import prod
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, constraints

from flowforge.checkpoint import load_model, save_model
from flowforge.distributions import BaseDistribution
from flowforge.registry import Rebuildable
from flowforge.transforms.base import Transform
from flowforge.validation import check_batched, check_count, check_sample_count, describe_shape, is_count, model_dtype


class Flow(Rebuildable, nn.Module):
    """A normalizing flow: ``base`` distribution, ``transform`` (data -> noise), optional context net.

    Arguments:
        base: the base distribution (its ``event_shape`` is the flow's).
        transform: the bijection from data to noise.
        context_net: optional module embedding the raw context before the transform sees it.
        context_features: size of the raw context vector. Inferred from the transform (no
            context net) or from ``context_net.in_features`` when omitted; give it for a context
            net without that attribute so that wrong sizes are caught.

    Example:
        >>> import torch
        >>> from flowforge.distributions import StandardNormal
        >>> from flowforge.transforms import AffineCoupling, Compose
        >>> flow = Flow(StandardNormal(2), Compose(AffineCoupling([True, False]), AffineCoupling([False, True])))
        >>> flow.log_prob(torch.zeros(3, 2)).shape, flow.sample(5).shape
        (torch.Size([3]), torch.Size([5, 2]))
    """

    def __init__(
        self,
        base: BaseDistribution,
        transform: Transform,
        context_net: nn.Module | None = None,
        context_features: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base, BaseDistribution):
            raise TypeError(f"base must be a flowforge distribution, got {type(base).__name__}")
        if not isinstance(transform, Transform):
            raise TypeError(f"transform must be a flowforge Transform, got {type(transform).__name__}")
        self.base = base
        self.transform = transform
        self.context_net = context_net
        self.event_shape = base.event_shape
        if transform.features is not None and (len(self.event_shape) != 1 or transform.features != self.event_shape[0]):
            raise ValueError(
                f"transform acts on {transform.features} features but the base distribution has event shape "
                f"{describe_shape(tuple(self.event_shape))}"
            )
        wanted = transform.context_features  # what the transform sees: the net's output, or the raw context
        if context_net is not None:
            if not isinstance(context_net, nn.Module):
                raise TypeError(f"context_net must be an nn.Module or None, got {type(context_net).__name__}")
            if not wanted:
                raise ValueError(
                    "context_net: the transform takes no context, so the net's output would be ignored; "
                    "build the transform with a context of the net's output size"
                )
            out = getattr(context_net, "out_features", None)
            if isinstance(out, int) and out != wanted:
                raise ValueError(f"context_net gives {out} features but the transform takes a context of {wanted}")
        if context_features is not None:
            context_features = check_count("context_features", context_features, low=0 if context_net is None else 1)
            if context_net is None and context_features != wanted:
                raise ValueError(
                    f"context_features must be the transform's context size ({wanted}) without a context_net, "
                    f"got {context_features}"
                )
        else:
            context_features = wanted if context_net is None else getattr(context_net, "in_features", None)
        #: size of the raw context, 0 for an unconditional flow, None when unknown (any size).
        self.context_features: int | None = context_features
        self.conditional = context_net is not None or transform.context_features > 0

    # -- input handling -------------------------------------------------------------------
    def _embed(self, context: Tensor | None, batch: int | None, batch_of: str) -> Tensor | None:
        """Check the raw context and return what the transform sees."""
        if not self.conditional:
            if context is not None:
                raise ValueError("this flow is unconditional: context must be None")
            return None
        if context is None:
            expected = describe_shape(("batch", self.context_features or "c"))
            raise ValueError(f"this flow is conditional: context of shape {expected} is required")
        # With an unknown context size (a context net without in_features) only the batch is checked.
        expected = (
            (self.context_features,) if self.context_features is not None else tuple(getattr(context, "shape", ())[1:])
        )
        context = check_batched(
            "context", context, expected, batch=batch, batch_of=batch_of, finite=True, dtype=model_dtype(self)
        )
        return context if self.context_net is None else self.context_net(context)

    # -- density ----------------------------------------------------------------------------
    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Same as :meth:`log_prob` (``flow(x, c)`` goes through module hooks and DDP)."""
        x = check_batched("x", x, self.event_shape, finite=True, dtype=model_dtype(self))
        embedded = self._embed(context, batch=x.shape[0], batch_of="x")
        if x.shape[0] == 0:  # nothing to score: no transform runs (a fresh ActNorm or a training BatchNorm needs rows)
            return x.new_zeros(0)
        z, logabsdet = self.transform(x, embedded)
        return self.base.log_prob(z) + logabsdet

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Log-density of ``x`` (batch, *event) given ``context`` (batch, c); shape (batch,)."""
        return self(x, context)

    # -- sampling ---------------------------------------------------------------------------
    def _draw(self, n: int, context: Tensor | None) -> tuple[Tensor | None, Tensor, tuple[int, ...]]:
        """Return noise, the context for each draw and the output batch shape (noise ``None``: no rows)."""
        n = check_sample_count(n)
        embedded = self._embed(context, batch=None, batch_of="x")
        if embedded is None:
            return self.base.rsample(n), None, (n,)
        rows = embedded.shape[0]
        if rows == 0:  # nothing to draw: the callers return empty results without running the transform
            return None, embedded, (n, 0)
        # Draw i for context row b sits at flat index i * rows + b, hence repeat (not repeat_interleave).
        return self.base.rsample(n * rows), embedded.repeat(n, *([1] * (embedded.dim() - 1))), (n, rows)

    def rsample(self, n: int, context: Tensor | None = None) -> Tensor:
        """Differentiable samples: ``(n, *event)``, or ``(n, B, *event)`` with a context of batch B."""
        z, embedded, batch_shape = self._draw(n, context)
        if z is None:
            return self._empty(batch_shape, self.event_shape)
        x = self.transform.inverse_without_logdet(z, embedded)
        return x.reshape(*batch_shape, *self.event_shape)

    def sample(self, n: int, context: Tensor | None = None) -> Tensor:
        """Samples without a graph; shapes as in :meth:`rsample`."""
        with torch.no_grad():
            return self.rsample(n, context)

    def sample_and_log_prob(self, n: int, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Samples and their log-densities from one inverse pass (differentiable, for reverse-KL).

        Returns ``x`` as :meth:`rsample` and ``log_prob`` of shape ``(n,)`` or ``(n, B)``.
        """
        z, embedded, batch_shape = self._draw(n, context)
        if z is None:
            return self._empty(batch_shape, self.event_shape), self._empty(batch_shape, ())
        base_log_prob = self.base.log_prob(z)
        x, logabsdet = self.transform.inverse(z, embedded)
        return x.reshape(*batch_shape, *self.event_shape), (base_log_prob - logabsdet).reshape(batch_shape)

    def _empty(self, batch_shape: tuple[int, ...], event_shape: tuple[int, ...]) -> Tensor:
        """A tensor with no elements on the flow's device, in its dtype."""
        return self.base.rsample(1).new_zeros(*batch_shape, *event_shape)

    def distribution(self, context: Tensor | None = None) -> FlowDistribution:
        """A ``torch.distributions.Distribution`` view of the flow at ``context`` (batch shape (B,))."""
        return FlowDistribution(self, context)

    def save(self, directory: str | Path, metadata: dict | None = None) -> Path:
        """Save weights (safetensors) and the config that rebuilds the flow (JSON) to ``directory``.

        Works for every registered flow (the recipes, ``CNF``; :mod:`flowforge.registry`), whose
        config holds every constructor argument; a hand-built flow raises a
        :class:`~flowforge.errors.RebuildError`: save its ``state_dict`` with
        :func:`flowforge.checkpoint.save_checkpoint` and rebuild it in code. The write is atomic
        (:mod:`flowforge.checkpoint`). ``metadata``: any JSON to keep alongside.

        >>> import tempfile, torch
        >>> from flowforge.flows import RealNVP
        >>> flow = RealNVP(2, transforms=2, activation=torch.nn.Tanh)
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     _ = flow.save(folder)
        ...     same = Flow.load(folder)
        >>> x = torch.randn(3, 2)
        >>> torch.equal(flow.log_prob(x), same.log_prob(x))
        True
        """
        return save_model(directory, self, metadata)

    @classmethod
    def load(cls, directory: str | Path, map_location: str | torch.device | None = None) -> Flow:
        """Rebuild a flow saved by :meth:`save`: its class and arguments from the manifest, its weights checked by hash.

        ``Flow.load`` accepts any saved flow; ``MAF.load`` also checks that the checkpoint holds a MAF.
        Raises :class:`~flowforge.errors.CheckpointError` for a missing, truncated, tampered or
        foreign checkpoint.
        """
        return load_model(directory, cls, map_location)


class FlowDistribution(Distribution):
    """``torch.distributions`` view of a :class:`Flow`, optionally at a fixed context.

    ``batch_shape`` is ``(B,)`` for a context of B rows, ``()`` otherwise. ``log_prob(value)``
    takes ``value`` of shape ``(*sample_shape, *batch_shape, *event_shape)``; other shapes are
    refused rather than broadcast.

    >>> import torch
    >>> from flowforge.flows import RealNVP
    >>> d = RealNVP(2, context=3, transforms=2).distribution(torch.randn(4, 3))
    >>> x = d.sample((5,))
    >>> x.shape, d.log_prob(x).shape
    (torch.Size([5, 4, 2]), torch.Size([5, 4]))
    """

    arg_constraints: dict = {}  # noqa: RUF012 - torch.distributions reads this class attribute
    has_rsample = True

    def __init__(self, flow: Flow, context: Tensor | None = None) -> None:
        self.flow = flow
        self.context = context
        if flow.conditional and context is None:
            raise ValueError("this flow is conditional: distribution(context) needs a context of shape (batch, c)")
        batch_shape = torch.Size() if context is None else torch.Size(context.shape[:1])
        super().__init__(batch_shape, flow.event_shape, validate_args=False)

    @property
    def support(self) -> constraints.Constraint:
        return constraints.independent(constraints.real, len(self.event_shape))

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> Tensor:
        if not isinstance(sample_shape, tuple | list | torch.Size) or not all(is_count(s) for s in sample_shape):
            raise ValueError(f"sample_shape must be a tuple of positive ints, got {sample_shape!r}")
        sample_shape = torch.Size(sample_shape)
        x = self.flow.rsample(max(prod(sample_shape), 1), self.context)
        return x.reshape((*sample_shape, *self.batch_shape, *self.event_shape))

    def log_prob(self, value: Tensor) -> Tensor:
        tail = (*self.batch_shape, *self.event_shape)
        if value.dim() < len(tail) or tuple(value.shape[value.dim() - len(tail) :]) != tail:
            raise ValueError(
                f"value must have shape (*sample_shape, {', '.join(map(str, tail))}), got {tuple(value.shape)}"
            )
        sample_shape = value.shape[: value.dim() - len(tail)]
        flat = value.reshape(-1, *self.event_shape)
        context = None
        if self.context is not None:
            context = self.context.repeat(prod(sample_shape), *([1] * (self.context.dim() - 1)))
        return self.flow.log_prob(flat, context).reshape((*sample_shape, *self.batch_shape))
