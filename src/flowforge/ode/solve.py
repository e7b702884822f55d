"""``odeint``: the one entry point for integrating ``dx/dt = f(x, t)``.

Fixed-step methods are ours (Butcher tableaus, :mod:`flowforge.ode.fixed`). Adaptive methods and
adjoint backpropagation come from torchdiffeq, wrapped so that the signature stays ours:
``f(x, t)`` with ``t`` of shape (batch,), and per-sample start and end times. Per-sample times
work with one shared adaptive solve through a change of variable: with
:math:`t = t_0 + s (t_1 - t_0)` and :math:`s \\in [0, 1]`,

.. math:: \\frac{dx}{ds} = (t_1 - t_0)\\, f\\big(x,\\ t_0 + s (t_1 - t_0)\\big).

The solver's own time ``s`` has the dtype of ``x0`` (float32 stays float32: no float64 time
tensors on devices without float64).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torchdiffeq
from torch import Tensor, nn

from flowforge.errors import ODESolverError
from flowforge.ode.fixed import (
    TABLEAUS,
    VelocityField,
    check_start,
    check_velocity_shape,
    checked_end,
    integrate_fixed,
    per_sample_time,
)
from flowforge.validation import check_bool, check_choice, check_count, check_real

#: Adaptive-step methods, solved by torchdiffeq.
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
#: ``atol`` and ``rtol`` of an adaptive method when none are given.
DEFAULT_TOLERANCE = 1e-5


def solver_settings(
    method: str,
    steps: int | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    *,
    default_steps: int = 10,
) -> tuple[int | None, float | None, float | None]:
    """Check one solve's settings together and fill in the ones left unset: ``(steps, atol, rtol)``.

    A fixed-step method (:data:`~flowforge.ode.TABLEAUS`) takes ``steps`` equal steps
    (``default_steps`` when ``None``) and no tolerance; an adaptive one (:data:`ADAPTIVE_METHODS`)
    chooses its own steps to meet ``atol`` and ``rtol`` (:data:`DEFAULT_TOLERANCE` when ``None``).
    A setting the method would not read is refused, naming it, rather than dropped: a caller who
    asks for ``steps=100`` of ``dopri5`` would otherwise get a solve of another accuracy than the
    one asked for. The setting that does not apply comes back as ``None``.

    >>> solver_settings("rk4"), solver_settings("dopri5", atol=1e-7)
    ((10, None, None), (None, 1e-07, 1e-05))
    """
    check_choice("method", method, (*TABLEAUS, *ADAPTIVE_METHODS))
    if method in TABLEAUS:
        for name, value in (("atol", atol), ("rtol", rtol)):
            if value is not None:
                raise ValueError(
                    f"{name} = {value!r}: method {method!r} takes equal steps and reads no tolerance; leave it "
                    f"out, or pick an adaptive method ({', '.join(ADAPTIVE_METHODS)})"
                )
        return check_count("steps", default_steps if steps is None else steps), None, None
    if steps is not None:
        raise ValueError(
            f"steps = {steps!r}: method {method!r} chooses its own steps (atol and rtol set its accuracy); "
            f"leave it out, or pick a fixed-step method ({', '.join(TABLEAUS)})"
        )
    atol = check_real("atol", DEFAULT_TOLERANCE if atol is None else atol, positive=True)
    rtol = check_real("rtol", DEFAULT_TOLERANCE if rtol is None else rtol, positive=True)
    return None, atol, rtol


class _UnitIntervalField(nn.Module):
    """``dx/ds`` on s in [0, 1] for per-sample spans; a Module so the adjoint finds f's parameters."""

    def __init__(self, f: VelocityField, start: Tensor, span: Tensor, event_dims: int) -> None:
        super().__init__()
        self.f = f  # registered as a submodule when f is an nn.Module
        self.start, self.span = start, span
        self.span_x = span.reshape(-1, *([1] * event_dims))

    def forward(self, s: Tensor, x: Tensor) -> Tensor:
        velocity = self.f(x, self.start + s * self.span)
        check_velocity_shape(velocity, x)  # a wrong shape would fail inside torchdiffeq, unnamed
        return self.span_x * velocity


