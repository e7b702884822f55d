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
        keyframe_stride=2,
        diffusion_steps=12,
        inference_steps=4,
        sampling_steps=5,
    )
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
    assert {"flow", "hierarchical", "mse", "ddpm", "flow-uniform-time"} <= set(HEADS)
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


@pytest.mark.parametrize("kind", ["flow", "hierarchical", "mse", "ddpm"])
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
        actions = policy.predict_chunk(_batch()).actions
        return not bool(torch.isfinite(loss)) or not bool(torch.isfinite(actions).all())
    finally:
        with torch.no_grad():
            tensor.copy_(saved)


@pytest.mark.parametrize("kind", ["flow", "hierarchical", "mse", "ddpm"])
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
