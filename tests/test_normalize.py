"""The one Normalizer: an exact inverse, a floor for constant features, statistics carried as buffers."""

from __future__ import annotations

import pytest
import torch

from flowforge.data.normalize import SCALE_FLOOR, Normalizer
from flowforge.errors import DataError

STATS = {"mean": [1.0, -2.0, 5.0], "std": [2.0, 0.5, 0.0], "min": [-3.0, -3.0, 5.0], "max": [5.0, -1.0, 5.0]}


@pytest.mark.parametrize("mode", ["mean_std", "min_max"])
def test_the_inverse_is_exact_and_constants_are_floored(mode: str) -> None:
    normalizer = Normalizer.from_statistics(STATS, mode).double()
    x = torch.randn(50, 3, dtype=torch.float64) * 3
    torch.testing.assert_close(normalizer.unnormalize(normalizer.normalize(x)), x)
    assert float(normalizer.scale[2]) == pytest.approx(SCALE_FLOOR)  # a constant feature is not divided by 0
    if mode == "min_max":
        ends = normalizer.normalize(torch.tensor([[-3.0, -3.0, 5.0], [5.0, -1.0, 5.0]], dtype=torch.float64))
        torch.testing.assert_close(ends[:, :2], torch.tensor([[-1.0, -1.0], [1.0, 1.0]], dtype=torch.float64))
    else:
        torch.testing.assert_close(
            normalizer.normalize(torch.tensor([[1.0, -2.0, 5.0]], dtype=torch.float64)),
            torch.zeros(1, 3, dtype=torch.float64),
        )


def test_integer_inputs_are_read_as_numbers_and_another_width_is_refused() -> None:
    normalizer = Normalizer.from_statistics(STATS, "mean_std")
    counts = torch.tensor([[3, -1, 5]])  # integers: the statistics must not be truncated to them
    torch.testing.assert_close(normalizer.normalize(counts), normalizer.normalize(counts.float()))
    assert normalizer.unnormalize(torch.zeros(1, 3, dtype=torch.long)).tolist() == [[1.0, -2.0, 5.0]]
    for wrong in (torch.zeros(2, 1), torch.zeros(3, 2), torch.zeros(2, 4)):
        with pytest.raises(ValueError, match=r"x must have 3 numbers in its last dimension .* got shape"):
            normalizer.normalize(wrong)  # a width of 1 would broadcast over the 3 features
    # min_max reads min and max: their size counts, whatever size a mean given beside them has
    ranged = Normalizer.from_statistics({"mean": [0.0], "min": [0.0, 1.0], "max": [1.0, 3.0]}, "min_max")
    assert ranged.features == 2


def test_statistics_are_buffers_that_a_state_dict_carries() -> None:
    fitted = Normalizer.from_statistics(STATS, "mean_std")
    assert set(fitted.state_dict()) == {"shift", "scale"}
    fresh = Normalizer(3, "mean_std")
    fresh.load_state_dict(fitted.state_dict())
    x = torch.randn(4, 3)
    torch.testing.assert_close(fresh.normalize(x), fitted.normalize(x))


def test_bad_statistics_are_refused() -> None:
    with pytest.raises(DataError, match="statistics lack std"):
        Normalizer(3).set_statistics({"mean": [0.0, 0.0, 0.0]})
    with pytest.raises(DataError, match="'max' must be 3 finite numbers"):
        Normalizer(3, "min_max").set_statistics({"min": [0.0] * 3, "max": [1.0, float("nan"), 1.0]})
    with pytest.raises(ValueError, match="mode must be"):
        Normalizer(3, "z_score")


def test_a_policy_checkpoint_with_the_old_normaliser_keys_still_loads() -> None:
    from flowforge.policy import ChunkPolicy, PolicyConfig

    config = PolicyConfig(
        state_key="observation.state", state_dim=3, action_dim=2, horizon=4, width=16, layers=1, heads=2, language=False
    )
    policy = ChunkPolicy(config)
    policy.set_statistics({"observation.state": STATS, "action": {"min": [-2.0, 0.0], "max": [2.0, 4.0]}})
    state = policy.state_dict()
    legacy = {k.replace("_normalizer.", "_"): v for k, v in state.items()}
    assert "state_shift" in legacy and "action_scale" in legacy
    again = ChunkPolicy(config)
    again.load_state_dict(legacy)
    torch.testing.assert_close(again.action_normalizer.scale, policy.action_normalizer.scale)
    torch.testing.assert_close(again.state_normalizer.shift, policy.state_normalizer.shift)


def test_statistics_beyond_float32_are_refused() -> None:
    """A mean of 1e39 would become a shift of inf in float32 buffers and every normalised value -inf."""
    for stats in ({"mean": [1e39], "std": [1.0]}, {"mean": [0.0], "std": [1e39]}):
        with pytest.raises(DataError, match=r"statistics too large for torch\.float32"):
            Normalizer.from_statistics(stats)
