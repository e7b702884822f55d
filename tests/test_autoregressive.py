"""MADE's autoregressive property and the masked autoregressive transforms and recipes."""

from __future__ import annotations

import pytest
import torch

from flowforge.flows import IAF, MAF, NSF
from flowforge.nn import MADE
from flowforge.transforms import (
    AdditiveElementwise,
    AffineElementwise,
    Coupling,
    Invert,
    MaskedAutoregressive,
    RationalQuadraticSpline,
)
from tests.invariants import randomize_


def _dependencies(made: MADE, context: torch.Tensor | None) -> torch.Tensor:
    """dep[j, i]: whether any output of feature j moves with input i (by autograd)."""
    x = torch.randn(7, made.features, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda inp: made(inp, context).sum(0), x, vectorize=True)
    return jac.abs().sum((1, 2)) > 0


@pytest.mark.parametrize("order", [None, [2, 0, 4, 1, 3], [4, 3, 2, 1, 0]])
@pytest.mark.parametrize("context", [0, 2])
@pytest.mark.parametrize(  # residual blocks follow the first hidden layer, all of one width
    ("hidden", "residual"),
    [((16, 16), False), ((16, 16), True), ((3,), False), ((32, 32, 32), False), ((32, 32, 32), True)],
)
def test_made_is_exactly_autoregressive(order, residual: bool, context: int, hidden) -> None:
    torch.manual_seed(0)
    made = randomize_(MADE(5, 3, context, hidden, residual=residual, order=order), scale=0.5).double()
    c = torch.randn(7, context, dtype=torch.float64) if context else None
    rank = torch.argsort(torch.arange(5) if order is None else torch.tensor(order))
    allowed = rank[None, :] < rank[:, None]
    depends = _dependencies(made, c)
    assert not (depends & ~allowed).any(), "an output depends on an input at or after it in the order"
    if hidden != (3,):  # wide enough that every allowed connection exists
        assert torch.equal(depends, allowed)


def test_made_first_feature_depends_on_context() -> None:
    made = randomize_(MADE(3, 2, context=4, hidden=(16,)), scale=0.5)
    x = torch.randn(5, 3)
    c = torch.randn(5, 4, requires_grad=True)
    (grad,) = torch.autograd.grad(made(x, c)[:, 0].sum(), c)
    assert grad.abs().sum() > 0


def test_made_refuses_bad_orders_and_widths() -> None:
    with pytest.raises(ValueError, match=r"order must be a 1-D arrangement of the ints 0\.\.2, each once"):
        MADE(3, 1, order=[0, 0, 1])
    with pytest.raises(ValueError, match="equal hidden widths"):
        MADE(3, 1, hidden=(8, 16), residual=True)


@pytest.mark.parametrize(
    "transformer", [AffineElementwise(), AdditiveElementwise(), RationalQuadraticSpline(6, 4.0)], ids=type
)
@pytest.mark.parametrize("residual", [False, True])
def test_inverse_matches_a_naive_fixed_point_solve(transformer, residual: bool) -> None:
    """The one-pass sequential inverse equals solving x by D full re-evaluations of the forward."""
    torch.manual_seed(1)
    layer = MaskedAutoregressive(6, transformer, 3, (24, 24), residual=residual, order=[3, 5, 0, 2, 1, 4])
    layer = randomize_(layer, scale=0.2).double()
    z, c = 2 * torch.randn(50, 6, dtype=torch.float64), torch.randn(50, 3, dtype=torch.float64)
    x_naive = torch.zeros_like(z)
    for _ in range(6):
        x_naive = transformer.inverse(z, layer.made(x_naive, c))[0]
    x, logabsdet = layer.inverse(z, c)
    torch.testing.assert_close(x, x_naive, rtol=0, atol=1e-10)
    torch.testing.assert_close(logabsdet, -layer(x, c)[1], rtol=0, atol=1e-10)


def test_sequential_inverse_runs_each_masked_layer_once_per_rank() -> None:
    """The inverse multiplies by each hidden weight in D slices, never recomputing a full pass."""
    layer = MaskedAutoregressive(8, hidden=(16, 16))
    calls = {"full_passes": 0}
    original = layer.made.forward

    def counting_forward(*args, **kwargs):
        calls["full_passes"] += 1
        return original(*args, **kwargs)

    layer.made.forward = counting_forward
    layer.inverse(torch.randn(4, 8))
    assert calls["full_passes"] == 0


def test_recipes_structure_and_one_feature() -> None:
    maf = MAF(4, context=2, transforms=3, hidden=(8,))
    orders = [layer.made.order.tolist() for layer in maf.transform.transforms]
    assert orders == [[0, 1, 2, 3], [3, 2, 1, 0], [0, 1, 2, 3]]
    iaf = IAF(4, transforms=2, hidden=(8,))
    assert all(
        isinstance(t, Invert) and isinstance(t.transform, MaskedAutoregressive) for t in iaf.transform.transforms
    )
    assert MAF(1, transforms=2).log_prob(torch.randn(3, 1)).shape == (3,)
    assert NSF(1, context=2, transforms=2).sample(2, torch.randn(3, 2)).shape == (2, 3, 1)
    with pytest.raises(ValueError, match="features >= 2"):
        NSF(1, autoregressive=False)
    coupling = NSF(3, transforms=2, autoregressive=False, bins=4)
    assert all(isinstance(t, Coupling) for t in coupling.transform.transforms)
    assert coupling.transform.transforms[0].transformer.params_per_feature == 11


def test_iaf_samples_with_one_network_pass_per_layer() -> None:
    iaf = IAF(5, transforms=3, hidden=(8,))
    calls = {"n": 0}
    for layer in iaf.transform.transforms:
        made = layer.transform.made
        original = made.forward

        def counting(*args, _original=original, **kwargs):
            calls["n"] += 1
            return _original(*args, **kwargs)

        made.forward = counting
    iaf.sample(10)
    assert calls["n"] == 3


def test_a_made_loaded_with_another_order_inverts_in_that_order() -> None:
    ordered = MADE(3, 2, hidden=(16, 16), order=[2, 0, 1], zero_init_output=False).double()
    loaded = MADE(3, 2, hidden=(16, 16), zero_init_output=False).double()
    loaded.load_state_dict(ordered.state_dict())
    x = torch.randn(5, 3, dtype=torch.float64)

    def affine_inverse(z_j, params):
        shift, log_scale = params[..., 0], params[..., 1]
        return (z_j - shift) * torch.exp(-log_scale), -log_scale

    params = loaded(x)
    z = x * torch.exp(params[..., 1]) + params[..., 0]
    recovered, _ = loaded.autoregressive_inverse(z, None, affine_inverse)
    torch.testing.assert_close(recovered, x)
