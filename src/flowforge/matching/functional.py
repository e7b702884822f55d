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

import torch
from torch import Tensor

from flowforge.matching.paths import AffinePath, check_sigma_floor
from flowforge.ode import TABLEAUS, odeint, solver_settings
from flowforge.ode.fixed import check_velocity_shape
from flowforge.validation import check_unit_times, finite_checks_enabled


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


def _checked_path_sample(x0: Tensor, x1: Tensor, t: Tensor, path: AffinePath) -> tuple[Tensor, Tensor]:
    """The loss functions' checks of their arguments, then :math:`x_t` and :math:`u_t` on ``path``."""
    if not isinstance(path, AffinePath):
        raise TypeError(f"path must be an AffinePath (LinearPath, ...), got {type(path).__name__}")
    if x0.shape != x1.shape or x1.dim() == 0 or x1.shape[0] == 0:
        raise ValueError(
            f"x0 and x1 must be paired rows of one shape (batch >= 1, ...), got {tuple(x0.shape)} and {tuple(x1.shape)}"
        )
    if not t.is_floating_point():
        raise TypeError(f"t must hold floating-point times, got {t.dtype}")
    if t.dim() == 0 or t.shape != x1.shape[: t.dim()]:
        raise ValueError(f"t must have a leading shape of the data's {tuple(x1.shape)}, got {tuple(t.shape)}")
    check_unit_times("t", t)
    return path.sample(x0, x1, t)


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
        t: times (batch,), or of a leading shape of the data for per-element times (a chunk's
            tokens at times of their own, as training-time real-time chunking does).
        path: the probability path that builds ``x_t`` and the target velocity.
        mask: which elements count (bool, a leading shape of the data); ``None``: all.
        weights: per-element weights (a leading shape of the data); ``None``: 1.
    """
    x_t, target = _checked_path_sample(x0, x1, t, path)
    prediction = velocity(x_t, t)
    check_velocity_shape(prediction, target, "velocity")
    return masked_mean((prediction - target).square(), mask, weights)


def data_prediction_loss(
    model: Callable[[Tensor, Tensor], Tensor],
    x0: Tensor,
    x1: Tensor,
    t: Tensor,
    path: AffinePath,
    *,
    mask: Tensor | None = None,
    weights: Tensor | None = None,
    sigma_floor: float = 0.05,
) -> Tensor:
    r"""The flow-matching loss of a model that predicts the data :math:`\hat x_1(x_t, t)` instead of
    the velocity (x-prediction), a scalar.

    The velocity it implies, :math:`\hat v = \dot\alpha_t \hat x_1 + \dot\sigma_t (x_t -
    \alpha_t \hat x_1) / \sigma_t` (:meth:`AffinePath.data_to_velocity`), misses the target by
    :math:`\hat v - u_t = \frac{\dot\alpha_t \sigma_t - \dot\sigma_t \alpha_t}{\sigma_t}
    (\hat x_1 - x_1)`, so the loss is :func:`flow_matching_loss` of :math:`\hat v` written in the
    data's units, :math:`\big(\frac{\dot\alpha_t \sigma_t - \dot\sigma_t \alpha_t}
    {\max(\sigma_t, s)} (\hat x_1 - x_1)\big)^2` with :math:`s` = ``sigma_floor``. On the linear
    path the factor is :math:`1 / \max(1 - t, s)`: the velocity loss wherever
    :math:`\sigma_t \ge s`, and bounded by :math:`1 / s` near the data, where it would grow
    without end. Unlike a velocity loss with a floored :math:`\sigma_t`, every time keeps its
    optimum at :math:`E[x_1 \mid x_t]`. ``sigma_floor`` is in (0, 1): at 0 a time of 1 (a
    training-time RTC prefix, masked or not) would make the loss infinite.
    Arguments as :func:`flow_matching_loss`; ``model(x_t, t)`` returns :math:`\hat x_1`.
    """
    sigma_floor = check_sigma_floor(sigma_floor, positive=True)
    x_t = _checked_path_sample(x0, x1, t, path)[0]
    alpha, sigma, d_alpha, d_sigma = (_broadcast(c.to(x1.dtype), x1, "t") for c in path.schedule(t))
    prediction = model(x_t, t)
    check_velocity_shape(prediction, x1, "prediction")
    factor = (d_alpha * sigma - d_sigma * alpha) / sigma.clamp_min(sigma_floor)
    return masked_mean((factor * (prediction - x1)).square(), mask, weights)


def shortcut_loss(
    velocity: Callable[[Tensor, Tensor, Tensor], Tensor],
    x0: Tensor,
    x1: Tensor,
    path: AffinePath,
    *,
    max_halvings: int,
    mask: Tensor | None = None,
) -> Tensor:
    r"""The self-consistency loss of shortcut models (Frans et al. 2025), a scalar.

    ``velocity(x, t, d)`` is the average velocity over a step of size ``d`` (``d = 0``: the
    instantaneous one). Each row draws a step :math:`d = 2^{-j}`, :math:`j \in \{1..M\}`
    (``max_halvings`` M), and a time on the grid of the step :math:`2d`,
    :math:`t \in \{0, 2d, \dots, 1 - 2d\}`; then two steps of size :math:`d` (held fixed, no
    gradient) are the target of one step of size :math:`2d`:

    .. math:: s(x_t, t, 2d) \approx \tfrac12\big[s(x_t, t, d) + s(x_t + d\, s(x_t, t, d), t + d, d)\big].

    The smallest step is queried as :math:`d = 0`, the flow-matching velocity, which anchors the
    recursion. ``mask`` as in :func:`masked_mean`.
    """
    rows = x1.shape[0]
    exponent = torch.randint(1, max_halvings + 1, (rows,), device=x1.device)
    d = torch.pow(2.0, -exponent.to(x1.dtype))  # the small step; the trained one is 2d
    slots = torch.pow(2.0, (exponent - 1).to(x1.dtype))  # 1 / (2d) steps of size 2d fit in [0, 1]
    t = torch.floor(torch.rand(rows, device=x1.device, dtype=x1.dtype) * slots) * 2 * d
    x_t, _ = path.sample(x0, x1, t)
    d_query = torch.where(exponent == max_halvings, torch.zeros_like(d), d)
    with torch.no_grad():
        first = velocity(x_t, t, d_query)
        check_velocity_shape(first, x_t, "velocity")
        x_mid = x_t + d.reshape(-1, *([1] * (x_t.dim() - 1))) * first
        target = 0.5 * (first + velocity(x_mid, t + d, d_query))
    return masked_mean((velocity(x_t, t, 2 * d) - target).square(), mask)


def shortcut_step(method: str, steps: int | None, max_halvings: int) -> float:
    """The step a shortcut model is told when sampling with ``steps`` steps of ``method``: ``1/steps``
    for Euler with a trained step (a power of two from 1 down to ``2**(1 - max_halvings)``), otherwise
    0, the instantaneous velocity (an adaptive method, whose ``steps`` is None, included)."""
    if steps is None:
        return 0.0
    trained = steps & (steps - 1) == 0 and steps < 2**max_halvings
    return 1.0 / steps if method == "euler" and trained else 0.0


def mean_flow_loss(
    average_velocity: Callable[[Tensor, Tensor, Tensor], Tensor],
    x0: Tensor,
    x1: Tensor,
    start: Tensor,
    span: Tensor,
    path: AffinePath,
    *,
    mask: Tensor | None = None,
    adaptive_power: float = 0.0,
    adaptive_offset: float = 1e-3,
    guided_velocity: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> Tensor:
    r"""The MeanFlow loss (Geng et al. 2025) in flowforge's time convention (noise at 0, data at 1), a scalar.

    ``average_velocity(x, s, h)`` is :math:`u(x_s, s, h) = \frac1h \int_s^{s+h} v(x_\tau, \tau)\,d\tau`,
    so that :math:`x_{s+h} = x_s + h\,u`. Differentiating :math:`h\,u = \int_s^{s+h} v` in
    :math:`s` with the end :math:`s + h` held fixed gives the MeanFlow identity

    .. math:: u(x_s, s, h) = v(x_s, s) + h \frac{d}{ds} u(x_s, s, h), \qquad
              \frac{d}{ds} u = \partial_x u \cdot v + \partial_s u - \partial_h u,

    the total derivative computed as one Jacobian-vector product (``torch.func.jvp``) with tangents
    :math:`(v, 1, -1)`, :math:`v` the path's conditional velocity. The right side is the target,
    held fixed (no gradient). ``start``, ``span`` (batch,); ``span = 0`` rows are flow matching (a
    batch of them alone takes one plain evaluation: no Jacobian-vector product).

    Adaptive weighting (the paper's, ``adaptive_power`` :math:`p > 0`): each row's mean squared error
    :math:`e` is weighted by :math:`(e + c)^{-p}` held fixed, :math:`c` = ``adaptive_offset``, and the
    rows averaged; :math:`p = 1` makes the loss behave like a robust norm of the error, which keeps
    the large early targets of the time derivative from taking over training. ``p = 0``: the plain
    mean of squared errors. ``mask`` as in :func:`masked_mean`.

    ``guided_velocity(x_s, v)``, when given, replaces the conditional velocity :math:`v` in both the
    tangent and the target (MeanFlow's classifier-free guidance, :class:`~flowforge.matching.MeanFlowMatcher`).
    """
    x_s, v = path.sample(x0, x1, start)
    if guided_velocity is not None:
        v = guided_velocity(x_s, v).detach()
    if bool((span == 0).all()):  # flow matching alone: the derivative is multiplied by 0, so skip it
        prediction, derivative = average_velocity(x_s, start, span), None
    else:
        prediction, derivative = torch.func.jvp(
            average_velocity, (x_s, start, span), (v, torch.ones_like(start), -torch.ones_like(span))
        )
    check_velocity_shape(prediction, v, "average_velocity")
    target = v if derivative is None else v + span.reshape(-1, *([1] * (v.dim() - 1))) * derivative
    target = target.detach()
    squared = (prediction - target).square()
    if adaptive_power == 0:
        return masked_mean(squared, mask)
    counted = squared.new_ones(()) if mask is None else _broadcast(mask, squared, "mask").to(squared.dtype)
    counted = counted.expand_as(squared).flatten(1)
    row_error = (squared.flatten(1) * counted).sum(1) / counted.sum(1).clamp_min(1.0)
    weights = (row_error.detach() + adaptive_offset).pow(-adaptive_power)
    rows = (counted.sum(1) > 0).to(squared.dtype)
    return (weights * row_error * rows).sum() / rows.sum().clamp_min(1.0)


def masked_mean(values: Tensor, mask: Tensor | None = None, weights: Tensor | None = None) -> Tensor:
    r""":math:`\sum_i w_i m_i v_i / \sum_i w_i m_i` over every element (0 when nothing is counted).

    ``mask`` (bool, ``True``: counted) and ``weights`` have a leading shape of ``values`` and are
    broadcast over the rest; ``None`` counts everything with weight 1.
    """
    if mask is None and weights is None:
        return values.mean()
    scale = values.new_ones(())
    if weights is not None:
        if finite_checks_enabled() and not bool((torch.isfinite(weights) & (weights >= 0)).all()):
            raise ValueError("weights must be finite numbers >= 0 (NaN, inf or a negative weight found)")
        scale = _broadcast(weights.to(values.dtype), values, "weights")
    if mask is not None:
        scale = scale * _broadcast(mask, values, "mask").to(values.dtype)
    scale = scale.expand_as(values)
    # Nothing counted: the numerator is 0 too, and the floor turns 0/0 into 0 (weights below 1 stay exact).
    return (values * scale).sum() / scale.sum().clamp_min(torch.finfo(values.dtype).tiny)


def integrate(
    field: Callable[[Tensor, Tensor], Tensor],
    x0: Tensor,
    *,
    method: str = "euler",
    steps: int | None = None,
    t_span: tuple[float, float] = (0.0, 1.0),
    atol: float | None = None,
    rtol: float | None = None,
    check_end: bool = True,
) -> Integration:
    """Integrate ``dx/dt = field(x, t)`` over ``t_span`` with any flowforge solver; the end state and
    its NFE (``steps``, ``atol``, ``rtol`` and ``check_end``: as :func:`~flowforge.ode.odeint`,
    which refuses a setting the method does not read)."""
    steps, atol, rtol = solver_settings(method, steps, atol, rtol)
    if method in TABLEAUS:
        x = odeint(field, x0, t_span, method, steps, check_end=check_end)
        return Integration(x, steps * len(TABLEAUS[method].b))
    calls = 0

    def counted(x: Tensor, t: Tensor) -> Tensor:
        nonlocal calls
        calls += 1
        return field(x, t)

    x = odeint(counted, x0, t_span, method, steps, atol=atol, rtol=rtol, check_end=check_end)
    return Integration(x, calls)


__all__ = [
    "Integration",
    "data_prediction_loss",
    "flow_matching_loss",
    "integrate",
    "masked_mean",
    "mean_flow_loss",
    "shortcut_loss",
    "shortcut_step",
]
