"""Image flows: squeeze, split, 1x1 convolution, image couplings, Glow, multi-scale RealNVP,
dequantization and the digits images."""

from __future__ import annotations

import math

import pytest
import torch

from flowforge.data import digits_images
from flowforge.flows import Dequantized, Flow, Glow, MultiscaleRealNVP, RealNVP
from flowforge.transforms import ActNorm, ImageAffineCoupling, InvertibleConv1x1, Split, Squeeze, Transform
from tests.invariants import parameters_without_gradient, randomize_

CONTEXT = 3


def _images(n: int, shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=torch.float64).to(dtype)


def _context(n: int, context: int, seed: int = 5) -> torch.Tensor | None:
    if context == 0:
        return None
    return torch.randn(n, context, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _autograd_logabsdet(fn, x: torch.Tensor) -> torch.Tensor:
    """log|det| of the Jacobian of an image map at every image of ``x`` (rows independent)."""
    flat = x.flatten(1)
    jac = torch.autograd.functional.jacobian(lambda v: fn(v.view_as(x)).flatten(1).sum(0), flat, vectorize=True)
    return torch.linalg.slogdet(jac.permute(1, 0, 2)).logabsdet


def _warmed(transform: Transform, shape: tuple[int, ...], context: int) -> Transform:
    """Initialise ActNorm layers on data, then perturb every parameter (identity inits hide bugs)."""
    torch.manual_seed(0)
    transform = transform.double()
    with torch.no_grad():
        transform(2.0 + 0.5 * _images(64, shape, seed=9), _context(64, context, seed=10))
    return randomize_(transform, scale=0.05)


IMAGE_TRANSFORMS = {
    "squeeze": (lambda c: Squeeze(), (2, 4, 4), False),
    "conv1x1": (lambda c: InvertibleConv1x1(3), (3, 2, 4), False),
    "actnorm_image": (lambda c: ActNorm(3, image=True), (3, 4, 2), False),
    "coupling_channel": (lambda c: ImageAffineCoupling(4, "channel", 0, c, 8), (4, 4, 4), True),
    "coupling_channel_odd": (lambda c: ImageAffineCoupling(3, "channel", 1, c, 8), (3, 2, 2), True),
    "coupling_checkerboard": (lambda c: ImageAffineCoupling(2, "checkerboard", 1, c, 8), (2, 4, 4), True),
    "split": (lambda c: Split(4, ImageAffineCoupling(2, "channel", 0, c, 8), c, 8), (4, 2, 4), True),
    "glow": (lambda c: Glow((1, 4, 4), levels=2, steps=2, hidden_channels=8, context=c).transform, (1, 4, 4), True),
    "glow_3_levels": (lambda c: Glow((2, 8, 8), levels=3, steps=1, hidden_channels=4).transform, (2, 8, 8), False),
    "realnvp_multiscale": (
        lambda c: MultiscaleRealNVP((1, 4, 4), levels=2, steps=2, hidden_channels=8, context=c).transform,
        (1, 4, 4),
        True,
    ),
}
VARIANTS = [
    pytest.param(name, context, id=f"{name}-{'ctx' if context else 'noctx'}")
    for name, (_, _, conditional) in IMAGE_TRANSFORMS.items()
    for context in ((0, CONTEXT) if conditional else (0,))
]


@pytest.mark.parametrize(("name", "context"), VARIANTS)
def test_round_trip_and_logdet_match_autograd(name: str, context: int) -> None:
    build, shape, _ = IMAGE_TRANSFORMS[name]
    t = _warmed(build(context), shape, context)
    x = 3.0 * _images(16, shape)
    c = _context(16, context)
    with torch.no_grad():
        z, logdet = t(x, c)
        x_back, logdet_back = t.inverse(z, c)
        sampled = t.inverse_without_logdet(z, c)  # the sampling path
    assert z.shape[0] == 16 and logdet.shape == (16,)
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-10)  # exact inverse (Glow's claim)
    torch.testing.assert_close(sampled, x_back, rtol=0, atol=1e-12)
    torch.testing.assert_close(logdet_back, -logdet, rtol=0, atol=1e-10)
    reference = _autograd_logabsdet(lambda v: t(v, c)[0], x)
    torch.testing.assert_close(logdet, reference, rtol=0, atol=1e-8)
    reference_inverse = _autograd_logabsdet(lambda v: t.inverse(v, c)[0], z)
    torch.testing.assert_close(logdet_back, reference_inverse, rtol=0, atol=1e-8)


