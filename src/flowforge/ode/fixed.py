r"""Fixed-step explicit Runge-Kutta solvers, written as data (Butcher tableaus).

For :math:`\dot x = f(x, t)` and a step :math:`h`, an explicit method with tableau
:math:`(a, b, c)` computes the stages

.. math:: k_i = f\Big(x + h \sum_{j<i} a_{ij} k_j,\ t + c_i h\Big), \qquad
          x \leftarrow x + h \sum_i b_i k_i.

One loop serves every tableau; a new method is a new table, not new code. Each sample may have
its own start and end time (``t0``, ``t1`` of shape (batch,)): its step is
:math:`h = (t_1 - t_0) / \text{steps}`, so all samples take the same number of steps and the
network ``f(x, t)`` is called with a time vector ``t`` of shape (batch,) on every stage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

VelocityField = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit Runge-Kutta method: stage times ``c``, stage weights ``a`` (strictly lower
    triangular, row ``i`` has ``i`` entries) and output weights ``b``; ``order`` is its global order."""

    name: str
    order: int
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]

    def __post_init__(self) -> None:
        stages = len(self.b)
        if len(self.c) != stages or len(self.a) != stages or any(len(row) != i for i, row in enumerate(self.a)):
            raise ValueError(f"tableau {self.name!r} is not an explicit {stages}-stage method")
        if abs(sum(self.b) - 1.0) > 1e-12:
            raise ValueError(f"tableau {self.name!r}: weights b must sum to 1")


TABLEAUS: dict[str, ButcherTableau] = {
    t.name: t
    for t in (
        ButcherTableau("euler", 1, (0.0,), ((),), (1.0,)),
        ButcherTableau("midpoint", 2, (0.0, 0.5), ((), (0.5,)), (0.0, 1.0)),
        ButcherTableau("heun", 2, (0.0, 1.0), ((), (1.0,)), (0.5, 0.5)),
        ButcherTableau(
            "rk4",
            4,
            (0.0, 0.5, 0.5, 1.0),
            ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
            (1 / 6, 1 / 3, 1 / 3, 1 / 6),
        ),
    )
}


def per_sample_time(name: str, value: float | Tensor, x: Tensor) -> Tensor:
    """A time given as a scalar or per sample, as a tensor of shape (batch,) in x's dtype and device."""
    t = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    if t.dim() == 0:
        return t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(
            f"{name} must be a scalar or a tensor of shape ({x.shape[0]},) (one time per sample), got {tuple(t.shape)}"
        )
    return t


def integrate_fixed(
    f: VelocityField,
    x0: Tensor,
    t0: float | Tensor,
    t1: float | Tensor,
    steps: int,
    tableau: ButcherTableau,
) -> Tensor:
    """Integrate ``dx/dt = f(x, t)`` from ``t0`` to ``t1`` in ``steps`` equal steps; return x(t1).

    ``t1 < t0`` integrates backwards. ``f`` receives ``t`` of shape (batch,).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if x0.dim() < 1:
        raise ValueError("x0 must have a batch dimension: shape (batch, ...)")
    start = per_sample_time("t0", t0, x0)
    h = (per_sample_time("t1", t1, x0) - start) / steps
    h_x = h.reshape(-1, *([1] * (x0.dim() - 1)))  # broadcast the step over the event dims
    x = x0
    for n in range(steps):
        t = start + n * h
        stages: list[Tensor] = []
        for c_i, a_i in zip(tableau.c, tableau.a, strict=True):
            x_i = x
            for a_ij, k_j in zip(a_i, stages, strict=True):
                if a_ij != 0.0:
                    x_i = x_i + (a_ij * h_x) * k_j
            stages.append(f(x_i, t + c_i * h))
        update = None
        for b_i, k_i in zip(tableau.b, stages, strict=True):
            if b_i != 0.0:
                update = b_i * k_i if update is None else update + b_i * k_i
        x = x + h_x * update
    return x
