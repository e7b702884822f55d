"""ODE solvers behind one entry point: fixed-step Runge-Kutta tableaus, adaptive and adjoint via torchdiffeq."""

from flowforge.ode.fixed import TABLEAUS, ButcherTableau, FixedStepSolve, integrate_fixed
from flowforge.ode.sde import SDE_METHODS, sdeint
from flowforge.ode.solve import ADAPTIVE_METHODS, ODESolverError, odeint

__all__ = [
    "ADAPTIVE_METHODS",
    "SDE_METHODS",
    "TABLEAUS",
    "ButcherTableau",
    "FixedStepSolve",
    "ODESolverError",
    "integrate_fixed",
    "odeint",
    "sdeint",
]
