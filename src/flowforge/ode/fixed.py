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

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from flowforge.errors import ODESolverError
from flowforge.validation import (
    all_finite,
    check_batched,
    check_count,
    check_floating,
    check_real,
    finite_checks_enabled,
)

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


def check_start(x0: object, finite: bool = True) -> Tensor:
    """A solve's initial state: a floating-point tensor of shape (batch, ...), and finite (when
    ``finite`` and the process-wide scan is on)."""
    if not isinstance(x0, Tensor):
        raise TypeError(f"x0 must be a torch.Tensor of shape (batch, ...), got {type(x0).__name__}")
    if x0.dim() < 1:
        raise ValueError("x0 must have a batch dimension: shape (batch, ...)")
    check_floating("x0", x0)
    if finite and finite_checks_enabled() and not all_finite(x0):
        check_batched("x0", x0, x0.shape[1:], finite=True)  # raises, naming the first bad row
    return x0


def _time(name: str, value: float | Tensor) -> float:
    """A shared start or end time as a finite float (the common case, a Python float, costs one test)."""
    if type(value) is float and math.isfinite(value):
        return value
    return check_real(name, value)


def _check_fits(name: str, value: float, dtype: torch.dtype) -> None:
    """Refuse a finite time too large for the state's dtype (it would overflow to inf there)."""
    if not abs(value) <= torch.finfo(dtype).max:
        raise ValueError(f"{name} = {value!r}: beyond the range of {dtype}, the state's dtype")


def checked_end(x1: Tensor, x0: Tensor, solve: str, hint: str) -> Tensor:
    """``x1``, refused when it is NaN or inf (when the process-wide scan is on): as the start's NaN
    when the start holds one, else as a solve that blew up. One scan when all is well."""
    if finite_checks_enabled() and not all_finite(x1):
        check_start(x0)  # a NaN start is the caller's input: named as such
        raise ODESolverError(
            f"{solve} reached NaN or inf from a finite start: the field blows up on this "
            f"interval or the steps are too large for it; try {hint}"
        )
    return x1


def per_sample_time(name: str, value: float | Tensor, x: Tensor) -> Tensor:
    """A time given as a scalar or per sample, as a tensor of shape (batch,) in x's dtype and device;
    NaN and inf are refused (scalars always, tensors when the process-wide scan is on)."""
    if not isinstance(value, Tensor):
        _check_fits(name, check_real(name, value), x.dtype)
    t = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    if t.dim() == 0:
        t = t.expand(x.shape[0])
    elif t.shape != (x.shape[0],):
        raise ValueError(
            f"{name} must be a scalar or a tensor of shape ({x.shape[0]},) (one time per sample), got {tuple(t.shape)}"
        )
    if finite_checks_enabled() and not all_finite(t):
        raise ValueError(f"{name} must hold finite times, got NaN or inf")
    return t


def integrate_fixed(
    f: VelocityField,
    x0: Tensor,
    t0: float | Tensor,
    t1: float | Tensor,
    steps: int,
    tableau: ButcherTableau,
    check_end: bool = True,
) -> Tensor:
    """Integrate ``dx/dt = f(x, t)`` from ``t0`` to ``t1`` in ``steps`` equal steps; return x(t1).

    ``t1 < t0`` integrates backwards. ``f`` receives ``t`` of shape (batch,). A NaN/inf start, or
    an end that went NaN/inf, raises (when the process-wide scan is on and ``check_end``; a caller
    that checks its results in its own terms turns it off).
    """
    steps = check_count("steps", steps)
    x0 = check_start(x0, finite=False)  # scanned with the end, once
    # a time tensor that carries a gradient stays a tensor (per-sample path): a float would cut its graph
    carries_gradient = any(isinstance(t, Tensor) and t.requires_grad for t in (t0, t1))
    if _is_scalar(t0) and _is_scalar(t1) and not carries_gradient:
        start, end = _time("t0", t0), _time("t1", t1)
        for name, value in (("t0", start), ("t1", end), ("t1 - t0", end - start)):
            _check_fits(name, value, x0.dtype)
        x1 = _integrate_shared_time(f, x0, start, end, steps, tableau)
        return checked_end(x1, x0, f"{tableau.name} ({steps} steps)", _FIXED_HINT) if check_end else x1
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
            if n == 0 and len(stages) == 1:
                check_velocity_shape(stages[0], x0)
        update = None
        for b_i, k_i in zip(tableau.b, stages, strict=True):
            if b_i != 0.0:
                update = b_i * k_i if update is None else update + b_i * k_i
        x = x + h_x * update
    return checked_end(x, x0, f"{tableau.name} ({steps} steps)", _FIXED_HINT) if check_end else x


_FIXED_HINT = "an adaptive method or more steps"


def check_velocity_shape(velocity: object, x0: Tensor, name: str = "f") -> None:
    """Refuse a field whose value does not have the state's shape (a (batch, 1) velocity would
    otherwise broadcast over a (batch, 2) state and give a wrong answer silently)."""
    if not isinstance(velocity, Tensor) or velocity.shape != x0.shape:
        shape = tuple(velocity.shape) if isinstance(velocity, Tensor) else type(velocity).__name__
        raise ValueError(
            f"{name} returned {shape} for a state of shape {tuple(x0.shape)}; a velocity has the state's shape"
        )


