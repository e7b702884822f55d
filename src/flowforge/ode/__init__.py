"""ODE solvers behind one entry point: fixed-step Runge-Kutta tableaus, adaptive and adjoint via torchdiffeq."""

from flowforge.ode.fixed import TABLEAUS, ButcherTableau, integrate_fixed
from flowforge.ode.sde import SDE_METHODS, sdeint
from flowforge.ode.solve import ADAPTIVE_METHODS, ODESolverError, odeint

__all__ = [
    "ADAPTIVE_METHODS",
    "SDE_METHODS",
    "TABLEAUS",
    "ButcherTableau",
    "ODESolverError",
    "integrate_fixed",
    "odeint",
    "sdeint",
]
