"""Residual blocks: Lipschitz bound, unbiased log-det series and gradient, fixed-point inverse."""

from __future__ import annotations

import math

import pytest
import torch

from flowforge.data import toy_dataset
from flowforge.flows import ResidualFlow
from flowforge.transforms import LipschitzLinear, ResidualBlock
from flowforge.transforms.residual import lipschitz_bound


def _block(logdet: str = "series", coefficient: float = 0.9, seed: int = 0, **kwargs) -> ResidualBlock:
    torch.manual_seed(seed)
    block = ResidualBlock(4, context=2, hidden=(16, 16), coefficient=coefficient, logdet=logdet, **kwargs).double()
    with torch.no_grad():  # large weights, so that every layer is rescaled to the bound
        for layer in block.residual.layers:
            layer.weight.mul_(3.0)
    return block


def _inputs(n: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randn(n, 2, generator=g, dtype=torch.float64)


def test_layers_are_rescaled_to_the_coefficient() -> None:
    block = _block()
    for weight in block.residual.normalized_weights():
        norm = float(torch.linalg.matrix_norm(weight.detach(), ord=2))
        assert abs(norm - 0.9) < 1e-6, f"spectral norm {norm} instead of the coefficient 0.9"
    # A layer whose weight is already inside the bound is left as it is.
    small = LipschitzLinear(5, 3, coefficient=0.9).double()
    with torch.no_grad():
        small.weight.mul_(0.1 / torch.linalg.matrix_norm(small.weight, ord=2))
    torch.testing.assert_close(small.normalized_weight(), small.weight)
    # A write through .data bypasses the version counter; refresh() brings the bound back.
    small.weight.data.mul_(100.0)
    small.refresh()
    assert float(torch.linalg.matrix_norm(small.normalized_weight().detach(), ord=2)) < 0.9 + 1e-9


def test_lipschitz_constant_is_below_the_coefficient() -> None:
    """The Jacobian of g at many points (and the product of layer norms) stays below the coefficient."""
    block = _block(coefficient=0.8)
    x, c = _inputs(300, seed=2)
    x = 3 * x
    jacobian = torch.autograd.functional.jacobian(lambda inp: block.residual(inp, c).sum(0), x).permute(1, 0, 2)
    largest = float(torch.linalg.matrix_norm(jacobian, ord=2).max())
    assert largest < 0.8, f"local Lipschitz constant {largest} exceeds 0.8"
    assert lipschitz_bound(block) <= 0.8**3 * (1 + 1e-6)
    # It stays so after optimizer steps (the power iteration follows the weights).
    optimizer = torch.optim.SGD(block.parameters(), lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        z, logdet = block(x, c)
        (-(logdet - 0.5 * z.square().sum(1))).mean().backward()
        optimizer.step()
    for weight in block.residual.normalized_weights():
        assert float(torch.linalg.matrix_norm(weight.detach(), ord=2)) <= 0.8 * (1 + 1e-6)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_series_logdet_is_unbiased(training: bool) -> None:
    """The Russian-roulette estimate averages to the exact log-det (mean within 3 standard errors)."""
    exact = _block("exact").train(training)
    series = _block("series").train(training)
    series.load_state_dict(exact.state_dict())
    x, c = _inputs(3)
    with torch.no_grad():
        reference = exact(x, c)[1]
        draws = torch.stack([series(x.repeat(50, 1), c.repeat(50, 1))[1].view(50, 3).mean(0) for _ in range(400)])
    mean, error = draws.mean(0), draws.std(0) / math.sqrt(len(draws))
    assert bool((error > 0).all())
    assert bool(((mean - reference).abs() < 3 * error + 1e-9).all()), f"{mean} vs exact {reference} (se {error})"


def test_neumann_gradient_is_unbiased() -> None:
    """The series' gradient with respect to the parameters averages to that of the exact log-det."""
    exact = _block("exact")
    series = _block("series")
    series.load_state_dict(exact.state_dict())
    x, c = _inputs(2)
    weight = exact.residual.layers[1].weight
    (reference,) = torch.autograd.grad(exact(x, c)[1].sum(), weight)
    series_weight = series.residual.layers[1].weight
    draws = []
    for _ in range(300):
        (grad,) = torch.autograd.grad(series(x.repeat(20, 1), c.repeat(20, 1))[1].sum() / 20, series_weight)
        draws.append(grad)
    draws = torch.stack(draws)
    mean, error = draws.mean(0), draws.std(0) / math.sqrt(len(draws))
    within = (mean - reference).abs() <= 3.5 * error + 1e-9
    assert float(within.double().mean()) > 0.97, "the series gradient is biased"
    assert float((mean - reference).abs().max()) < 0.1 * float(reference.abs().max()) + 1e-6


def test_inverse_is_a_fixed_point_with_exact_gradients() -> None:
    block = _block("exact").eval()
    x, c = _inputs()
    z, logdet = block(x, c)
    z, logdet = z.detach(), logdet.detach()
    x_back, logdet_back = block.inverse(z, c)
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-10)
    torch.testing.assert_close(logdet_back, -logdet, rtol=0, atol=1e-10)
    assert 1 < block.last_iterations < 200
    # The implicit-function gradient equals backpropagation through a long unrolled iteration.
    loss = block.inverse(z, c)[0].square().sum()
    params = list(block.residual.parameters())
    implicit = torch.autograd.grad(loss, params, allow_unused=True)
    weights = block.residual.normalized_weights()
    unrolled_x = z
    for _ in range(300):
        unrolled_x = z - block.residual(unrolled_x, c, weights)
    unrolled = torch.autograd.grad(unrolled_x.square().sum(), params, allow_unused=True)
    for name, a, b in zip([n for n, _ in block.residual.named_parameters()], implicit, unrolled, strict=True):
        assert a is not None and b is not None, name
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9, msg=name)


