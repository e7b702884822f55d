"""Base distributions against torch.distributions, by quadrature and by moments."""

from __future__ import annotations

import math

import pytest
import torch
from torch import distributions as D

from flowforge.distributions import BoxUniform, DiagNormal, GaussianMixture, StandardNormal
from tests.invariants import density_mass_2d, randomize_


def _reference(dist) -> D.Distribution:
    """The same distribution written with torch.distributions."""
    if isinstance(dist, StandardNormal):
        return D.Independent(D.Normal(torch.zeros(dist.event_shape, dtype=torch.float64), 1.0), 1)
    if isinstance(dist, DiagNormal):
        return D.Independent(D.Normal(dist.loc.detach(), dist.log_scale.detach().exp()), 1)
    if isinstance(dist, GaussianMixture):
        component = D.Independent(D.Normal(dist.loc.detach(), dist.log_scale.detach().exp()), 1)
        return D.MixtureSameFamily(D.Categorical(logits=dist.logits.detach()), component)
    raise TypeError(type(dist))


def _distributions() -> list:
    return [
        StandardNormal(3).double(),
        randomize_(DiagNormal(3), scale=0.5).double(),
        randomize_(GaussianMixture(3, components=4, seed=2), scale=0.5).double(),
    ]


@pytest.mark.parametrize("dist", _distributions(), ids=lambda d: type(d).__name__)
def test_log_prob_matches_torch_distributions(dist) -> None:
    x = 2 * torch.randn(100, 3, dtype=torch.float64)
    torch.testing.assert_close(dist.log_prob(x), _reference(dist).log_prob(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dist", _distributions(), ids=lambda d: type(d).__name__)
def test_sample_moments_match(dist) -> None:
    torch.manual_seed(0)
    x = dist.sample(200_000)
    ref = _reference(dist)
    assert x.shape == (200_000, 3) and not x.requires_grad
    torch.testing.assert_close(x.mean(0), ref.mean, rtol=0, atol=0.02)
    torch.testing.assert_close(x.var(0), ref.variance, rtol=0.03, atol=0.01)


@pytest.mark.parametrize(
    "dist",
    [StandardNormal(2), randomize_(DiagNormal(2), scale=0.5), randomize_(GaussianMixture(2, 5, seed=1), scale=0.5)],
    ids=lambda d: type(d).__name__,
)
def test_density_integrates_to_one(dist) -> None:
    mass = density_mass_2d(dist.double().log_prob, bound=10.0, resolution=400)
    assert abs(mass - 1) < 1e-3


def test_reparametrised_gradients() -> None:
    normal, mixture = DiagNormal(2), GaussianMixture(2, 3)
    normal.rsample(16).sum().backward()
    assert normal.loc.grad is not None and normal.log_scale.grad is not None
    mixture.rsample(64).square().sum().backward()
    assert mixture.loc.grad.abs().sum() > 0 and mixture.log_scale.grad.abs().sum() > 0


def test_box_uniform() -> None:
    box = BoxUniform([-1.0, 0.0], [1.0, 4.0]).double()
    inside = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    outside = torch.tensor([[1.0, 1.0], [0.0, -0.1]], dtype=torch.float64)
    torch.testing.assert_close(box.log_prob(inside), torch.full((2,), -math.log(8.0), dtype=torch.float64))
    assert torch.isneginf(box.log_prob(outside)).all()
    samples = box.sample(10_000)
    assert torch.isfinite(box.log_prob(samples)).all()
    assert samples.dtype == torch.float64
    with pytest.raises(ValueError, match="high must exceed low"):
        BoxUniform([0.0], [0.0])
    # Far from 0 the float32 spacing is coarse: low + (high - low) u rounds up to high for many u,
    # a point outside [low, high) that log_prob scores -inf. Every draw stays inside.
    far = BoxUniform([1e6], [1e6 + 1])
    torch.manual_seed(0)
    assert torch.isfinite(far.log_prob(far.sample(20_000))).all()


def test_follows_module_dtype_and_checks_shapes() -> None:
    for dist in (StandardNormal(2), DiagNormal(2), GaussianMixture(2, 2), BoxUniform([0.0, 0.0], [1.0, 1.0])):
        assert dist.double().sample(3).dtype == torch.float64
        with pytest.raises(ValueError, match=r"x must have shape \(batch, 2\)"):
            dist.log_prob(torch.zeros(3, 3, dtype=torch.float64))
        with pytest.raises(ValueError, match="n must be a positive int"):
            dist.sample(0)
