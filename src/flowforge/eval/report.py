"""What ``flowforge eval`` prints: likelihood and sample-quality metrics, in one place.

* ``nll``: mean negative log-likelihood in nats per point (for integer data, of the dequantized
  lower bound, so an upper bound on the discrete NLL);
* ``bits_per_dim``: ``nll / (D log 2)``;
* ``mmd``, ``energy_distance``, ``sliced_w2``: between model samples and held-out data (images flattened).

>>> import torch
>>> metrics = sample_metrics(torch.zeros(50, 2), torch.zeros(50, 2))
>>> format_metrics({"nll": 1.5, **metrics})
'nll 1.5000, mmd 0.0000, energy_distance 0.0000, sliced_w2 0.0000'
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from flowforge.errors import NumericalError
from flowforge.eval.metrics import energy_distance, mmd, sliced_wasserstein
from flowforge.validation import check_count


def likelihood_metrics(log_probs: Tensor, dims: int) -> dict[str, float]:
    """``nll`` (nats) and ``bits_per_dim`` from per-point log-densities ``(n,)`` of ``dims``-dimensional
    points. A log-density of -inf (a point the model gives no mass) makes the NLL inf; NaN is refused."""
    dims = check_count("dims", dims)
    if not isinstance(log_probs, Tensor) or log_probs.dim() != 1 or log_probs.shape[0] == 0:
        shape = tuple(log_probs.shape) if isinstance(log_probs, Tensor) else type(log_probs).__name__
        raise ValueError(f"log_probs must have shape (n,) with n >= 1 (one log-density per point), got {shape}")
    if bool(log_probs.isnan().any()):
        raise NumericalError(
            f"{int(log_probs.isnan().sum())} of {log_probs.shape[0]} log-densities are NaN: the model diverged"
        )
    nll = float(-log_probs.double().mean())
    return {"nll": nll, "bits_per_dim": nll / (dims * math.log(2))}


def sample_metrics(generated: Tensor, reference: Tensor, seed: int = 0) -> dict[str, float]:
    """MMD, energy distance and sliced W2 between ``generated`` and ``reference`` (rows flattened)."""
    for name, value in (("generated", generated), ("reference", reference)):
        if not isinstance(value, Tensor) or value.dim() < 2 or value.shape[0] < 2:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{name} must hold at least 2 samples, shape (n >= 2, ...), got {shape}")
    generated, reference = generated.flatten(1).float(), reference.flatten(1).float()
    if not bool(torch.isfinite(generated).all()):
        bad = int((~torch.isfinite(generated)).any(1).sum())
        raise NumericalError(
            f"{bad} of the model's {generated.shape[0]} samples hold NaN or inf: the model diverged or its "
            "sampler is unstable; no sample metric can be computed"
        )
    return {
        "mmd": mmd(generated, reference),
        "energy_distance": energy_distance(generated, reference),
        "sliced_w2": sliced_wasserstein(generated, reference, generator=torch.Generator().manual_seed(seed)),
    }


def format_metrics(metrics: dict[str, float]) -> str:
    """One line: ``name value, ...``."""
    return ", ".join(f"{name} {value:.4f}" for name, value in metrics.items())


__all__ = ["format_metrics", "likelihood_metrics", "sample_metrics"]
