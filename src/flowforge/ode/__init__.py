"""ODE solvers behind one entry point: fixed-step Runge-Kutta tableaus, adaptive and adjoint via torchdiffeq."""

from flowforge.ode.fixed import TABLEAUS, ButcherTableau, FixedStepSolve, integrate_fixed
from flowforge.ode.sde import SDE_METHODS, sdeint
from flowforge.ode.solve import ADAPTIVE_METHODS, DEFAULT_TOLERANCE, ODESolverError, odeint, solver_settings

__all__ = [
    "ADAPTIVE_METHODS",
    "DEFAULT_TOLERANCE",
    "SDE_METHODS",
    "TABLEAUS",
    "ButcherTableau",
    "FixedStepSolve",
    "ODESolverError",
    "integrate_fixed",
    "odeint",
    "sdeint",
    "solver_settings",
]
