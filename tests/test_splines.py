"""Rational-quadratic splines: the numerical edge cases that break spline flows in practice."""

from __future__ import annotations

import pytest
import torch

from flowforge.transforms import RationalQuadraticSpline, rational_quadratic_spline
from flowforge.transforms.splines import _interior_knots

BINS, BOUND = 8, 3.0


def _params(n: int, dtype: torch.dtype, scale: float = 2.0, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    w, h, d = (scale * torch.randn(n, k, generator=g, dtype=torch.float64).to(dtype) for k in (BINS, BINS, BINS - 1))
    return w, h, d


def _knots(raw: torch.Tensor) -> torch.Tensor:
    inner = _interior_knots(raw, BOUND)
    return torch.cat([torch.full_like(inner[:, :1], -BOUND), inner, torch.full_like(inner[:, :1], BOUND)], 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_trip_and_log_derivative_against_autograd(dtype: torch.dtype) -> None:
    n = 4000
    w, h, d = _params(n, dtype)
    x = (torch.linspace(-1.5 * BOUND, 1.5 * BOUND, n, dtype=torch.float64)).to(dtype).requires_grad_(True)
    y, log_derivative = rational_quadratic_spline(x, w, h, d, BOUND)
    (grad,) = torch.autograd.grad(y.sum(), x)
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    torch.testing.assert_close(log_derivative.detach(), grad.log(), rtol=0, atol=tol)
    y = y.detach()
    x_back, inverse_log_derivative = rational_quadratic_spline(y, w, h, d, BOUND, inverse=True)
    # Where the spline is nearly flat (slope down to ~1e-6 with these parameters) x is ill-conditioned
    # given y, so x-space errors are checked where |dy/dx| > 1e-2; y-space errors everywhere.
    well_conditioned = log_derivative.detach() > -4.6
    torch.testing.assert_close(x_back[well_conditioned], x.detach()[well_conditioned], rtol=0, atol=10 * tol)
    torch.testing.assert_close(rational_quadratic_spline(x_back, w, h, d, BOUND)[0], y, rtol=0, atol=10 * tol)
    torch.testing.assert_close(
        inverse_log_derivative[well_conditioned], -log_derivative.detach()[well_conditioned], rtol=0, atol=10 * tol
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inputs_exactly_on_knots(dtype: torch.dtype) -> None:
    """Every knot, both ends included, in both directions: finite, continuous, invertible."""
    n = 64
    w, h, d = _params(n, dtype, seed=1)
    x_knots, y_knots = _knots(w), _knots(h)
    rows = torch.arange(n).repeat_interleave(BINS + 1)

    def spline(v: torch.Tensor, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return rational_quadratic_spline(v, w[rows], h[rows], d[rows], BOUND, inverse=inverse)

    y, log_derivative = spline(x_knots.reshape(-1), inverse=False)
    assert torch.isfinite(y).all() and torch.isfinite(log_derivative).all()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(y, y_knots.reshape(-1), rtol=0, atol=tol)
    x, inverse_log_derivative = spline(y_knots.reshape(-1), inverse=True)
    assert torch.isfinite(x).all() and torch.isfinite(inverse_log_derivative).all()
    # float32: a knot next to a nearly flat bin is found again only up to the bin's conditioning.
    torch.testing.assert_close(x, x_knots.reshape(-1), rtol=0, atol=tol if dtype == torch.float64 else 1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tails_and_huge_inputs_are_identity_with_finite_gradients(dtype: torch.dtype) -> None:
    values = torch.tensor([-1e30, -1e6, -BOUND - 1e-3, BOUND + 1e-3, 7.5, 1e6, 1e30], dtype=dtype)
    w, h, d = (p.requires_grad_(True) for p in _params(values.numel(), dtype))
    for inverse in (False, True):
        x = values.clone().requires_grad_(True)
        y, log_derivative = rational_quadratic_spline(x, w, h, d, BOUND, inverse=inverse)
        assert torch.equal(y.detach(), values) and torch.equal(log_derivative.detach(), torch.zeros_like(values))
        grads = torch.autograd.grad((y + log_derivative).sum(), (x, w, h, d))
        assert all(torch.isfinite(g).all() for g in grads)
        torch.testing.assert_close(grads[0], torch.ones_like(values))


def test_bounds_map_to_bounds_and_continuity_at_the_edges() -> None:
    w, h, d = _params(2, torch.float32)
    x = torch.tensor([-BOUND, BOUND])
    y, _ = rational_quadratic_spline(x, w, h, d, BOUND)
    assert torch.equal(y, x)  # exactly: the end knots are exactly +-B
    eps = torch.tensor([-BOUND - 1e-4, BOUND + 1e-4])
    torch.testing.assert_close(rational_quadratic_spline(eps, w, h, d, BOUND)[0], eps)


@pytest.mark.parametrize("scale", [0.1, 5.0, 50.0])
def test_monotone_for_any_parameters(scale: float) -> None:
    """Strictly increasing on a fine grid even for extreme unnormalised parameters (float32)."""
    w, h, d = _params(16, torch.float32, scale=scale, seed=2)
    x = torch.linspace(-BOUND - 1, BOUND + 1, 5001).expand(16, -1)
    expand = lambda p: p[:, None, :].expand(-1, x.shape[1], -1)  # noqa: E731
    y, log_derivative = rational_quadratic_spline(x, expand(w), expand(h), expand(d), BOUND)
    assert torch.isfinite(y).all() and torch.isfinite(log_derivative).all()
    # Mathematically strictly increasing; in float32 a nearly flat bin may wobble by an ulp.
    ulp = torch.finfo(torch.float32).eps * y.abs().clamp_min(1)
    assert (y[:, 1:] >= y[:, :-1] - 2 * ulp[:, 1:]).all()


def test_float32_extremes_never_produce_nan() -> None:
    """Inputs straddling knots by one ulp, huge and tiny parameters: no NaN in values or gradients."""
    g = torch.Generator().manual_seed(3)
    n = 20000
    w = (30 * torch.randn(n, BINS, generator=g)).requires_grad_(True)
    h = (30 * torch.randn(n, BINS, generator=g)).requires_grad_(True)
    d = (30 * torch.randn(n, BINS - 1, generator=g)).requires_grad_(True)
    knots = _knots(w.detach())
    pick = knots[torch.arange(n), torch.randint(0, BINS + 1, (n,), generator=g)]
    x = torch.nextafter(pick, torch.where(torch.rand(n, generator=g) < 0.5, -torch.inf, torch.inf))
    for inverse in (False, True):
        y, log_derivative = rational_quadratic_spline(x, w, h, d, BOUND, inverse=inverse)
        assert torch.isfinite(y).all() and torch.isfinite(log_derivative).all()
        grads = torch.autograd.grad((y + log_derivative).sum(), (w, h, d))
        assert all(torch.isfinite(gr).all() for gr in grads)


def test_zero_parameters_are_the_identity() -> None:
    spline = RationalQuadraticSpline(bins=5, bound=2.0)
    x = torch.linspace(-4, 4, 33, dtype=torch.float64).reshape(3, 11)
    y, log_derivative = spline(x, torch.zeros(3, 11, spline.params_per_feature, dtype=torch.float64))
    torch.testing.assert_close(y, x)
    torch.testing.assert_close(log_derivative, torch.zeros_like(x), rtol=0, atol=1e-12)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="bins must be an int >= 2"):
        RationalQuadraticSpline(bins=1)
    for bound in (0.0, 1e300):  # 1e300 overflowed float32 in the first batch
        with pytest.raises(ValueError, match=r"bound must be in \(0, 1e\+08\]"):
            RationalQuadraticSpline(bound=bound)
    with pytest.raises(ValueError, match="K, K and K-1"):
        rational_quadratic_spline(torch.zeros(2), torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, 4), 1.0)


@pytest.mark.parametrize("autoregressive", [True, False])
def test_flow_on_a_batch_entirely_in_the_tails(autoregressive: bool) -> None:
    """A whole batch outside [-B, B] (the failure that made spline layers raise): finite values, finite gradients."""
    from flowforge.flows import NSF

    flow = NSF(3, context=2, transforms=3, hidden=(16,), bound=2.0, autoregressive=autoregressive)
    x = torch.tensor([[5.0, -6.0, 40.0], [-1e6, 3.0, 2.5]])
    log_prob = flow.log_prob(x, torch.zeros(2, 2))
    assert torch.isfinite(log_prob).all()
    log_prob.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in flow.parameters() if p.grad is not None)
    samples, sample_log_prob = flow.sample_and_log_prob(4, torch.zeros(2, 2))
    assert torch.isfinite(samples).all() and torch.isfinite(sample_log_prob).all()
