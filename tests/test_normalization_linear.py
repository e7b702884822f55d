"""ActNorm, BatchNorm and LULinear: the behaviour the invariant harness cannot see.

The harness (tests/cases.py) already checks round trips, log-dets against autograd, gradients,
state dicts and shapes of every case; here: data-dependent initialisation, running statistics,
the training-mode log-det of BatchNorm, and the factorised weight of LULinear. Math in float64.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from flowforge.distributions import StandardNormal
from flowforge.flows import Flow
from flowforge.transforms import ActNorm, BatchNorm, Compose, LULinear
from tests.invariants import autograd_logabsdet, per_sample_jacobians, safetensors_round_trip

F64 = torch.float64


def _data(n: int, features: int, seed: int = 0, image: tuple[int, int] | None = None) -> torch.Tensor:
    """Rows with per-feature means 1..features and standard deviations 0.5..(features / 2)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (n, features) if image is None else (n, features, *image)
    mean = torch.arange(1, features + 1, dtype=F64)
    std = 0.5 * torch.arange(1, features + 1, dtype=F64)
    view = (1, features) if image is None else (1, features, 1, 1)
    return mean.view(view) + std.view(view) * torch.randn(shape, generator=generator, dtype=F64)


# -- ActNorm ----------------------------------------------------------------------------------


