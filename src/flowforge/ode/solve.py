"""``odeint``: the one entry point for integrating ``dx/dt = f(x, t)``."""

from __future__ import annotations

from torch import Tensor

from flowforge.ode.fixed import TABLEAUS, VelocityField, integrate_fixed


def odeint(
    f: VelocityField,
    x0: Tensor,
    t_span: tuple[float | Tensor, float | Tensor],
    method: str = "rk4",
    steps: int = 10,
) -> Tensor:
    """Solve ``dx/dt = f(x, t)`` from ``t_span[0]`` to ``t_span[1]``; return x at the end time.

    Arguments:
        f: the velocity field, called as ``f(x, t)`` with ``t`` of shape (batch,).
        x0: initial state, shape (batch, ...).
        t_span: start and end time, each a float or a tensor of shape (batch,) (per-sample times).
        method: a fixed-step method, one of :data:`~flowforge.ode.TABLEAUS`.
        steps: number of equal steps.

    >>> import torch
    >>> x1 = odeint(lambda x, t: -x, torch.ones(2, 1), (0.0, 1.0), method="rk4", steps=20)
    >>> torch.allclose(x1, torch.full((2, 1), torch.e ** -1), atol=1e-6)
    True
    """
    if method not in TABLEAUS:
        raise ValueError(f"unknown method {method!r}; fixed-step methods: {', '.join(TABLEAUS)}")
    if len(t_span) != 2:
        raise ValueError(f"t_span must be (t0, t1), got {len(t_span)} values")
    return integrate_fixed(f, x0, t_span[0], t_span[1], steps, TABLEAUS[method])
