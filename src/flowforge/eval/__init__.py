"""Metrics and plots."""

from flowforge.eval.metrics import negative_log_likelihood
from flowforge.eval.plots import density_grid, plot_density_2d

__all__ = ["density_grid", "negative_log_likelihood", "plot_density_2d"]
