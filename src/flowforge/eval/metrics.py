r"""Likelihood and sample-quality metrics.

* :func:`negative_log_likelihood` (nats per point) and :func:`bits_per_dim`.
* :func:`mmd`: the unbiased estimate of the squared maximum mean discrepancy with a sum of
  Gaussian kernels, :math:`k(x, y) = \sum_b \exp(-\|x - y\|^2 / (2 h_b^2))`.
* :func:`energy_distance`: :math:`2\,\mathbb E\|X - Y\| - \mathbb E\|X - X'\| - \mathbb E\|Y - Y'\|`
  (Székely), zero exactly when the two laws agree.
* :func:`wasserstein`: the exact :math:`W_p` between two empirical measures (POT's network
  simplex); cost :math:`O(n^3)` in the worst case, fine up to a few thousand points.
* :func:`sliced_wasserstein`: :math:`\big(\mathbb E_\theta\, W_p^p(\theta^\top X, \theta^\top Y)\big)^{1/p}`
  over random directions :math:`\theta` on the sphere, each 1-D problem solved by sorting.
* :func:`quality_against_nfe`: any sample metric against the network evaluations spent, for every
  flow-matching family (fixed steps and adaptive) and for a CNF (adaptive).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from flowforge.flows.base import Flow
from flowforge.validation import MAX_SAMPLER_STEPS, check_count, check_real, check_sample_count, is_count


@torch.no_grad()
def negative_log_likelihood(flow: Flow, data: Tensor, context: Tensor | None = None, batch_size: int = 8192) -> float:
    """Mean negative log-likelihood of ``data`` (n, *event) under ``flow``, in nats per point.

    Evaluated in chunks of ``batch_size`` so that large test sets fit in memory. ``data`` (and
    ``context``, one row per data row) must be finite; a non-finite value raises ``ValueError``.
    """
    _check_finite("data", _as_samples("data", data, min_rows=1, flat=False))
    if context is not None:
        _check_finite("context", _as_samples("context", context, min_rows=1, flat=False))
        if context.shape[0] != data.shape[0]:
            raise ValueError(
                f"context must have one row per data row: expected shape ({data.shape[0]}, ...), "
                f"got {tuple(context.shape)}"
            )
    if not (_is_integer(batch_size) and batch_size >= 1):
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    parameter = next(flow.parameters(), None)
    device, dtype = (parameter.device, parameter.dtype) if parameter is not None else (data.device, data.dtype)
    total = 0.0
    for start in range(0, data.shape[0], batch_size):
        chunk = data[start : start + batch_size].to(device, dtype)
        ctx = None if context is None else context[start : start + batch_size].to(device, dtype)
        total += float(flow.log_prob(chunk, ctx).double().sum())
    return -total / data.shape[0]


def bits_per_dim(nll_nats: float, dims: int) -> float:
    """Convert a per-point negative log-likelihood in nats to bits per dimension.

    >>> round(bits_per_dim(64 * math.log(2), 64), 6)
    1.0
    """
    dims = check_count("dims", dims)
    return check_real("nll_nats", nll_nats) / (dims * math.log(2))


def _as_samples(name: str, value: object, min_rows: int, flat: bool = True) -> Tensor:
    """``value`` checked to be a real tensor of at least ``min_rows`` rows: (n, d) with d >= 1 when ``flat``."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (n, d), got {type(value).__name__}")
    if value.dtype == torch.bool or value.is_complex():
        raise TypeError(f"{name} must hold real numbers, got dtype {value.dtype}")
    expected = f"(n, d) with n >= {min_rows} and d >= 1" if flat else f"(n, ...) with n >= {min_rows}"
    if (flat and value.dim() != 2) or value.dim() < 1 or value.shape[0] < min_rows or (flat and value.shape[1] < 1):
        raise ValueError(f"{name} must have shape {expected}, got {tuple(value.shape)}")
    return value


def _check_finite(name: str, value: Tensor) -> None:
    finite = torch.isfinite(value)
    if not bool(finite.all()):
        index = tuple(int(i) for i in (~finite).nonzero()[0])
        raise ValueError(
            f"{name} must be finite: {name}[{', '.join(map(str, index))}] is {float(value[index])} "
            "(NaN/inf samples have no distance)"
        )


