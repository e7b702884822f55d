r"""Continuous normalizing flows (Neural ODE flows, FFJORD; Chen et al. 2018, Grathwohl et al. 2019).

A velocity field :math:`v(x, t, c)` moves noise at :math:`t = 0` to data at :math:`t = 1`
(the project's time convention). Along a trajectory the log-density obeys the instantaneous
change of variables, :math:`\frac{d}{dt} \log p(x_t) = -\nabla\!\cdot v(x_t, t, c)`, so with the
augmented state :math:`(x, \ell)` and :math:`\dot\ell = \nabla\!\cdot v`:

* ``forward`` (data -> noise) integrates from :math:`t = 1` to :math:`0` starting at
  :math:`\ell = 0`; then :math:`\ell(0) = -\int_0^1 \nabla\!\cdot v\, dt = \log|\det \partial z / \partial x|`.
* ``inverse`` (noise -> data) integrates from 0 to 1 and returns :math:`\ell(1)`, the log-det of
  the inverse map.

With the exact trace this is the log-det of the flow map up to the solver's tolerance; with the
Hutchinson trace it is an unbiased estimate (one probe per solve, as in FFJORD).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flowforge.ode import TABLEAUS, odeint, solver_settings
from flowforge.ode.divergence import ExactDivergence, HutchinsonDivergence
from flowforge.registry import rebuilding, record_arguments
from flowforge.transforms.base import Transform
from flowforge.validation import check_autograd_available, check_count


class _AugmentedField(nn.Module):
    """``(x, l[, E, F]) -> (v, div v[, |v|^2, |dv/dx|_F^2])``: what the solver integrates.

    A Module so the adjoint finds the velocity's parameters; counts its evaluations (``nfe``).
    """

    def __init__(
        self, velocity: nn.Module, context: Tensor | None, divergence, features: int, regularize: bool
    ) -> None:
        super().__init__()
        self.velocity = velocity
        self.context = context
        self.divergence = divergence
        self.features = features
        self.regularize = regularize
        self.nfe = 0

    def forward(self, state: Tensor, t: Tensor) -> Tensor:
        self.nfe += 1
        outer_grad = torch.is_grad_enabled()
        with torch.enable_grad():
            x = state[:, : self.features]
            if not x.requires_grad:
                x = x.detach().requires_grad_(True)
            v = self.velocity(x, t, self.context)
            if self.regularize:
                div, frobenius = self.divergence(v, x, create_graph=outer_grad, frobenius=True)
                parts = [v, div[:, None], v.square().sum(1, keepdim=True), frobenius[:, None]]
            else:
                parts = [v, self.divergence(v, x, create_graph=outer_grad)[:, None]]
        out = torch.cat(parts, dim=1)
        return out if outer_grad else out.detach()


class _CountedVelocity(nn.Module):
    """``x -> v(x, t, c)`` alone (sampling needs no trace); counts its evaluations (``nfe``)."""

    def __init__(self, velocity: nn.Module, context: Tensor | None) -> None:
        super().__init__()
        self.velocity = velocity
        self.context = context
        self.nfe = 0

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        self.nfe += 1
        return self.velocity(x, t, self.context)


class ContinuousFlowTransform(Transform):
    """The flow map of an ODE over ``t`` in [0, 1] as a :class:`Transform` (forward: data -> noise).

    Arguments:
        velocity: ``net(x, t, context) -> v`` with ``t`` of shape (batch,).
        features: size of ``x``.
        context: size of the context (0 for none).
        trace: ``"exact"`` or ``"hutchinson"`` (Rademacher probes).
        method: an adaptive (``"dopri5"``, ...) or fixed-step (``"rk4"``, ...) method.
        steps: steps of a fixed-step method (a positive int; default 20).
        atol, rtol: tolerances of an adaptive method (finite, > 0; default 1e-5).
        adjoint: backpropagate through the adjoint ODE (memory independent of the step count).

    Every argument is checked here, at construction (:mod:`flowforge.validation`), so a bad
    setting fails before any solve; a setting the method would not read (``steps`` of an
    adaptive method, tolerances of a fixed-step one) is refused
    (:func:`~flowforge.ode.solver_settings`), except while a saved model is rebuilt. A batch of
    0 rows maps to 0 rows without a solve.
    """

    def __init__(
        self,
        velocity: nn.Module,
        features: int,
        context: int = 0,
        trace: str = "exact",
        method: str = "dopri5",
        steps: int | None = None,
        atol: float | None = None,
        rtol: float | None = None,
        adjoint: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(velocity, nn.Module):
            raise TypeError(f"velocity must be an nn.Module net(x, t, context) -> v, got {type(velocity).__name__}")
        if trace not in ("exact", "hutchinson"):
            raise ValueError(f"trace must be 'exact' or 'hutchinson', got {trace!r}")
        if rebuilding():  # a model saved before the rule carries all three: keep the ones it reads
            steps, atol, rtol = (steps, None, None) if method in TABLEAUS else (None, atol, rtol)
        steps, atol, rtol = solver_settings(method, steps, atol, rtol, default_steps=20)
        check_count("features", features)
        context = check_count("context (0: no context)", context, low=0)
        if not isinstance(adjoint, bool):
            raise TypeError(f"adjoint must be True or False, got {adjoint!r}")
        if adjoint and method in TABLEAUS:  # odeint refuses it too, but only at the first solve
            raise ValueError(
                f"adjoint = True needs an adaptive method; method {method!r} takes fixed steps and "
                "backpropagates through them directly"
            )
        self.velocity = velocity
        self.features, self.context_features = int(features), int(context)
        self.trace, self.method, self.steps, self.atol, self.rtol = trace, method, steps, atol, rtol
        self.adjoint = adjoint

    def set_solver(
        self, method: str, steps: int | None = None, atol: float | None = None, rtol: float | None = None
    ) -> None:
        """Solve with another method from now on (training with a fixed-step method and evaluating
        with an adaptive one, say), checked as at construction; a saved model records it."""
        steps, atol, rtol = solver_settings(method, steps, atol, rtol, default_steps=20)
        if self.adjoint and method in TABLEAUS:
            raise ValueError(
                f"method = {method!r}: this transform solves with adjoint = True, which needs an adaptive method"
            )
        self.method, self.steps, self.atol, self.rtol = method, steps, atol, rtol
        record_arguments(self, method=method, steps=steps, atol=atol, rtol=rtol)

    #: number of velocity evaluations of the most recent solve (forward or inverse).
    last_nfe: int = 0
    #: refuse a solve whose end went NaN or inf (:func:`~flowforge.ode.odeint`); a caller that
    #: names the bad rows itself (a policy's chunk likelihood) sets it to False on its instance.
    check_end: bool = True

    def _solve(self, x: Tensor, context: Tensor | None, t0: float, t1: float, regularize: bool = False) -> Tensor:
        """Integrate the augmented state from t0 to t1; returns the final state."""
        check_autograd_available("a continuous flow's log-determinant (the divergence of its velocity)")
        divergence = ExactDivergence() if self.trace == "exact" else HutchinsonDivergence()
        divergence.reset(x)
        field = _AugmentedField(
            self.velocity, context if self.context_features else None, divergence, self.features, regularize
        )
        state = torch.cat([x, x.new_zeros(x.shape[0], 3 if regularize else 1)], dim=1)
        return self._integrate(field, state, t0, t1)

    def _integrate(self, field: _AugmentedField | _CountedVelocity, state: Tensor, t0: float, t1: float) -> Tensor:
        """Solve ``field`` from t0 to t1 with this transform's solver settings; records the NFE."""
        if state.shape[0] == 0:  # nothing to integrate (an adaptive step-size control would underflow)
            self.last_nfe = 0
            return state
        needs_grad = self.adjoint and field.context is not None and field.context.requires_grad
        end = odeint(
            field,
            state,
            (t0, t1),
            self.method,
            self.steps,
            atol=self.atol,
            rtol=self.rtol,
            adjoint=self.adjoint,
            adjoint_tensors=(field.context,) if needs_grad else (),
            check_end=self.check_end,
        )
        self.last_nfe = field.nfe
        return end

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check_input("x", x, context)
        end = self._solve(x, context, 1.0, 0.0)
        return end[:, : self.features], end[:, self.features]

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.check_input("z", z, context)
        end = self._solve(z, context, 0.0, 1.0)
        return end[:, : self.features], end[:, self.features]

    def inverse_without_logdet(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        """Noise to data by integrating ``x`` alone: no trace, and the solver's error control (and
        so its step count) sees only the trajectory, which is what straight (RNODE) paths save."""
        self.check_input("z", z, context)
        field = _CountedVelocity(self.velocity, context if self.context_features else None)
        return self._integrate(field, z, 0.0, 1.0)

    def forward_with_regularization(
        self, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        r"""``forward`` plus the RNODE regularisers of the trajectory (Finlay et al. 2020), per sample:
        kinetic energy :math:`\int_0^1 \|v\|^2 dt` and Jacobian norm
        :math:`\int_0^1 \|\partial v/\partial x\|_F^2 dt` (exact or Hutchinson, like the trace).
        Returns ``(z, logabsdet, kinetic, jacobian)``."""
        self.check_input("x", x, context)
        end = self._solve(x, context, 1.0, 0.0, regularize=True)
        d = self.features
        # Integrated from t = 1 down to 0, the accumulated integrals carry a minus sign.
        return end[:, :d], end[:, d], -end[:, d + 1], -end[:, d + 2]

    def extra_repr(self) -> str:
        return f"features={self.features}, context={self.context_features}, trace={self.trace}, method={self.method}"


__all__ = ["ContinuousFlowTransform"]
