"""Metrics, image-quality measures and plots."""

from flowforge.eval.image_quality import (
    DigitsClassifier,
    conditional_accuracy,
    frechet_classifier_distance,
    frechet_distance,
    train_digits_classifier,
)
from flowforge.eval.metrics import (
    bits_per_dim,
    energy_distance,
    mmd,
    negative_log_likelihood,
    sliced_wasserstein,
    wasserstein,
)
from flowforge.eval.plots import density_grid, plot_class_grid, plot_density_2d

__all__ = [
    "DigitsClassifier",
    "bits_per_dim",
    "conditional_accuracy",
    "density_grid",
    "energy_distance",
    "frechet_classifier_distance",
    "frechet_distance",
    "mmd",
    "negative_log_likelihood",
    "plot_class_grid",
    "plot_density_2d",
    "sliced_wasserstein",
    "train_digits_classifier",
    "wasserstein",
]