class _AdjointSolve(torch.autograd.Function):
    """torchdiffeq's adjoint solve as one autograd node whose backward pass reports a failed solve
    as :class:`~flowforge.errors.ODESolverError`, as the forward pass does (torchdiffeq stops a
    backward solve that runs out of steps with a bare ``AssertionError``). The inner solve is kept
    as a graph of its own and differentiated in :meth:`backward`, as reentrant checkpointing does."""

    @staticmethod
    def forward(
        ctx,
        solve: Callable[[Tensor], Tensor],
        explain: Callable[[str], str],
        inner: tuple[Tensor, ...],
        x0: Tensor,
        *inputs: Tensor,
    ):
        # ``inner[i]`` is what the solve reads in place of ``inputs[i]``: the tensor itself, or a
        # detached leaf standing for it, whose gradient is then handed to ``inputs[i]`` alone.
        with torch.enable_grad():
            start = x0.detach().requires_grad_(x0.requires_grad)
            end = solve(start)
        ctx.start, ctx.end, ctx.inner, ctx.explain = start, end, inner, explain
        return end.detach()

    @staticmethod
    def backward(ctx, grad: Tensor):
        targets = (ctx.start, *ctx.inner)
        wanted = [t for t in targets if t.requires_grad]
        try:
            grads = iter(torch.autograd.grad(ctx.end, wanted, grad, allow_unused=True))
        except AssertionError as error:
            raise ODESolverError(ctx.explain(f"in the adjoint's backward solve: {error}")) from error
        return (None, None, None, *(next(grads) if t.requires_grad else None for t in targets))