def _pair(name_x: str, x: Tensor, name_y: str, y: Tensor, min_rows: int = 1) -> tuple[Tensor, Tensor]:
    """``x`` (n, d) and ``y`` (m, d) checked (shape, finite) and in float64."""
    x, y = _as_samples(name_x, x, min_rows), _as_samples(name_y, y, min_rows)
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"{name_x} and {name_y} must have the same dimension: {name_y} must have shape (m, {x.shape[1]}) "
            f"like {name_x} {tuple(x.shape)}, got {tuple(y.shape)}"
        )
    _check_finite(name_x, x)
    _check_finite(name_y, y)
    # Every metric here is unchanged by a common shift: centring on the pooled mean keeps data far from
    # the origin from losing its digits to the squares of large coordinates.
    x, y = x.double(), y.double()
    centre = torch.cat([x, y]).mean(0)
    x, y = x - centre, y - centre
    largest = float(torch.cat([x, y]).abs().max())
    if largest > math.sqrt(torch.finfo(torch.float64).max / (4 * x.shape[1])):  # the largest squared distance
        raise ValueError(
            "x and y hold numbers too large to score (their squared distances would overflow float64); "
            "rescale both sets alike"
        )
    return x, y


def _distances(x: Tensor, y: Tensor) -> Tensor:
    """Exact pairwise Euclidean distances: cdist's matrix-product shortcut (taken above 25 rows)
    loses the small distances between close points to cancellation."""
    return torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist")


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_p(p: float) -> None:
    if not (_is_real(p) and 1 <= p < math.inf):
        raise ValueError(f"p must be a finite number >= 1, got {p!r}")


def mmd(x: Tensor, y: Tensor, bandwidths: Sequence[float] | None = None) -> float:
    r"""Unbiased squared MMD between samples ``x`` (n, d) and ``y`` (m, d), n, m >= 2, with a sum of Gaussian kernels.

    Arguments:
        bandwidths: kernel widths :math:`h_b`; by default the median pairwise distance of the
            pooled sample times 0.5, 1 and 2.

    The estimate can be slightly negative when the laws agree (it is unbiased).
    """
    x, y = _pair("x", x, "y", y, min_rows=2)  # the unbiased within-sample terms need two points each
    if bandwidths is not None:
        bandwidths = list(bandwidths)
        if not bandwidths or not all(_is_real(h) and 0 < h < math.inf for h in bandwidths):
            raise ValueError(f"bandwidths must be one or more positive finite numbers, got {bandwidths}")
    pooled = torch.cat([x, y])
    distances = _distances(pooled, pooled).square()
    if bandwidths is None:
        median = distances.sqrt().flatten().median().clamp(min=1e-12)
        bandwidths = [0.5 * float(median), float(median), 2.0 * float(median)]
    kernel = sum(torch.exp(-distances / (2 * h * h)) for h in bandwidths)
    n, m = x.shape[0], y.shape[0]
    kxx, kyy, kxy = kernel[:n, :n], kernel[n:, n:], kernel[:n, n:]
    within_x = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    within_y = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(within_x + within_y - 2 * kxy.mean())


def energy_distance(x: Tensor, y: Tensor) -> float:
    r"""Energy distance :math:`2\mathbb E\|X - Y\| - \mathbb E\|X - X'\| - \mathbb E\|Y - Y'\|` (V-statistic).

    >>> import torch
    >>> energy_distance(torch.zeros(3, 1), torch.ones(4, 1))
    2.0
    """
    x, y = _pair("x", x, "y", y)
    return float(2 * _distances(x, y).mean() - _distances(x, x).mean() - _distances(y, y).mean())


