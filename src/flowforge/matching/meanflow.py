r"""MeanFlow (Geng et al. 2025): a network of the *average* velocity, for one-step sampling.

The network :math:`u_\theta(x, t, c, h)` (a velocity network with a step input, e.g.
``VelocityMLP(..., step_input=True)``; ``step`` is the span :math:`h`) models

.. math:: u(x_t, t, h) = \frac1h \int_t^{t+h} v(x_\tau, \tau)\, d\tau, \qquad x_{t+h} = x_t + h\, u(x_t, t, h),

the average over :math:`[t, t + h]` of the marginal velocity :math:`v` along the ODE's path; at
:math:`h = 0` it is :math:`v` itself. Differentiating :math:`h\,u = \int_t^{t+h} v` in :math:`t`
with the end fixed gives the MeanFlow identity

.. math:: u(x_t, t, h) = v(x_t, t) + h\, \tfrac{d}{dt} u(x_t, t, h),

whose right side, with the conditional velocity for :math:`v` and the total derivative from one
Jacobian-vector product, is the regression target, held fixed
(:func:`~flowforge.matching.functional.mean_flow_loss`). Times: two draws of the time sampler,
:math:`t` the smaller and :math:`t + h` the larger, on a share ``span_fraction`` of the rows; the
rest have :math:`h = 0` (flow matching). The paper found a quarter of spanning rows and the
adaptive weight :math:`p = 1` best for one-step samples.

**Sampling**: Euler with ``steps = k`` tells the network the span :math:`h = 1/k`, so one step
from noise is :math:`x_1 = x_0 + u(x_0, 0, 1)`; other solvers integrate the instantaneous field
(:math:`h = 0`), as for :class:`~flowforge.matching.ShortcutMatcher`.

**Classifier-free guidance, trained in** (the paper's): with ``context_dropout > 0`` and
``guidance_scale = w``, the target's velocity is :math:`\tilde v = w\,v + (1 - w)\,
u_\theta(x_t, t, \varnothing, 0)` on rows that keep their context (the network's own unconditional
instantaneous velocity, held fixed), so the trained network samples the guided distribution in one
evaluation, without a doubled batch at sampling.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from flowforge.matching.functional import mean_flow_loss
from flowforge.matching.matcher import FlowMatcher, _SamplingField
from flowforge.nn.velocity import check_step_input
from flowforge.ode import solver_settings
from flowforge.registry import register
from flowforge.validation import check_real


@register("meanflow")
class MeanFlowMatcher(FlowMatcher):
    """An average-velocity network trained with the MeanFlow identity; 1-step sampling from noise.

    Arguments:
        velocity: ``net(x, t, context=None, step=None)`` (``step`` is the span h), e.g.
            ``VelocityMLP(..., step_input=True)``.
        args, matcher_options: the other arguments of :class:`FlowMatcher` (path, coupling,
            time_sampler, context_dropout, ...).
        span_fraction: share of the rows trained with a span h > 0 (the rest flow matching), in [0, 1].
        adaptive_power: p of the adaptive loss weight (0: plain squared error), >= 0.
        guidance_scale: the classifier-free guidance weight trained into the network (1: none);
            a value other than 1 needs ``context_dropout > 0``.

    >>> import torch
    >>> from flowforge.nn import VelocityMLP
    >>> model = MeanFlowMatcher(VelocityMLP(2, hidden=(16,), step_input=True))
    >>> model.loss(torch.randn(8, 2)).shape, model.sample(3, steps=1).shape
    (torch.Size([]), torch.Size([3, 2]))
    """

    def __init__(
        self,
        velocity: nn.Module,
        *args: Any,
        span_fraction: float = 0.25,
        adaptive_power: float = 1.0,
        guidance_scale: float = 1.0,
        **matcher_options: Any,
    ) -> None:
        check_step_input(velocity, "MeanFlow")
        super().__init__(velocity, *args, **matcher_options)
        span_fraction = check_real("span_fraction", span_fraction)
        if not 0.0 <= span_fraction <= 1.0:
            raise ValueError(f"span_fraction must be in [0, 1], got {span_fraction}")
        self.span_fraction = span_fraction
        self.adaptive_power = check_real("adaptive_power", adaptive_power, non_negative=True)
        self.guidance_scale = check_real("guidance_scale", guidance_scale)
        if self.guidance_scale != 1.0 and not self.context_dropout:
            raise ValueError(
                f"guidance_scale={guidance_scale} needs context_dropout > 0 (the unconditional velocity "
                "is learned from the dropped rows); pass guidance_scale=1.0 or a context_dropout"
            )

    def loss(
        self,
        x1: Tensor,
        context: Tensor | None = None,
        *,
        x0: Tensor | None = None,
        t: Tensor | None = None,
    ) -> Tensor:
        """The MeanFlow loss on a data batch; a given ``t`` sets the start times (the spans still drawn).

        Arguments and checks as :meth:`FlowMatcher.loss`.
        """
        x1, context, x0, t = self._loss_inputs(x1, context, x0, t)
        rows = x1.shape[0]
        first = t if t is not None else self.time_sampler(rows, device=x1.device, dtype=x1.dtype)
        second = self.time_sampler(rows, device=x1.device, dtype=x1.dtype)
        spanned = torch.rand(rows, device=x1.device) < self.span_fraction
        if t is None:
            start = torch.where(spanned, torch.minimum(first, second), first)
            span = torch.where(spanned, (first - second).abs(), torch.zeros_like(first))
        else:  # the start is given: the span reaches a later draw, or 0
            start = first
            span = torch.where(spanned, (second - first).clamp_min(0.0), torch.zeros_like(first))
        dropped = self._dropped_rows(context)
        context = self._drop_context(context, dropped)

        def average_velocity(x: Tensor, s: Tensor, h: Tensor) -> Tensor:
            return self.velocity(x, s, context, step=h)

        return mean_flow_loss(
            average_velocity,
            x0,
            x1,
            start,
            span,
            self.path,
            adaptive_power=self.adaptive_power,
            guided_velocity=self._guided_target(context, dropped, start),
        )

    def _guided_target(
        self, context: Tensor | None, dropped: Tensor | None, start: Tensor
    ) -> Callable[[Tensor, Tensor], Tensor] | None:
        """:math:`\\tilde v = w v + (1 - w) u(x, t, \\varnothing, 0)` on kept rows, ``None`` without guidance."""
        if self.guidance_scale == 1.0 or context is None:
            return None
        null = self.null_context.to(context.dtype).expand_as(context)
        scale = self.guidance_scale

        def guided(x: Tensor, v: Tensor) -> Tensor:
            with torch.no_grad():
                unconditional = self.velocity(x, start, null, step=torch.zeros_like(start))
            mixed = scale * v + (1.0 - scale) * unconditional
            if dropped is None:
                return mixed
            return torch.where(dropped.reshape(-1, *([1] * (v.dim() - 1))), v, mixed)

        return guided

    def sampling_field(
        self, context: Tensor | None, guidance_scale: float | None, method: str, steps: int | None
    ) -> Callable[[Tensor, Tensor], Tensor]:
        return _SamplingField(self, context, guidance_scale, {"step": self.span_for(method, steps)})

    def span_for(self, method: str, steps: int | None = None) -> float:
        """The span the network is told: ``1/steps`` for Euler, 0 (the instantaneous field) otherwise
        (an adaptive method, which takes no ``steps``, included)."""
        steps = solver_settings(method, steps)[0]
        return 1.0 / steps if method == "euler" else 0.0

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, span_fraction={self.span_fraction}, adaptive_power={self.adaptive_power}, "
            f"guidance_scale={self.guidance_scale}"
        )


__all__ = ["MeanFlowMatcher"]
