r"""Reflow (rectified flow; Liu et al. 2023) and the straightness of a flow.

A trained flow defines a deterministic coupling of noise and data: :math:`x_1 = \Phi(x_0)`, the
ODE solution from :math:`x_0`. Training a new flow on these pairs (``loss(x1, x0=x0)``) gives a
flow whose trajectories are straighter, because paths of the old flow no longer cross; a
straight flow is integrated exactly by one Euler step. Reflow is:

>>> import torch
>>> from flowforge.matching import FlowMatcher
>>> from flowforge.nn import VelocityMLP
>>> teacher = FlowMatcher(VelocityMLP(2, hidden=(16,)))
>>> x0, x1 = reflow_pairs(teacher, 64, steps=4)
>>> student = FlowMatcher(VelocityMLP(2, hidden=(16,)))
>>> loss = student.loss(x1, x0=x0)  # train the student on the teacher's pairs

**Straightness** (Liu et al. 2023, eq. 4) measures how far the velocity strays from the straight
displacement along the flow's own trajectories:

.. math:: S = \int_0^1 \mathbb E\, \big\| (Z_1 - Z_0) - v(Z_t, t) \big\|^2 \, dt,

zero exactly when every trajectory is a straight line traversed at constant speed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowforge.matching.functional import integrate
from flowforge.matching.matcher import FlowMatcher
from flowforge.ode import solver_settings
from flowforge.validation import check_bool, check_count, check_sample_count


def _checked_draws(matcher: FlowMatcher, n: object, context: Tensor | None, row: str) -> tuple[int, Tensor | None]:
    """``n`` draws and their context (one row per draw, checked and cast as the samplers check it)."""
    if not isinstance(matcher, FlowMatcher):
        raise TypeError(f"matcher must be a FlowMatcher, got {type(matcher).__name__}")
    n = check_sample_count(n)
    context = matcher._check_context(context)
    if context is not None and context.shape[0] != n:
        raise ValueError(
            f"context must have one row per {row}: shape ({n}, {matcher.context_features}), got {tuple(context.shape)}"
        )
    return n, context


@torch.no_grad()
def reflow_pairs(
    matcher: FlowMatcher,
    n: int,
    context: Tensor | None = None,
    steps: int | None = None,
    method: str = "rk4",
    batch_size: int = 4096,
    guidance_scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Noise-data pairs ``(x0, x1)`` coupled by ``matcher``'s ODE, each (n, *event).

    Arguments:
        matcher: the trained flow.
        n: number of pairs.
        context: (n, context): one condition per pair, for a conditional model.
        steps, method: the solver for the pairs (accurate pairs make a better student): 100 steps
            of ``method`` by default; an adaptive method takes no ``steps``.
        batch_size: pairs solved at once.
        guidance_scale: classifier-free guidance weight of the teacher.
    """
    n, context = _checked_draws(matcher, n, context, "pair")
    batch_size = check_count("batch_size", batch_size)
    steps = solver_settings(method, steps, default_steps=100)[0]
    guidance_scale = matcher._check_guidance(guidance_scale, context)
    noise = matcher.base.sample(n)
    data = torch.empty_like(noise)
    for start in range(0, n, batch_size):
        rows = slice(start, start + batch_size)
        rows_context = None if context is None else context[rows]
        field = matcher.sampling_field(rows_context, guidance_scale, method, steps)
        data[rows] = integrate(field, noise[rows], method=method, steps=steps).x
    return noise, data


@torch.no_grad()
def straightness(
    matcher: FlowMatcher,
    n: int = 2048,
    context: Tensor | None = None,
    steps: int = 100,
    normalized: bool = False,
) -> float:
    r"""The straightness :math:`S` of ``matcher``'s flow, estimated on ``n`` Euler trajectories of ``steps`` steps.

    With ``normalized=True`` it is divided by :math:`\mathbb E\|Z_1 - Z_0\|^2` (scale-free; 0 is straight).
    ``context`` (n, context) gives one condition per trajectory.

    >>> import torch
    >>> from flowforge.matching import FlowMatcher
    >>> from flowforge.nn import VelocityMLP
    >>> straightness(FlowMatcher(VelocityMLP(2, hidden=(8,))), n=16, steps=8) >= 0
    True
    """
    n, context = _checked_draws(matcher, n, context, "trajectory")
    steps = check_count("steps", steps)
    normalized = check_bool("normalized", normalized)
    field = matcher.sampling_field(context, None, "euler", steps)
    x = start = matcher.base.sample(n)
    h = 1.0 / steps
    velocities = []
    for k in range(steps):
        t = torch.full((n,), k * h, dtype=x.dtype, device=x.device)
        v = field(x, t)
        velocities.append(v)
        x = x + h * v
    displacement = x - start
    deviation = torch.stack([(displacement - v).flatten(1).square().sum(1).mean() for v in velocities]).mean()
    if normalized:
        deviation = deviation / displacement.flatten(1).square().sum(1).mean()
    return float(deviation)


__all__ = ["reflow_pairs", "straightness"]