def test_actnorm_first_training_batch_comes_out_standardised() -> None:
    layer = ActNorm(4).double()
    assert not layer.initialized
    x = _data(300, 4)
    z, ladj = layer(x)
    assert bool(layer.initialized)
    torch.testing.assert_close(z.mean(0), torch.zeros(4, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(z.var(0, unbiased=False), torch.ones(4, dtype=F64), rtol=0, atol=1e-12)
    expected = -0.5 * x.var(0, unbiased=False).log().sum()
    torch.testing.assert_close(ladj, expected.expand(300), rtol=0, atol=1e-12)
    # The first output carries a graph to the freshly set parameters.
    z.square().sum().backward()
    assert layer.shift.grad is not None and layer.log_scale.grad is not None


def test_actnorm_images_per_channel() -> None:
    layer = ActNorm(3).double()
    x = _data(6, 3, image=(5, 4))
    z, ladj = layer(x)
    assert z.shape == x.shape and ladj.shape == (6,)
    torch.testing.assert_close(z.mean((0, 2, 3)), torch.zeros(3, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(z.var((0, 2, 3), unbiased=False), torch.ones(3, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(ladj, (20 * layer.log_scale.sum()).expand(6))
    # Log-det against autograd through the flattened image, and the round trip.
    with torch.no_grad():
        layer.log_scale.add_(0.1 * torch.randn(3, dtype=F64))

    def flat(inp: torch.Tensor) -> torch.Tensor:
        return layer(inp.view(-1, 3, 5, 4))[0].flatten(1)

    x = _data(4, 3, seed=1, image=(5, 4))
    z, ladj = layer(x)
    torch.testing.assert_close(ladj, autograd_logabsdet(flat, x.flatten(1)), rtol=0, atol=1e-10)
    x_back, ladj_back = layer.inverse(z)
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-12)
    torch.testing.assert_close(ladj_back, -ladj, rtol=0, atol=1e-12)


def test_actnorm_initialises_only_once() -> None:
    layer = ActNorm(3).double()
    layer(_data(100, 3, seed=0))
    shift, log_scale = layer.shift.detach().clone(), layer.log_scale.detach().clone()
    z, _ = layer(5.0 * _data(100, 3, seed=1) - 2.0)  # different statistics, still training mode
    torch.testing.assert_close(layer.shift.detach(), shift, rtol=0, atol=0)
    torch.testing.assert_close(layer.log_scale.detach(), log_scale, rtol=0, atol=0)
    assert z.var(0).min() > 5.0  # not standardised again


def test_actnorm_initialisation_survives_a_state_dict_round_trip() -> None:
    source = ActNorm(3).double()
    source(_data(100, 3, seed=0))
    target = safetensors_round_trip(source, ActNorm(3).double())
    assert bool(target.initialized)
    x = _data(50, 3, seed=1) * 3.0
    z_target, ladj_target = target.train()(x)  # a training batch must not re-initialise the loaded layer
    z_source, ladj_source = source(x)
    torch.testing.assert_close(z_target, z_source, rtol=0, atol=0)
    torch.testing.assert_close(ladj_target, ladj_source, rtol=0, atol=0)
    torch.testing.assert_close(target.shift, source.shift, rtol=0, atol=0)
    # Loading an uninitialised state makes the next training batch initialise again.
    safetensors_round_trip(ActNorm(3).double(), target)
    assert not target.initialized
    z, _ = target(x)
    torch.testing.assert_close(z.mean(0), torch.zeros(3, dtype=F64), rtol=0, atol=1e-12)


def test_actnorm_is_the_identity_until_initialised() -> None:
    """Eval-mode forward and inverse (sampling) never initialise."""
    layer = ActNorm(2).double()
    x = _data(10, 2)
    for z, ladj in (layer.eval()(x), layer.train().inverse(x)):
        torch.testing.assert_close(z, x, rtol=0, atol=0)
        torch.testing.assert_close(ladj, torch.zeros(10, dtype=F64), rtol=0, atol=0)
    assert not layer.initialized


def test_actnorm_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="features must be a positive int"):
        ActNorm(0)
    layer = ActNorm(3)
    with pytest.raises(ValueError, match=r"at least 2 values per feature"):
        layer(torch.randn(1, 3))  # a first batch of one row cannot be standardised
    assert not layer.initialized
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 3\) or \(batch, 3, H, W\), got \(4, 3, 2\)"):
        layer(torch.randn(4, 3, 2))
    with pytest.raises(ValueError, match=r"z must have shape \(batch, 3\) or \(batch, 3, H, W\), got \(4, 2, 5, 5\)"):
        layer.inverse(torch.randn(4, 2, 5, 5))
    layer(torch.randn(1, 3, 2, 2))  # one image has 4 values per channel: enough
    assert bool(layer.initialized)


# -- BatchNorm --------------------------------------------------------------------------------


def test_batchnorm_running_statistics_converge_and_eval_mode_standardises() -> None:
    torch.manual_seed(0)
    layer = BatchNorm(3, momentum=0.1).double()
    mean = torch.tensor([2.0, -1.0, 0.5], dtype=F64)
    std = torch.tensor([0.5, 3.0, 1.5], dtype=F64)
    for _ in range(300):
        layer(mean + std * torch.randn(512, 3, dtype=F64))
    torch.testing.assert_close(layer.running_mean, mean, rtol=0, atol=0.05)
    torch.testing.assert_close(layer.running_var, std.square(), rtol=0.05, atol=0)
    layer.eval()
    with torch.no_grad():
        z, ladj = layer(mean + std * torch.randn(100_000, 3, dtype=F64))
    torch.testing.assert_close(z.mean(0), torch.zeros(3, dtype=F64), rtol=0, atol=0.05)
    torch.testing.assert_close(z.var(0), torch.ones(3, dtype=F64), rtol=0, atol=0.06)
    torch.testing.assert_close(ladj, -0.5 * (layer.running_var + layer.eps).log().sum().expand(100_000))


def test_batchnorm_running_statistics_update_rule() -> None:
    """running = (1 - momentum) running + momentum batch, with the unbiased batch variance."""
    layer = BatchNorm(2, momentum=0.25).double()
    x = _data(10, 2)
    layer(x)
    torch.testing.assert_close(layer.running_mean, 0.25 * x.mean(0), rtol=0, atol=1e-14)
    torch.testing.assert_close(layer.running_var, 0.75 + 0.25 * x.var(0), rtol=0, atol=1e-14)
    with torch.no_grad():
        layer.eval()(x)
    torch.testing.assert_close(layer.running_mean, 0.25 * x.mean(0), rtol=0, atol=1e-14)  # eval leaves them


def test_batchnorm_training_logabsdet_is_that_of_the_row_map_with_batch_statistics_fixed() -> None:
    torch.manual_seed(0)
    layer = BatchNorm(4, eps=1e-3).double()
    with torch.no_grad():
        layer.log_gamma.copy_(0.3 * torch.randn(4, dtype=F64))
        layer.beta.copy_(torch.randn(4, dtype=F64))
    x = _data(64, 4)
    z, ladj = layer.train()(x)
    mean, var = x.mean(0), x.var(0, unbiased=False)

    def row_map(inp: torch.Tensor) -> torch.Tensor:  # the MAF paper's map, batch statistics as constants
        return (inp - mean) / (var + layer.eps).sqrt() * layer.log_gamma.exp() + layer.beta

    torch.testing.assert_close(z, row_map(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(ladj, autograd_logabsdet(row_map, x), rtol=0, atol=1e-10)
    # The same map is the layer's own eval-mode map with the running statistics set to the batch's.
    frozen = BatchNorm(4, eps=1e-3).double()
    frozen.load_state_dict({**layer.state_dict(), "running_mean": mean, "running_var": var})
    frozen.eval()
    with torch.no_grad():
        z_frozen, ladj_frozen = frozen(x)
    torch.testing.assert_close(z_frozen, z, rtol=0, atol=1e-12)
    torch.testing.assert_close(ladj_frozen, ladj, rtol=0, atol=1e-12)
    torch.testing.assert_close(ladj, autograd_logabsdet(lambda inp: frozen(inp)[0], x), rtol=0, atol=1e-10)


def test_batchnorm_inverse_needs_eval_mode() -> None:
    layer = BatchNorm(2).double()
    x = _data(32, 2)
    z, _ = layer(x)
    with pytest.raises(RuntimeError, match=r"only defined in eval mode.*\.eval\(\)"):
        layer.inverse(z)
    flow = Flow(StandardNormal(2), Compose(LULinear(2), BatchNorm(2))).double()
    with pytest.raises(RuntimeError, match="eval mode"):
        flow.sample(4)  # sampling in training mode would not invert the training-mode forward
    flow.eval()
    samples, log_prob = flow.sample_and_log_prob(8)
    torch.testing.assert_close(flow.log_prob(samples), log_prob)


def test_batchnorm_refuses_bad_arguments() -> None:
    for kwargs in ({"momentum": 0.0}, {"momentum": 1.5}, {"eps": 0.0}, {"eps": float("nan")}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            BatchNorm(3, **kwargs)
    with pytest.raises(ValueError, match="features must be a positive int"):
        BatchNorm(0)
    with pytest.raises(ValueError, match=r"at least 2 rows.*\.eval\(\)"):
        BatchNorm(3)(torch.randn(1, 3))
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 3\)"):
        BatchNorm(3)(torch.randn(4, 2))
    BatchNorm(3).eval()(torch.randn(1, 3))  # one row is fine with the running statistics


# -- LULinear ---------------------------------------------------------------------------------


@pytest.mark.parametrize("identity_init", [True, False])
def test_lu_linear_weight_is_p_l_u_and_is_the_map_applied(identity_init: bool) -> None:
    torch.manual_seed(0)
    layer = LULinear(6, identity_init=identity_init).double()
    with torch.no_grad():
        layer.lu.add_(0.3 * torch.randn(6, 6, dtype=F64))
        layer.bias.add_(torch.randn(6, dtype=F64))
    p, lower, upper = layer.permutation_matrix(), layer.lower(), layer.upper()
    eye = torch.eye(6, dtype=F64)
    torch.testing.assert_close(p @ p.T, eye, rtol=0, atol=0)
    assert set(p.flatten().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(lower.diagonal(), torch.ones(6, dtype=F64), rtol=0, atol=0)
    assert not lower.triu(1).any() and not upper.tril(-1).any() and bool((upper.diagonal() > 0).all())
    weight = layer.weight()
    torch.testing.assert_close(weight, p @ lower @ upper, rtol=0, atol=0)
    x = _data(16, 6) * 2.0
    z, ladj = layer(x)
    torch.testing.assert_close(z, x @ weight.T + layer.bias, rtol=0, atol=1e-12)
    torch.testing.assert_close(per_sample_jacobians(lambda inp: layer(inp)[0], x), weight.expand(16, 6, 6))
    sign, logabsdet = torch.linalg.slogdet(weight)
    torch.testing.assert_close(ladj, logabsdet.expand(16), rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.inverse(z)[1], -logabsdet.expand(16), rtol=0, atol=1e-12)
    assert sign == torch.linalg.det(p)  # det L = 1, det U > 0


def test_lu_linear_initialisations() -> None:
    layer = LULinear(5).double()
    torch.testing.assert_close(layer.weight(), torch.eye(5, dtype=F64))
    x = _data(8, 5)
    z, ladj = layer(x)
    torch.testing.assert_close(z, x)
    torch.testing.assert_close(ladj, torch.zeros(8, dtype=F64))
    torch.manual_seed(1)
    rotation = LULinear(5, identity_init=False).double().weight()
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(5, dtype=F64), rtol=0, atol=1e-5)
    assert not torch.allclose(rotation, torch.eye(5, dtype=F64), atol=0.1)


def test_lu_linear_follows_its_parameters_after_an_optimizer_step() -> None:
    """Nothing derived from the parameters may be cached."""
    torch.manual_seed(0)
    layer = LULinear(4, identity_init=False).double()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.01)  # small enough to decrease the loss
    x = _data(32, 4)
    losses = []
    for _ in range(3):
        z, ladj = layer(x)
        optimizer.zero_grad()
        loss = (0.5 * z.square().sum(1) - ladj).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        with torch.no_grad():
            z, ladj = layer(x)
            torch.testing.assert_close(z, x @ layer.weight().T + layer.bias, rtol=0, atol=1e-12)
            torch.testing.assert_close(ladj, torch.linalg.slogdet(layer.weight()).logabsdet.expand(32))
            torch.testing.assert_close(layer.inverse(z)[0], x, rtol=0, atol=1e-12)
    assert losses[2] < losses[1] < losses[0]


def test_lu_linear_diagonal_floor_keeps_it_invertible() -> None:
    layer = LULinear(3, min_diagonal=1e-2).double()
    with torch.no_grad():
        layer.lu.fill_diagonal_(-1e4)  # softplus underflows to 0: the floor is all that is left
    torch.testing.assert_close(layer.diagonal(), torch.full((3,), 1e-2, dtype=F64))
    x = _data(8, 3)
    z, ladj = layer(x)
    torch.testing.assert_close(ladj, torch.full((8,), 3 * math.log(1e-2), dtype=F64))
    torch.testing.assert_close(layer.inverse(z)[0], x, rtol=0, atol=1e-10)


def test_lu_linear_uses_no_deprecated_calls() -> None:
    layer = LULinear(4, identity_init=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z, _ = layer(torch.randn(8, 4))
        layer.inverse(z)
        LULinear(3, identity_init=False)


def test_lu_linear_refuses_bad_arguments() -> None:
    for features in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="features must be a positive int"):
            LULinear(features)
    for bound in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="min_diagonal"):
            LULinear(3, min_diagonal=bound)
    with pytest.raises(ValueError, match="identity_init must be a bool"):
        LULinear(3, identity_init="yes")
    with pytest.raises(ValueError, match=r"z must have shape \(batch, 3\)"):
        LULinear(3).inverse(torch.randn(2, 4))
