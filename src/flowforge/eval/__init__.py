"""Metrics and plots."""

from flowforge.eval.metrics import (
    bits_per_dim,
    energy_distance,
    mmd,
    negative_log_likelihood,
    sliced_wasserstein,
    wasserstein,
)
from flowforge.eval.plots import density_grid, plot_density_2d

__all__ = [
    "bits_per_dim",
    "density_grid",
    "energy_distance",
    "mmd",
    "negative_log_likelihood",
    "plot_density_2d",
    "sliced_wasserstein",
    "wasserstein",
]
