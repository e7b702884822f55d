"""UNetVelocity: the velocity-field contract on images, conditioning on context and step size, clear
refusals, and flow matching (with classifier-free guidance) and a shortcut model running on it."""

from __future__ import annotations

import pytest
import torch

from flowforge import registry
from flowforge.matching import FlowMatcher, ShortcutMatcher
from flowforge.nn import UNetVelocity
from tests.invariants import parameters_without_gradient

SHAPE = (1, 8, 8)
CLASSES = 10


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small convolutions run fastest on one thread, and far slower when threads compete for busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _net(**changes) -> UNetVelocity:
    torch.manual_seed(0)
    settings = dict(context=CLASSES, channels=8, groups=4, time_embedding=16)
    settings.update(changes)
    return UNetVelocity(SHAPE, **settings).double()


def _inputs(n: int = 4, shape: tuple[int, ...] = SHAPE, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    t = torch.rand(n, generator=g, dtype=torch.float64)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    return x, t, torch.eye(CLASSES, dtype=torch.float64)[labels]


def test_is_registered_as_a_velocity_network_with_the_attributes_flow_matching_reads() -> None:
    assert registry.lookup("velocity", "unet") is UNetVelocity
    net = _net()
    assert net.features == SHAPE and net.context_features == CLASSES
    assert UNetVelocity([3, 16, 16]).features == (3, 16, 16)  # a JSON list rebuilds as the tuple


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"context": 0},
        {"channel_multipliers": (1, 2, 2), "attention": True, "heads": 2},
        {"blocks": 2, "step_input": True},
        {"time_embedding": 0},
    ],
    ids=["default", "unconditional", "three-levels-attention", "two-blocks-step", "raw-time"],
)
def test_output_has_the_shape_of_x_and_gradients_reach_every_parameter(changes: dict) -> None:
    net = _net(**changes)
    x, t, c = _inputs()
    v = net(x, t, c if net.context_features else None)
    assert v.shape == x.shape and v.dtype == torch.float64
    weights = torch.randn(v.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert parameters_without_gradient(net, (v * weights).sum()) == []


def test_non_square_images_and_three_channels() -> None:
    torch.manual_seed(0)
    net = UNetVelocity((3, 4, 8), channels=8, groups=4, channel_multipliers=(1, 2, 2))
    x = torch.randn(2, 3, 4, 8)
    assert net(x, torch.rand(2)).shape == x.shape


def test_the_output_depends_on_time_context_and_each_sample_alone() -> None:
    net = _net().eval()
    x, t, c = _inputs()
    with torch.no_grad():
        v = net(x, t, c)
        assert not torch.allclose(net(x, t, c.flip(0)), v)  # another class per row
        assert not torch.allclose(net(x, t, 0.5 * c + 0.1), v)  # any real context vector (a guidance null row)
        assert not torch.allclose(net(x, 1 - t, c), v)
        # rows do not mix: GroupNorm normalises each sample over its own channels and pixels
        torch.testing.assert_close(net(x[:2], t[:2], c[:2]), v[:2], rtol=1e-12, atol=1e-12)


def test_the_step_input_is_used_when_enabled_and_refused_otherwise() -> None:
    net = _net(step_input=True).eval()
    x, t, c = _inputs()
    with torch.no_grad():
        v0 = net(x, t, c)
        torch.testing.assert_close(net(x, t, c, step=0.0), v0)  # None means step 0
        v_half = net(x, t, c, step=0.5)
        assert not torch.allclose(v_half, v0)
        torch.testing.assert_close(net(x, t, c, step=torch.full((4,), 0.5, dtype=torch.float64)), v_half)
    with pytest.raises(ValueError, match="no step-size input; build it with step_input=True"):
        _net()(x, t, c, step=0.5)


def test_bad_inputs_are_refused_with_the_expected_shape() -> None:
    net = _net()
    x, t, c = _inputs()
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 1, 8, 8\), got \(4, 64\)"):
        net(x.flatten(1), t, c)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 1, 8, 8\), got \(4, 1, 4, 4\)"):
        net(x[..., :4, :4], t, c)
    with pytest.raises(ValueError, match=r"t must have shape \(4,\)"):
        net(x, t[:, None], c)
    with pytest.raises(ValueError, match=r"context must have shape \(batch, 10\), got \(4, 3\)"):
        net(x, t, c[:, :3])
    with pytest.raises(ValueError, match=r"batch size must equal that of x \(4\), got 2"):
        net(x, t, c[:2])
    with pytest.raises(ValueError, match=r"conditional: pass a context of shape \(batch, 10\)"):
        net(x, t)
    with pytest.raises(ValueError, match="takes no context"):
        _net(context=0)(x, t, c)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"channel_multipliers": (1, 2, 2, 2, 2)}, r"divisible by 16 \(halved 4 times"),
        ({"groups": 3}, r"channels \(8\) must be divisible by groups \(3\)"),
        ({"attention": True, "heads": 3}, r"heads \(3\) must divide the lowest resolution's width"),
        ({"channel_multipliers": ()}, "channel_multipliers must be one or more positive ints"),
        ({"dropout": 1.0}, r"dropout must be a probability in \[0, 1\), got 1\.0"),
        ({"heads": 2}, "heads = 2: attention = False does not read it"),
    ],
)
def test_bad_settings_are_refused_naming_them(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _net(**changes)
    with pytest.raises(ValueError, match=r"features must be an image shape \(C, H, W\)"):
        UNetVelocity(64)


def test_flow_matching_with_guidance_trains_and_samples_images() -> None:
    torch.manual_seed(0)
    matcher = FlowMatcher(UNetVelocity(SHAPE, context=CLASSES, channels=8, groups=4), context_dropout=0.2)
    assert matcher.event_shape == SHAPE and matcher.context_features == CLASSES
    g = torch.Generator().manual_seed(3)
    data = torch.rand(64, *SHAPE, generator=g) * 2 - 1
    labels = torch.eye(CLASSES)[torch.randint(0, CLASSES, (64,), generator=g)]
    optimizer = torch.optim.Adam(matcher.parameters(), lr=2e-3)
    before = [p.detach().clone() for p in matcher.parameters()]
    for _ in range(5):
        loss = matcher.loss(data, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss)
    assert all(not torch.equal(b, p) for b, p in zip(before, matcher.parameters(), strict=True))  # null context too
    matcher.eval()
    classes = torch.eye(CLASSES)[:3]
    drawn = matcher.sample(2, classes, steps=3, guidance_scale=2.0)
    assert drawn.shape == (2, 3, *SHAPE) and torch.isfinite(drawn).all()


def test_a_shortcut_model_passes_its_step_size_to_the_unet() -> None:
    torch.manual_seed(0)
    model = ShortcutMatcher(UNetVelocity(SHAPE, channels=8, groups=4, step_input=True))
    assert torch.isfinite(model.loss(torch.randn(8, *SHAPE)))
    assert model.sample(3, steps=2).shape == (3, *SHAPE)


def test_forward_mode_derivatives_match_finite_differences() -> None:
    """MeanFlow's loss takes a Jacobian-vector product of the network in (x, t, step) (torch.func.jvp)."""
    net = _net(step_input=True, attention=True, heads=2, channel_multipliers=(1, 2, 2)).eval()
    x, t, c = _inputs()
    step = 0.3 * t.flip(0)
    tangent = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def field(x, t, step):
        return net(x, t, c, step=step)

    with torch.no_grad():
        _, derivative = torch.func.jvp(field, (x, t, step), (tangent, torch.ones_like(t), torch.zeros_like(step)))
        eps = 1e-6
        central = (field(x + eps * tangent, t + eps, step) - field(x - eps * tangent, t - eps, step)) / (2 * eps)
    torch.testing.assert_close(derivative, central, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("network", ["velocity-mlp", "residual-velocity-mlp"])
def test_the_vector_networks_refuse_a_context_they_do_not_take_and_integer_times(network: str) -> None:
    """Called directly (not through a matcher's checks), a network neither drops a context nor
    fails inside a matrix product."""
    cls = registry.lookup("velocity", network)
    x, t = torch.randn(3, 2), torch.rand(3)
    with pytest.raises(ValueError, match="this network takes no context"):
        cls(2)(x, t, torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"this network is conditional: pass a context of shape \(batch, 2\)"):
        cls(2, context=2)(x, t)
    with pytest.raises(ValueError, match=r"context must have shape \(batch, 2\)"):
        cls(2, context=2)(x, t, torch.randn(3, 5))
    with pytest.raises(TypeError, match="t must be a floating-point tensor"):
        cls(2)(x, torch.zeros(3, dtype=torch.long))
    assert cls(2, context=2)(x, t, torch.randn(3, 2)).shape == (3, 2)
