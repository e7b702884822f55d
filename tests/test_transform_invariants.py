"""The invariant harness over every registered transform (see tests/cases.py)."""

from __future__ import annotations

import pytest
import torch

from tests.cases import TRANSFORM_CASES
from tests.invariants import (
    CONTEXT,
    TransformCase,
    logabsdet_errors,
    parameters_without_gradient,
    random_context,
    random_inputs,
    randomize_,
    round_trip_errors,
    safetensors_round_trip,
    warm_up_,
)

# (case, context size) for every case, with a context variant where the transform has one.
VARIANTS = [
    pytest.param(case, context, id=f"{case.name}-{'ctx' if context else 'noctx'}")
    for case in TRANSFORM_CASES
    for context in ((0, CONTEXT) if case.conditional else (0,))
]
TRAINABLE_VARIANTS = [v for v in VARIANTS if any(True for _ in v.values[0].build(v.values[1]).parameters())]
# Cases whose training-mode output mixes the rows of a batch (see TransformCase.batch_dependent).
BATCH_DEPENDENT_VARIANTS = [v for v in VARIANTS if v.values[0].batch_dependent]
ROW_WISE_VARIANTS = [v for v in VARIANTS if not v.values[0].batch_dependent]
WARMED_UP_VARIANTS = [v for v in VARIANTS if v.values[0].warmup_batches > 0]
DTYPES = [pytest.param(torch.float64, id="f64"), pytest.param(torch.float32, id="f32")]
# Round-trip and log-det tolerances: the float64 ones are the project's acceptance bar.
# float32 round trips: inputs reach |x| ~ 30, and where a spline is nearly flat x is recovered from z
# only to eps * |z| / slope, so the bound is 5e-3 absolute (about 2e-4 relative).
TOLERANCE = {torch.float64: (1e-10, 1e-8), torch.float32: (5e-3, 2e-3)}


def build(case: TransformCase, context: int, dtype: torch.dtype, seed: int = 0):
    """The case's transform, warmed up on data, with parameter noise, in ``dtype``; in eval mode
    when it is batch-dependent (so every check below sees a row-wise map), else in training mode."""
    torch.manual_seed(seed)
    t = warm_up_(case.build(context), case.features, context, case.warmup_batches)
    t = randomize_(t, scale=case.randomize_scale, seed=seed).to(dtype)
    return t.eval() if case.batch_dependent else t


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("case", "context"), VARIANTS)
def test_inverse_round_trip(case: TransformCase, context: int, dtype: torch.dtype) -> None:
    t = build(case, context, dtype)
    x = random_inputs(1000, case.features, dtype)
    c = random_context(1000, context, dtype)
    err_fi, err_if = round_trip_errors(t, x, c)
    tol = TOLERANCE[dtype][0]
    assert err_fi < tol, f"inverse(forward(x)) off by {err_fi:.3e}"
    assert err_if < tol, f"forward(inverse(z)) off by {err_if:.3e}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("case", "context"), VARIANTS)
def test_logabsdet_matches_autograd_jacobian(case: TransformCase, context: int, dtype: torch.dtype) -> None:
    t = build(case, context, dtype)
    x = random_inputs(1000, case.features, dtype)
    c = random_context(1000, context, dtype)
    err_forward, err_inverse = logabsdet_errors(t, x, c)
    tol = TOLERANCE[dtype][1]
    assert err_forward < tol, f"forward logabsdet differs from autograd by {err_forward:.3e}"
    assert err_inverse < tol, f"inverse logabsdet differs from autograd by {err_inverse:.3e}"


