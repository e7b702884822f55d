"""The shared flow-matching primitives: the one loss (masks, weights) and the one integrator (NFE)."""

from __future__ import annotations

import re

import pytest
import torch

from flowforge.matching import CosinePath, LinearPath, data_prediction_loss, flow_matching_loss, integrate
from flowforge.matching.functional import masked_mean
from flowforge.ode import ADAPTIVE_METHODS, TABLEAUS


def test_the_loss_regresses_on_the_paths_target_velocity() -> None:
    torch.manual_seed(0)
    x0, x1, t = torch.randn(6, 3), torch.randn(6, 3), torch.rand(6)
    for path in (LinearPath(), CosinePath()):
        _, target = path.sample(x0, x1, t)
        assert float(flow_matching_loss(lambda x, time, target=target: target, x0, x1, t, path)) == 0.0
        zero = flow_matching_loss(lambda x, time: torch.zeros_like(x), x0, x1, t, path)
        torch.testing.assert_close(zero, target.square().mean())


def test_masks_and_weights_count_what_they_say() -> None:
    torch.manual_seed(1)
    values = torch.rand(4, 5, 2)
    mask = torch.rand(4, 5) > 0.4
    expected = values[mask].mean()
    torch.testing.assert_close(masked_mean(values, mask), expected)
    weights = torch.tensor([1.0, 0.0, 2.0, 0.5])
    row_means = values.flatten(1).mean(1)
    torch.testing.assert_close(masked_mean(values, weights=weights), (weights * row_means).sum() / weights.sum())
    assert float(masked_mean(values, torch.zeros(4, 5, dtype=torch.bool))) == 0.0  # nothing counted
    with pytest.raises(ValueError, match=r"mask must have a leading shape of the data's \(4, 5, 2\), got \(5,\)"):
        masked_mean(values, torch.ones(5, dtype=torch.bool))
    # Padded chunk steps change nothing, whatever the network predicts there.
    x0, x1, t = torch.randn(4, 5, 2), torch.randn(4, 5, 2), torch.rand(4)
    keep = torch.ones(4, 5, dtype=torch.bool)
    keep[:, 3:] = False

    def garbage_on_padding(x, time):
        out = torch.zeros_like(x)
        out[:, 3:] = 1e6
        return out

    masked = flow_matching_loss(garbage_on_padding, x0, x1, t, LinearPath(), mask=keep)
    plain = flow_matching_loss(lambda x, time: torch.zeros_like(x), x0[:, :3], x1[:, :3], t, LinearPath())
    torch.testing.assert_close(masked, plain)


@pytest.mark.parametrize("method", [*TABLEAUS, *ADAPTIVE_METHODS])
def test_integrate_reports_the_evaluations_it_made(method: str) -> None:
    calls = 0

    def field(x, t):
        nonlocal calls
        calls += 1
        return -x * (1 + t[:, None])

    x0 = torch.ones(3, 2, dtype=torch.float64)
    result = integrate(field, x0, method=method, **({"steps": 7} if method in TABLEAUS else {}))
    assert result.nfe == calls > 0
    exact = torch.exp(torch.tensor(-1.5, dtype=torch.float64))  # x' = -(1 + t) x from 0 to 1
    tolerance = 0.15 if method == "euler" else 0.03  # a sanity check; orders are tested in test_ode
    torch.testing.assert_close(result.x, torch.full_like(x0, float(exact)), rtol=tolerance, atol=0)


def test_integrate_refuses_an_unknown_method() -> None:
    with pytest.raises(ValueError, match="unknown method 'rk9'; choose one of"):
        integrate(lambda x, t: x, torch.zeros(1, 1), method="rk9")


def test_the_mean_flow_target_matches_finite_differences_of_the_network() -> None:
    """The JVP inside mean_flow_loss is the total derivative d/ds u(x_s, s, h) with the end s + h fixed:
    rebuilding the loss with a central finite difference along the path gives the same value."""
    from flowforge.matching import LinearPath
    from flowforge.matching.functional import mean_flow_loss

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3)).double()

    def average_velocity(x, s, h):
        return net(torch.cat([x, s[:, None], h[:, None]], dim=1))

    path = LinearPath()
    x0, x1 = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    start = torch.rand(6, dtype=torch.float64) * 0.5
    span = torch.rand(6, dtype=torch.float64) * 0.5
    loss = mean_flow_loss(average_velocity, x0, x1, start, span, path)
    eps = 1e-6
    with torch.no_grad():
        ahead = average_velocity(path.sample(x0, x1, start + eps)[0], start + eps, span - eps)
        behind = average_velocity(path.sample(x0, x1, start - eps)[0], start - eps, span + eps)
        derivative = (ahead - behind) / (2 * eps)
        x_s, v = path.sample(x0, x1, start)
        target = v + span[:, None] * derivative
        expected = (average_velocity(x_s, start, span) - target).square().mean()
    torch.testing.assert_close(loss, expected, rtol=1e-7, atol=1e-9)
    loss.backward()  # the prediction carries gradients; the target does not
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in net.parameters())
    # With span 0 it is plain flow matching: the target is the conditional velocity.
    zero = mean_flow_loss(average_velocity, x0, x1, start, torch.zeros_like(span), path)
    with torch.no_grad():
        flat = (average_velocity(x_s, start, torch.zeros_like(span)) - v).square().mean()
    torch.testing.assert_close(zero, flat)


