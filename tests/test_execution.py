"""Chunk execution with inference delay: what the robot received equals what the executor says it
executed, for every method and delay; real-time chunking's guidance."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from flowforge.matching.functional import integrate
from flowforge.policy import ChunkExecutor, ChunkPolicy, PolicyConfig
from flowforge.policy.heads import GUIDANCE_JACOBIANS, RTC_SCHEDULES, ChunkGuide, _GuidedField, rtc_weights


def _policy(kind: str, **changes) -> ChunkPolicy:
    torch.manual_seed(0)
    config = PolicyConfig(
        **changes,
        kind=kind,
        state_key="observation.state",
        state_dim=3,
        action_dim=2,
        horizon=8,
        n_action_steps=4,
        width=16,
        layers=1,
        heads=2,
        language=False,
        **({} if kind in ("mse", "ddpm") else {"sampling_steps": 4}),  # the baselines refuse a flow's steps
    )
    return ChunkPolicy(config).eval()


def _observation(step: int) -> dict:
    return {"state": np.array([step, np.sin(step), 1.0], dtype=np.float32)}


@pytest.mark.parametrize("execution", ["sync", "async", "rtc", "rtc-trained", "rtc-trained, guided"])
@pytest.mark.parametrize("delay", [0, 1, 2, 3, 4, 6, 9, (1, 4), (0, 7)])
def test_what_the_robot_received_is_what_the_executor_says_it_executed(execution: str, delay) -> None:
    low, high = delay if isinstance(delay, tuple) else (delay, delay)
    execution, guided = execution.split(", ")[0], execution.endswith("guided")
    if execution == "rtc-trained" and high > 7:
        pytest.skip("a chunk of 8 holds at most 7 given actions")
    policy = _policy("flow", rtc_training_delay=7 if execution == "rtc-trained" else 0)
    executor = ChunkExecutor(policy, execution=execution, delay=delay, overlap_guidance=guided)
    torch.manual_seed(1)
    sent = [executor.act(_observation(step)) for step in range(40)]
    chunks = [c.actions[0].numpy() for c in executor.chunks]
    assert len(executor.executed) == 40 and len(executor.timings) == len(chunks)
    previous = -1
    for step, (number, index) in enumerate(executor.executed):
        timing = executor.timings[number]
        assert timing.arrived <= step, (step, timing)  # never an action of a chunk still on its way
        assert index == min(step - timing.origin, 7)  # the action meant for this step (or the held last one)
        np.testing.assert_array_equal(sent[step], chunks[number][index])
        assert number >= previous  # chunks take over in order
        previous = number
    for number, timing in enumerate(executor.timings):
        assert timing.origin == timing.requested  # index 0 is for the step of the observation
        if execution == "sync" or number == 0:
            assert timing.arrived == timing.requested  # the robot waited
        elif timing.arrived <= 40 - 1 or number < len(executor.timings) - 1:
            assert low <= timing.arrived - timing.requested <= high
    if low == high:
        waits = len(executor.timings) if execution == "sync" else 1
        assert executor.waited == low * waits
    else:
        assert low <= executor.waited <= high * len(executor.timings)
    if execution == "rtc-trained":
        # each chunk starts with the actions that ran while it was computed, given as they ran (the
        # old plan's held last action included where the delay outlasts the plan)
        for number, timing in enumerate(executor.timings[1:], start=1):
            for i in range(min(timing.arrived, 40) - timing.origin):
                np.testing.assert_allclose(sent[timing.origin + i], chunks[number][i], atol=1e-5)


@pytest.mark.parametrize("execution", ["sync", "async", "rtc", "rtc-trained", "rtc-trained, guided", "async, ddpm"])
@pytest.mark.parametrize("delay", [0, 3, (1, 5)])
def test_candidates_keep_the_chunk_that_joins_the_last_action_sent_most_closely(execution: str, delay) -> None:
    execution, guided, ddpm = execution.split(", ")[0], execution.endswith("guided"), execution.endswith("ddpm")
    trained = 5 if execution == "rtc-trained" else 0
    policy = _policy("ddpm") if ddpm else _policy("flow", rtc_training_delay=trained)  # DDPM samples from noise too
    executor = ChunkExecutor(policy, execution=execution, delay=delay, overlap_guidance=guided, candidates=5)
    sampled = []  # every predict_chunk's batch, guide, prefix and chunks
    predict = policy.predict_chunk

    def recorded(batch, *args, **kwargs):
        result = predict(batch, *args, **kwargs)
        sampled.append((batch, kwargs.get("guide"), kwargs.get("prefix"), result.actions.clone()))
        return result

    policy.predict_chunk = recorded
    torch.manual_seed(1)
    sent = [executor.act(_observation(step)) for step in range(40)]
    assert len(sampled) == len(executor.chunks) >= 5
    for number, ((batch, guide, prefix, candidates), timing) in enumerate(zip(sampled, executor.timings, strict=True)):
        kept = executor.chunks[number].actions
        if number == 0:  # an episode's first chunk joins nothing: one is sampled
            assert len(candidates) == 1 and torch.equal(kept, candidates)
            continue
        assert len(candidates) == 5 and batch["state"].shape[0] == 5
        assert all(torch.equal(row, batch["state"][0]) for row in batch["state"])  # the one observation
        for given in (guide, prefix):
            if given is not None:
                assert all(torch.equal(row, given.actions[0]) for row in given.actions)
        index = timing.arrived - timing.origin  # where the chunk took over
        before = np.clip(sent[timing.arrived - 1], -1, 1) if timing.arrived < len(sent) else None
        if before is None:
            continue  # still on its way when the episode ended
        distance = (candidates[:, index].clamp(-1, 1) - torch.as_tensor(before)).norm(dim=-1)
        chosen = [row for row in range(5) if torch.equal(candidates[row], kept[0])]
        assert chosen == [int(distance.argmin())]
    for step, (number, index) in enumerate(executor.executed):  # the books stay exact
        np.testing.assert_array_equal(sent[step], executor.chunks[number].actions[0, index].numpy())


def test_candidates_make_the_take_over_smoother_than_one_draw() -> None:
    policy = _policy("flow")
    jumps = {}
    for candidates in (1, 8):
        executor = ChunkExecutor(policy, execution="async", delay=2, candidates=candidates)
        torch.manual_seed(3)
        for _ in range(60):
            executor.act(_observation(0))
        jumps[candidates] = np.mean(executor.boundary_jumps())
    assert jumps[8] < 0.6 * jumps[1]


def test_each_chunk_is_computed_from_the_observation_at_its_request() -> None:
    policy = _policy("mse")  # deterministic: a chunk is a function of its observation
    executor = ChunkExecutor(policy, execution="async", delay=3)
    for step in range(30):
        executor.act(_observation(step))
    for timing, result in zip(executor.timings, executor.chunks, strict=True):
        state = torch.as_tensor(_observation(timing.requested)["state"])[None, None]
        expected = policy.predict_chunk({"state": state}).actions
        torch.testing.assert_close(result.actions, expected)


@pytest.mark.parametrize("execution", ["async", "rtc"])
@pytest.mark.parametrize("n_action_steps", [1, 2, 3, 4, 5, 6, 7, 8])
def test_after_the_first_chunk_each_runs_for_the_longer_of_the_delay_and_n_action_steps_minus_it(
    execution: str, n_action_steps: int
) -> None:
    delay = 3
    executor = ChunkExecutor(_policy("flow"), execution=execution, delay=delay, n_action_steps=n_action_steps)
    for step in range(60):
        executor.act(_observation(step))
    later = [timing for timing in executor.timings if timing.arrived < 60][1:]
    # The second is requested D steps before the first's executed part ends (at its step 1 if that is sooner).
    assert later[0].requested == max(n_action_steps - delay, 1)
    # A chunk arrives at index D: the next is requested at once unless its executed part is longer.
    assert {b.arrived - a.arrived for a, b in itertools.pairwise(later)} == {max(n_action_steps - delay, delay)}
    assert all(t.requested == t.arrived - delay for t in later)


def test_without_delay_every_method_is_the_synchronous_policy() -> None:
    policy = _policy("flow")
    runs = {}
    for execution in ("sync", "async", "rtc"):
        executor = ChunkExecutor(policy, execution=execution, delay=0)
        torch.manual_seed(2)
        runs[execution] = np.stack([executor.act(_observation(step)) for step in range(20)])
    np.testing.assert_array_equal(runs["async"], runs["sync"])
    # RTC with no delay still inpaints the rest of the plan, so only its first chunk is plain sampling.
    np.testing.assert_array_equal(runs["rtc"][:4], runs["sync"][:4])


def test_guidance_with_zero_weights_is_plain_sampling_and_pulls_the_frozen_steps() -> None:
    policy = _policy("flow")
    state = torch.randn(1, 1, 3)
    noise = torch.randn(1, 8, 2)
    plain = policy.predict_chunk({"state": state}, noise=noise).actions
    target = torch.full((1, 8, 2), 0.5)
    free = ChunkGuide(target, torch.zeros(8))
    torch.testing.assert_close(policy.predict_chunk({"state": state}, noise=noise, guide=free).actions, plain)
    frozen = ChunkGuide(target, rtc_weights(8, frozen=3, overlap=6))
    guided = policy.predict_chunk({"state": state}, noise=noise, guide=frozen).actions
    before = (plain[:, :3] - target[:, :3]).abs().mean()
    after = (guided[:, :3] - target[:, :3]).abs().mean()
    assert after < 0.5 * before  # the steps that execute meanwhile are pulled to the plan
    with pytest.raises(ValueError, match=r"guide\.weights must be 8 numbers in"):
        policy.predict_chunk({"state": state}, guide=ChunkGuide(target, torch.full((8,), 2.0)))
    with pytest.raises(ValueError, match="'mse' head cannot be guided"):
        _policy("mse").predict_chunk({"state": state}, guide=free)


def test_identity_guidance_is_the_vjp_where_the_jacobian_is_one_and_still_pulls_where_it_vanishes() -> None:
    """With v = 0 the predicted chunk is x itself (Jacobian I): both forms add the same guidance. With a
    velocity that sends every x to one chunk c (Jacobian 0: a policy sure of its chunk), the
    vector-Jacobian product adds nothing, while the identity form adds c_t W (Y - c)."""
    torch.manual_seed(0)
    target, x, t = torch.full((1, 8, 2), 0.5), torch.randn(1, 8, 2), torch.tensor([0.3])
    weights = rtc_weights(8, frozen=3, overlap=6)
    by_form = {form: ChunkGuide(target, weights, jacobian=form) for form in GUIDANCE_JACOBIANS}

    def still(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)

    pulled = {form: _GuidedField(still, guide)(x, t) for form, guide in by_form.items()}
    torch.testing.assert_close(pulled["identity"], pulled["vjp"])
    assert (pulled["vjp"][:, :3].sign() == (target - x)[:, :3].sign()).all()
    chunk = torch.randn(1, 8, 2)

    def sure(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (chunk - x) / (1 - t).reshape(-1, 1, 1)

    torch.testing.assert_close(_GuidedField(sure, by_form["vjp"])(x, t), sure(x, t))
    r2 = 0.7**2 / (0.3**2 + 0.7**2)
    strength = min(5.0, 0.7 / (0.3 * r2))  # 2.76: under the clip at t = 0.3
    expected = sure(x, t) + strength * weights[None, :, None] * (target - chunk)
    torch.testing.assert_close(_GuidedField(sure, by_form["identity"])(x, t), expected)
    unclipped = ChunkGuide(target, weights, 1e39, jacobian="identity")  # past float32: clips nothing
    torch.testing.assert_close(_GuidedField(sure, unclipped)(x, t), expected)


@pytest.mark.parametrize("steps", [4, 10])
@pytest.mark.parametrize("max_guidance", [5.0, 10.0])
def test_identity_guidance_on_a_sure_policy_ends_where_the_last_step_puts_it(steps: int, max_guidance: float) -> None:
    """The velocity of a policy sure of its chunk c undoes every guidance step but the last, so k
    Euler steps end at c + (s / k) W (Y - c), s = min(beta, ((k - 1)^2 + 1) / (k - 1))."""
    torch.manual_seed(0)
    chunk, target = torch.randn(1, 8, 2), torch.full((1, 8, 2), 0.5)
    weights = rtc_weights(8, frozen=3, overlap=6)

    def sure(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (chunk - x) / (1 - t).reshape(-1, 1, 1)

    field = _GuidedField(sure, ChunkGuide(target, weights, max_guidance, jacobian="identity"))
    end = integrate(field, torch.randn(1, 8, 2), method="euler", steps=steps, check_end=False).x
    strength = min(max_guidance, ((steps - 1) ** 2 + 1) / (steps - 1))
    torch.testing.assert_close(end, chunk + strength / steps * weights[None, :, None] * (target - chunk))


def test_identity_guidance_through_the_policy_pulls_the_frozen_steps() -> None:
    policy = _policy("flow")
    state, noise = torch.randn(1, 1, 3), torch.randn(1, 8, 2)
    target = torch.full((1, 8, 2), 0.5)
    plain = policy.predict_chunk({"state": state}, noise=noise).actions
    guide = ChunkGuide(target, rtc_weights(8, frozen=3, overlap=6), jacobian="identity")
    guided = policy.predict_chunk({"state": state}, noise=noise, guide=guide).actions
    assert (guided[:, :3] - target[:, :3]).abs().mean() < 0.5 * (plain[:, :3] - target[:, :3]).abs().mean()
    torch.testing.assert_close(guided[:, 6:], plain[:, 6:], atol=0.3, rtol=0)  # the free steps barely move
    with pytest.raises(ValueError, match=r"unknown guide\.jacobian 'exact'; choose one of 'vjp'"):
        policy.predict_chunk({"state": state}, guide=ChunkGuide(target, torch.ones(8), jacobian="exact"))


def test_bad_execution_settings_are_refused() -> None:
    policy = _policy("flow")
    with pytest.raises(ValueError, match="execution"):
        ChunkExecutor(policy, execution="later")
    for delay in (-1, 1001, (0, 10**20)):
        with pytest.raises(ValueError, match=r"delay must be an int in 0\.\.1000"):
            ChunkExecutor(policy, execution="async", delay=delay)
    with pytest.raises(ValueError, match="low end is above its high end"):
        ChunkExecutor(policy, execution="async", delay=(4, 2))
    with pytest.raises(ValueError, match="temporal_ensemble"):
        ChunkExecutor(policy, temporal_ensemble=0.1, execution="async", delay=2)
    with pytest.raises(ValueError, match="cannot be guided"):
        ChunkExecutor(_policy("ddpm"), execution="rtc", delay=2)
    with pytest.raises(ValueError, match="temporal_ensemble must be a finite number >= 0 or None, got True"):
        ChunkExecutor(policy, temporal_ensemble=True)
    assert ChunkExecutor(policy, temporal_ensemble=np.float32(0.1)).temporal_ensemble == pytest.approx(0.1)
    for value in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="max_guidance must be a finite number >= 0"):
            ChunkExecutor(policy, execution="rtc", delay=1, max_guidance=value)
    with pytest.raises(ValueError, match="or 'real'"):
        ChunkExecutor(policy, execution="async", delay="fast")
    with pytest.raises(ValueError, match=r"unknown guidance_schedule 'cosine'; choose one of 'exp'"):
        ChunkExecutor(policy, execution="rtc", delay=1, guidance_schedule="cosine")
    with pytest.raises(ValueError, match=r"unknown guidance_jacobian 'exact'; choose one of 'vjp', 'identity'"):
        ChunkExecutor(policy, execution="rtc", delay=1, guidance_jacobian="exact")
    for overlap in (-1, 9, 2.0, True):
        with pytest.raises(ValueError, match=rf"guided_overlap must be an int in 0\.\.8, got {overlap!r}"):
            ChunkExecutor(policy, execution="rtc", delay=1, guided_overlap=overlap)
    settings = (
        {"max_guidance": 5.0},
        {"guidance_schedule": "exp"},
        {"max_guidance": 20.0},
        {"guidance_jacobian": "vjp"},
        {"guided_overlap": 3},
    )
    for setting in settings:
        with pytest.raises(ValueError, match="guides real-time chunking, which execution='async' does not run"):
            ChunkExecutor(policy, execution="async", delay=1, **setting)
    for candidates in (0, 257, 2.0, True):
        with pytest.raises(ValueError, match=rf"candidates must be an int in 1\.\.256, got {candidates!r}"):
            ChunkExecutor(policy, execution="async", delay=1, candidates=candidates)
    with pytest.raises(ValueError, match="candidates = 4 chooses where a chunk takes over; temporal_ensemble"):
        ChunkExecutor(policy, temporal_ensemble=0.1, candidates=4)
    with pytest.raises(ValueError, match="candidates = 4: a 'mse' head gives one chunk per observation"):
        ChunkExecutor(_policy("mse"), execution="async", delay=1, candidates=4)


def test_rtc_schedules_weigh_the_overlap_between_frozen_and_free() -> None:
    """Every schedule: 1 on the frozen steps, 0 past the overlap; over the rest, 'ones' holds the old plan,
    'zeros' leaves it free, and 'exp' and 'linear' decay from it ('exp' faster)."""
    weights = {name: rtc_weights(12, frozen=3, overlap=9, schedule=name) for name in RTC_SCHEDULES}
    for w in weights.values():
        assert w.shape == (12,) and (w[:3] == 1).all() and (w[9:] == 0).all()
    assert (weights["ones"][3:9] == 1).all() and (weights["zeros"][3:9] == 0).all()
    for name in ("exp", "linear"):
        middle = weights[name][3:9]
        assert (middle > 0).all() and (middle < 1).all() and (middle.diff() < 0).all()
    assert (weights["exp"][3:9] < weights["linear"][3:9]).all()
    with pytest.raises(ValueError, match=r"unknown schedule 'steps'; choose one of"):
        rtc_weights(12, frozen=3, overlap=9, schedule="steps")


@pytest.mark.parametrize("guided_overlap", [None, 0, 1, 3])
def test_the_guided_overlap_ends_that_many_steps_after_the_frozen_ones(guided_overlap: int | None) -> None:
    """The guide's weights: 1 on the D frozen steps, the schedule over the next ``guided_overlap``
    steps (by default every step the current plan still has), 0 after."""
    policy = _policy("flow")
    executor = ChunkExecutor(
        policy, execution="rtc", delay=2, guidance_schedule="linear", guided_overlap=guided_overlap
    )
    guides = []
    predict = policy.predict_chunk

    def recorded(batch, *args, **kwargs):
        guides.append(kwargs.get("guide"))
        return predict(batch, *args, **kwargs)

    policy.predict_chunk = recorded
    for step in range(6):
        executor.act(_observation(step))
    weights = guides[1].weights  # requested at step 2: the first chunk has 6 planned actions left
    ends = 6 if guided_overlap is None else 2 + guided_overlap
    torch.testing.assert_close(weights, rtc_weights(8, frozen=2, overlap=ends, schedule="linear"))
    assert (weights[:2] == 1).all() and (weights[ends:] == 0).all() and (weights[2:ends] > 0).all()


def test_a_stronger_schedule_holds_the_overlap_closer_to_the_old_plan() -> None:
    """Guided with the same noise, the overlap after the frozen steps ends nearer the target with
    'ones' than with 'zeros', and the frozen steps are pulled either way."""
    policy = _policy("flow")
    state, noise = torch.randn(1, 1, 3), torch.randn(1, 8, 2)
    target = torch.full((1, 8, 2), 0.5)
    distance = {}
    for name in ("zeros", "ones"):
        guide = ChunkGuide(target, rtc_weights(8, frozen=2, overlap=6, schedule=name))
        chunk = policy.predict_chunk({"state": state}, noise=noise, guide=guide).actions
        distance[name] = ((chunk - target).abs().mean(dim=(0, 2))).tolist()
    assert sum(distance["ones"][2:6]) < 0.5 * sum(distance["zeros"][2:6])


def test_training_time_rtc_gives_the_prefix_time_one_and_no_loss() -> None:
    policy = _policy("flow", rtc_training_delay=5)
    lengths = torch.tensor([0, 2, 5, 3])
    policy.head.prefix_lengths = lambda rows: lengths  # fixed prefixes for the check
    batch = {"state": torch.randn(4, 1, 3), "action": torch.rand(4, 8, 2) * 2 - 1}
    seen = {}
    denoise = policy.expert.denoise

    def spy(x, t, cache, interval=None, shift=0.0):
        seen["t"], seen["x"] = t, x
        out = denoise(x, t, cache, interval)
        given = torch.arange(8)[None] < lengths[:, None]
        return out + shift * given[..., None]  # whatever the expert says on the prefix

    policy.expert.denoise = spy
    torch.manual_seed(3)
    reference = policy.loss(batch)
    given = torch.arange(8)[None] < lengths[:, None]
    assert seen["t"].shape == (4, 8) and bool((seen["t"][given] == 1).all()) and bool((seen["t"][~given] < 1).all())
    target = policy.normalize_action(batch["action"])
    torch.testing.assert_close(seen["x"][given], target[given])  # the prefix enters clean (time 1 = data)
    policy.expert.denoise = lambda x, t, cache, interval=None: spy(x, t, cache, interval, shift=1e3)
    torch.manual_seed(3)
    torch.testing.assert_close(policy.loss(batch), reference)  # no loss on the prefix


@pytest.mark.parametrize("unprefixed", [None, 0.5])
def test_training_time_rtc_weights_every_step_as_plain_training(unprefixed: float | None) -> None:
    """Over the prefix lengths' distribution, each step's weight times the chance that it is trained
    is 1 for every step: the first steps, trained in fewer rows, weigh as much as the rest."""
    delay, horizon = 5, 8
    policy = _policy("flow", rtc_training_delay=delay, rtc_unprefixed_fraction=unprefixed)
    torch.manual_seed(0)
    lengths = policy.head.prefix_lengths(60_000)
    chance = torch.stack([(lengths == length).float().mean() for length in range(delay + 1)])
    expected = (
        torch.full((delay + 1,), 1 / (delay + 1))
        if unprefixed is None
        else torch.tensor([unprefixed] + [(1 - unprefixed) / delay] * delay)
    )
    torch.testing.assert_close(chance, expected, atol=0.01, rtol=0)
    weights = policy.head.prefix_step_weights(horizon).double()
    trained = torch.stack([torch.arange(horizon) >= length for length in range(delay + 1)]).double()
    torch.testing.assert_close(expected.double() @ (trained * weights), torch.ones(horizon, dtype=torch.float64))


def test_training_time_rtc_loss_is_the_step_weighted_mean() -> None:
    """A row with no prefix and a row with a prefix of 3, whose errors sit on one step each, give
    the loss the weights say."""
    policy = _policy("flow", rtc_training_delay=5)
    weights = policy.head.prefix_step_weights(8)
    lengths = torch.tensor([0, 3])
    policy.head.prefix_lengths = lambda rows: lengths
    batch = {"state": torch.randn(2, 1, 3), "action": torch.zeros(2, 8, 2)}
    target = policy.normalize_action(batch["action"])
    errors = torch.zeros(2, 8, 2)
    errors[0, 0] = 1.0  # step 0 of the row without prefix: weight 6
    errors[1, 5] = 2.0  # step 5 of the other: weight 1

    def exact(x, t, cache, interval=None):
        # the straight path's own velocity, x1 - x0 = (x1 - x_t) / (1 - t), plus the planted errors
        return (target - x) / (1 - t[..., None]).clamp_min(1e-6) + errors

    policy.expert.denoise = exact
    kept = torch.arange(8)[None] >= lengths[:, None]
    expected = (6 * 2 * 1.0**2 + 1 * 2 * 2.0**2) / (2 * float((kept * weights).sum()))
    torch.testing.assert_close(policy.loss(batch), torch.tensor(expected), rtol=1e-4, atol=1e-6)


def test_training_time_rtc_prefix_noise_perturbs_only_the_given_actions() -> None:
    from flowforge.errors import ConfigError

    policy = _policy("flow", rtc_training_delay=4, rtc_prefix_noise=0.3)
    lengths = torch.tensor([4, 0, 2])
    policy.head.prefix_lengths = lambda rows: lengths
    batch = {"state": torch.randn(3, 1, 3), "action": torch.rand(3, 8, 2) * 2 - 1}
    seen = {}
    denoise = policy.expert.denoise

    def spy(x, t, cache, interval=None):
        seen["x"], seen["t"] = x, t
        return denoise(x, t, cache, interval)

    policy.expert.denoise = spy
    policy.loss(batch)
    target = policy.normalize_action(batch["action"])
    given = torch.arange(8)[None] < lengths[:, None]
    moved = (seen["x"][given] - target[given]).abs()
    assert float(moved.min()) > 0 and 0.05 < float(moved.mean()) < 0.6  # N(0, 0.3^2): mean |e| = 0.24
    assert bool((seen["t"][given] == 1).all())
    with pytest.raises(ConfigError, match=r"rtc_prefix_noise = 0.1: .*rtc_training_delay >= 1"):
        PolicyConfig(rtc_prefix_noise=0.1)
    with pytest.raises(ConfigError, match="rtc_prefix_noise = -1"):
        PolicyConfig(rtc_training_delay=2, rtc_prefix_noise=-1)
    with pytest.raises(ConfigError, match=r"rtc_unprefixed_fraction = 0.5: .*rtc_training_delay >= 1"):
        PolicyConfig(rtc_unprefixed_fraction=0.5)
    for fraction in (0.0, 1.0, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="rtc_unprefixed_fraction = "):
            PolicyConfig(rtc_training_delay=2, rtc_unprefixed_fraction=fraction)


def test_a_trained_policy_completes_given_actions() -> None:
    from flowforge.policy.heads import ChunkPrefix

    policy = _policy("flow", rtc_training_delay=4)
    state = torch.randn(2, 1, 3)
    given = torch.rand(2, 8, 2) * 2 - 1
    chunk = policy.predict_chunk({"state": state}, prefix=ChunkPrefix(given, 3)).actions
    torch.testing.assert_close(chunk[:, :3], given[:, :3], rtol=1e-5, atol=1e-5)  # executed as given
    with pytest.raises(ValueError, match="trained with prefixes of 0 to 4"):
        policy.predict_chunk({"state": state}, prefix=ChunkPrefix(given, 5))
    with pytest.raises(ValueError, match="not trained to complete given actions"):
        _policy("flow").predict_chunk({"state": state}, prefix=ChunkPrefix(given, 2))
    with pytest.raises(ValueError, match="rtc_training_delay >= 6"):
        ChunkExecutor(policy, execution="rtc-trained", delay=6)
    with pytest.raises(ValueError, match="training-time RTC is for kind = 'flow'"):
        PolicyConfig(kind="ddpm", rtc_training_delay=2)


@pytest.mark.parametrize("jacobian", GUIDANCE_JACOBIANS)
def test_a_guided_prefix_stays_given_and_the_guide_pulls_the_overlap_after_it(jacobian: str) -> None:
    from flowforge.policy.heads import ChunkPrefix

    policy = _policy("flow", rtc_training_delay=4)
    state, noise = torch.randn(2, 1, 3), torch.randn(2, 8, 2)
    plan = torch.rand(2, 8, 2) * 2 - 1
    prefix = ChunkPrefix(plan, 3)
    completed = policy.predict_chunk({"state": state}, noise=noise, prefix=prefix).actions
    free = ChunkGuide(plan, torch.zeros(8), jacobian=jacobian)
    unguided = policy.predict_chunk({"state": state}, noise=noise, prefix=prefix, guide=free).actions
    torch.testing.assert_close(unguided, completed)  # zero weights: training-time RTC alone
    guide = ChunkGuide(plan, rtc_weights(8, frozen=3, overlap=6), max_guidance=10.0, jacobian=jacobian)
    guided = policy.predict_chunk({"state": state}, noise=noise, prefix=prefix, guide=guide).actions
    torch.testing.assert_close(guided[:, :3], plan[:, :3], rtol=1e-5, atol=1e-5)  # still executed as given
    before = (completed[:, 3:5] - plan[:, 3:5]).abs().mean()
    assert (guided[:, 3:5] - plan[:, 3:5]).abs().mean() < 0.8 * before  # the overlap after it is pulled
    torch.testing.assert_close(guided[:, 6:], completed[:, 6:], atol=0.3, rtol=0)  # the free steps barely move


def test_overlap_guidance_is_for_training_time_rtc_only() -> None:
    trained = _policy("flow", rtc_training_delay=4)
    for execution in ("sync", "async", "rtc"):
        with pytest.raises(ValueError, match="overlap_guidance = True guides the overlap after training-time RTC"):
            ChunkExecutor(trained, execution=execution, delay=2, overlap_guidance=True)
    with pytest.raises(ValueError, match="which execution='rtc-trained' does not run without overlap_guidance"):
        ChunkExecutor(trained, execution="rtc-trained", delay=2, max_guidance=10.0)
    with pytest.raises(TypeError, match=r"overlap_guidance must be a bool \(True or False\), got 1"):
        ChunkExecutor(trained, execution="rtc-trained", delay=2, overlap_guidance=1)
    executor = ChunkExecutor(trained, execution="rtc-trained", delay=2, overlap_guidance=True, max_guidance=10.0)
    assert executor.guided and executor.max_guidance == 10.0


def test_boundary_jumps_and_the_boundary_plot(tmp_path) -> None:
    from flowforge.eval.plots import plot_chunk_boundaries

    traces = {}
    for execution in ("sync", "rtc"):
        executor = ChunkExecutor(_policy("flow"), execution=execution, delay=2)
        torch.manual_seed(4)
        sent = np.stack([executor.act(_observation(step)) for step in range(24)])
        actions, switches = executor.sent_actions()
        np.testing.assert_array_equal(actions, np.clip(sent, -1, 1))
        assert switches and executor.boundary_jumps() == [
            float(np.linalg.norm(actions[k] - actions[k - 1])) for k in switches
        ]
        changes = executor.within_chunk_changes()
        assert len(changes) + len(switches) == len(actions) - 1
        deviations = executor.plan_deviations()  # chunks of 8 executing 4 leave a planned next action
        assert len(deviations) == len(switches)
        for k, deviation in zip(switches, deviations, strict=True):
            (old, j) = executor.executed[k - 1]
            planned = np.clip(executor.chunks[old].actions[0, j + 1].numpy(), -1, 1)
            assert deviation == pytest.approx(float(np.linalg.norm(actions[k] - planned)))
        # the triangle inequality ties the three: jump <= deviation + the plan's own change
        for k, deviation in zip(switches, deviations, strict=True):
            (old, j) = executor.executed[k - 1]
            plan = np.clip(executor.chunks[old].actions[0, j : j + 2].numpy(), -1, 1)
            planned_change = float(np.linalg.norm(plan[1] - plan[0]))
            assert float(np.linalg.norm(actions[k] - actions[k - 1])) <= deviation + planned_change + 1e-6
        assert sorted(changes + executor.boundary_jumps()) == sorted(
            float(np.linalg.norm(actions[k] - actions[k - 1])) for k in range(1, len(actions))
        )
        traces[execution] = (actions, switches)
    path = plot_chunk_boundaries(traces, tmp_path / "boundaries.png", dims=(0, 1))
    from PIL import Image

    with Image.open(path) as image:
        assert image.size[0] > 300 and image.size[1] > 200


class _Line:
    """A stand-in environment: the state counts the steps; it never ends on its own."""

    def reset(self, seed=None):
        self.step_count = 0
        return {"state": np.zeros(3, dtype=np.float32)}, {"instruction": "", "is_success": False}

    def step(self, action):
        self.step_count += 1
        observation = {"state": np.array([self.step_count, 0.0, 1.0], dtype=np.float32)}
        return observation, 0.0, False, False, {"instruction": "", "is_success": False}


def test_a_paced_episode_does_not_hurry_after_a_step_that_overran() -> None:
    """A controller at a fixed rate: after the actor blocks for five periods, every later step still
    lasts a full period (the clock does not catch up by running the next steps unpaced)."""
    import time

    from flowforge.envs.episode import run_episode

    period, called = 0.02, []

    def act(observation):
        called.append(time.perf_counter())
        if len(called) == 2:
            time.sleep(5 * period)  # a chunk computed while the robot waits
        return np.zeros(2, dtype=np.float32)

    run_episode(_Line(), act, seed=0, max_steps=7, pace=period)
    gaps = np.diff(called)
    assert gaps[1] >= 5 * period and (gaps[2:] >= 0.95 * period).all(), gaps


@pytest.mark.parametrize("execution", ["sync", "async", "rtc", "rtc, 3 candidates"])
def test_a_real_background_delay_keeps_exact_books(execution: str) -> None:
    from flowforge.envs.episode import run_episode

    execution, candidates = execution.split(", ")[0], 3 if execution.endswith("candidates") else 1
    policy = _policy("flow")
    period = 0.002  # a fast controller: inference takes several control steps
    executor = ChunkExecutor(policy, execution=execution, delay="real", control_period=period, candidates=candidates)
    rows = []  # the batch size of every chunk computed, in the inference thread too
    predict = policy.predict_chunk

    def recorded(batch, *args, **kwargs):
        rows.append(batch["state"].shape[0])
        return predict(batch, *args, **kwargs)

    policy.predict_chunk = recorded
    sent = []

    def act(observation):
        action = executor.act(observation)
        sent.append(action)
        return action

    try:
        run_episode(_Line(), act, seed=0, max_steps=60, pace=period)
    finally:
        executor.close()
    chunks = [c.actions[0].numpy() for c in executor.chunks]
    assert all(c.actions.shape[0] == 1 for c in executor.chunks)  # one chunk kept of the candidates
    assert rows[0] == 1 and set(rows[1:]) == {candidates}, rows
    assert len(executor.executed) == 60
    for step, (number, index) in enumerate(executor.executed):
        timing = executor.timings[number]
        assert 0 <= timing.arrived <= step and index == min(step - timing.origin, 7)
        np.testing.assert_array_equal(sent[step], chunks[number][index])
    if execution != "sync":
        later = executor.timings[1:]
        arrived = [t for t in later if t.arrived >= 0]
        assert all(t.arrived >= t.requested for t in arrived)  # how many arrive depends on the machine's speed
        assert len(later) - len(arrived) <= 1  # at most the last one was still being computed at the end
        assert executor.delay >= 1  # requests plan for the measured delay
    with pytest.raises(ValueError, match="known delay bound"):
        ChunkExecutor(_policy("flow", rtc_training_delay=4), execution="rtc-trained", delay="real")


@pytest.mark.parametrize(
    ("execution", "delay"),
    [("sync", 0), ("rtc", 3), ("rtc-trained", 3), ("rtc-trained, guided", 3), ("rtc", "real")],
)
def test_warming_up_computes_each_kind_of_chunk_in_each_thread_and_changes_nothing(execution: str, delay) -> None:
    import threading

    execution, guided = execution.split(", ")[0], execution.endswith("guided")
    policy = _policy("flow", rtc_training_delay=4 if execution == "rtc-trained" else 0)
    executor = ChunkExecutor(policy, execution=execution, delay=delay, overlap_guidance=guided)
    calls = []
    predict = policy.predict_chunk

    def recorded(batch, *args, **kwargs):
        given = (kwargs.get("guide") is not None, kwargs.get("prefix") is not None)
        calls.append((threading.current_thread().name.split("_")[0], *given))
        return predict(batch, *args, **kwargs)

    policy.predict_chunk = recorded
    try:
        executor.act(_observation(0))
        torch.manual_seed(5)
        before = torch.get_rng_state()
        history = list(executor.history)
        executor.warm_up(_observation(7))
        assert torch.equal(torch.get_rng_state(), before) and list(executor.history) == history
        assert len(executor.chunks) == len(executor.timings) == 1 and executor.executed == [(0, 0)]
    finally:
        executor.close()
    warmed = calls[1:]
    kinds = {(False, False)} | ({(True, False)} if execution == "rtc" else set())
    kinds |= {(guided, True)} if execution == "rtc-trained" else set()
    assert {call[1:] for call in warmed} == kinds
    threads = {call[0] for call in warmed}
    assert threads == ({"MainThread", "chunk-inference"} if delay == "real" else {"MainThread"})


def test_a_gif_is_written_whole_or_not_at_all(tmp_path, monkeypatch) -> None:
    """An episode's GIF interrupted while it is encoded (Ctrl-C during an evaluation) leaves no
    empty or truncated file under its name; a finished one holds every frame."""
    from PIL import Image

    from flowforge.envs.evaluate import save_gif

    frames = [np.full((8, 8, 3), 40 * i, dtype=np.uint8) for i in range(4)]
    with Image.open(save_gif(frames, tmp_path / "whole.gif")) as image:
        assert image.n_frames == 4

    def interrupted(self, target, *args, **kwargs):  # the header written, then Ctrl-C
        if hasattr(target, "write"):
            target.write(b"GIF89a")
        else:
            with open(target, "wb") as handle:
                handle.write(b"GIF89a")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_gif(frames, tmp_path / "cut.gif")
    assert not (tmp_path / "cut.gif").exists()


def test_a_chunk_refused_in_the_inference_thread_is_not_waited_for_again() -> None:
    import time

    from flowforge.errors import NumericalError

    executor = ChunkExecutor(_policy("flow"), execution="async", delay="real", control_period=10.0)
    overflowing = {"state": np.array([3e38, -3e38, 3e38], dtype=np.float32)}
    outcomes, sent = [], []
    try:
        for step in range(10):
            try:
                sent.append(executor.act(overflowing if step == 3 else _observation(step)))
                outcomes.append("ok")
            except NumericalError:
                outcomes.append("refused")
            time.sleep(0.02)
    finally:
        executor.close()
    assert outcomes.count("refused") == 1 and outcomes[-1] == "ok", outcomes
    # the refused chunk left no timing behind: chunk numbers still name the chunks that were sent
    assert len(executor.timings) == len(executor.chunks)
    recorded, _ = executor.sent_actions()
    np.testing.assert_allclose(recorded, np.clip(np.stack(sent), -1, 1))


@pytest.mark.parametrize("obs_horizon", [2, 3])
def test_a_bad_frame_already_in_the_history_refuses_one_chunk_not_every_later_one(obs_horizon: int) -> None:
    from flowforge.errors import NumericalError

    executor = ChunkExecutor(_policy("flow", obs_horizon=obs_horizon))  # chunks requested at steps 0, 4, 8, ...
    overflowing = {"state": np.array([3e38, -3e38, 3e38], dtype=np.float32)}  # finite: it enters the history
    outcomes = []
    for step in range(12):
        try:
            executor.act(overflowing if step == 3 else _observation(step))
            outcomes.append("ok")
        except NumericalError:
            outcomes.append("refused")
    assert outcomes == ["ok"] * 4 + ["refused"] + ["ok"] * 7, outcomes


def test_the_executor_hands_out_copies_and_keeps_copies_of_frames() -> None:
    executor = ChunkExecutor(_policy("flow"))
    action = executor.act(_observation(0))
    before = executor.chunks[0].actions[0, 0].clone()
    action *= 0
    torch.testing.assert_close(executor.chunks[0].actions[0, 0], before)
    policy = _policy("flow", obs_horizon=2, image_shape=[3, 36, 36])
    executor = ChunkExecutor(policy)
    frame = np.zeros((36, 36, 3), np.uint8)
    executor.act({**_observation(0), "image": frame})
    frame[:] = 255  # the caller renders the next frame into the same buffer
    assert float(executor.batch({**_observation(1), "image": frame})["image"][0, 0].float().mean()) == 0.0


def test_temporal_ensembling_records_the_actions_it_sent() -> None:
    executor = ChunkExecutor(_policy("flow"), temporal_ensemble=0.3)
    sent = np.stack([executor.act(_observation(step)) for step in range(12)])
    recorded, switches = executor.sent_actions()
    np.testing.assert_allclose(recorded, np.clip(sent, -1, 1))
    assert switches == [] and executor.boundary_jumps() == [] and len(executor.within_chunk_changes()) == 11


def test_a_float64_policy_keeps_given_actions_in_float64() -> None:
    from flowforge.policy.heads import ChunkPrefix

    policy = _policy("flow", rtc_training_delay=3).double()
    given = torch.randn(1, 8, 2, dtype=torch.float64) * 1.2345678901234
    result = policy.predict_chunk({"state": torch.randn(1, 1, 3, dtype=torch.float64)}, prefix=ChunkPrefix(given, 3))
    torch.testing.assert_close(result.actions[0, :3], given[0, :3], rtol=0, atol=1e-12)


def test_a_window_whose_first_action_is_padding_is_refused() -> None:
    policy = _policy("flow").train()
    action, pad = torch.randn(4, 8, 2), torch.zeros(4, 8, dtype=torch.bool)
    pad[2, 0] = True
    action[2, 0] = float("nan")
    with pytest.raises(ValueError, match=r"action_is_pad\[2, 0\] is True: a window's first action is real"):
        policy.loss({"state": torch.randn(4, 1, 3), "action": action, "action_is_pad": pad})
