"""The invariant harness over every registered flow (see tests/cases.py)."""

from __future__ import annotations

import pytest
import torch

from flowforge.flows import Flow
from tests.cases import FLOW_CASES
from tests.invariants import (
    CONTEXT,
    FlowCase,
    autograd_logabsdet,
    density_mass_2d,
    parameters_without_gradient,
    random_context,
    random_inputs,
    randomize_,
    safetensors_round_trip,
)

VARIANTS = [
    pytest.param(case, context, id=f"{case.name}-{'ctx' if context else 'noctx'}")
    for case in FLOW_CASES
    for context in ((0, CONTEXT) if case.conditional else (0,))
]
DTYPES = [pytest.param(torch.float64, id="f64"), pytest.param(torch.float32, id="f32")]


def build(case: FlowCase, context: int, dtype: torch.dtype, seed: int = 0) -> Flow:
    torch.manual_seed(seed)
    return randomize_(case.build(context), scale=case.randomize_scale, seed=seed).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("case", "context"), VARIANTS)
def test_log_prob_of_samples_matches_sample_and_log_prob(case: FlowCase, context: int, dtype: torch.dtype) -> None:
    flow = build(case, context, dtype)
    c = random_context(4, context, dtype)
    torch.manual_seed(1)
    x, log_prob = flow.sample_and_log_prob(50, c)
    expected = flow.log_prob(x.reshape(-1, case.features), None if c is None else c.repeat(50, 1))
    tol = case.float64_tolerance if dtype == torch.float64 else 1e-3
    torch.testing.assert_close(log_prob.reshape(-1), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize(("case", "context"), VARIANTS)
def test_sample_equals_the_inverse_of_the_same_noise(case: FlowCase, context: int) -> None:
    """``sample`` (which skips log-determinants) and ``sample_and_log_prob`` give the same points."""
    flow = build(case, context, torch.float64)
    c = random_context(3, context, torch.float64)
    torch.manual_seed(2)
    x = flow.sample(20, c)
    torch.manual_seed(2)
    expected, _ = flow.sample_and_log_prob(20, c)
    tol = case.float64_tolerance
    torch.testing.assert_close(x, expected.detach(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("case", "context"), VARIANTS)
def test_log_prob_is_base_density_plus_autograd_logabsdet(case: FlowCase, context: int, dtype: torch.dtype) -> None:
    """log p(x) = log p_Z(f(x)) + log|det df/dx|, the Jacobian taken by autograd through the whole flow."""
    flow = build(case, context, dtype)
    x = random_inputs(200, case.features, dtype, max_scale=3.0)
    c = random_context(200, context, dtype)
    embedded = c if flow.context_net is None or c is None else flow.context_net(c)
    with torch.no_grad():
        z, _ = flow.transform(x, embedded)
        expected = flow.base.log_prob(z) + autograd_logabsdet(lambda inp: flow.transform(inp, embedded)[0], x)
        tol = max(1e-8, case.float64_tolerance) if dtype == torch.float64 else 1e-3
        torch.testing.assert_close(flow.log_prob(x, c).double(), expected.double(), rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("case", "context"), VARIANTS)
def test_gradients_reach_every_parameter(case: FlowCase, context: int, dtype: torch.dtype) -> None:
    flow = build(case, context, dtype)
    x = random_inputs(256, case.features, dtype, max_scale=3.0)
    c = random_context(256, context, dtype)
    missing = parameters_without_gradient(flow, -flow.log_prob(x, c).mean())
    assert not missing, f"maximum likelihood: no gradient reaches {missing}"


@pytest.mark.parametrize(("case", "context"), VARIANTS)
def test_rsample_is_differentiable(case: FlowCase, context: int) -> None:
    """Reverse-KL style loss: gradients flow through the samples to every transform parameter."""
    flow = build(case, context, torch.float64)
    c = random_context(8, context, torch.float64)
    x, log_prob = flow.sample_and_log_prob(64, c)
    missing = parameters_without_gradient(flow.transform, (log_prob + x.square().sum(-1)).mean())
    assert not missing, f"sample_and_log_prob: no gradient reaches {missing}"
    missing = parameters_without_gradient(flow.transform, flow.rsample(64, c).square().mean())
    assert not missing, f"rsample: no gradient reaches {missing}"
    assert not flow.sample(4, c).requires_grad


@pytest.mark.parametrize(("case", "context"), VARIANTS)
def test_train_and_eval_modes_agree(case: FlowCase, context: int) -> None:
    flow = build(case, context, torch.float64)
    x = random_inputs(32, case.features, torch.float64)
    c = random_context(32, context, torch.float64)
    torch.testing.assert_close(flow.train().log_prob(x, c), flow.eval().log_prob(x, c), rtol=0, atol=0)


@pytest.mark.parametrize(("case", "context"), VARIANTS)
def test_state_dict_round_trip(case: FlowCase, context: int) -> None:
    source = build(case, context, torch.float64, seed=0)
    target = safetensors_round_trip(source, build(case, context, torch.float64, seed=1))
    x = random_inputs(16, case.features, torch.float64)
    c = random_context(16, context, torch.float64)
    torch.testing.assert_close(source.log_prob(x, c), target.log_prob(x, c), rtol=0, atol=0)
    torch.manual_seed(3)
    a = source.sample(5, c)
    torch.manual_seed(3)
    torch.testing.assert_close(a, target.sample(5, c), rtol=0, atol=0)


@pytest.mark.parametrize(("case", "context"), VARIANTS)
def test_batch_of_one(case: FlowCase, context: int) -> None:
    flow = build(case, context, torch.float64)
    x = random_inputs(4, case.features, torch.float64)
    c = random_context(4, context, torch.float64)
    one = flow.log_prob(x[:1], None if c is None else c[:1])
    assert one.shape == (1,)
    torch.testing.assert_close(one, flow.log_prob(x, c)[:1])
    assert flow.sample(1, None if c is None else c[:1]).shape == (
        (1, case.features) if c is None else (1, 1, case.features)
    )


@pytest.mark.parametrize(("case", "context"), VARIANTS)
def test_sample_shape_convention(case: FlowCase, context: int) -> None:
    """(n, *event) without a context; (n, B, *event) with a context of B rows, draw-major."""
    flow = build(case, context, torch.float32)
    if context == 0:
        assert flow.sample(7).shape == (7, case.features)
        x, log_prob = flow.sample_and_log_prob(7)
        assert x.shape == (7, case.features) and log_prob.shape == (7,)
        return
    c = random_context(3, context, torch.float32)
    x, log_prob = flow.sample_and_log_prob(7, c)
    assert x.shape == (7, 3, case.features) and log_prob.shape == (7, 3)
    # Row b of every draw was generated with context row b: its log-density there must match.
    torch.testing.assert_close(flow.log_prob(x[:, 1], c[1:2].expand(7, -1)), log_prob[:, 1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("case", "context"), [v for v in VARIANTS if v.values[0].features == 2])
def test_density_integrates_to_one(case: FlowCase, context: int) -> None:
    flow = build(case, context, torch.float64).eval()
    c = random_context(1, context, torch.float64)
    log_prob = flow.log_prob if c is None else (lambda pts: flow.log_prob(pts, c.expand(pts.shape[0], -1)))
    mass = density_mass_2d(log_prob, bound=12.0, resolution=600)
    assert abs(mass - 1.0) < 0.01, f"density integrates to {mass:.4f}"


@pytest.mark.parametrize(("case", "context"), VARIANTS)
def test_distribution_view(case: FlowCase, context: int) -> None:
    flow = build(case, context, torch.float64)
    c = random_context(4, context, torch.float64)
    d = flow.distribution(c)
    assert isinstance(d, torch.distributions.Distribution)
    batch = () if c is None else (4,)
    assert d.batch_shape == batch and d.event_shape == (case.features,)
    x = d.rsample((2, 3))
    assert x.shape == (2, 3, *batch, case.features) and x.requires_grad
    log_prob = d.log_prob(x)
    assert log_prob.shape == (2, 3, *batch)
    flat_context = None if c is None else c.repeat(6, 1)
    torch.testing.assert_close(log_prob.reshape(-1), flow.log_prob(x.reshape(-1, case.features), flat_context))
    single = d.sample()  # the empty sample shape, as torch.distributions allows
    assert single.shape == (*batch, case.features) and d.log_prob(single).shape == batch
    with pytest.raises(ValueError, match="value must have shape"):
        d.log_prob(torch.zeros(2, case.features + 1))
