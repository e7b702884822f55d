r"""Itô SDE solvers with diagonal noise: :math:`dx = f(x, t)\,dt + g(x, t) \odot dW_t`.

* ``"euler_maruyama"``: :math:`x \leftarrow x + f h + g\,\Delta W` (strong order 1/2).
* ``"milstein"``: the derivative-free (Runge-Kutta) Milstein scheme for diagonal noise, strong
  order 1: with the support value :math:`\bar x = x + f h + g\sqrt h`,

  .. math:: x \leftarrow x + f h + g\,\Delta W + \frac{g(\bar x) - g(x)}{2\sqrt h}\,(\Delta W^2 - h).

``f`` and ``g`` are called as ``f(x, t)`` with ``t`` of shape (batch,); ``g`` returns a tensor
broadcastable to ``x`` (per-element or per-sample noise scale). Brownian increments can be
passed in (``noise``), which is how the tests pin a path and measure the order of convergence.

Milstein's order 1 holds for diagonal noise whose scale :math:`g_i` depends on :math:`x_i` alone
(or on no state at all). A scale that couples the state's entries -- a per-sample ``g`` computed
from the whole state, such as ``x.mean(1, keepdim=True)``, is non-commutative noise -- leaves it
at strong order 1/2, no better than Euler-Maruyama at twice the cost.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from flowforge.ode.fixed import check_start, check_velocity_shape, checked_end, per_sample_time
from flowforge.validation import all_finite, check_count, check_floating, finite_checks_enabled

SDE_METHODS = ("euler_maruyama", "milstein")


def sdeint(
    drift: Callable[[Tensor, Tensor], Tensor],
    diffusion: Callable[[Tensor, Tensor], Tensor],
    x0: Tensor,
    t_span: tuple[float | Tensor, float | Tensor],
    steps: int = 100,
    method: str = "euler_maruyama",
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Integrate the Itô SDE from ``t_span[0]`` to ``t_span[1]`` in ``steps`` equal steps; return x at the end.

    Arguments:
        drift: ``f(x, t)``, same shape as ``x``.
        diffusion: ``g(x, t)``, broadcastable to ``x`` (diagonal noise).
        x0: initial state (batch, ...).
        t_span: start and end time, floats or per-sample tensors of shape (batch,); the end may
            precede the start (reverse-time integration, e.g. sampling from data to noise).
        steps: number of steps.
        method: ``"euler_maruyama"`` or ``"milstein"``.
        noise: optional standard-normal draws of shape (steps, *x0.shape); the Brownian increment
            of step n is ``noise[n] * sqrt(|h|)``.
        generator: random generator for the draws when ``noise`` is not given.

    >>> import torch
    >>> x = sdeint(lambda x, t: -x, lambda x, t: 0.1 * torch.ones_like(x), torch.ones(1000, 1), (0.0, 5.0), steps=200)
    >>> abs(float(x.mean())) < 0.05
    True
    """
    if method not in SDE_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(SDE_METHODS)}")
    steps = check_count("steps", steps)
    x0 = check_start(x0)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if noise is not None:
        if not isinstance(noise, Tensor):
            raise TypeError(f"noise must be a torch.Tensor of shape {(steps, *x0.shape)}, got {type(noise).__name__}")
        if noise.shape != (steps, *x0.shape):
            raise ValueError(f"noise must have shape {(steps, *x0.shape)}, got {tuple(noise.shape)}")
        check_floating("noise", noise)
        if finite_checks_enabled() and not all_finite(noise):
            raise ValueError("noise holds NaN or inf; expected finite standard-normal draws")
        noise = noise.to(dtype=x0.dtype, device=x0.device)  # the state's dtype rules, as for every input
    if not isinstance(t_span, tuple | list) or len(t_span) != 2:
        raise ValueError(f"t_span must be (start, end), got {t_span!r}")
    start = per_sample_time("t0", t_span[0], x0)
    h = (per_sample_time("t1", t_span[1], x0) - start) / steps
    h_x = h.reshape(-1, *([1] * (x0.dim() - 1)))
    sqrt_h = h_x.abs().sqrt()
    x = x0
    for n in range(steps):
        t = start + n * h
        if noise is not None:
            draw = noise[n]
        else:  # drawn where the generator lives (a CPU generator for a CUDA state too), then moved
            where = generator.device if generator is not None else x.device
            draw = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=where).to(x.device)
        dw = draw * sqrt_h
        f, g = drift(x, t), diffusion(x, t)
        if n == 0:
            check_velocity_shape(f, x0, "drift")
            _check_diffusion_shape(g, x0)
        step = x + f * h_x
        if method == "milstein":
            support = step + g * sqrt_h
            # A row of zero span has a numerator of exactly 0: the floor keeps 0 / 0 from making NaN.
            denominator = (2 * sqrt_h).clamp_min(torch.finfo(sqrt_h.dtype).tiny)
            correction = (diffusion(support, t) - g) * (dw.square() - h_x.abs()) / denominator
            x = step + g * dw + correction
        else:
            x = step + g * dw
    return checked_end(x, x0, method, "more steps, or check that drift and diffusion are finite here")


def _check_diffusion_shape(g: object, x0: Tensor) -> None:
    """Refuse a diffusion that does not broadcast to the state without changing its shape."""
    try:
        fits = isinstance(g, Tensor) and torch.broadcast_shapes(g.shape, x0.shape) == x0.shape
    except RuntimeError:
        fits = False
    if not fits:
        shape = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
        raise ValueError(
            f"diffusion returned {shape} for a state of shape {tuple(x0.shape)}; diagonal noise is a tensor that "
            "broadcasts to the state (per element, or (batch, 1, ...) per sample)"
        )


__all__ = ["SDE_METHODS", "sdeint"]
