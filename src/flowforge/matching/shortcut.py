r"""Shortcut models (Frans et al. 2025): one network for any number of sampling steps, down to one.

The network takes the step size :math:`d` as an extra input, :math:`s_\theta(x, t, c, d)`, and
predicts the *average* velocity over the next step, so that :math:`x_{t+d} = x_t + d\,
s_\theta(x_t, t, c, d)`. At :math:`d = 0` it is the instantaneous velocity, trained by plain
flow matching. Larger steps are trained by self-consistency: two steps of size :math:`d` must
equal one of size :math:`2d`,

.. math:: s_\theta(x_t, t, 2d) \approx \tfrac12\big[s_\theta(x_t, t, d)
          + s_\theta(x_t + d\, s_\theta(x_t, t, d),\ t + d,\ d)\big],

with the right side held fixed (no gradient). Step sizes are powers of two,
:math:`d \in \{2^{-M}, \dots, 2^{-1}\}`, the smallest one is queried as :math:`d = 0` (the
flow-matching velocity), which anchors the recursion, and the times of a self-consistency row lie
on the grid of its step, :math:`t \in \{0, 2d, \dots, 1 - 2d\}`, where a sampler with that step
evaluates the network. A fraction of every batch
(``self_consistency_fraction``) trains the shortcut targets, the rest flow matching.

Sampling with ``steps = k`` and Euler uses step input :math:`d = 1/k` when that step was trained
(:math:`k` a power of two below :math:`2^M`); other step counts and other solvers use the
instantaneous velocity (:math:`d = 0`), i.e. the model's flow-matching field.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from flowforge.matching.functional import flow_matching_loss, shortcut_loss, shortcut_step
from flowforge.matching.matcher import FlowMatcher, _SamplingField
from flowforge.nn.velocity import check_step_input
from flowforge.ode import solver_settings
from flowforge.registry import register
from flowforge.validation import check_count, check_real

#: The largest ``max_halvings``: the smallest step, 2**-20, is still resolved by float32 times.
MAX_HALVINGS = 20


@register("shortcut")
class ShortcutMatcher(FlowMatcher):
    """Flow matching plus shortcut self-consistency, for usable 1-2 step sampling.

    Arguments:
        velocity: ``net(x, t, context=None, step=None)``, e.g. ``VelocityMLP(..., step_input=True)``.
        args, matcher_options: the other arguments of :class:`FlowMatcher` (path, coupling, ...).
        self_consistency_fraction: share of each batch trained on the self-consistency target.
        max_halvings: M in 1..``MAX_HALVINGS`` (20): the smallest trained step is ``2**-M`` (default 7:
            1/128).

    Inputs follow the input rule of :mod:`flowforge.validation`, as for :class:`FlowMatcher`:
    ``loss`` of 0 rows is a ``ValueError``, ``sample(steps=...)`` needs a positive int.

    >>> import torch
    >>> from flowforge.nn import VelocityMLP
    >>> model = ShortcutMatcher(VelocityMLP(2, hidden=(16,), step_input=True))
    >>> model.loss(torch.randn(8, 2)).shape, model.sample(3, steps=1).shape
    (torch.Size([]), torch.Size([3, 2]))
    """

    def __init__(
        self,
        velocity: nn.Module,
        *args: Any,
        self_consistency_fraction: float = 0.25,
        max_halvings: int = 7,
        **matcher_options: Any,
    ) -> None:
        check_step_input(velocity, "shortcut")
        super().__init__(velocity, *args, **matcher_options)
        self_consistency_fraction = check_real("self_consistency_fraction", self_consistency_fraction)
        if not 0.0 < self_consistency_fraction < 1.0:
            raise ValueError(f"self_consistency_fraction must be in (0, 1), got {self_consistency_fraction}")
        self.self_consistency_fraction = float(self_consistency_fraction)
        self.max_halvings = check_count("max_halvings", max_halvings, high=MAX_HALVINGS)

    def loss(
        self,
        x1: Tensor,
        context: Tensor | None = None,
        *,
        x0: Tensor | None = None,
        t: Tensor | None = None,
    ) -> Tensor:
        """Flow-matching loss (step 0) on most rows plus the self-consistency loss on the rest.

        Arguments and checks as :meth:`FlowMatcher.loss`; a given ``t`` sets the flow-matching rows' times.
        """
        x1, context, x0, t = self._loss_inputs(x1, context, x0, t)
        batch = x1.shape[0]
        context = self._drop_context(context)
        n_sc = min(max(round(batch * self.self_consistency_fraction), 1), batch - 1) if batch > 1 else 0

        # Flow-matching rows: instantaneous velocity at step 0.
        fm = slice(n_sc, batch)
        t_fm = t[fm] if t is not None else self.time_sampler(batch - n_sc, device=x1.device, dtype=x1.dtype)
        fm_context = None if context is None else context[fm]
        loss = flow_matching_loss(
            lambda x, time: self.velocity(x, time, fm_context, step=0.0), x0[fm], x1[fm], t_fm, self.path
        )

        if n_sc:
            sc = slice(0, n_sc)
            sc_context = None if context is None else context[sc]
            consistency = shortcut_loss(
                lambda x, time, d: self.velocity(x, time, sc_context, step=d),
                x0[sc],
                x1[sc],
                self.path,
                max_halvings=self.max_halvings,
            )
            # Every row weighs the same: the two parts' means, weighted by their row counts.
            loss = (loss * (batch - n_sc) + consistency * n_sc) / batch
        return loss

    def sampling_field(
        self, context: Tensor | None, guidance_scale: float | None, method: str, steps: int | None
    ) -> Callable[[Tensor, Tensor], Tensor]:
        return _SamplingField(self, context, guidance_scale, {"step": self.step_input_for(method, steps)})

    def step_input_for(self, method: str, steps: int | None = None) -> float:
        """The step size the network is told: ``1/steps`` for Euler with a trained step (a power of two
        from 1 down to ``2**(1 - max_halvings)``), otherwise 0, the instantaneous velocity (an
        adaptive method, which takes no ``steps``, included)."""
        return shortcut_step(method, solver_settings(method, steps)[0], self.max_halvings)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, self_consistency_fraction={self.self_consistency_fraction}, "
            f"max_halvings={self.max_halvings}"
        )


__all__ = ["ShortcutMatcher"]
