"""The policy as parts: one contract that every registered head passes, checkpoints whose every
tensor is used, and checkpoints of the previous release that load converted, with identical actions."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from flowforge.checkpoint import save_model
from flowforge.matching.time import UniformTime
from flowforge.policy import HEAD_CATEGORY, ChunkPolicy, FlowHead, PolicyConfig
from flowforge.policy.heads import DDIMScheduler, DDPMScheduler, cosine_alpha_bar, fill_padding, head
from flowforge.registry import names
from flowforge.runs.policy import load_policy
from tests.invariants import parameters_without_gradient

RELEASED = Path(__file__).parent / "fixtures" / "policy_release"


@head("flow-uniform-time")
class UniformTimeFlowHead(FlowHead):
    """A head defined outside the package: flow matching with uniform times. Registering it is all
    it takes for ``policy.kind = "flow-uniform-time"`` to build a policy."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.time_sampler = UniformTime()


@head("flow-sample-prediction")
class SamplePredictionFlowHead(FlowHead):
    """The flow head with ``prediction = "sample"``, registered under a name of its own so that every
    contract test runs on it too (a config names it ``kind = "flow"``, ``prediction = "sample"``)."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.prediction = "sample"


HEADS = names(HEAD_CATEGORY)


def _policy(kind: str, seed: int = 0, **changes) -> ChunkPolicy:
    settings = dict(
        kind=kind,
        state_key="observation.state",
        state_dim=4,
        action_dim=2,
        horizon=8,
        obs_horizon=2,
        width=16,
        layers=2,
        heads=2,
        image_shape=[3, 36, 36],
        language=True,
        instructions=["reach", "push", "open"],
    )
    if kind == "hierarchical":
        settings.update(keyframe_stride=2)
    if kind == "ddpm":  # each head is given only the settings it reads (the others refuse theirs)
        settings.update(diffusion_steps=12, inference_steps=4)
    elif kind != "mse":
        settings.update(sampling_steps=5)
    settings.update(changes)
    torch.manual_seed(seed)
    policy = ChunkPolicy(PolicyConfig(**settings))
    policy.set_instruction_embeddings(torch.nn.functional.normalize(torch.randn(3, 384), dim=1))
    policy.set_statistics(
        {
            "observation.state": {"mean": [0.1] * 4, "std": [2.0] * 4, "min": [-3.0] * 4, "max": [3.0] * 4},
            "action": {"mean": [0.0] * 2, "std": [1.0] * 2, "min": [-2.0, -1.0], "max": [2.0, 1.0]},
        }
    )
    return policy


def _batch(rows: int = 5, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    pad = torch.zeros(rows, 8, dtype=torch.bool)
    pad[0, 5:] = True
    pad[1, 2:] = True
    return {
        "state": torch.randn(rows, 2, 4, generator=g),
        "image": torch.randint(0, 256, (rows, 2, 3, 36, 36), generator=g, dtype=torch.uint8),
        "task_index": torch.randint(0, 3, (rows,), generator=g),
        "action": torch.rand(rows, 8, 2, generator=g) * 2 - 1,
        "action_is_pad": pad,
    }


def _levels(policy: ChunkPolicy) -> int:
    return 2 if policy.policy_config.kind == "hierarchical" else 1


def test_the_contract_covers_the_shipped_heads_and_one_defined_outside() -> None:
    assert {"flow", "hierarchical", "mse", "ddpm", "flow-uniform-time", "flow-sample-prediction"} <= set(HEADS)
    assert isinstance(_policy("flow-uniform-time").head, UniformTimeFlowHead)


@pytest.mark.parametrize("kind", HEADS)
def test_loss_is_finite_and_its_gradients_reach_every_parameter(kind: str) -> None:
    policy = _policy(kind)
    torch.manual_seed(0)
    loss = policy.loss(_batch())
    assert loss.dim() == 0 and bool(torch.isfinite(loss))
    missing = parameters_without_gradient(policy, loss)
    assert not missing, f"no gradient reaches {missing}"


@pytest.mark.parametrize("kind", HEADS)
def test_padded_steps_leave_the_heads_loss_unchanged(kind: str) -> None:
    policy = _policy(kind)
    batch = _batch()
    target = policy.normalize_action(batch["action"])
    pad = batch["action_is_pad"]
    cache = policy.expert.encode(policy.prefix(batch))

    def loss(chunk: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(7)
        return policy.head.loss(chunk, cache, pad)

    reference = loss(target)
    changed = target.clone()
    changed[pad] = float("nan")  # garbage past the episodes' ends
    torch.testing.assert_close(loss(changed), reference, rtol=0, atol=0)
    changed = target.clone()
    changed[2, 1] += 1.0  # a real step
    assert not torch.equal(loss(changed), reference)


@pytest.mark.parametrize("kind", HEADS)
def test_cached_and_uncached_sampling_are_equal_for_the_same_noise(kind: str) -> None:
    policy = _policy(kind).eval()
    batch = _batch()
    noise = torch.randn(5, 8, 2, generator=torch.Generator().manual_seed(3))
    methods = ["ddpm", "ddim"] if kind == "ddpm" else [None]
    for method in methods:
        settings = {} if method is None else {"method": method}
        torch.manual_seed(11)  # the ancestral DDPM chain draws noise at every step
        cached = policy.predict_chunk(batch, noise=noise, use_cache=True, **settings)
        torch.manual_seed(11)
        uncached = policy.predict_chunk(batch, noise=noise, use_cache=False, **settings)
        torch.testing.assert_close(cached.actions, uncached.actions, rtol=1e-4, atol=1e-4)
        assert cached.nfe == uncached.nfe and bool(torch.isfinite(cached.actions).all())


@pytest.mark.parametrize("kind", HEADS)
def test_chunk_from_noise_is_predict_chunks_computation_and_replays_on_new_inputs(kind: str) -> None:
    """The unchecked path that CUDA graphs and torch.compile capture gives predict_chunk's chunk, and
    called again on the same tensors refilled in place (as a graph replays) the chunk of the new inputs."""
    policy = _policy(kind).eval()
    batches = [_batch(seed=seed) for seed in (1, 2)]
    noises = [torch.randn(5, 8, 2, generator=torch.Generator().manual_seed(seed)) for seed in (3, 4)]
    steps = None if kind == "mse" else 2  # a regression head takes no steps
    sampling = policy.sampling(steps)
    static = {key: batches[0][key].clone() for key in ("state", "image", "task_index")}
    static_noise = noises[0].clone()
    for batch, noise in zip(batches, noises, strict=True):
        for key, buffer in static.items():
            buffer.copy_(batch[key])
        static_noise.copy_(noise)
        torch.manual_seed(11)
        expected = policy.predict_chunk(batch, steps=steps, noise=noise)
        torch.manual_seed(11)
        with torch.inference_mode():
            actions, nfe = policy.chunk_from_noise(static, static_noise, sampling)
        torch.testing.assert_close(actions, expected.actions, rtol=0, atol=0)
        assert nfe == expected.nfe


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
@pytest.mark.parametrize("kind", HEADS)
def test_chunk_from_noise_reads_no_value_back_to_the_host(kind: str) -> None:
    """A value read back (``.item()``, ``bool(tensor)``) breaks a compiled graph and cannot be captured
    in a CUDA graph: the sampling path, language lookup included, traces as one graph."""
    policy = _policy(kind).eval()
    batch = {key: value for key, value in _batch().items() if key in ("state", "image", "task_index")}
    sampling, noise = policy.sampling(None if kind == "mse" else 2), torch.randn(5, 8, 2)
    torch._dynamo.reset()
    with torch.inference_mode():
        explained = torch._dynamo.explain(policy.chunk_from_noise)(batch, noise, sampling)
    torch._dynamo.reset()
    assert explained.graph_break_count == 0, [str(reason.reason)[:200] for reason in explained.break_reasons]


@pytest.mark.parametrize("kind", HEADS)
def test_steps_k_cost_k_evaluations_per_level_and_leave_the_config_unchanged(kind: str) -> None:
    policy = _policy(kind).eval()
    before = dataclasses.replace(policy.policy_config)
    batch = _batch()
    if not policy.head.samples_from_noise:
        assert policy.predict_chunk(batch).nfe == 1
        with pytest.raises(ValueError, match="takes no steps"):
            policy.predict_chunk(batch, steps=3)
    else:
        for k in (1, 2, 3):
            assert policy.predict_chunk(batch, steps=k).nfe == k * _levels(policy)
        default = policy.predict_chunk(batch).nfe
        expected = policy.policy_config.inference_steps if kind == "ddpm" else policy.policy_config.sampling_steps
        assert default == expected * _levels(policy)
    assert policy.policy_config == before


@pytest.mark.parametrize("kind", ["flow", "flow-sample-prediction", "hierarchical", "mse", "ddpm"])
def test_a_float64_policy_with_images_samples_and_trains(kind: str) -> None:
    policy = _policy(kind).double()
    batch = _batch()
    assert policy.loss(batch).dtype == torch.float64
    actions = policy.eval().predict_chunk(batch).actions
    assert actions.dtype == torch.float64 and bool(torch.isfinite(actions).all())


def test_a_regression_policy_leaves_the_random_state_alone() -> None:
    policy = _policy("mse").eval()
    state = torch.random.get_rng_state()
    policy.predict_chunk(_batch())
    assert torch.equal(torch.random.get_rng_state(), state)


def test_fill_padding_holds_the_last_real_action() -> None:
    chunk = torch.arange(6.0).view(1, 6, 1)
    pad = torch.tensor([[False, False, False, True, True, True]])
    assert fill_padding(chunk, pad)[0, :, 0].tolist() == [0.0, 1.0, 2.0, 2.0, 2.0, 2.0]
    assert fill_padding(chunk, None) is chunk


def test_schedulers_are_objects_with_their_own_step_lists() -> None:
    alpha_bar = cosine_alpha_bar(20)
    assert DDIMScheduler(alpha_bar, 5).timesteps == [19, 14, 10, 5, 0]
    assert DDPMScheduler(alpha_bar, 20).timesteps == list(range(19, -1, -1))
    # With the exact noise, one DDIM step from any level lands on the data.
    data, eps = torch.randn(3, 4), torch.randn(3, 4)
    scheduler = DDIMScheduler(alpha_bar, 1)
    noisy = alpha_bar[19].sqrt() * data + (1 - alpha_bar[19]).sqrt() * eps
    torch.testing.assert_close(scheduler.step(noisy, eps, 0), data, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- checkpoints
def _poisoned_outputs_are_non_finite(policy: ChunkPolicy, tensor: torch.Tensor) -> bool:
    """Whether filling ``tensor`` with NaN reaches the loss or the sampled actions."""
    saved = tensor.detach().clone()
    with torch.no_grad():
        tensor.fill_(float("nan"))
    try:
        torch.manual_seed(0)
        loss = policy.loss(_batch())
        try:
            actions = policy.predict_chunk(_batch()).actions
        except ValueError as error:  # the policy refuses to return a non-finite chunk
            assert "is not finite" in str(error)
            return True
        return not bool(torch.isfinite(loss)) or not bool(torch.isfinite(actions).all())
    finally:
        with torch.no_grad():
            tensor.copy_(saved)


@pytest.mark.parametrize("kind", ["flow", "flow-sample-prediction", "hierarchical", "mse", "ddpm"])
def test_every_tensor_of_a_saved_policy_is_used(kind: str, tmp_path: Path) -> None:
    save_model(tmp_path / kind, _policy(kind).eval())
    loaded = load_policy(tmp_path / kind)
    state = loaded.state_dict(keep_vars=True)
    unused = [key for key, tensor in state.items() if not _poisoned_outputs_are_non_finite(loaded, tensor)]
    assert not unused, f"saved but never used: {unused}"


@pytest.mark.parametrize("kind", ["flow", "hierarchical", "mse", "ddpm"])
def test_a_checkpoint_of_the_previous_release_loads_converted_with_identical_actions(kind: str, tmp_path: Path) -> None:
    manifest = json.loads((RELEASED / kind / "checkpoint.json").read_text())
    assert manifest["model"]["__object__"] == kind  # one class per kind, as that release wrote them
    policy = load_policy(RELEASED / kind)
    assert policy.policy_config.kind == kind
    g = torch.Generator().manual_seed(1)
    batch = {
        "state": torch.randn(2, 2, 3, generator=g),
        "image": torch.randint(0, 256, (2, 2, 3, 36, 36), generator=g, dtype=torch.uint8),
        "task_index": torch.tensor([0, 1]),
    }
    noise = torch.randn(2, 4, 2, generator=g)
    settings = {"noise": noise} if kind != "mse" else {}
    if kind == "ddpm":
        settings["method"] = "ddim"
    expected = torch.tensor(json.loads((RELEASED / "expected.json").read_text())[kind])
    torch.testing.assert_close(policy.predict_chunk(batch, **settings).actions, expected, rtol=1e-6, atol=1e-6)
    save_model(tmp_path / "again", policy)  # saved again in today's layout, it loads as itself
    again = load_policy(tmp_path / "again")
    torch.testing.assert_close(again.predict_chunk(batch, **settings).actions, expected, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- clean-chunk prediction
class _ConstantCache:
    """A stand-in cache whose expert outputs the same chunk for every input and time."""

    def __init__(self, chunk: torch.Tensor) -> None:
        self.chunk = chunk

    def denoise(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.chunk.expand_as(x)


def test_a_sample_predicting_head_reads_its_expert_as_the_clean_chunk() -> None:
    config = _policy("flow", prediction="sample").policy_config
    assert config.prediction == "sample"
    flow = FlowHead(config)
    clean = torch.randn(1, 8, 2, dtype=torch.float64)
    cache = _ConstantCache(clean)
    x = torch.randn(4, 8, 2, dtype=torch.float64)
    t = torch.tensor([0.0, 0.3, 0.9, 1.0], dtype=torch.float64)
    expected = (clean - x) / (1 - t).clamp_min(1e-3).reshape(-1, 1, 1)
    torch.testing.assert_close(flow.velocity(cache)(x, t), expected)
    # Per-token times (a given prefix sits at time 1) are read token by token.
    per_token = torch.rand(4, 8, dtype=torch.float64)
    torch.testing.assert_close(flow.velocity(cache)(x, per_token), (clean - x) / (1 - per_token)[..., None])
    # Euler's last step lands on the expert's own chunk, from any start and at any step count.
    for steps in (1, 3, 10):
        for method in ("euler", "midpoint"):
            found = flow.sample(cache, x, steps=steps, method=method, noise_scale=1.0).x
            torch.testing.assert_close(found, clean.expand_as(x))
    velocity_head = FlowHead(_policy("flow").policy_config)  # the same outputs read as a velocity
    assert not torch.allclose(velocity_head.sample(cache, x, steps=3, method="euler", noise_scale=1.0).x, clean)


def test_a_sample_predicting_heads_loss_is_the_velocity_loss_of_its_velocity() -> None:
    from flowforge.matching import flow_matching_loss

    flow = FlowHead(_policy("flow", prediction="sample").policy_config)
    target, t = torch.randn(6, 8, 2), torch.rand(6) * 0.9  # 1 - t above the loss's floor
    cache = _LinearCache(0.2 * torch.randn(16, 16), 0.1 * torch.randn(16), (8, 2))
    flow.time_sampler = lambda rows, device=None, dtype=None: t
    torch.manual_seed(9)
    found = flow.loss(target, cache, None)
    torch.manual_seed(9)  # the head's own noise draw, replayed
    expected = flow_matching_loss(flow.velocity(cache), torch.randn_like(target), target, t, flow.path)
    torch.testing.assert_close(found, expected)


def test_sample_prediction_is_a_flow_head_setting_and_has_no_chunk_likelihood() -> None:
    from flowforge.errors import ConfigError

    with pytest.raises(ValueError, match="prediction = 'noise' is not one of velocity, sample"):
        _policy("flow", prediction="noise")
    refused = r"prediction = 'sample': kind = 'shortcut' does not use it \(it is for the flow head\)"
    with pytest.raises(ConfigError, match=refused):
        _policy("shortcut", prediction="sample")
    policy = _policy("flow", prediction="sample").eval()
    with pytest.raises(ValueError, match=r"prediction = 'sample'.*singular at the data end"):
        policy.log_prob(_batch(), method="rk4", steps=4)
    # A namespace config (no PolicyConfig checks) is read by the head's own check.
    from types import SimpleNamespace

    with pytest.raises(ValueError, match=r"unknown prediction 'x'; choose one of 'velocity', 'sample'"):
        FlowHead(SimpleNamespace(horizon=8, sampling_steps=4, method="euler", noise_scale=1.0, prediction="x"))


def test_a_sample_predicting_head_refuses_methods_that_evaluate_its_velocity_at_the_data_end() -> None:
    """Its velocity is singular at t = 1, where Heun's, RK4's and adaptive methods' last stage
    lands (there it reads the floor's value: a constant chunk came out 0.46 off at 3 Heun steps)."""
    from flowforge.errors import ConfigError
    from flowforge.policy.heads import SAMPLE_PREDICTION_METHODS

    assert SAMPLE_PREDICTION_METHODS == ("euler", "midpoint")
    refused = r"method = '{}': a flow head with prediction = 'sample' .* singular at t = 1 .*'euler', 'midpoint'"
    flow = FlowHead(_policy("flow", prediction="sample").policy_config)
    cache, x = _ConstantCache(torch.randn(1, 8, 2)), torch.randn(3, 8, 2)
    for method in ("heun", "rk4", "dopri5"):
        with pytest.raises(ConfigError, match=refused.format(method)):
            _policy("flow", prediction="sample", method=method)
        with pytest.raises(ValueError, match=refused.format(method)):
            flow.sample(cache, x, steps=3, method=method, noise_scale=1.0)
    with pytest.raises(ValueError, match=r"unknown method 'bogus'; choose one of 'euler', 'midpoint'"):
        flow.sample(cache, x, steps=3, method="bogus", noise_scale=1.0)
    policy = _policy("flow", prediction="sample").eval()
    batch = {k: v for k, v in _batch().items() if k not in ("action", "action_is_pad")}
    with pytest.raises(ValueError, match=refused.format("rk4")):
        policy.predict_chunk(batch, method="rk4", steps=3)
    assert _policy("flow", method="rk4").policy_config.method == "rk4"  # the velocity head takes any


# ---------------------------------------------------------------- chunk likelihood
class _LinearCache:
    """A stand-in cache whose velocity is linear, v(x, t) = M x + b on the flattened chunk: the flow
    map is x1 = e^M x0 + M^{-1}(e^M - I) b, so log p(x1) = log N(x0) - tr M in closed form."""

    def __init__(self, matrix: torch.Tensor, bias: torch.Tensor, shape: tuple[int, int]) -> None:
        self.matrix, self.bias, self.shape = matrix, bias, shape

    def denoise(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1) @ self.matrix.T + self.bias
        return flat.reshape(x.shape)


def test_log_prob_of_a_linear_velocity_field_equals_the_closed_form() -> None:
    torch.manual_seed(0)
    shape = (3, 2)
    matrix = 0.3 * torch.randn(6, 6, dtype=torch.float64)
    bias = 0.2 * torch.randn(6, dtype=torch.float64)
    cache = _LinearCache(matrix, bias, shape)
    x1 = torch.randn(5, *shape, dtype=torch.float64)
    flow = FlowHead(_policy("flow").policy_config)
    exp = torch.linalg.matrix_exp(matrix)
    x0 = torch.linalg.solve(exp, (x1.reshape(5, 6) - torch.linalg.solve(matrix, (exp - torch.eye(6)) @ bias)).T).T
    for noise_scale in (1.0, 0.5):
        normal = torch.distributions.Normal(0.0, noise_scale)
        expected = normal.log_prob(x0).sum(1) - torch.trace(matrix)
        found = flow.log_prob(x1, cache, trace="exact", atol=1e-9, rtol=1e-9, noise_scale=noise_scale)
        torch.testing.assert_close(found, expected, rtol=1e-6, atol=1e-6)
    # Hutchinson's estimate is unbiased: its mean over probes approaches the exact value.
    torch.manual_seed(1)
    estimates = torch.stack([flow.log_prob(x1, cache, trace="hutchinson", method="rk4", steps=20) for _ in range(200)])
    exact = flow.log_prob(x1, cache, trace="exact", method="rk4", steps=20)
    standard_error = estimates.std(0) / len(estimates) ** 0.5
    assert ((estimates.mean(0) - exact).abs() < 4 * standard_error).all()
    assert (estimates.std(0) > 0).all()  # a real estimate, not the exact trace


def test_a_policys_chunk_density_integrates_to_one_in_the_data_units() -> None:
    torch.manual_seed(0)
    config = PolicyConfig(
        kind="flow",
        state_key="observation.state",
        state_dim=2,
        action_dim=1,
        horizon=1,
        width=16,
        layers=1,
        heads=2,
        language=False,
        action_normalization="min_max",
    )
    policy = ChunkPolicy(config)
    policy.set_statistics(
        {"observation.state": {"mean": [0.0, 0.0], "std": [1.0, 1.0]}, "action": {"min": [-2.0], "max": [4.0]}}
    )
    policy.eval()
    grid = torch.linspace(-25.0, 27.0, 801)
    batch = {"state": torch.zeros(801, 1, 2), "action": grid[:, None, None]}
    density = policy.log_prob(batch, method="rk4", steps=40).exp()
    total = torch.trapezoid(density, grid)
    assert abs(float(total) - 1.0) < 5e-3, float(total)


def test_log_prob_keeps_no_graph_across_solver_steps(monkeypatch) -> None:
    from flowforge.ode.divergence import ExactDivergence, HutchinsonDivergence

    asked: list[bool] = []
    for estimator in (ExactDivergence, HutchinsonDivergence):
        original = estimator.__call__

        def recording(self, v, x, create_graph, frobenius=False, _original=original):
            asked.append(create_graph)
            return _original(self, v, x, create_graph, frobenius)

        monkeypatch.setattr(estimator, "__call__", recording)
    policy = _policy("flow").eval()
    for trace in ("exact", "hutchinson"):
        density = policy.log_prob(_batch(), trace=trace, method="rk4", steps=3)
        assert not density.requires_grad and torch.isfinite(density).all()
    # A graph through each divergence would chain every step's (an exact trace at batch 64 held 24 GB).
    assert asked and not any(asked)


def test_log_prob_is_for_flow_heads_and_checks_its_chunks() -> None:
    batch = _batch()
    assert _policy("flow").eval().log_prob(batch, method="rk4", steps=4).shape == (5,)
    with pytest.raises(ValueError, match="'ddpm' head has no chunk likelihood"):
        _policy("ddpm").log_prob(batch)
    with pytest.raises(ValueError, match=r"action must be a float tensor of shape \(5, 8, 2\)"):
        _policy("flow").log_prob({**batch, "action": batch["action"][:, :4]})
    with pytest.raises(ValueError, match="trace"):
        _policy("flow").log_prob(batch, trace="sometimes")
    with pytest.raises(ValueError, match=r"steps must be an int in 1\.\.1000, got 5000"):  # as sampling's cap
        _policy("flow").log_prob(batch, method="euler", steps=5000)
    with pytest.raises(ValueError, match=r"noise_scale must be at most 100 \(a temperature"):
        _policy("flow").log_prob(batch, noise_scale=1e30)
    with pytest.raises(
        ValueError, match=r"velocity field \(policy.kind = 'flow', 'shortcut', 'meanflow', 'consistency'"
    ):
        _policy("mse").log_prob(batch)
    policy = _policy("flow").eval()
    unpadded = {key: value for key, value in batch.items() if key != "action_is_pad"}
    torch.testing.assert_close(  # chunks are scored whole: the padding mask is not read
        policy.log_prob(batch, method="rk4", steps=2, trace="exact"),
        policy.log_prob(unpadded, method="rk4", steps=2, trace="exact"),
    )
    # A fixed-step method scores each chunk alike in any batch (an adaptive one shares its steps).
    together = policy.log_prob(unpadded, method="rk4", steps=4)
    alone = torch.cat(
        [policy.log_prob({k: v[i : i + 1] for k, v in unpadded.items()}, method="rk4", steps=4) for i in range(5)]
    )
    torch.testing.assert_close(together, alone)


def test_few_step_heads_tell_the_expert_their_step() -> None:
    policy = _policy("shortcut").eval()
    seen: list[float] = []
    denoise = policy.expert.denoise

    def spy(x, t, cache, interval=None):
        seen.append(float(interval[0]))
        return denoise(x, t, cache, interval)

    policy.expert.denoise = spy
    policy.predict_chunk(_batch(), steps=4, method="euler")
    assert seen == [0.25] * 4  # a trained power of two: the shortcut of that step
    seen.clear()
    policy.predict_chunk(_batch(), steps=3, method="midpoint")
    assert seen == [0.0] * 6  # any other solve: the instantaneous velocity
    meanflow = _policy("meanflow").eval()
    assert meanflow.predict_chunk(_batch(), steps=1).nfe == 1
    with pytest.raises(ValueError, match="meanflow head steps with its average velocity"):
        meanflow.predict_chunk(_batch(), method="midpoint")


def test_the_consistency_head_holds_its_boundary_condition_and_samples_in_one_step() -> None:
    policy = _policy("consistency", consistency_segments=2).eval()
    head = policy.head
    torch.testing.assert_close(
        head.segment_end(torch.tensor([0.0, 0.2, 0.5, 0.51, 0.99, 1.0])), torch.tensor([0.5, 0.5, 0.5, 1.0, 1.0, 1.0])
    )
    batch = _batch()
    with torch.no_grad():
        cache = policy.expert.encode(policy.prefix(policy.checked_batch(batch)))
        x = torch.randn(5, 8, 2)
        data, _ = head.predicted_chunk(cache, x, torch.ones(5))
        torch.testing.assert_close(data, x)  # f(x, 1) = x: the boundary condition by construction
        noise = torch.randn(5, 8, 2)
        _, velocity = head.predicted_chunk(cache, noise, torch.zeros(5))
    result = policy.predict_chunk(batch, steps=1, noise=noise)
    torch.testing.assert_close(result.actions, policy.unnormalize_action(noise + velocity), rtol=1e-5, atol=1e-5)
    assert result.nfe == 1
    with pytest.raises(ValueError, match="consistency head samples by its own steps"):
        policy.predict_chunk(batch, method="rk4")


def test_the_consistency_target_is_the_demonstrated_chunk_where_the_later_time_reaches_the_data_end() -> None:
    # A gap of nearly 1 clamps every later time to 1, where f(x, 1) = x is the chunk itself: the
    # loss becomes |f(x_t, t) - A|^2, what ties the consistency function to the demonstrations.
    policy = _policy("consistency", consistency_delta=0.999999, consistency_velocity_weight=0.0, consistency_segments=1)
    head, target = policy.head, torch.rand(6, 8, 2) * 2 - 1
    cache = policy.expert.encode(policy.prefix(policy.checked_batch(_batch(6))))
    torch.manual_seed(3)
    loss = head.filled_loss(target, cache, None)
    torch.manual_seed(3)
    noise = torch.randn_like(target)
    t = torch.rand(6)
    x_t = t[:, None, None] * target + (1 - t[:, None, None]) * noise
    expected = (x_t + (1 - t[:, None, None]) * cache.denoise(x_t, t) - target).square().mean()
    torch.testing.assert_close(loss, expected)


def _count_jvp_rows(monkeypatch) -> list[int]:
    """The rows of every Jacobian-vector product taken from now on (the meanflow head's span rows)."""
    rows: list[int] = []
    original = torch.func.jvp

    def counting(function, primals, tangents):
        rows.append(primals[0].shape[0])
        return original(function, primals, tangents)

    monkeypatch.setattr(torch.func, "jvp", counting)
    return rows


def test_meanflow_runs_the_jacobian_vector_product_on_its_span_rows_alone(monkeypatch) -> None:
    policy = _policy("meanflow", meanflow_fraction=0.25)
    batch = _batch(8)
    jvp_rows = _count_jvp_rows(monkeypatch)
    loss = policy.loss(batch)
    assert jvp_rows == [2] and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in policy.expert.parameters())