def test_inverse_warns_when_it_runs_out_of_iterations() -> None:
    block = _block("exact", max_iterations=2)
    x, c = _inputs()
    z, _ = block(x, c)
    with pytest.warns(RuntimeWarning, match="fixed-point iteration stopped after 2 steps"):
        block.inverse(z, c)


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="coefficient must be in"):
        ResidualBlock(3, coefficient=1.0)
    with pytest.raises(ValueError, match="logdet must be"):
        ResidualBlock(3, logdet="trace")
    with pytest.raises(ValueError, match="x must have shape"):
        ResidualBlock(3)(torch.zeros(2, 4))


def test_residual_flow_learns_a_2d_density() -> None:
    """250 steps with the series log-det lower the held-out NLL of moons well below the start (2.8 nats).

    Residual flows learn slowly (each block deforms space by less than its Lipschitz bound): 600
    steps reach 1.9 nats, so this only checks a clear decrease."""
    torch.manual_seed(0)
    data = toy_dataset("moons", 2048, seed=0)
    test = toy_dataset("moons", 512, seed=1)
    flow = ResidualFlow(2, transforms=3, hidden=(32, 32))
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-2)
    with torch.no_grad():
        flow(data[:256])  # ActNorm initialisation
        start = float(-flow.eval().log_prob(test).mean())
    flow.train()
    for _ in range(250):
        batch = data[torch.randint(0, len(data), (128,))]
        optimizer.zero_grad()
        (-flow.log_prob(batch).mean()).backward()
        optimizer.step()
    with torch.no_grad():
        end = float(-flow.eval().log_prob(test).mean())
    assert end < start - 0.25, f"NLL went from {start:.3f} to {end:.3f}"
    sample = flow.sample(64)
    assert sample.shape == (64, 2) and bool(torch.isfinite(sample).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_saved_residual_flow_reloads_to_the_same_densities(tmp_path, dtype: torch.dtype) -> None:
    """The power iteration that a reload, copy or refresh runs again from converged vectors changes
    nothing, so every copy scores exactly as the original did."""
    import copy
    import pickle

    from flowforge.checkpoint import load_model, save_model

    torch.manual_seed(0)
    flow = ResidualFlow(2, transforms=2, hidden=(16,), logdet="exact").to(dtype)
    x = torch.randn(5, 2, dtype=dtype)
    flow.log_prob(x)  # the first batch initialises ActNorm
    flow.eval()
    expected = flow.log_prob(x)
    save_model(tmp_path / "flow.safetensors", flow)
    copies = [load_model(tmp_path / "flow.safetensors").eval(), copy.deepcopy(flow), pickle.loads(pickle.dumps(flow))]
    for other in copies:
        assert torch.equal(other.log_prob(x), expected)
    for layer in (module for module in flow.modules() if isinstance(module, LipschitzLinear)):
        layer.refresh()
    assert torch.equal(flow.log_prob(x), expected)


def test_an_empty_batch_scores_to_an_empty_tensor_before_any_initialisation() -> None:
    """0 rows run no transform: a fresh ActNorm (which initialises from a batch) and a training-mode
    BatchNorm (which needs rows) are untouched."""
    from flowforge.flows import MAF, Glow

    flows = [
        (ResidualFlow(2, transforms=1, hidden=(8,)), torch.zeros(0, 2)),
        (MAF(2, transforms=2, hidden=(8,), batch_norm=True), torch.zeros(0, 2)),
        (Glow((1, 4, 4), levels=1, steps=1, hidden_channels=4), torch.zeros(0, 1, 4, 4)),
    ]
    for flow, empty in flows:
        before = {name: value.clone() for name, value in flow.state_dict().items()}
        assert flow.train().log_prob(empty).shape == (0,)
        assert all(torch.equal(value, before[name]) for name, value in flow.state_dict().items())
