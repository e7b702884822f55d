r"""Flow matching: train a velocity field by regression, sample it as an ODE or SDE, evaluate its density.

Conditional flow matching (Lipman et al. 2023; Liu et al. 2023; Albergo & Vanden-Eijnden 2023)
regresses a network :math:`v_\theta(x, t, c)` onto the velocity of a conditional path,

.. math:: \mathcal L(\theta) = \mathbb E_{t,\ (x_0, x_1) \sim \pi,\ c}\,
          \big\| v_\theta(x_t, t, c) - u_t(x_0, x_1) \big\|^2,

where the path (:mod:`flowforge.matching.paths`) gives :math:`x_t, u_t`, the coupling
(:mod:`flowforge.matching.couplings`) gives the joint :math:`\pi` of noise and data, and the time
sampler (:mod:`flowforge.matching.time`) the law of :math:`t`. The minimiser is the marginal
velocity, whose ODE carries :math:`\mathcal N(0, I)` at :math:`t = 0` to the data at :math:`t = 1`.

**Classifier-free guidance** (Ho & Salimans 2022): with ``context_dropout = p`` the context of
each training row is replaced, with probability p, by a learned null context; at sampling,
:math:`\tilde v = v(x, t, \varnothing) + w\,(v(x, t, c) - v(x, t, \varnothing))`, so ``w = 1`` is
the conditional model and ``w > 1`` sharpens it. Both velocities come from one batched call.

**Sample shapes** follow :class:`flowforge.flows.Flow`: ``sample(n)`` is ``(n, *event)``, and
with a context of batch B, ``sample(n, context)`` is ``(n, B, *event)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from math import prod

import torch
from torch import Tensor, nn

from flowforge.distributions import StandardNormal
from flowforge.matching.couplings import Coupling, IndependentCoupling
from flowforge.matching.functional import flow_matching_loss, integrate
from flowforge.matching.paths import AffinePath, LinearPath, _expand
from flowforge.matching.time import TimeSampler, UniformTime
from flowforge.ode import ADAPTIVE_METHODS, TABLEAUS, sdeint
from flowforge.registry import Rebuildable, register
from flowforge.transforms.continuous import ContinuousFlowTransform
from flowforge.validation import check_batched, check_sample_count


class _FlatVelocity(nn.Module):
    """The (possibly guided) velocity on flattened events: what the CNF machinery integrates."""

    def __init__(self, matcher: FlowMatcher, guidance_scale: float | None) -> None:
        super().__init__()
        self.matcher = matcher
        self.guidance_scale = guidance_scale

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None) -> Tensor:
        event = x.reshape(x.shape[0], *self.matcher.event_shape)
        return self.matcher.velocity_at(event, t, context, self.guidance_scale).reshape(x.shape[0], -1)


class _SamplingField:
    """``f(x, t)`` for the solvers; with a network that offers ``time_conditioning`` and no guidance,
    it also offers ``on_grid`` so a fixed-step solve precomputes the time features of every stage."""

    def __init__(
        self, matcher: FlowMatcher, context: Tensor | None, guidance_scale: float | None, net_inputs: dict
    ) -> None:
        self.matcher, self.context, self.guidance_scale, self.net_inputs = matcher, context, guidance_scale, net_inputs
        conditioning = getattr(matcher.velocity, "time_conditioning", None)
        if conditioning is None or guidance_scale is not None or set(net_inputs) - {"step"}:
            self.on_grid = None

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        return self.matcher.velocity_at(x, t, self.context, self.guidance_scale, **self.net_inputs)

    def on_grid(self, times: Tensor) -> Callable[[Tensor, int], Tensor]:
        return self.matcher.velocity.time_conditioning(times, self.context, **self.net_inputs)


@register("flow-matching")
class FlowMatcher(Rebuildable, nn.Module):
    """A velocity network with the path, coupling and time law it is trained with.

    Arguments:
        velocity: ``net(x, t, context=None) -> v`` (the velocity-field contract).
        path: the probability path (default :class:`~flowforge.matching.LinearPath`).
        coupling: noise-data pairing (default :class:`~flowforge.matching.IndependentCoupling`).
        time_sampler: the law of the training time (default uniform).
        event_shape: shape of one sample; taken from ``velocity.features`` when omitted.
        context: size of the context vector; taken from ``velocity.context_features`` when omitted.
        context_dropout: probability of training a row with the null context (classifier-free
            guidance needs it > 0).

    >>> import torch
    >>> from flowforge.nn import VelocityMLP
    >>> matcher = FlowMatcher(VelocityMLP(2, hidden=(16,)))
    >>> loss = matcher.loss(torch.randn(8, 2))
    >>> loss.shape, matcher.sample(5, steps=4).shape
    (torch.Size([]), torch.Size([5, 2]))
    """

    def __init__(
        self,
        velocity: nn.Module,
        path: AffinePath | None = None,
        coupling: Coupling | None = None,
        time_sampler: TimeSampler | None = None,
        *,
        event_shape: int | Sequence[int] | None = None,
        context: int | None = None,
        context_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.velocity = velocity
        self.path = path if path is not None else LinearPath()
        self.coupling = coupling if coupling is not None else IndependentCoupling()
        self.time_sampler = time_sampler if time_sampler is not None else UniformTime()
        if event_shape is None:
            event_shape = getattr(velocity, "features", None)
            if event_shape is None:
                raise ValueError("give event_shape: the velocity network has no `features` attribute to infer it from")
        self.base = StandardNormal(event_shape)
        self.event_shape = tuple(self.base.event_shape)
        self.context_features = int(context if context is not None else getattr(velocity, "context_features", 0))
        if not 0.0 <= context_dropout < 1.0:
            raise ValueError(f"context_dropout must be in [0, 1), got {context_dropout}")
        if context_dropout and not self.context_features:
            raise ValueError("context_dropout needs a conditional model (context > 0)")
        self.context_dropout = float(context_dropout)
        self.null_context = nn.Parameter(torch.zeros(self.context_features)) if context_dropout else None

    # ------------------------------------------------------------------ checks
    def _check(self, name: str, x: Tensor, context: Tensor | None) -> None:
        check_batched(name, x, self.event_shape, finite=True)
        if self.context_features:
            if context is None:
                raise ValueError(f"this model is conditional: pass a context of shape (batch, {self.context_features})")
            check_batched("context", context, (self.context_features,), batch=x.shape[0], batch_of=name, finite=True)
        elif context is not None:
            raise ValueError("this model takes no context (context=0); got one")

    def _check_context(self, context: Tensor | None) -> None:
        if self.context_features:
            if context is None:
                raise ValueError(f"this model is conditional: pass a context of shape (B, {self.context_features})")
            check_batched("context", context, (self.context_features,), finite=True)
        elif context is not None:
            raise ValueError("this model takes no context (context=0); got one")

    # ------------------------------------------------------------------ training
    def loss(
        self,
        x1: Tensor,
        context: Tensor | None = None,
        *,
        x0: Tensor | None = None,
        t: Tensor | None = None,
    ) -> Tensor:
        """The flow-matching loss on a data batch ``x1`` (batch, *event): mean squared velocity error.

        Arguments:
            x1: data.
            context: condition per row (batch, context), for a conditional model.
            x0: noise already paired with ``x1`` (reflow pairs); when given the coupling is skipped.
            t: training times (batch,); drawn from the time sampler when omitted.
        """
        x0 = self._paired_noise(x1, context, x0)
        if t is None:
            t = self.time_sampler(x1.shape[0], device=x1.device, dtype=x1.dtype)
        context = self._drop_context(context)
        return flow_matching_loss(lambda x, time: self.velocity(x, time, context), x0, x1, t, self.path)

    def _paired_noise(self, x1: Tensor, context: Tensor | None, x0: Tensor | None) -> Tensor:
        """Check the batch and return its noise partners: drawn and coupled, or the given ``x0`` checked."""
        self._check("x1", x1, context)
        if x0 is None:
            return self.coupling(torch.randn_like(x1), x1, context)
        return check_batched("x0", x0, self.event_shape, batch=x1.shape[0], batch_of="x1")

    def _drop_context(self, context: Tensor | None) -> Tensor | None:
        if context is None or not self.context_dropout or not self.training:
            return context
        dropped = torch.rand(context.shape[0], 1, device=context.device) < self.context_dropout
        return torch.where(dropped, self.null_context.to(context.dtype), context)

    # ------------------------------------------------------------------ velocity
    def velocity_at(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor | None = None,
        guidance_scale: float | None = None,
        **net_inputs: Tensor | float,
    ) -> Tensor:
        r"""The model's velocity; with ``guidance_scale = w``, :math:`v_\varnothing + w (v_c - v_\varnothing)`.

        ``net_inputs`` go to the network as keywords (the step size of a shortcut model).
        """
        if guidance_scale is None or context is None:
            return self.velocity(x, t, context, **net_inputs)
        if self.null_context is None:
            raise ValueError("guidance needs a model trained with context_dropout > 0 (it learns the null context)")
        null = self.null_context.to(context.dtype).expand_as(context)
        doubled = {k: torch.cat([v, v]) if isinstance(v, Tensor) and v.dim() else v for k, v in net_inputs.items()}
        both = self.velocity(torch.cat([x, x]), torch.cat([t, t]), torch.cat([context, null]), **doubled)
        conditional, unconditional = both.chunk(2)
        return unconditional + guidance_scale * (conditional - unconditional)

    # ------------------------------------------------------------------ sampling
    def _noise_and_context(self, n: int, context: Tensor | None) -> tuple[Tensor, Tensor | None, tuple[int, ...]]:
        n = check_sample_count(n)
        self._check_context(context)
        rows = n if context is None else n * context.shape[0]
        x0 = self.base.sample(rows)  # on the model's device and dtype (the base holds a buffer)
        if context is not None:
            context = context.repeat(n, 1)  # draw-major: rows i*B .. i*B+B-1 are draw i
        shape = (n, *self.event_shape) if context is None else (n, rows // n, *self.event_shape)
        return x0, context, shape

    def rsample(
        self,
        n: int,
        context: Tensor | None = None,
        steps: int = 10,
        method: str = "euler",
        guidance_scale: float | None = None,
        atol: float = 1e-5,
        rtol: float = 1e-5,
    ) -> Tensor:
        """Differentiable samples: integrate the ODE from noise (t = 0) to data (t = 1).

        Arguments:
            n: draws (per context row).
            context: (B, context) for a conditional model.
            steps: fixed steps (the NFE is ``steps`` x stages of ``method``).
            method: ``"euler"``, ``"midpoint"``, ``"heun"``, ``"rk4"`` or an adaptive method
                (``"dopri5"``, ...; then ``atol``/``rtol`` apply and ``steps`` does not).
            guidance_scale: classifier-free guidance weight (None: the plain conditional model).
        """
        if method not in TABLEAUS and method not in ADAPTIVE_METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join((*TABLEAUS, *ADAPTIVE_METHODS))}")
        x0, context, shape = self._noise_and_context(n, context)
        field = self.sampling_field(context, guidance_scale, method, steps)
        return integrate(field, x0, method=method, steps=steps, atol=atol, rtol=rtol).x.reshape(shape)

    def sampling_field(
        self, context: Tensor | None, guidance_scale: float | None, method: str, steps: int
    ) -> Callable[[Tensor, Tensor], Tensor]:
        """The field ``f(x, t)`` the ODE sampler integrates (a few-step model also uses the step size)."""
        return _SamplingField(self, context, guidance_scale, {})

    @torch.no_grad()
    def sample(
        self,
        n: int,
        context: Tensor | None = None,
        steps: int = 10,
        method: str = "euler",
        guidance_scale: float | None = None,
        atol: float = 1e-5,
        rtol: float = 1e-5,
    ) -> Tensor:
        """Samples from the ODE, without gradients; arguments as :meth:`rsample`."""
        return self.rsample(n, context, steps, method, guidance_scale, atol, rtol)

    @torch.no_grad()
    def sample_sde(
        self,
        n: int,
        context: Tensor | None = None,
        steps: int = 100,
        noise_scale: float = 1.0,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        r"""Samples from an SDE with the same marginals as the ODE (Euler-Maruyama).

        For any diffusion :math:`g_t`, :math:`dx = [v(x, t) + \tfrac12 g_t^2 \nabla\log p_t(x)]\,dt
        + g_t\, dW` has the marginals :math:`p_t` of the ODE (the score comes from the velocity,
        :meth:`AffinePath.velocity_to_score`). Here :math:`g_t = \text{noise\_scale}\cdot\sigma_t`,
        which vanishes at the data end where the score is singular, so
        :math:`\tfrac12 g_t^2 \nabla\log p_t = -\tfrac12\,\text{noise\_scale}^2\,\sigma_t\,\hat x_0`
        stays finite. ``noise_scale = 0`` is the Euler ODE sampler.
        """
        if noise_scale < 0:
            raise ValueError(f"noise_scale must be >= 0, got {noise_scale}")
        x0, context, shape = self._noise_and_context(n, context)
        path = self.path

        def drift(x: Tensor, t: Tensor) -> Tensor:
            v = self.velocity_at(x, t, context, guidance_scale)
            if noise_scale == 0:
                return v
            sigma = _expand(path.schedule(t)[1], x)
            return v - 0.5 * noise_scale**2 * sigma * path.velocity_to_noise(v, x, t)

        def diffusion(x: Tensor, t: Tensor) -> Tensor:
            return noise_scale * _expand(path.schedule(t)[1], x)

        return sdeint(drift, diffusion, x0, (0.0, 1.0), steps, generator=generator).reshape(shape)

    # ------------------------------------------------------------------ likelihood
    def log_prob(
        self,
        x: Tensor,
        context: Tensor | None = None,
        trace: str = "exact",
        method: str = "dopri5",
        steps: int = 50,
        atol: float = 1e-5,
        rtol: float = 1e-5,
        guidance_scale: float | None = None,
    ) -> Tensor:
        r"""Log-density of the model's ODE at ``x`` (batch, *event), by the instantaneous change of variables.

        Integrates :math:`(x, \ell)` from data (t = 1) back to noise (t = 0) with
        :math:`\dot\ell = \nabla\!\cdot v` (:class:`~flowforge.transforms.ContinuousFlowTransform`);
        ``trace="exact"`` or ``"hutchinson"`` (unbiased, one Rademacher probe per solve).
        """
        self._check("x", x, context)
        features = prod(self.event_shape)
        transform = ContinuousFlowTransform(
            _FlatVelocity(self, guidance_scale), features, self.context_features, trace, method, steps, atol, rtol
        )
        z, logabsdet = transform(x.reshape(x.shape[0], features), context)
        self.last_nfe = transform.last_nfe
        return self.base.log_prob(z.reshape(x.shape)) + logabsdet

    #: velocity evaluations of the most recent log_prob solve.
    last_nfe: int = 0

    def extra_repr(self) -> str:
        return (
            f"event_shape={self.event_shape}, context={self.context_features}, path={self.path!r}, "
            f"coupling={self.coupling!r}, time_sampler={self.time_sampler!r}, context_dropout={self.context_dropout}"
        )


__all__ = ["FlowMatcher"]
