"""Input checking at the public surface: clear ValueErrors, nothing silently broadcast."""

from __future__ import annotations

import pytest
import torch

import flowforge
from flowforge.flows import RealNVP
from flowforge.transforms import AffineCoupling, Compose, Permutation


@pytest.fixture
def conditional() -> RealNVP:
    return RealNVP(3, context=2, transforms=2, hidden=(8,))


def test_wrong_feature_size(conditional: RealNVP) -> None:
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 3\), got \(4, 2\)"):
        conditional.log_prob(torch.zeros(4, 2), torch.zeros(4, 2))


def test_unbatched_input_is_not_broadcast(conditional: RealNVP) -> None:
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 3\), got \(3,\)"):
        conditional.log_prob(torch.zeros(3), torch.zeros(1, 2))


def test_wrong_context_size_and_batch(conditional: RealNVP) -> None:
    with pytest.raises(ValueError, match=r"context must have shape \(batch, 2\), got \(4, 3\)"):
        conditional.log_prob(torch.zeros(4, 3), torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"context must have shape \(4, 2\): its batch size must equal that of x"):
        conditional.log_prob(torch.zeros(4, 3), torch.zeros(1, 2))
    with pytest.raises(ValueError, match=r"context must have shape \(batch, 2\)"):
        conditional.sample(5, torch.zeros(2))


def test_missing_or_unexpected_context(conditional: RealNVP) -> None:
    with pytest.raises(ValueError, match="conditional: context of shape"):
        conditional.log_prob(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="conditional"):
        conditional.sample(2)
    with pytest.raises(ValueError, match="unconditional: context must be None"):
        RealNVP(3, transforms=2).log_prob(torch.zeros(4, 3), torch.zeros(4, 2))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs(conditional: RealNVP, bad: float) -> None:
    x, c = torch.zeros(4, 3), torch.zeros(4, 2)
    x[2, 1] = bad
    with pytest.raises(ValueError, match=r"x contains NaN or inf \(first at batch index 2\)"):
        conditional.log_prob(x, c)
    c[1, 0] = bad
    with pytest.raises(ValueError, match="context contains NaN or inf"):
        conditional.log_prob(torch.zeros(4, 3), c)
    with pytest.raises(ValueError, match="context contains NaN or inf"):
        conditional.sample(3, c)


def test_finite_checks_can_be_switched_off(conditional: RealNVP) -> None:
    x = torch.full((2, 3), float("nan"))
    with flowforge.validation.checks(finite=False):
        assert torch.isnan(conditional.log_prob(x, torch.zeros(2, 2))).all()
    assert flowforge.validation.finite_checks_enabled()


def test_non_tensor_and_integer_inputs(conditional: RealNVP) -> None:
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor"):
        conditional.log_prob([[0.0, 0.0, 0.0]], torch.zeros(1, 2))
    with pytest.raises(TypeError, match="floating-point"):
        conditional.log_prob(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 2))


@pytest.mark.parametrize("n", [0, -1, 2.5, True])
def test_bad_sample_counts(n) -> None:
    with pytest.raises(ValueError, match="n must be a positive int"):
        RealNVP(2, transforms=1).sample(n)


def test_bad_masks_and_permutations() -> None:
    with pytest.raises(ValueError, match="at least one True"):
        AffineCoupling(torch.tensor([True, True]))
    with pytest.raises(ValueError, match="at least one True"):
        AffineCoupling(torch.tensor([False]))
    with pytest.raises(ValueError, match="1-D boolean"):
        AffineCoupling(torch.tensor([1, 0]))
    with pytest.raises(ValueError, match=r"arrangement of the ints 0\.\.2, each once, got \[0, 0, 1\]"):
        Permutation([0, 0, 1])
    with pytest.raises(ValueError, match="different feature sizes"):
        Compose(Permutation.reverse(2), Permutation.reverse(3))
    with pytest.raises(ValueError, match="scale_bound"):
        AffineCoupling([True, False], scale_bound=0.0)


def test_flow_refuses_mismatched_base_and_transform() -> None:
    from flowforge.distributions import StandardNormal
    from flowforge.flows import Flow

    with pytest.raises(ValueError, match="acts on 3 features"):
        Flow(StandardNormal(2), Permutation.reverse(3))