@pytest.mark.parametrize(("name", "context"), [v for v in VARIANTS if v.values[0] not in ("squeeze",)])
def test_gradients_reach_every_parameter(name: str, context: int) -> None:
    build, shape, _ = IMAGE_TRANSFORMS[name]
    t = _warmed(build(context), shape, context)
    x = _images(8, shape)
    c = _context(8, context)
    z, logdet = t(x, c)
    missing = parameters_without_gradient(t, (z.square().flatten(1).sum(1) - logdet).mean())
    assert not missing, f"no gradient reaches {missing}"


def test_squeeze_layout_and_errors() -> None:
    x = torch.arange(32.0).reshape(1, 2, 4, 4)
    z, _ = Squeeze()(x)
    assert z.shape == (1, 8, 2, 2)
    # Channel 4c + 2i + j holds pixel (2h + i, 2w + j) of channel c.
    assert z[0, 4 + 2 * 1 + 0, 1, 0] == x[0, 1, 3, 0]
    with pytest.raises(ValueError, match="even height and width"):
        Squeeze()(torch.zeros(1, 1, 3, 4))


def test_checkerboard_coupling_leaves_its_pixels_unchanged() -> None:
    layer = randomize_(ImageAffineCoupling(2, "checkerboard", parity=0, hidden_channels=8).double(), 0.3)
    x = _images(4, (2, 4, 4))
    z, _ = layer(x)
    kept = (torch.arange(4)[:, None] + torch.arange(4)[None, :]) % 2 == 0
    torch.testing.assert_close(z[..., kept], x[..., kept], rtol=0, atol=0)
    assert not torch.allclose(z[..., ~kept], x[..., ~kept])


def test_split_prior_is_the_learned_gaussian() -> None:
    """log N(x2; mu(x1), sigma(x1)) equals the standard normal at z2 plus Split's log-det."""
    split = randomize_(Split(4, None, 0, 8).double(), 0.3)
    x = _images(5, (4, 2, 2))
    z, logdet = split(x)
    mean, log_scale = split._prior(x[:, :2], None)
    expected = torch.distributions.Normal(mean, log_scale.exp()).log_prob(x[:, 2:]).flatten(1).sum(1)
    standard = torch.distributions.Normal(0.0, 1.0).log_prob(z[:, 2:]).flatten(1).sum(1)
    torch.testing.assert_close(standard + logdet, expected)
    torch.testing.assert_close(z[:, :2], x[:, :2], rtol=0, atol=0)


def test_glow_is_a_flow_over_images() -> None:
    torch.manual_seed(0)
    flow = Glow((1, 8, 8), levels=2, steps=2, hidden_channels=8, context=10)
    labels = torch.nn.functional.one_hot(torch.tensor([3, 7]), 10).float()
    samples = flow.sample(4, labels)
    assert samples.shape == (4, 2, 1, 8, 8)
    log_prob = flow.log_prob(samples[:, 1], labels[1:].expand(4, -1))
    assert log_prob.shape == (4,) and bool(torch.isfinite(log_prob).all())
    with pytest.raises(ValueError, match="divisible by 8"):
        Glow((1, 8, 12), levels=3)
    with pytest.raises(ValueError, match=r"shape=\(C, H, W\)"):
        Glow((8, 8))