def odeint(
    f: VelocityField,
    x0: Tensor,
    t_span: tuple[float | Tensor, float | Tensor],
    method: str = "rk4",
    steps: int | None = None,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    adjoint: bool = False,
    max_steps: int | None = None,
    adjoint_tensors: tuple[Tensor, ...] = (),
    check_end: bool = True,
) -> Tensor:
    """Solve ``dx/dt = f(x, t)`` from ``t_span[0]`` to ``t_span[1]``; return x at the end time.

    Arguments:
        f: the velocity field, called as ``f(x, t)`` with ``t`` of shape (batch,). For
            ``adjoint=True`` it must be an ``nn.Module``: the adjoint differentiates its parameters.
        x0: initial state, shape (batch, ...).
        t_span: start and end time, each a float or a tensor of shape (batch,) (per-sample times).
        method: a fixed-step method (:data:`~flowforge.ode.TABLEAUS`) or an adaptive one
            (:data:`ADAPTIVE_METHODS`).
        steps: number of equal steps of a fixed-step method (default 10).
        atol, rtol: error tolerances of an adaptive method (default 1e-5). A setting the method
            does not read is refused (:func:`solver_settings`).
        adjoint: backpropagate by solving the adjoint ODE (memory independent of the number of
            steps) instead of through the solver's operations (adaptive methods).
        max_steps: give up after this many adaptive steps (default 10,000); refused with a fixed-step
            method, which takes exactly ``steps``.
        adjoint_tensors: tensors other than ``f``'s parameters that ``f`` reads and that need
            gradients (a context from an embedding net, say); the adjoint only differentiates what
            it is told about.
        check_end: refuse an end state that went NaN or inf (when the process-wide scan is on); a
            caller that checks its results in its own terms (a policy naming the observation row)
            turns this off.

    Raises:
        ODESolverError: the adaptive step size underflowed, ``max_steps`` was exceeded, or the
            solution went NaN or inf from a finite start.

    >>> import torch
    >>> x1 = odeint(lambda x, t: -x, torch.ones(2, 1), (0.0, 1.0), method="rk4", steps=20)
    >>> torch.allclose(x1, torch.full((2, 1), torch.e ** -1), atol=1e-6)
    True
    >>> x1 = odeint(lambda x, t: -x, torch.ones(2, 1), (0.0, 1.0), method="dopri5", atol=1e-8, rtol=1e-8)
    >>> torch.allclose(x1, torch.full((2, 1), torch.e ** -1), atol=1e-6)
    True
    """
    if not isinstance(t_span, tuple | list) or len(t_span) != 2:
        hint = " (a tensor of times: pass its two ends, (t[0], t[-1]))" if isinstance(t_span, Tensor) else ""
        raise ValueError(f"t_span must be (t0, t1), got {t_span!r}{hint}")
    check_bool("adjoint", adjoint)
    steps, atol, rtol = solver_settings(method, steps, atol, rtol)
    if method in TABLEAUS:
        if adjoint:
            raise ValueError("adjoint=True needs an adaptive method; fixed-step methods backpropagate directly")
        if max_steps is not None:
            raise ValueError(f"max_steps = {max_steps!r}: {method} takes exactly steps = {steps}; leave max_steps out")
        return integrate_fixed(f, x0, t_span[0], t_span[1], steps, TABLEAUS[method], check_end=check_end)
    if adjoint and not isinstance(f, nn.Module):
        raise ValueError("adjoint=True needs f to be an nn.Module (its parameters are what the adjoint differentiates)")
    x0 = check_start(x0)
    max_steps = 10_000 if max_steps is None else check_count("max_steps", max_steps)
    start = per_sample_time("t0", t_span[0], x0)
    span = per_sample_time("t1", t_span[1], x0) - start
    if x0.shape[0] == 0:  # nothing to solve; torchdiffeq's step-size control would underflow on it
        return x0.clone()
    # Times given as tensors that need gradients reach the field, under the adjoint, as leaves of
    # their own: the adjoint differentiates them (it differentiates only what it is told about),
    # and span = t1 - t0 must not also carry start's gradient a second time.
    timed = adjoint and (start.requires_grad or span.requires_grad)
    times = (start, span) if timed else ()
    if timed:
        start, span = start.detach().requires_grad_(), span.detach().requires_grad_()
    field = _UnitIntervalField(f, start, span, x0.dim() - 1)
    s = torch.tensor([0.0, 1.0], dtype=x0.dtype, device=x0.device)
    options = {"max_num_steps": max_steps}

    def explain(message: str) -> str:
        return (
            f"{method} gave up ({message}): the field is stiff or blows up on this interval, or atol={atol}, "
            f"rtol={rtol} are too tight for max_steps={max_steps}; loosen the tolerances, raise max_steps or "
            "use a fixed-step method"
        )

    try:
        if adjoint:
            adjoint_params = (*f.parameters(), *(t for t in adjoint_tensors if t.requires_grad))
            leaves = (start, span) if times else ()

            def solve(start: Tensor) -> Tensor:
                path = torchdiffeq.odeint_adjoint(
                    field,
                    start,
                    s,
                    rtol=rtol,
                    atol=atol,
                    method=method,
                    options=options,
                    adjoint_params=(*adjoint_params, *leaves),
                )
                return path[-1]

            end = _AdjointSolve.apply(solve, explain, (*adjoint_params, *leaves), x0, *adjoint_params, *times)
        else:
            end = torchdiffeq.odeint(field, x0, s, rtol=rtol, atol=atol, method=method, options=options)[-1]
    except AssertionError as error:  # torchdiffeq reports a failed solve with bare asserts
        message = str(error)
        if "underflow" in message or "max_num_steps" in message:
            raise ODESolverError(explain(message)) from error
        raise
    if not check_end:
        return end
    return checked_end(end, x0, method, "tighter tolerances or a fixed-step method")