@pytest.mark.parametrize(("fraction", "span_rows"), [(0.0, []), (1.0, [8]), (0.1, [1])])
def test_meanflow_trains_the_share_of_span_rows_it_is_given(monkeypatch, fraction: float, span_rows: list) -> None:
    """0 is plain flow matching and 1 spans only, as asked; strictly between, a batch keeps one row of
    each part however small the share (0.1 of 8 rows rounds to 1)."""
    policy = _policy("meanflow", meanflow_fraction=fraction)
    jvp_rows = _count_jvp_rows(monkeypatch)
    assert torch.isfinite(policy.loss(_batch(8)))
    assert jvp_rows == span_rows


def test_a_shortcut_head_needs_both_of_its_parts() -> None:
    from flowforge.errors import ConfigError

    for fraction in (0.0, 1.0):
        with pytest.raises(ConfigError, match=rf"shortcut_fraction = {fraction}: expected a finite number > 0 and < 1"):
            _policy("shortcut", shortcut_fraction=fraction)


def test_meanflow_draws_its_times_and_span_ends_uniformly(monkeypatch) -> None:
    """Span rows: s = min and s + h = max of two uniform draws (means 1/3 and 2/3); the other rows
    h = 0 at uniform times (mean 1/2). The flow head's shifted Beta would put the means near 0.4."""
    import flowforge.policy.heads as heads

    policy = _policy("meanflow", meanflow_fraction=0.5)
    drawn: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = heads.mean_flow_loss

    def recording(velocity, noise, target, start, span, *args, **kwargs):
        drawn.append((start.detach().clone(), span.detach().clone()))
        return original(velocity, noise, target, start, span, *args, **kwargs)

    monkeypatch.setattr(heads, "mean_flow_loss", recording)
    torch.manual_seed(0)
    with torch.no_grad():
        for _ in range(40):
            policy.loss(_batch(8))
    spanned = [(s, h) for s, h in drawn if bool((h > 0).all())]
    plain = [s for s, h in drawn if bool((h == 0).all())]
    assert len(spanned) == len(plain) == 40
    start = torch.cat([s for s, _ in spanned])
    end = torch.cat([s + h for s, h in spanned])
    assert bool((end <= 1).all()) and bool((start >= 0).all())
    # 160 draws each: standard errors about 0.02.
    assert abs(float(start.mean()) - 1 / 3) < 0.07 and abs(float(end.mean()) - 2 / 3) < 0.07
    assert abs(float(torch.cat(plain).mean()) - 0.5) < 0.07


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("consistency_segments", 0),
        ("consistency_segments", 1.5),
        ("time_embedding_frequency", 0.5),
        ("time_embedding_frequency", float("nan")),
        ("consistency_delta", 1.0),
    ],
)
def test_few_step_settings_out_of_range_are_refused_naming_the_setting(setting: str, value) -> None:
    from flowforge.errors import ConfigError

    with pytest.raises((ConfigError, ValueError), match=setting):
        _policy("consistency", **{setting: value})


