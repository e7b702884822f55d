r"""Per-episode feature statistics and their aggregation, as LeRobot v3.0 stores them.

Every numeric feature of an episode gets ``min``, ``max``, ``mean``, ``std``, ``count`` and the
quantiles ``q01 q10 q50 q90 q99`` (over frames, per dimension); an image feature gets the same per
colour channel, of pixel values scaled to [0, 1], each of shape (3, 1, 1), over at most
:data:`IMAGE_SAMPLES` evenly spaced frames. A data set's statistics aggregate its episodes' with
counts :math:`n_i` (:math:`N = \sum_i n_i`):

.. math:: \mu = \frac{\sum_i n_i \mu_i}{N}, \qquad
          \sigma^2 = \frac{\sum_i n_i \left(\sigma_i^2 + (\mu_i - \mu)^2\right)}{N},

minimum of minima, maximum of maxima, and each quantile the count-weighted mean of the episodes'
(exact for the mean and standard deviation; an approximation for quantiles, the same one LeRobot
makes, so that statistics merged by either agree).

>>> import numpy as np
>>> a, b = feature_stats(np.array([[0.0], [2.0]])), feature_stats(np.array([[4.0], [6.0], [8.0]]))
>>> merged = aggregate_stats([a, b])
>>> np.allclose(merged["mean"], 4.0), merged["count"], np.allclose(merged["std"], np.std([0.0, 2, 4, 6, 8]))
(True, [5], True)
"""

from __future__ import annotations

from typing import Any

import numpy as np

QUANTILES = {"q01": 0.01, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}
#: Statistics of every feature, in the order LeRobot writes them.
STATISTICS = ("min", "max", "mean", "std", "count", *QUANTILES)
#: Frames of an episode sampled for image statistics.
IMAGE_SAMPLES = 100


def feature_stats(values: np.ndarray) -> dict[str, list]:
    """Statistics of ``values`` (frames, dims) over frames: each a list of ``dims`` numbers, ``count`` ``[frames]``."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        values = values[:, None]
    if values.ndim != 2 or len(values) == 0:
        raise ValueError(f"values must be (frames, dims) with at least one frame, got shape {values.shape}")
    bad = np.argwhere(~np.isfinite(values))
    if len(bad):
        frame, dim = bad[0]
        raise ValueError(f"values hold {values[frame, dim]} at frame {frame}, dimension {dim}: expected finite numbers")
    stats = {
        "min": values.min(0),
        "max": values.max(0),
        "mean": values.mean(0),
        "std": values.std(0),
    }
    stats.update({name: np.quantile(values, q, axis=0) for name, q in QUANTILES.items()})
    return {**{k: v.tolist() for k, v in stats.items()}, "count": [len(values)]}


def image_stats(frames: np.ndarray) -> dict[str, list]:
    """Per-channel statistics of uint8 frames (n, h, w, 3), pixels scaled to [0, 1]; each (3, 1, 1)."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or len(frames) == 0:
        raise ValueError(
            f"frames must be uint8 pixels (n >= 1, h, w, channels), got {frames.dtype} of shape {frames.shape}"
        )
    picked = np.unique(np.linspace(0, len(frames) - 1, min(len(frames), IMAGE_SAMPLES)).round().astype(int))
    pixels = frames[picked].reshape(-1, frames.shape[-1]).astype(np.float64) / 255.0
    flat = feature_stats(pixels)
    shaped = {k: [[[v]] for v in values] for k, values in flat.items() if k != "count"}
    return {**shaped, "count": [len(picked)]}


def aggregate_stats(episodes: list[dict[str, Any]]) -> dict[str, Any]:
    """One feature's statistics over several episodes' (see the module docstring), in their shapes."""
    if not episodes:
        raise ValueError("aggregate_stats needs at least one episode's statistics")
    counts = np.array([float(e["count"][0]) for e in episodes])
    total = counts.sum()
    if not np.isfinite(counts).all() or (counts < 0).any() or total <= 0:
        raise ValueError(f"counts must be >= 0 with a positive total, got {counts.tolist()}")

    def stacked(name: str) -> np.ndarray:
        return np.stack([np.asarray(e[name], dtype=np.float64) for e in episodes])

    weights = (counts / total).reshape(-1, *([1] * (stacked("mean").ndim - 1)))
    means = stacked("mean")
    mean = (weights * means).sum(0)
    variance = (weights * (stacked("std") ** 2 + (means - mean) ** 2)).sum(0)
    merged = {
        "min": stacked("min").min(0),
        "max": stacked("max").max(0),
        "mean": mean,
        "std": np.sqrt(variance),
    }
    merged.update({name: (weights * stacked(name)).sum(0) for name in QUANTILES})
    return {**{k: v.tolist() for k, v in merged.items()}, "count": [int(total)]}


__all__ = ["IMAGE_SAMPLES", "QUANTILES", "STATISTICS", "aggregate_stats", "feature_stats", "image_stats"]