def _is_scalar(value: float | Tensor) -> bool:
    return not isinstance(value, Tensor) or value.dim() == 0


def _integrate_shared_time(
    f: VelocityField, x0: Tensor, t0: float, t1: float, steps: int, tableau: ButcherTableau
) -> Tensor:
    """The common case of one time span for the whole batch, with the least work per step.

    The step is a Python float, so every stage and update is one fused ``add(x, k, alpha=...)``,
    and the stage times come from a cache (the loop only expands them to the batch). This is
    what makes small-batch sampling (a control loop) cheap: there the solver's own operations,
    not the network, would otherwise dominate.

    A field may also take over the grid: if ``f`` has a method ``solve_on_grid(x0, times, h, steps,
    tableau)`` (``times``: every stage time in order, shape (steps x stages,)) that returns a
    tensor, that is the solve (a compiled :class:`FixedStepSolve`, say); if it returns ``None`` or
    ``f`` has none, and ``f`` has ``on_grid(times) -> at_stage``, that is called once and the
    solver then calls ``at_stage(x, index)`` for stage ``index`` instead of ``f(x, t)``. A network
    conditioned on time computes its time features for all stages in one batched operation this
    way (:meth:`flowforge.nn.VelocityMLP.time_conditioning`).
    """
    h = (t1 - t0) / steps
    times = _stage_times(t0, t1, steps, tableau, x0.dtype, x0.device)
    solve_on_grid = getattr(f, "solve_on_grid", None)
    if solve_on_grid is not None:
        x = solve_on_grid(x0, _stage_grid(t0, t1, steps, tableau, x0.dtype, x0.device), h, steps, tableau)
        if x is not None:
            return x
    batch = x0.shape[0]
    stage_count = len(tableau.c)
    on_grid = getattr(f, "on_grid", None)
    at_stage = on_grid(torch.cat(times)) if on_grid is not None else None
    x = x0
    for n in range(steps):
        stages: list[Tensor] = []
        for i, a_i in enumerate(tableau.a):
            x_i = x
            for a_ij, k_j in zip(a_i, stages, strict=True):
                if a_ij != 0.0:
                    x_i = torch.add(x_i, k_j, alpha=a_ij * h)
            index = n * stage_count + i
            stages.append(at_stage(x_i, index) if at_stage is not None else f(x_i, times[index].expand(batch)))
            if index == 0:
                check_velocity_shape(stages[0], x0)
        for b_i, k_i in zip(tableau.b, stages, strict=True):
            if b_i != 0.0:
                x = torch.add(x, k_i, alpha=b_i * h)
    return x


class FixedStepSolve(torch.nn.Module):
    """The fixed-step loop of :func:`integrate_fixed` around a velocity network, as a module that
    ``torch.jit.trace`` can compile whole: ``forward(x0, stage_times[, context])`` with
    ``stage_times`` of shape (steps x stages, batch), the step ``h`` a constant."""

    def __init__(self, net: torch.nn.Module, tableau: ButcherTableau, steps: int, h: float) -> None:
        super().__init__()
        self.net, self.tableau, self.steps, self.h = net, tableau, steps, h

    def forward(self, x: Tensor, stage_times: Tensor, context: Tensor | None = None) -> Tensor:
        extra = () if context is None else (context,)
        stage_count = len(self.tableau.c)
        for n in range(self.steps):
            stages: list[Tensor] = []
            for i, a_i in enumerate(self.tableau.a):
                x_i = x
                for a_ij, k_j in zip(a_i, stages, strict=True):
                    if a_ij != 0.0:
                        x_i = torch.add(x_i, k_j, alpha=a_ij * self.h)
                stages.append(self.net(x_i, stage_times[n * stage_count + i], *extra))
            for b_i, k_i in zip(self.tableau.b, stages, strict=True):
                if b_i != 0.0:
                    x = torch.add(x, k_i, alpha=b_i * self.h)
        return x


@functools.lru_cache(maxsize=64)
def _stage_grid(
    t0: float, t1: float, steps: int, tableau: ButcherTableau, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """Every stage time of a solve in step-major order, shape (steps x stages,) (cached)."""
    with torch.inference_mode(False):  # ordinary tensors: a later solve with gradients reuses them
        return torch.cat(_stage_times(t0, t1, steps, tableau, dtype, device))


@functools.lru_cache(maxsize=64)
def _stage_times(
    t0: float, t1: float, steps: int, tableau: ButcherTableau, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, ...]:
    """Every stage time of a solve, as one-element tensors in step-major order (cached: a control
    loop samples with the same grid every call, and building it costs as much as a small step)."""
    h = (t1 - t0) / steps
    # Ordinary tensors even when the first solve runs under inference mode: the cache outlives it,
    # and a later solve with gradients hands these times to the field, which may save them.
    with torch.inference_mode(False):
        grid = torch.tensor([t0 + h * (n + c) for n in range(steps) for c in tableau.c], dtype=dtype, device=device)
        return tuple(grid.split(1))