def test_the_adaptive_mean_flow_weight_divides_each_rows_error_by_itself_held_fixed() -> None:
    """With p = 1 each row contributes e / (e + c) with the weight held fixed: the value is that, and
    the gradient is the plain squared error's scaled per row by 1 / (e + c). Masked entries count nowhere."""
    from flowforge.matching import LinearPath
    from flowforge.matching.functional import mean_flow_loss

    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).double()

    def average_velocity(x, s, h):
        return net(torch.cat([x, s[:, None], h[:, None]], dim=1).flatten(1)[:, :6]).reshape(x.shape)

    path = LinearPath()
    x0, x1 = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    start, span = torch.rand(5, dtype=torch.float64) * 0.5, torch.rand(5, dtype=torch.float64) * 0.5
    mask = torch.tensor([[True, True, False, True]] * 4 + [[False] * 4])
    torch.manual_seed(2)
    weighted = mean_flow_loss(average_velocity, x0, x1, start, span, path, mask=mask, adaptive_power=1.0)
    # Rebuild the per-row errors from the plain loss of each row alone.
    errors = torch.stack(
        [
            mean_flow_loss(
                average_velocity,
                x0[i : i + 1],
                x1[i : i + 1],
                start[i : i + 1],
                span[i : i + 1],
                path,
                mask=mask[i : i + 1],
            )
            for i in range(4)
        ]
    )
    expected = (errors / (errors.detach() + 1e-3)).mean()
    torch.testing.assert_close(weighted, expected)
    grads = torch.autograd.grad(weighted, list(net.parameters()))
    expected_grads = torch.autograd.grad(expected, list(net.parameters()))
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want)
    plain = mean_flow_loss(average_velocity, x0, x1, start, span, path, mask=mask)
    assert not torch.allclose(weighted, plain)


def test_masked_mean_is_the_weighted_mean_for_any_weights_and_refuses_bad_ones() -> None:
    values = torch.arange(4.0)
    torch.testing.assert_close(masked_mean(values, weights=torch.full((4,), 0.1)), torch.tensor(1.5))
    torch.testing.assert_close(masked_mean(values, weights=torch.tensor([0.0, 0.0, 0.0, 0.2])), torch.tensor(3.0))
    assert masked_mean(values, mask=torch.zeros(4, dtype=torch.bool)) == 0  # nothing counted
    for weights in (torch.tensor([1.0, 1.0, 1.0, -2.9]), torch.tensor([1.0, 1.0, 1.0, float("nan")])):
        with pytest.raises(ValueError, match="weights must be finite numbers >= 0"):
            masked_mean(values, weights=weights)


def test_the_flow_matching_loss_refuses_times_outside_the_unit_interval() -> None:
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match=r"t must hold times in \[0, 1\].*got 5 at index 0"):
        flow_matching_loss(lambda x, t: x, x, x, torch.full((4,), 5.0), LinearPath())


def test_the_loss_refuses_unpaired_or_empty_batches_and_a_path_by_name() -> None:
    def velocity(x, t):
        return x

    rows = torch.zeros(3, 2)
    for x0, x1, t, path, error, message in (
        (torch.zeros(0, 2), torch.zeros(0, 2), torch.zeros(0), LinearPath(), ValueError, "got \\(0, 2\\) and"),
        (rows, torch.zeros(2, 2), torch.zeros(3), LinearPath(), ValueError, "paired rows of one shape"),
        (rows, rows, torch.zeros(3), "linear", TypeError, "path must be an AffinePath"),
    ):
        with pytest.raises(error, match=message):
            flow_matching_loss(velocity, x0, x1, t, path)


