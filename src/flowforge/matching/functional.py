r"""Stateless flow-matching primitives: the one loss and the one integrator every user calls.

:class:`~flowforge.matching.FlowMatcher`, :class:`~flowforge.matching.ShortcutMatcher` and the
flow-matching policy heads train and sample through these two functions; nobody re-implements them.

**Loss.** For a path (:mod:`flowforge.matching.paths`) with :math:`x_t = \alpha_t x_1 + \sigma_t x_0`
and target velocity :math:`u_t`,

.. math:: \mathcal L = \frac{\sum_i w_i\, m_i\, \big(v(x_t, t)_i - u_{t,i}\big)^2}{\sum_i w_i\, m_i},

over every element :math:`i` of the batch, with an optional mask :math:`m` (``True``: counted; e.g.
the steps of an action chunk past an episode's end are ``False``) and weights :math:`w`, both of
any leading shape of the data (``(batch,)`` or ``(batch, steps)``) and broadcast over the rest.

**Integration.** :func:`integrate` solves :math:`dx/dt = f(x, t)` from noise to data with any
flowforge solver and returns the end state together with the number of field evaluations (NFE):
``steps`` times the method's stages for a fixed-step method (no counting wrapper, so a field's fast
fixed-grid path is kept), counted for an adaptive one.

>>> import torch
>>> from flowforge.matching import LinearPath
>>> x0, x1, t = torch.zeros(4, 2), torch.ones(4, 2), torch.full((4,), 0.5)
>>> float(flow_matching_loss(lambda x, t: torch.ones_like(x), x0, x1, t, LinearPath()))
0.0
>>> result = integrate(lambda x, t: torch.ones_like(x), torch.zeros(3, 2), method="midpoint", steps=4)
>>> result.x[0].tolist(), result.nfe
([1.0, 1.0], 8)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from flowforge.matching.paths import AffinePath
from flowforge.ode import ADAPTIVE_METHODS, TABLEAUS, odeint
from flowforge.validation import check_choice


@dataclass(frozen=True)
class Integration:
    """The result of :func:`integrate`: the end state ``x`` and the field evaluations ``nfe``."""

    x: Tensor
    nfe: int


def _broadcast(values: Tensor, like: Tensor, name: str) -> Tensor:
    if values.shape != like.shape[: values.dim()]:
        raise ValueError(
            f"{name} must have a leading shape of the data's {tuple(like.shape)}, got {tuple(values.shape)}"
        )
    return values.reshape(*values.shape, *([1] * (like.dim() - values.dim()))).expand_as(like)


def flow_matching_loss(
    velocity: Callable[[Tensor, Tensor], Tensor],
    x0: Tensor,
    x1: Tensor,
    t: Tensor,
    path: AffinePath,
    *,
    mask: Tensor | None = None,
    weights: Tensor | None = None,
) -> Tensor:
    """The conditional flow-matching loss (see the module docstring), a scalar.

    Arguments:
        velocity: ``v(x_t, t)`` with ``t`` of shape (batch,) (bind the context and cache beforehand).
        x0, x1: noise and data, paired row by row (batch, ...).
        t: times (batch,).
        path: the probability path that builds ``x_t`` and the target velocity.
        mask: which elements count (bool, a leading shape of the data); ``None``: all.
        weights: per-element weights (a leading shape of the data); ``None``: 1.
    """
    x_t, target = path.sample(x0, x1, t)
    return masked_mean((velocity(x_t, t) - target).square(), mask, weights)


def masked_mean(values: Tensor, mask: Tensor | None = None, weights: Tensor | None = None) -> Tensor:
    r""":math:`\sum_i w_i m_i v_i / \sum_i w_i m_i` over every element (0 when nothing is counted).

    ``mask`` (bool, ``True``: counted) and ``weights`` have a leading shape of ``values`` and are
    broadcast over the rest; ``None`` counts everything with weight 1.
    """
    if mask is None and weights is None:
        return values.mean()
    scale = values.new_ones(())
    if weights is not None:
        scale = _broadcast(weights.to(values.dtype), values, "weights")
    if mask is not None:
        scale = scale * _broadcast(mask, values, "mask").to(values.dtype)
    scale = scale.expand_as(values)
    return (values * scale).sum() / scale.sum().clamp_min(1.0)


def integrate(
    field: Callable[[Tensor, Tensor], Tensor],
    x0: Tensor,
    *,
    method: str = "euler",
    steps: int = 10,
    t_span: tuple[float, float] = (0.0, 1.0),
    atol: float = 1e-5,
    rtol: float = 1e-5,
) -> Integration:
    """Integrate ``dx/dt = field(x, t)`` over ``t_span`` with any flowforge solver; the end state and its NFE."""
    if method in TABLEAUS:
        x = odeint(field, x0, t_span, method, steps)
        return Integration(x, steps * len(TABLEAUS[method].b))
    check_choice("method", method, (*TABLEAUS, *ADAPTIVE_METHODS))
    calls = 0

    def counted(x: Tensor, t: Tensor) -> Tensor:
        nonlocal calls
        calls += 1
        return field(x, t)

    x = odeint(counted, x0, t_span, method, steps, atol=atol, rtol=rtol)
    return Integration(x, calls)


__all__ = ["Integration", "flow_matching_loss", "integrate", "masked_mean"]
