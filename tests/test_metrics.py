"""Sample-quality metrics against closed forms, brute force and SciPy."""

from __future__ import annotations

import math

import pytest
import scipy.stats
import torch

from flowforge.eval import bits_per_dim, energy_distance, mmd, sliced_wasserstein, wasserstein


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
    with pytest.raises(ValueError, match="at least 2 points"):
        energy_distance(torch.randn(1, 2), torch.randn(5, 2))
    with pytest.raises(ValueError, match="bandwidths"):
        mmd(torch.randn(5, 2), torch.randn(5, 2), bandwidths=[0.0])
