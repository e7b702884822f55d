"""Sample-quality metrics against closed forms, brute force and SciPy."""

from __future__ import annotations

import math

import pytest
import scipy.stats
import torch

from flowforge.eval import (
    bits_per_dim,
    energy_distance,
    mmd,
    negative_log_likelihood,
    sliced_wasserstein,
    wasserstein,
)

SAMPLE_METRICS = {
    "mmd": mmd,
    "energy_distance": energy_distance,
    "wasserstein": wasserstein,
    "sliced_wasserstein": sliced_wasserstein,
}


def test_exact_wasserstein_on_a_line_is_the_sorted_matching() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 1, generator=g), 2 * torch.rand(40, 1, generator=g)
    for p in (1, 2, 3):
        expected = float((x.double().sort(0).values - y.double().sort(0).values).abs().pow(p).mean()) ** (1 / p)
        assert wasserstein(x, y, p=p) == pytest.approx(expected, rel=1e-9)
    assert wasserstein(x, y, p=1) == pytest.approx(scipy.stats.wasserstein_distance(x[:, 0], y[:, 0]), rel=1e-6)


def test_wasserstein_of_a_translation_is_its_length() -> None:
    x = torch.randn(200, 3, generator=torch.Generator().manual_seed(1))
    shift = torch.tensor([3.0, -4.0, 12.0])
    assert wasserstein(x, x + shift) == pytest.approx(13.0, rel=1e-9)


def test_sliced_wasserstein_of_a_translation() -> None:
    # For direction theta uniform on the sphere, E (theta . s)^2 = |s|^2 / d.
    x = torch.randn(500, 2, generator=torch.Generator().manual_seed(2))
    estimate = sliced_wasserstein(
        x, x + torch.tensor([3.0, 4.0]), projections=20_000, generator=torch.Generator().manual_seed(3)
    )
    assert estimate == pytest.approx(5.0 / math.sqrt(2), rel=0.02)
    with pytest.raises(ValueError, match="equal sample sizes"):
        sliced_wasserstein(x, x[:10])


def test_energy_distance_matches_scipy_in_one_dimension() -> None:
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(50, 1, generator=g), torch.randn(70, 1, generator=g) + 0.5
    expected = scipy.stats.energy_distance(x[:, 0].numpy(), y[:, 0].numpy()) ** 2
    assert energy_distance(x, y) == pytest.approx(expected, rel=1e-6)


def test_mmd_is_the_unbiased_kernel_statistic_and_separates_laws() -> None:
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(6, 2, generator=g).double(), torch.randn(5, 2, generator=g).double()
    h = 0.7

    def k(a, b):
        return math.exp(-float((a - b).square().sum()) / (2 * h * h))

    within_x = sum(k(x[i], x[j]) for i in range(6) for j in range(6) if i != j) / 30
    within_y = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / 20
    across = sum(k(x[i], y[j]) for i in range(6) for j in range(5)) / 30
    assert mmd(x, y, bandwidths=[h]) == pytest.approx(within_x + within_y - 2 * across, rel=1e-10)
    same = [mmd(torch.randn(100, 2, generator=g), torch.randn(100, 2, generator=g)) for _ in range(50)]
    assert abs(sum(same) / 50) < 0.01  # unbiased: centred on zero when the laws agree
    assert mmd(torch.randn(200, 2, generator=g), torch.randn(200, 2, generator=g) + 1.0) > 0.1


def test_bits_per_dim_and_input_checks() -> None:
    assert bits_per_dim(10 * math.log(2), 5) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="same dimension"):
        mmd(torch.randn(5, 2), torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"x must have shape \(n, d\) with n >= 2"):
        mmd(torch.randn(1, 2), torch.randn(5, 2))  # the unbiased within-sample terms need two points
    with pytest.raises(ValueError, match="bandwidths"):
        mmd(torch.randn(5, 2), torch.randn(5, 2), bandwidths=[0.0])


# ---------------------------------------------------------------- bad input: non-finite samples, wrong shapes


@pytest.mark.parametrize("metric", SAMPLE_METRICS.values(), ids=SAMPLE_METRICS.keys())
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("argument", ["x", "y"])
def test_every_metric_refuses_non_finite_samples(metric, bad: float, argument: str) -> None:
    # wasserstein used to return 0.0 (a perfect score) here, the others NaN or inf.
    g = torch.Generator().manual_seed(6)
    samples = {"x": torch.randn(8, 2, generator=g), "y": torch.randn(8, 2, generator=g)}
    samples[argument][5, 1] = bad
    with pytest.raises(ValueError, match=rf"^{argument} must be finite: {argument}\[5, 1\] is {bad}"):
        metric(**samples)