def wasserstein(x: Tensor, y: Tensor, p: int = 2, max_iterations: int = 100_000_000) -> float:
    r"""Exact :math:`W_p` between the empirical measures of ``x`` (n, d) and ``y`` (m, d), uniform weights.

    >>> import torch
    >>> round(wasserstein(torch.zeros(4, 2), torch.full((5, 2), 3.0)), 6)  # every point moves by 3 sqrt(2)
    4.242641
    """
    import ot

    _check_p(p)
    if not (_is_integer(max_iterations) and max_iterations >= 1):
        raise ValueError(f"max_iterations must be an integer >= 1, got {max_iterations!r}")
    x, y = _pair("x", x, "y", y)
    cost = _distances(x, y).pow(p).cpu().numpy()
    if not np.isfinite(cost).all():
        raise ValueError(f"x and y are too far apart to score: their distances to the power p = {p} overflow float64")
    a, b = np.full(x.shape[0], 1.0 / x.shape[0]), np.full(y.shape[0], 1.0 / y.shape[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # POT's warnings become the error below
        total, log = ot.emd2(a, b, cost, numItermax=max_iterations, log=True)
    if log.get("result_code") != 1:  # 1: optimal; otherwise the plan is not the optimum
        raise ValueError(
            f"the exact transport problem was not solved ({log.get('warning') or 'no optimum'}); W_p would be wrong: "
            f"raise max_iterations (now {max_iterations})"
        )
    return float(total) ** (1.0 / p)


def sliced_wasserstein(
    x: Tensor, y: Tensor, projections: int = 256, p: int = 2, generator: torch.Generator | None = None
) -> float:
    r"""Sliced :math:`W_p` over ``projections`` random directions; needs ``x`` and ``y`` of equal size.

    Each 1-D problem is solved exactly by sorting (the monotone coupling is optimal on a line).
    """
    _check_p(p)
    if not (_is_integer(projections) and projections >= 1):
        raise ValueError(f"projections must be an integer >= 1, got {projections!r}")
    x, y = _pair("x", x, "y", y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"sliced_wasserstein needs equal sample sizes: y must have shape ({x.shape[0]}, {x.shape[1]}) "
            f"like x, got {tuple(y.shape)}"
        )
    directions = torch.randn(x.shape[1], projections, generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=0, keepdim=True)
    projected_x = (x @ directions.to(x.device)).sort(0).values
    projected_y = (y @ directions.to(y.device)).sort(0).values
    result = float((projected_x - projected_y).abs().pow(p).mean()) ** (1.0 / p)
    if not math.isfinite(result):
        raise ValueError(f"x and y are too far apart to score: their distances to the power p = {p} overflow float64")
    return result


@dataclass(frozen=True)
class NFEPoint:
    """One point of a quality-against-NFE curve: how it was sampled, the evaluations it took, the metric."""

    label: str
    nfe: int
    value: float


def quality_against_nfe(
    model: torch.nn.Module,
    metric: Callable[[Tensor], float],
    n: int,
    *,
    context: Tensor | None = None,
    steps: Sequence[int] = (1, 2, 4, 8, 16),
    adaptive: str | None = "dopri5",
    seed: int = 0,
) -> list[NFEPoint]:
    """``metric(samples)`` of ``n`` samples drawn at each number of ``steps`` and adaptively.

    Every flow-matching family samples through ``sample(n, context, steps=k)`` (Euler: a
    shortcut model is told its step, MeanFlow its span, a consistency model steps its own
    way); the NFE is what the model reports (``last_nfe``). The adaptive point integrates the
    model's instantaneous field with ``adaptive`` (a consistency model has none and skips it). A
    model without fixed steps (a :class:`~flowforge.flows.CNF`) gives its one adaptive point,
    sampled with the method it was built with. Each point draws with the same ``seed``.
    ``steps``, ``adaptive`` and ``seed`` are checked before the first point is drawn; a metric
    value that is not finite stops the curve with a ``FloatingPointError`` naming the point.
    """
    from flowforge.config import check_seed
    from flowforge.matching import ConsistencyMatcher, FlowMatcher  # models sit below eval
    from flowforge.ode import ADAPTIVE_METHODS

    n = check_sample_count(n)
    if isinstance(steps, str | bytes) or not isinstance(steps, Sequence):
        raise ValueError(f"steps must be a list of step counts, e.g. (1, 2, 4, 8, 16), got {steps!r}")
    if not all(is_count(k, high=MAX_SAMPLER_STEPS) for k in steps):
        raise ValueError(f"steps must hold ints in 1..{MAX_SAMPLER_STEPS}, got {list(steps)!r}")
    steps = [int(k) for k in steps]
    if not steps and adaptive is None:
        raise ValueError("steps is empty and adaptive is None: there is no point to measure")
    if adaptive is not None and adaptive not in ADAPTIVE_METHODS:
        raise ValueError(f"adaptive = {adaptive!r} is not one of {', '.join(ADAPTIVE_METHODS)} (or None)")
    check_seed("seed", seed)
    points = []

    def measure(label: str, draw: Callable[[], Tensor]) -> None:
        torch.manual_seed(seed)
        samples = draw()
        value = metric(samples)
        if isinstance(value, Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"metric must return a number, got {value!r} ({type(value).__name__}) at {label}")
        value = float(value)
        if not math.isfinite(value):
            raise FloatingPointError(f"metric gave {value} for the samples at {label}: expected a finite number")
        points.append(NFEPoint(label, int(model.last_nfe), value))

    if isinstance(model, FlowMatcher):
        for k in steps:
            measure(f"{k} step{'s' if k > 1 else ''}", lambda k=k: model.sample(n, context, steps=k))
        if adaptive is not None and not isinstance(model, ConsistencyMatcher):
            measure(adaptive, lambda: model.sample(n, context, method=adaptive))
    elif hasattr(model, "last_nfe") and hasattr(model, "sample"):
        measure("adaptive", lambda: model.sample(n, context))
    else:
        raise TypeError(
            f"{type(model).__name__} reports no NFE: pass a flow-matching model (FlowMatcher and its "
            "few-step families) or a CNF"
        )
    return points


__all__ = [
    "NFEPoint",
    "bits_per_dim",
    "energy_distance",
    "mmd",
    "negative_log_likelihood",
    "quality_against_nfe",
    "sliced_wasserstein",
    "wasserstein",
]
