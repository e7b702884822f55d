"""SDE solvers: strong order of convergence on geometric Brownian motion, whose solution is known."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from flowforge.ode import sdeint

MU, SIGMA, T = 0.5, 0.8, 1.0


def _strong_errors(method: str, fine_steps: int = 512, paths: int = 4000) -> list[float]:
    generator = torch.Generator().manual_seed(0)
    fine = torch.randn(fine_steps, paths, 1, generator=generator, dtype=torch.float64)
    x0 = torch.ones(paths, 1, dtype=torch.float64)
    brownian_end = fine.sum(0) * math.sqrt(T / fine_steps)
    exact = x0 * torch.exp((MU - SIGMA**2 / 2) * T + SIGMA * brownian_end)
    errors = []
    for steps in (16, 32, 64, 128):
        k = fine_steps // steps
        coarse = fine.reshape(steps, k, paths, 1).sum(1) / math.sqrt(k)  # same Brownian path, coarser grid
        x = sdeint(lambda x, t: MU * x, lambda x, t: SIGMA * x, x0, (0.0, T), steps, method, noise=coarse)
        errors.append(float((x - exact).abs().mean()))
    return errors


@pytest.mark.parametrize(("method", "order"), [("euler_maruyama", 0.5), ("milstein", 1.0)])
def test_strong_order_of_convergence(method: str, order: float) -> None:
    errors = _strong_errors(method)
    slopes = [math.log2(a / b) for a, b in itertools.pairwise(errors)]
    observed = sum(slopes) / len(slopes)
    assert abs(observed - order) < 0.15, f"{method}: observed strong order {observed:.2f} ({slopes}), expected {order}"


def test_stationary_distribution_of_an_ornstein_uhlenbeck_process() -> None:
    """dx = -x dt + sqrt(2) dW has N(0, 1) as its stationary law."""
    generator = torch.Generator().manual_seed(1)
    x = sdeint(
        lambda x, t: -x,
        lambda x, t: math.sqrt(2) * torch.ones_like(x),
        torch.full((20000, 1), 3.0, dtype=torch.float64),
        (0.0, 8.0),
        steps=800,
        generator=generator,
    )
    assert abs(float(x.mean())) < 0.03 and abs(float(x.var()) - 1) < 0.05


def test_bad_arguments() -> None:
    x0 = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="unknown method"):
        sdeint(lambda x, t: x, lambda x, t: x, x0, (0.0, 1.0), method="srk9")
    with pytest.raises(ValueError, match="noise must have shape"):
        sdeint(lambda x, t: x, lambda x, t: x, x0, (0.0, 1.0), steps=4, noise=torch.zeros(3, 3, 2))


@pytest.mark.parametrize("method", ["euler_maruyama", "milstein"])
def test_a_row_with_a_zero_time_span_stays_where_it_starts(method: str) -> None:
    """Milstein's correction divides by the square root of the step: a span of 0 (one row here) gives
    0 / 0 unless guarded; every method returns that row's start, and the other row moves."""
    x0 = torch.ones(2, 1)
    end = sdeint(lambda x, t: -x, lambda x, t: 0.5 * x, x0, (torch.tensor([0.0, 1.0]), 1.0), steps=4, method=method)
    assert torch.equal(end[1], x0[1]) and torch.isfinite(end).all() and not torch.equal(end[0], x0[0])