@pytest.mark.parametrize("path", [LinearPath(), CosinePath()], ids=["linear", "cosine"])
def test_the_data_prediction_loss_is_the_velocity_loss_of_the_velocity_it_implies(path) -> None:
    torch.manual_seed(2)
    x0, x1 = torch.randn(64, 3, dtype=torch.float64), torch.randn(64, 3, dtype=torch.float64)
    t = torch.rand(64, dtype=torch.float64) * 0.9  # sigma_t above the floor everywhere
    weights = torch.rand(64, dtype=torch.float64)

    def model(x, time):  # any network's estimate of the data
        return 0.7 * x - 0.2 * time[:, None] + 0.1

    def implied_velocity(x, time):
        return path.data_to_velocity(model(x, time), x, time)

    found = data_prediction_loss(model, x0, x1, t, path, weights=weights)
    torch.testing.assert_close(found, flow_matching_loss(implied_velocity, x0, x1, t, path, weights=weights))
    # Per-token times (a chunk's steps at times of their own) are read as flow_matching_loss reads them.
    chunk0, chunk1 = x0.reshape(16, 4, 3), x1.reshape(16, 4, 3)
    per_token = t.reshape(16, 4)

    def chunk_model(x, time):
        return 0.7 * x - 0.2 * time[..., None] + 0.1

    def chunk_velocity(x, time):
        return path.data_to_velocity(chunk_model(x, time), x, time)

    torch.testing.assert_close(
        data_prediction_loss(chunk_model, chunk0, chunk1, per_token, path),
        flow_matching_loss(chunk_velocity, chunk0, chunk1, per_token, path),
    )


def test_the_data_prediction_loss_stays_bounded_and_unbiased_at_the_data_end() -> None:
    torch.manual_seed(3)
    x0, x1 = torch.randn(32, 2, dtype=torch.float64), torch.randn(32, 2, dtype=torch.float64)
    near_data = 1 - torch.rand(32, dtype=torch.float64) * 0.04  # sigma_t below the floor 0.05
    path = LinearPath()
    # The demonstrated data is the optimum at every time: no floor moves it.
    assert float(data_prediction_loss(lambda x, time: x1, x0, x1, near_data, path)) == 0.0
    # An error e costs (e / max(1 - t, s))^2: at most (e / s)^2 where 1 / (1 - t)^2 grows without end.
    error = 0.01

    def off(x, time):
        return x1 + error

    found = data_prediction_loss(off, x0, x1, near_data, path, sigma_floor=0.05)
    torch.testing.assert_close(found, torch.tensor((error / 0.05) ** 2, dtype=torch.float64))
    # Away from the floor it is the velocity loss: (e / (1 - t))^2.
    half = torch.full((32,), 0.5, dtype=torch.float64)
    torch.testing.assert_close(
        data_prediction_loss(off, x0, x1, half, path), torch.tensor((error / 0.5) ** 2, dtype=torch.float64)
    )
    for floor in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=rf"sigma_floor = {floor}: expected a number in \(0, 1\)"):
            data_prediction_loss(off, x0, x1, half, path, sigma_floor=floor)
        with pytest.raises(ValueError, match=rf"sigma_floor = {floor}: expected a number in \[0, 1\)"):
            path.data_to_velocity(x1, x0, half, sigma_floor=floor)
    for floor, error, message in (
        (float("nan"), ValueError, "sigma_floor must be a finite number, got nan"),
        ("0.1", TypeError, "sigma_floor must be a finite number, got '0.1'"),
        (True, TypeError, "sigma_floor must be a finite number, got True"),
    ):
        with pytest.raises(error, match=re.escape(message)):
            data_prediction_loss(off, x0, x1, half, path, sigma_floor=floor)
        with pytest.raises(error, match=re.escape(message)):
            path.data_to_velocity(x1, x0, half, sigma_floor=floor)
    # A floor of 0 leaves the loss infinite at time 1, masked or not: the loss refuses it.
    with pytest.raises(ValueError, match=r"sigma_floor = 0.0: expected a number in \(0, 1\)"):
        data_prediction_loss(off, x0, x1, half, path, sigma_floor=0.0)
    unfloored = path.data_to_velocity(x1, x0, half, sigma_floor=0.0)
    torch.testing.assert_close(unfloored, path.data_to_velocity(x1, x0, half))
    # Per-token times with a given prefix at time 1 and no loss on it (training-time RTC): finite.
    tokens = torch.randn(4, 6, 3, dtype=torch.float64)
    token_times = torch.full((4, 6), 0.5, dtype=torch.float64)
    token_times[:, :2] = 1.0
    noise = torch.randn_like(tokens)
    loss = data_prediction_loss(lambda x, t: x, noise, tokens, token_times, path, mask=token_times < 1)
    assert torch.isfinite(loss)
    with pytest.raises(TypeError, match="path must be an AffinePath"):
        data_prediction_loss(off, x0, x1, half, "linear")
