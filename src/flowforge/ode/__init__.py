"""ODE solvers: fixed-step Runge-Kutta methods as Butcher tableaus, behind one entry point."""

from flowforge.ode.fixed import TABLEAUS, ButcherTableau, integrate_fixed
from flowforge.ode.solve import odeint

__all__ = ["TABLEAUS", "ButcherTableau", "integrate_fixed", "odeint"]