def test_consistency_distillation_targets_the_teachers_ode_map() -> None:
    # A Gaussian target N(m, s^2) per number, independent noise: on the linear path the marginal is
    # N(t m, sigma_t^2) with sigma_t^2 = (1 - t)^2 + t^2 s^2, so the teacher's velocity and its ODE
    # map to the data end are closed-form, v(x, t) = m + (t s^2 - (1 - t)) (x - t m) / sigma_t^2 and
    # Phi(x, t) = m + s (x - t m) / sigma_t. The trajectories bend, so a student whose consistency
    # function is Phi has nothing left to learn (only Heun's error on one interval), and one that takes
    # the teacher's single Euler step to the data end is far from it.
    from types import SimpleNamespace

    head = _policy("consistency", consistency_segments=1).head
    g = torch.Generator().manual_seed(0)
    m, s = torch.randn(1, 8, 2, generator=g), 0.2 + 2 * torch.rand(1, 8, 2, generator=g)

    def variance(t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1, 1, 1)
        return (1 - t) ** 2 + t**2 * s**2

    def teacher(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        late = t.reshape(-1, 1, 1)
        return m + (late * s**2 - (1 - late)) * (x - late * m) / variance(t)

    def exact_student(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # (Phi - x) / (1 - t)
        late = t.reshape(-1, 1, 1)
        phi = m + s * (x - late * m) / variance(t).sqrt()
        return (phi - x) / (1 - late).clamp(min=1e-12)

    target = m + s * torch.randn(256, 8, 2, generator=g)
    # Trajectory distillation regresses the end of the teacher's Euler trajectory: with many steps,
    # the ODE map's end.
    torch.manual_seed(1)
    exact = head.trajectory_distillation_loss(target, SimpleNamespace(denoise=exact_student), None, teacher, 400)
    torch.manual_seed(1)
    euler = head.trajectory_distillation_loss(target, SimpleNamespace(denoise=teacher), None, teacher, 400)
    assert float(exact) < 1e-4 < 1e-3 < float(euler)
    torch.manual_seed(1)
    exact = head.distillation_loss(target, SimpleNamespace(denoise=exact_student), None, teacher, 18)
    torch.manual_seed(1)
    euler = head.distillation_loss(target, SimpleNamespace(denoise=teacher), None, teacher, 18)
    assert float(exact) < 1e-6 < 1e-3 < float(euler)
    pad = torch.zeros(256, 8, dtype=torch.bool)
    pad[:, 4:] = True  # padded steps carry no loss: the exact student stays at zero with garbage there
    garbage = target.clone()
    garbage[:, 4:] = float("nan")
    torch.manual_seed(1)
    assert float(head.distillation_loss(garbage, SimpleNamespace(denoise=exact_student), pad, teacher, 18)) < 1e-6
    with pytest.raises(ValueError, match="needs one segment"):
        _policy("consistency", consistency_segments=2).head.distillation_loss(target, None, None, teacher, 18)


def test_a_policy_is_distilled_only_from_a_teacher_with_its_action_normaliser() -> None:
    """The teacher's velocities live in its normalised action units: another normaliser is refused."""
    student, teacher = _policy("consistency"), _policy("flow").eval()
    assert torch.isfinite(student.distillation_loss(_batch(), teacher))
    teacher.set_statistics(
        {
            "observation.state": {"mean": [0.1] * 4, "std": [2.0] * 4, "min": [-3.0] * 4, "max": [3.0] * 4},
            "action": {"mean": [0.0] * 2, "std": [1.0] * 2, "min": [-200.0, -1.0], "max": [200.0, 1.0]},
        }
    )
    with pytest.raises(ValueError, match=r"the teacher normalises actions otherwise than this policy \(shift"):
        student.distillation_loss(_batch(), teacher)


def test_a_teacher_trained_with_any_flow_time_law_can_be_distilled(tmp_path: Path) -> None:
    """The law of the flow times is how a head trains, not its network: a consistency student, which
    draws no flow times, follows a teacher trained with another law."""
    from flowforge.runs.policy import _load_teacher

    teacher = _policy("flow", time_sampler="uniform")
    save_model(tmp_path / "teacher", teacher)
    student = dataclasses.replace(teacher.policy_config, kind="consistency", time_sampler="shifted-beta")
    assert _load_teacher(student, str(tmp_path / "teacher")).policy_config.time_sampler == "uniform"


def test_a_teacher_that_predicts_the_clean_chunk_is_followed_along_its_velocity(monkeypatch, tmp_path: Path) -> None:
    """Distillation follows the teacher's ODE: the velocity its clean chunk implies, not its raw output."""
    from flowforge.runs.policy import _load_teacher

    teacher = _policy("flow", prediction="sample").eval()
    save_model(tmp_path / "teacher", teacher)
    student_config = dataclasses.replace(teacher.policy_config, kind="consistency", prediction="velocity")
    assert _load_teacher(student_config, str(tmp_path / "teacher")).policy_config.prediction == "sample"
    student = _policy("consistency")
    given = []
    monkeypatch.setattr(type(student.head), "distillation_loss", lambda self, *args: given.append(args[3]) or 0.0)
    student.distillation_loss(_batch(), teacher)
    x, t = torch.randn(5, 8, 2), torch.full((5,), 0.4)
    cache = teacher.expert.encode(teacher.prefix(teacher.checked_batch(_batch(), training=True), augment=False))
    with torch.no_grad():
        torch.testing.assert_close(given[0](x, t), (cache.denoise(x, t) - x) / 0.6)


def test_consistency_distillation_ends_a_clean_chunk_teachers_last_interval_on_its_chunk() -> None:
    """On the last interval (t = 1) a teacher that predicts the clean chunk takes an Euler step,
    which lands on that chunk; Heun's second evaluation would read its singular velocity at 1
    (the floor's value), and the target would land halfway."""
    student = _policy("consistency").head
    clean = torch.randn(1, 8, 2, dtype=torch.float64)
    teacher = FlowHead(_policy("flow", prediction="sample").policy_config).velocity(_ConstantCache(clean))
    matrix, bias = 0.2 * torch.randn(16, 16, dtype=torch.float64), 0.1 * torch.randn(16, dtype=torch.float64)
    cache = _LinearCache(matrix, bias, (8, 2))
    target = torch.randn(6, 8, 2, dtype=torch.float64)
    torch.manual_seed(4)
    found = student.distillation_loss(target, cache, None, teacher, intervals=1)  # every row: (0, 1)
    torch.manual_seed(4)  # the loss's own draws, replayed: the interval, then the noise
    torch.randint(0, 1, (6,))
    noisy = torch.randn_like(target)  # the path at t = 0
    predicted = noisy + cache.denoise(noisy, torch.zeros(6, dtype=torch.float64))
    torch.testing.assert_close(found, (predicted - clean).square().mean())


def test_a_shortcut_policy_samples_with_an_adaptive_solver_on_its_instantaneous_velocity() -> None:
    """An adaptive solver takes no step count, so the expert is told d = 0, as any other solver
    that takes no trained Euler step (rk4 here)."""
    smooth = {"time_embedding_frequency": 1.0}  # a field smooth in t, so that both solves converge
    policy = _policy("shortcut", **smooth).eval()
    batch = {k: v for k, v in _batch().items() if k not in ("action", "action_is_pad")}
    noise = torch.randn(5, 8, 2, generator=torch.Generator().manual_seed(2))
    adaptive = policy.predict_chunk(batch, method="dopri5", noise=noise).actions
    fixed = policy.predict_chunk(batch, method="rk4", steps=20, noise=noise).actions
    torch.testing.assert_close(adaptive, fixed, rtol=0, atol=1e-3)
    configured = _policy("shortcut", method="dopri5", **smooth).eval()
    torch.testing.assert_close(configured.predict_chunk(batch, noise=noise).actions, adaptive)


def test_schedulers_and_rtc_weights_refuse_arguments_outside_their_ranges() -> None:
    from flowforge.policy.heads import rtc_weights

    alpha_bar = cosine_alpha_bar(100)
    for call, message in (
        (lambda: DDIMScheduler(alpha_bar, 0), r"steps must be an int in 1\.\.100, got 0"),
        (lambda: DDIMScheduler(alpha_bar, 101), r"steps must be an int in 1\.\.100, got 101"),
        (lambda: DDIMScheduler(alpha_bar, 10, float("nan")), "clip must be a finite number > 0, got nan"),
        (lambda: rtc_weights(0, frozen=0, overlap=0), "horizon must be a positive int, got 0"),
        (lambda: rtc_weights(6, frozen=-1, overlap=5), r"frozen must be an int in 0\.\.6, got -1"),
        (lambda: rtc_weights(6, frozen=2, overlap=-3), "overlap must be an int >= 0, got -3"),
    ):
        with pytest.raises(ValueError, match=message):
            call()
    assert len(DDIMScheduler(alpha_bar, 100).timesteps) == 100