@pytest.mark.parametrize(("case", "context"), VARIANTS)
def test_inverse_without_logdet_is_the_inverse(case: TransformCase, context: int) -> None:
    """The sampling path (no log-determinant) maps noise to the same data as ``inverse``."""
    t = build(case, context, torch.float64)
    z = random_inputs(200, case.features, torch.float64, seed=3)
    c = random_context(200, context, torch.float64)
    torch.testing.assert_close(t.inverse_without_logdet(z, c), t.inverse(z, c)[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("case", "context"), VARIANTS)
def test_directions_are_consistent(case: TransformCase, context: int) -> None:
    """logabsdet of the inverse at z = f(x) is minus that of the forward at x; shapes are (batch,)."""
    t = build(case, context, torch.float64)
    x = random_inputs(64, case.features, torch.float64)
    c = random_context(64, context, torch.float64)
    z, ladj = t(x, c)
    _, ladj_back = t.inverse(z, c)
    assert z.shape == x.shape and ladj.shape == (64,) and ladj_back.shape == (64,)
    torch.testing.assert_close(ladj_back, -ladj, rtol=0, atol=1e-10)


@pytest.mark.parametrize(("case", "context"), TRAINABLE_VARIANTS)
def test_gradients_reach_every_parameter(case: TransformCase, context: int) -> None:
    t = build(case, context, torch.float64)
    x = random_inputs(128, case.features, torch.float64)
    c = random_context(128, context, torch.float64)
    z, ladj = t(x, c)
    missing = parameters_without_gradient(t, (z.square().sum(1) - ladj).mean())
    assert not missing, f"no gradient reaches {missing}"
    x_back, ladj_back = t.inverse(z.detach(), c)
    missing = parameters_without_gradient(t, (x_back.square().sum(1) + ladj_back).mean())
    assert not missing, f"no gradient reaches {missing} through the inverse"


@pytest.mark.parametrize(("case", "context"), ROW_WISE_VARIANTS)
def test_train_and_eval_modes_agree(case: TransformCase, context: int) -> None:
    t = build(case, context, torch.float64)
    x = random_inputs(32, case.features, torch.float64)
    c = random_context(32, context, torch.float64)
    z_train, ladj_train = t.train()(x, c)
    z_eval, ladj_eval = t.eval()(x, c)
    torch.testing.assert_close(z_train, z_eval, rtol=0, atol=0)
    torch.testing.assert_close(ladj_train, ladj_eval, rtol=0, atol=0)


@pytest.mark.parametrize(("case", "context"), BATCH_DEPENDENT_VARIANTS)
def test_batch_dependent_cases_mix_rows_only_in_training(case: TransformCase, context: int) -> None:
    """The flag is honest (training mode mixes rows) and the eval-mode checks are sound (eval mode does not)."""
    t = build(case, context, torch.float64)
    x = random_inputs(64, case.features, torch.float64)
    c = random_context(64, context, torch.float64)
    head_c = None if c is None else c[:8]
    with torch.no_grad():
        for a, b in zip(t.eval()(x, c), t(x[:8], head_c), strict=True):
            torch.testing.assert_close(a[:8], b, rtol=0, atol=1e-12)
        z_all, _ = t.train()(x, c)
        z_head, _ = t(x[:8], head_c)
    assert not torch.allclose(z_all[:8], z_head), "declared batch-dependent, but training mode is row-wise"


@pytest.mark.parametrize(("case", "context"), WARMED_UP_VARIANTS)
def test_warm_up_changes_the_map(case: TransformCase, context: int) -> None:
    """After the warm-up the map differs from the freshly built one, so the checks are not of defaults."""
    torch.manual_seed(0)
    fresh = case.build(context).double().eval()
    torch.manual_seed(0)
    warmed = warm_up_(case.build(context), case.features, context, case.warmup_batches).double().eval()
    x = random_inputs(32, case.features, torch.float64)
    c = random_context(32, context, torch.float64)
    with torch.no_grad():
        assert not torch.allclose(fresh(x, c)[0], warmed(x, c)[0]), "the warm-up left the map as built"


@pytest.mark.parametrize(("case", "context"), VARIANTS)
def test_state_dict_round_trip(case: TransformCase, context: int) -> None:
    source = build(case, context, torch.float64, seed=0)
    target = build(case, context, torch.float64, seed=1)
    safetensors_round_trip(source, target)
    x = random_inputs(16, case.features, torch.float64)
    c = random_context(16, context, torch.float64)
    for a, b in zip(source(x, c), target(x, c), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(("case", "context"), VARIANTS)
def test_batch_of_one(case: TransformCase, context: int) -> None:
    t = build(case, context, torch.float64)
    x = random_inputs(5, case.features, torch.float64)
    c = random_context(5, context, torch.float64)
    z_all, ladj_all = t(x, c)
    z_one, ladj_one = t(x[:1], None if c is None else c[:1])
    assert z_one.shape == (1, case.features) and ladj_one.shape == (1,)
    torch.testing.assert_close(z_one, z_all[:1])
    torch.testing.assert_close(ladj_one, ladj_all[:1])


@pytest.mark.parametrize(("case", "context"), VARIANTS)
def test_wrong_shapes_are_refused(case: TransformCase, context: int) -> None:
    t = build(case, context, torch.float32)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, "):
        t(torch.zeros(4, case.features + 1), random_context(4, context, torch.float32))
    with pytest.raises(ValueError, match=r"z must have shape \(batch, "):
        t.inverse(torch.zeros(4, case.features, 1), random_context(4, context, torch.float32))
    if context:
        with pytest.raises(ValueError, match="context"):
            t(torch.zeros(4, case.features), torch.zeros(4, context + 1))
        with pytest.raises(ValueError, match="batch size must equal that of x"):
            t(torch.zeros(4, case.features), torch.zeros(3, context))
        with pytest.raises(ValueError, match=r"context .* is required"):
            t(torch.zeros(4, case.features))