def test_compose_of_image_layers_is_shape_agnostic() -> None:
    """ActNorm in image mode reports no vector size, so a stack can change its channel count."""
    assert ActNorm(4, image=True).features is None
    with pytest.raises(ValueError, match=r"\(batch, 4, H, W\)"):
        ActNorm(4, image=True)(torch.zeros(3, 4))


def _cell_log_mass(flow: Flow, k: torch.Tensor, levels: int, resolution: int = 200) -> torch.Tensor:
    """log P(k) = log of the flow's mass over the cell [k/L, (k+1)/L)^2, by the midpoint rule."""
    h = 1.0 / resolution
    u = (torch.arange(resolution, dtype=torch.float64) + 0.5) * h
    grid = torch.stack(torch.meshgrid(u, u, indexing="ij"), -1).reshape(-1, 2)
    out = []
    with torch.no_grad():
        for row in k:
            y = (row + grid) / levels
            out.append(torch.logsumexp(flow.log_prob(y), 0) + math.log(h * h) - 2 * math.log(levels))
    return torch.stack(out)


def test_dequantization_bounds_the_discrete_likelihood() -> None:
    """Both dequantizers give lower bounds on log P(k); the uniform one's mean is E_u[log p] - D log L."""
    torch.manual_seed(0)
    levels = 4
    flow = randomize_(RealNVP(2, transforms=2, hidden=(8,)).double(), 0.3)
    k = torch.tensor([[0.0, 1.0], [3.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
    exact = _cell_log_mass(flow, k, levels)
    uniform = Dequantized(flow, levels)
    variational = Dequantized(flow, levels, variational=True, hidden=8).double()
    randomize_(variational.noise_net, 0.3)
    with torch.no_grad():
        for model in (uniform, variational):
            bound = torch.stack([model.log_prob(k) for _ in range(4000)]).mean(0)
            assert bool((bound <= exact + 0.01).all()), f"{bound} exceeds the exact log-mass {exact}"
            assert bool((bound > exact - 1.0).all())
    # The mass of all cells sums to the flow's mass on [0, 1)^2 (<= 1).
    cells = torch.cartesian_prod(torch.arange(4.0), torch.arange(4.0)).double()
    assert float(_cell_log_mass(flow, cells, levels, resolution=40).exp().sum()) <= 1.0 + 1e-6


def test_dequantized_model_checks_and_samples() -> None:
    model = Dequantized(Glow((1, 8, 8), levels=2, steps=1, hidden_channels=8), levels=17)
    with pytest.raises(ValueError, match=r"integers in 0\.\.16"):
        model.log_prob(torch.full((2, 1, 8, 8), 17.0))
    with pytest.raises(ValueError, match="k must have shape"):
        model.log_prob(torch.zeros(2, 64))
    samples = model.sample(3)
    assert samples.shape == (3, 1, 8, 8) and torch.equal(samples, samples.round())
    assert float(samples.min()) >= 0 and float(samples.max()) <= 16
    bpd = model.bits_per_dim(digits_images("test")[0][:32])
    assert 0 < bpd < 10


def test_digits_images_split() -> None:
    train, train_labels = digits_images("train")
    test, test_labels = digits_images("test")
    assert train.shape == (1438, 1, 8, 8) and test.shape == (359, 1, 8, 8)
    assert train_labels.shape == (1438,) and int(test_labels.max()) == 9
    assert torch.equal(train, train.round()) and int(train.min()) == 0 and int(train.max()) == 16
    # Disjoint and complete: the union is the whole set, as multisets of rows.
    import sklearn.datasets

    everything = torch.as_tensor(sklearn.datasets.load_digits().data, dtype=torch.float32)
    joined = torch.cat([train.flatten(1), test.flatten(1)])
    assert torch.equal(joined.sum(0), everything.sum(0)) and len(joined) == len(everything)
    with pytest.raises(ValueError, match="split must be"):
        digits_images("validation")