@pytest.mark.parametrize("metric", SAMPLE_METRICS.values(), ids=SAMPLE_METRICS.keys())
@pytest.mark.parametrize(
    ("x_shape", "y_shape", "message"),
    [
        ((8,), (8, 2), r"x must have shape \(n, d\)"),  # 1-D: points or coordinates? refused, not guessed
        ((8, 2), (8, 1, 2), r"y must have shape \(n, d\)"),
        ((8, 0), (8, 0), r"x must have shape \(n, d\) with n >= \d and d >= 1, got \(8, 0\)"),
        ((0, 2), (8, 2), r"x must have shape \(n, d\) with n >= \d and d >= 1, got \(0, 2\)"),
        ((8, 2), (8, 3), r"y must have shape \(m, 2\) like x \(8, 2\), got \(8, 3\)"),
    ],
)
def test_every_metric_checks_shapes_naming_the_argument(metric, x_shape, y_shape, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        metric(torch.ones(x_shape), torch.ones(y_shape))


def test_metrics_refuse_what_is_not_a_real_tensor_and_allow_what_they_can_compute() -> None:
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor of shape"):
        energy_distance([[0.0], [1.0]], torch.zeros(2, 1))
    with pytest.raises(TypeError, match="y must hold real numbers"):
        wasserstein(torch.zeros(2, 1), torch.zeros(2, 1, dtype=torch.complex64))
    # energy distance (a V-statistic) and W_p are defined for a single point each
    assert energy_distance(torch.zeros(1, 1), torch.ones(1, 1)) == pytest.approx(2.0)
    assert wasserstein(torch.zeros(1, 2), torch.full((1, 2), 3.0)) == pytest.approx(3 * math.sqrt(2))
    with pytest.raises(ValueError, match=r"y must have shape \(3, 2\) like x, got \(4, 2\)"):
        sliced_wasserstein(torch.zeros(3, 2), torch.zeros(4, 2))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda x: mmd(x, x, bandwidths=[math.nan]), "bandwidths"),  # NaN passed `h <= 0` and gave NaN
        (lambda x: mmd(x, x, bandwidths=[]), "bandwidths"),
        (lambda x: wasserstein(x, x, p=math.nan), "p must be a finite number >= 1"),
        (lambda x: sliced_wasserstein(x, x, p=math.inf), "p must be a finite number >= 1"),
        (lambda x: sliced_wasserstein(x, x, projections=0), "projections must be an integer >= 1"),
        (lambda x: wasserstein(x, x, max_iterations=0), "max_iterations must be an integer >= 1"),
    ],
)
def test_metric_settings_are_checked(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(torch.randn(6, 2, generator=torch.Generator().manual_seed(7)))


def test_negative_log_likelihood_refuses_non_finite_or_empty_data() -> None:
    from flowforge.flows import RealNVP

    flow = RealNVP(2, transforms=2, hidden=(8,))
    data = torch.randn(10, 2, generator=torch.Generator().manual_seed(8))
    assert math.isfinite(negative_log_likelihood(flow, data, batch_size=3))
    data[7, 0] = math.nan
    with pytest.raises(ValueError, match=r"data must be finite: data\[7, 0\] is nan"):
        negative_log_likelihood(flow, data)
    with pytest.raises(ValueError, match=r"data must have shape \(n, \.\.\.\) with n >= 1, got \(0, 2\)"):
        negative_log_likelihood(flow, torch.zeros(0, 2))  # was a ZeroDivisionError
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        negative_log_likelihood(flow, torch.zeros(3, 2), batch_size=0)


def test_bits_per_dim_and_the_nfe_curve_check_their_arguments() -> None:
    import numpy as np

    from flowforge.eval.metrics import bits_per_dim, quality_against_nfe
    from flowforge.matching import FlowMatcher
    from flowforge.nn import VelocityMLP

    for call, message in (
        (lambda: bits_per_dim(math.nan, 2), "nll_nats must be a finite number"),
        (lambda: bits_per_dim(1.0, 1.5), "dims must be a positive int"),
        (lambda: bits_per_dim(1.0, True), "dims must be a positive int"),
    ):
        with pytest.raises((TypeError, ValueError), match=message):
            call()
    model = FlowMatcher(VelocityMLP(2, hidden=(8,)))
    with pytest.raises(ValueError, match="there is no point to measure"):
        quality_against_nfe(model, lambda x: 0.0, 8, steps=(), adaptive=None)
    with pytest.raises(TypeError, match=r"metric must return a number, got '1\.0'"):
        quality_against_nfe(model, lambda x: "1.0", 8, steps=(1,), adaptive=None)
    points = quality_against_nfe(model, lambda x: torch.tensor(1.0), np.int64(8), steps=(np.int64(2),), adaptive=None)
    assert [(p.nfe, p.value) for p in points] == [(2, 1.0)]


def test_sde_sampling_reports_its_nfe() -> None:
    from flowforge.matching import FlowMatcher
    from flowforge.nn import VelocityMLP

    model = FlowMatcher(VelocityMLP(2, hidden=(8,)))
    model.sample(3, steps=4, method="rk4")
    model.sample_sde(3, steps=7)
    assert model.last_nfe == 7


@pytest.mark.parametrize("name", list(SAMPLE_METRICS))
def test_sample_metrics_do_not_move_when_both_sets_are_shifted_far_from_the_origin(name: str) -> None:
    """Every metric is shift-invariant: with both sets 1e8 away (float64) it must score as at the
    origin (the matrix-product form of the distances lost every digit there), and a set against
    itself scores 0 even with more than 25 rows."""
    metric = SAMPLE_METRICS[name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 3, generator=g, dtype=torch.float64)
    y = torch.randn(60, 3, generator=g, dtype=torch.float64) + 0.5
    kwargs = {"generator": torch.Generator().manual_seed(1)} if name == "sliced_wasserstein" else {}
    near = metric(x, y, **kwargs)
    kwargs = {"generator": torch.Generator().manual_seed(1)} if name == "sliced_wasserstein" else {}
    assert metric(x + 1e8, y + 1e8, **kwargs) == pytest.approx(near, rel=1e-6)
    if name in ("energy_distance", "wasserstein"):
        assert metric(x + 1e4, x + 1e4) == 0.0
    with pytest.raises(ValueError, match="too large to score"):
        metric(x * 1e200, y * 1e200)  # finite, but the squared distances overflow


def test_an_exact_wasserstein_that_stopped_before_the_optimum_is_refused() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 2, generator=g), torch.randn(200, 2, generator=g) + 0.3
    assert wasserstein(x, y) > 0
    with pytest.raises(ValueError, match=r"not solved .* raise max_iterations \(now 10\)"):
        wasserstein(x, y, max_iterations=10)  # POT stops early: its plan is not the optimum
