"""Bad input refused where it enters, naming it: a policy's training batch, likelihood, language
inputs, guides and statistics; an executor's observations; evaluation's arguments; and the
recorded arguments of a saved model, which later changes to the caller's objects do not reach."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowforge.checkpoint import load_model, save_model
from flowforge.data.normalize import Normalizer
from flowforge.errors import ConfigError, DataError, NumericalError
from flowforge.flows import Glow, RealNVP
from flowforge.policy import ChunkExecutor, ChunkPolicy, PolicyConfig
from flowforge.policy.heads import ChunkGuide, ChunkPrefix
from flowforge.validation import checks

SMALL = {
    "state_key": "observation.state",
    "state_dim": 3,
    "action_dim": 2,
    "horizon": 8,
    "width": 16,
    "layers": 1,
    "heads": 2,
    "language": False,
}


def _policy(**changes) -> ChunkPolicy:
    torch.manual_seed(0)
    return ChunkPolicy(PolicyConfig(**{**SMALL, **changes}))


def _batch(rows: int = 4) -> dict:
    return {"state": torch.randn(rows, 1, 3), "action": torch.randn(rows, 8, 2)}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda b: b["state"].__setitem__((1, 0, 2), float("nan")), r"state holds nan at index \(1, 0, 2\)"),
        (lambda b: b["action"].__setitem__((2, 3, 0), float("inf")), r"action holds inf at index \(2, 3, 0\)"),
        (lambda b: b.update(action=torch.randn(3, 8, 2)), r"action must be a float tensor of shape \(4, 8, 2\)"),
        (lambda b: b.update(action=torch.ones(4, 8, 2, dtype=torch.bool)), "action must be a float tensor"),
        (lambda b: b.pop("action"), "batch needs 'action'"),
        (lambda b: b.update(action_is_pad=torch.zeros(4, 8)), "action_is_pad must be a bool tensor of shape"),
        (lambda b: b.update(state="abc"), "state must be a tensor or array of numbers, got str"),
    ],
)
@pytest.mark.parametrize("kind", ["flow", "mse", "meanflow"])
def test_a_training_batch_is_checked_before_the_loss(kind: str, change, message: str) -> None:
    policy = _policy(kind=kind).train()
    batch = _batch()
    change(batch)
    with pytest.raises(ValueError, match=message):
        policy.loss(batch)


def test_a_likelihood_that_overflows_is_refused_not_nan() -> None:
    policy = _policy().eval()
    batch = {"state": torch.full((1, 1, 3), 1e30), "action": torch.zeros(1, 8, 2)}
    with pytest.raises(NumericalError, match=r"log_prob is NaN for rows \[0\]"):
        policy.log_prob(batch, steps=2, method="euler")
    assert bool(torch.isfinite(policy.log_prob(_batch(1), steps=2, method="euler")).all())


def test_language_inputs_are_checked() -> None:
    policy = _policy(language=True, instructions=["reach", "push"]).eval()
    policy.set_instruction_embeddings(torch.randn(2, 384))
    state = torch.zeros(2, 1, 3)
    for index, message in (
        (torch.tensor([0, 2]), r"task_index must index the 2 instructions \(0\.\.1\), got \[0, 2\]"),
        (torch.tensor([-1, 0]), "task_index must index the 2 instructions"),
        (torch.tensor([0.0, 1.0]), "task_index must be 2 integers"),
        (torch.tensor([0]), "task_index must be 2 integers"),
    ):
        with pytest.raises(ValueError, match=message):
            policy.predict_chunk({"state": state, "task_index": index}, steps=2)
    for texts in (["reach"] * 3, [3, 4]):
        with pytest.raises(ValueError, match="instruction must be a string or 2 strings"):
            policy.predict_chunk({"state": state, "instruction": texts}, steps=2)
    # Both given: they must name the same instructions (otherwise the index would win unseen).
    both = {"state": state, "task_index": torch.tensor([1, 1]), "instruction": ["push", "reach"]}
    with pytest.raises(ValueError, match="disagree at row 1: task_index 1 is 'push', instruction is 'reach'"):
        policy.predict_chunk(both, steps=2)
    with pytest.raises(ValueError, match="disagree at row 0"):
        policy.predict_chunk({**both, "instruction": "reach"}, steps=2)
    assert policy.predict_chunk({**both, "instruction": "push"}, steps=2).actions.shape == (2, 8, 2)
    # training and likelihoods refuse a wrong index too, with the NaN scan off: it is no NaN scan
    training = {"state": state, "action": torch.zeros(2, 8, 2), "task_index": torch.tensor([-1, 0])}
    with checks(finite=False):
        for call in (policy.loss, lambda batch: policy.log_prob(batch, steps=2, method="euler")):
            with pytest.raises(ValueError, match="task_index must index the 2 instructions"):
                call(training)
    # a distillation teacher reads the batch's index into its own instructions
    student = _policy(kind="consistency", language=True, instructions=["reach", "push"])
    teacher = _policy(language=True, instructions=["reach"])
    for model in (student, teacher):
        model.set_instruction_embeddings(torch.randn(len(model.encoder.instructions), 384))
    with pytest.raises(ValueError, match=r"task_index must index the 1 instructions \(0\.\.0\), got \[1, 0\]"):
        student.distillation_loss({**training, "task_index": torch.tensor([1, 0])}, teacher)
    assert policy.predict_chunk({"state": state, "task_index": torch.tensor([1, 0])}, steps=2).actions.shape == (
        2,
        8,
        2,
    )

    for embeddings, message in (
        (torch.randn(3, 384), r"embeddings must be a floating-point tensor of shape \(2, 384\).*\(3, 384\)"),
        (torch.ones(2, 384, dtype=torch.int64), "embeddings must be a floating-point tensor"),
        (torch.full((2, 384), float("nan")), "embeddings hold NaN or inf"),
    ):
        with pytest.raises(ValueError, match=message):
            policy.set_instruction_embeddings(embeddings)
    with pytest.raises(ValueError, match=r"without language input \(language = false\)"):
        _policy().set_instruction_embeddings(torch.randn(2, 384))


def test_numbers_too_large_for_the_models_dtype_are_refused_where_they_enter() -> None:
    """float64 1e300 is finite, but inf once cast to the policy's float32: refused, not turned into NaN."""
    policy = _policy()
    huge = torch.full((2, 1, 3), 1e300, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"state holds 1e\+300 at index \(0, 0, 0\) \(beyond the range of"):
        policy.eval().predict_chunk({"state": huge}, steps=2)
    with pytest.raises(ValueError, match=r"action holds 1e\+300 .*beyond the range of torch.float32"):
        policy.train().loss(
            {"state": torch.zeros(2, 1, 3), "action": torch.full((2, 8, 2), 1e300, dtype=torch.float64)}
        )
    flow = RealNVP(2, context=1, transforms=2)
    with pytest.raises(ValueError, match=r"context contains NaN or inf \(first at batch index 0, values beyond"):
        flow.sample(2, torch.full((1, 1), 1e300, dtype=torch.float64))
    images = _policy(image_shape=[3, 32, 32], cameras=["wrist"], image_encoder="resnet-keypoints")
    batch = {
        "state": torch.zeros(2, 1, 3),
        "action": torch.zeros(2, 8, 2),
        "image.wrist": torch.full((2, 1, 3, 32, 32), 300.0),
    }
    with pytest.raises(ValueError, match=r"image.wrist holds values outside 0-255 \(300.0 to 300.0\)"):
        images.train().loss(batch)


def test_guides_prefixes_steps_and_flags_are_checked() -> None:
    policy = _policy(rtc_training_delay=3).eval()
    state = {"state": torch.zeros(2, 1, 3)}
    weights = torch.linspace(1, 0, 8)
    with pytest.raises(ValueError, match=r"guide\.actions must be floating-point"):
        policy.predict_chunk(state, steps=2, guide=ChunkGuide(torch.zeros(2, 8, 2, dtype=torch.bool), weights))
    with pytest.raises(ValueError, match=r"guide\.weights must be 8 floating-point numbers"):
        policy.predict_chunk(state, steps=2, guide=ChunkGuide(torch.zeros(2, 8, 2), torch.ones(8, dtype=torch.int64)))
    with pytest.raises(ValueError, match=r"prefix\.actions must be floating-point"):
        policy.predict_chunk(state, steps=2, prefix=ChunkPrefix(torch.zeros(2, 8, 2, dtype=torch.int64), 2))
    with pytest.raises(TypeError, match="guide must be a ChunkGuide or None, got Tensor"):
        policy.predict_chunk(state, steps=2, guide=torch.zeros(2, 8, 2))
    with pytest.raises(ValueError, match=r"steps must be an int in 1\.\.1000, got 1000000000"):
        policy.predict_chunk(state, steps=10**9)
    with pytest.raises(TypeError, match="use_cache must be a bool"):
        policy.predict_chunk(state, steps=2, use_cache="no")
    given = policy.predict_chunk(state, steps=2, prefix=ChunkPrefix(torch.zeros(2, 8, 2), np.int64(2)))
    assert torch.equal(given.actions[:, :2], torch.zeros(2, 2, 2))  # a NumPy length is a length


def test_statistics_with_a_negative_spread_are_refused() -> None:
    with pytest.raises(DataError, match=r"'std' must be >= 0"):
        Normalizer(2).set_statistics({"mean": [0, 0], "std": [1, -1]})
    with pytest.raises(DataError, match=r"'min' must be <= 'max'"):
        Normalizer(2, mode="min_max").set_statistics({"min": [1, 0], "max": [-1, 1]})
    policy = _policy(image_shape=[3, 40, 40], image_normalization="mean_std")
    with pytest.raises(ValueError, match="expected finite numbers"):
        policy.set_image_statistics([{"mean": [0.5] * 3, "std": [-0.5] * 3}])
    with pytest.raises(ValueError, match="'std' must be 3 numbers"):
        policy.set_image_statistics([{"mean": [0.5] * 3}])


def test_settings_of_the_wrong_type_or_layout_are_refused() -> None:
    for changes, message in (
        ({"language": "no"}, "language = 'no': expected true or false"),
        ({"language": True, "instructions": "reach"}, "instructions = 'reach': expected a list of strings"),
        ({"language": True, "instructions": ["a", "a"]}, "listed twice"),
        ({"image_shape": [3, 40.7, 40]}, r"image_shape = \[3, 40\.7, 40\]: expected \[3, H, W\] of integers in 1"),
        ({"kind": "meanflow", "method": "dopri5"}, "a meanflow head steps with its average velocity; use 'euler'"),
    ):
        with pytest.raises(ConfigError, match=message):
            PolicyConfig(**{**SMALL, **changes})
    with pytest.raises(ConfigError, match=r"state_dim = 3: expected twice the state_key's numbers"):
        _policy(previous_state=True)
    with pytest.raises(ConfigError, match=r"state_dim = 2: expected the state_key's plus the goal's 3"):
        _policy(goal_key="observation.goal", state_dim=2)


def test_an_observation_split_wrongly_between_state_and_goal_never_enters_the_history() -> None:
    policy = _policy(goal_key="observation.goal", state_dim=6).eval()
    executor = ChunkExecutor(policy, n_action_steps=1, steps=2)
    executor.act({"state": np.zeros(3), "goal": np.ones(3)})
    for observation, message in (
        ({"state": np.zeros(5), "goal": np.zeros(1)}, r"observation\['goal'\] must be 3 numbers"),
        ({"state": np.zeros(3), "environment_state": np.zeros(10)}, r"'environment_state'\] has 10 numbers"),
        ({"state": np.zeros(3, dtype=np.complex64), "goal": np.zeros(3)}, "must be a vector of numbers"),
    ):
        with pytest.raises(ValueError, match=message):
            executor.act(observation)
    assert len(executor.history) == 1
    executor.act({"state": np.zeros(3), "goal": np.ones(3)})  # the next valid frame is taken
    executor.close()
    with pytest.raises(RuntimeError, match="was closed"):
        executor.act({"state": np.zeros(3), "goal": np.ones(3)})
    with pytest.raises(TypeError, match="policy must be a ChunkPolicy"):
        ChunkExecutor(object())


def test_evaluation_arguments_are_checked_before_any_episode() -> None:
    from flowforge.envs.evaluate import evaluate, wilson_interval

    policy = _policy(state_dim=4, action_dim=4)
    for args, changes, message in (
        (["reach-v3"], {"episodes": 0}, "episodes must be an int in 1..10000"),
        ([], {"episodes": 1}, "tasks must be a non-empty list of distinct task names"),
        (["reach-v3", "reach-v3"], {"episodes": 1}, "distinct"),
        (["reach-v3"], {"episodes": 1, "seed_base": -1}, "seed_base must be an int >= 0"),
        (["reach-v3"], {"episodes": 1, "videos_per_task": -1}, "videos_per_task must be an int >= 0"),
    ):
        with pytest.raises(ValueError, match=message):
            evaluate(policy, args, progress=False, **changes)
    with pytest.raises(ValueError, match="expected 0 <= successes <= trials"):
        wilson_interval(5, 3)


def test_a_saved_model_keeps_the_arguments_it_was_built_with() -> None:
    import tempfile

    shape, hidden = [1, 4, 4], [8]
    glow = Glow(shape, levels=1, steps=1, hidden_channels=4)
    flow = RealNVP(3, transforms=3, hidden=hidden, seed=np.int64(3), scale_bound=np.float32(2.0))
    shape[1], hidden[0] = 8, 16  # the caller's lists change after construction
    x = torch.randn(5, 3)
    with tempfile.TemporaryDirectory() as first, tempfile.TemporaryDirectory() as second:
        save_model(first, glow)
        save_model(second, flow)  # NumPy numbers are stored as the numbers they are
        assert tuple(load_model(first).event_shape) == (1, 4, 4)
        torch.testing.assert_close(load_model(second).log_prob(x), flow.log_prob(x), rtol=0, atol=0)


def test_an_activation_must_be_a_module_class() -> None:
    for activation in ("tanh", torch.nn.ReLU(), torch.relu):
        with pytest.raises(TypeError, match=r"activation must be a torch\.nn\.Module class"):
            RealNVP(2, activation=activation)
    with pytest.raises(TypeError, match="activation = Linear: the class must build without arguments"):
        RealNVP(2, activation=torch.nn.Linear)


def test_numbers_of_the_wrong_type_are_refused_naming_them() -> None:
    from flowforge.flows import Dequantized, ResidualFlow

    for value in (True, "3", None):
        with pytest.raises(TypeError, match="scale_bound must be a finite number"):
            RealNVP(2, scale_bound=value)
    with pytest.raises(TypeError, match=r"coefficient must be a finite number, got '0\.9'"):
        ResidualFlow(2, coefficient="0.9")
    with pytest.raises(TypeError, match="variational must be a bool"):
        Dequantized(RealNVP(2, transforms=1), 4, variational="no")
    with pytest.raises(ValueError, match=r"hidden must be a positive int, got 2\.7"):
        Dequantized(RealNVP(2, transforms=1), 4, variational=True, hidden=2.7)
    assert RealNVP(np.int64(3), transforms=1).event_shape == (3,)


def test_episode_and_frame_positions_do_not_wrap() -> None:
    from pathlib import Path

    from flowforge.data.episodes import EpisodeDataset

    dataset = EpisodeDataset(Path(__file__).parent / "fixtures" / "lerobot_v3" / "shared", 1, 4)
    key = "observation.images.wrist"
    for call, message in (
        (lambda: dataset.camera_frames(-1, key), r"episode -1: expected an int in 0\.\.1"),
        (lambda: dataset.episode_columns(2), r"episode 2: expected an int in 0\.\.1"),
        (lambda: dataset.camera_frames(0, key, [99]), r"frame 99 of episode 0: expected an int in 0\.\.4"),
        (lambda: dataset[True], r"index True: expected an int in 0\.\.8"),
    ):
        with pytest.raises(IndexError, match=message):
            call()
    assert dataset.camera_frames(1, key).shape[0] == dataset.lengths[1]


def test_ddpm_sampling_refuses_a_step_count_it_would_ignore() -> None:
    policy = _policy(kind="ddpm", diffusion_steps=20).eval()
    state = {"state": torch.zeros(1, 1, 3)}
    with pytest.raises(ValueError, match="steps = 3: DDPM sampling runs every one of the 20 training steps"):
        policy.predict_chunk(state, steps=3, method="ddpm")
    assert policy.predict_chunk(state, method="ddpm").nfe == 20
    assert policy.predict_chunk(state, steps=np.int64(4), method="ddim").nfe == 4


def test_a_part_kept_in_another_dtype_reloads_in_its_own() -> None:
    import tempfile

    from flowforge.flows import VAE

    torch.manual_seed(0)
    vae = VAE(4, 2, (4,), prior="maf", prior_transforms=1, prior_hidden=(4,))
    vae.prior.double()
    with tempfile.TemporaryDirectory() as folder:
        save_model(folder, vae)
        reloaded = load_model(folder)
    assert {p.dtype for p in reloaded.prior.parameters()} == {torch.float64}
    assert {p.dtype for p in reloaded.encoder.parameters()} == {torch.float32}
    for mine, theirs in zip(vae.state_dict().values(), reloaded.state_dict().values(), strict=True):
        assert mine.dtype == theirs.dtype and torch.equal(mine, theirs)


def test_the_scan_switch_reaches_training_batches_but_never_predictions() -> None:

    policy = _policy().train()
    batch = _batch()
    batch["action"][0, 0, 0] = float("nan")
    with checks(finite=False):  # a training step may skip the scans for speed
        assert torch.isnan(policy.loss(batch))
        state = torch.full((1, 1, 3), float("nan"))
        with pytest.raises(ValueError, match="state holds nan"):  # a NaN observation never becomes an action
            policy.eval().predict_chunk({"state": state}, steps=2)
    with pytest.raises(ValueError, match="action holds nan"):
        policy.train().loss(batch)


def test_a_policy_too_large_for_memory_is_refused_naming_its_size(monkeypatch: pytest.MonkeyPatch) -> None:
    from pathlib import Path

    import flowforge.runs.policy as policy_runs
    from flowforge.data.episodes import EpisodeDataset
    from flowforge.errors import ConfigError
    from flowforge.policy import PolicyConfig

    def out_of_memory(config):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 4294967296 bytes.")

    monkeypatch.setattr(policy_runs, "build_policy", out_of_memory)
    dataset = EpisodeDataset(Path(__file__).parent / "fixtures" / "lerobot_v3" / "shared", 1, 4)
    config = PolicyConfig(
        horizon=4, n_action_steps=2, width=64, layers=2, language=False, state_key="observation.state"
    )
    message = r"\[policy\] width = 64, layers = 2, horizon = 4: a policy too large .* \(4\.0 GiB asked for one tensor\)"
    with pytest.raises(ConfigError, match=message):
        policy_runs.prepare_policy(config, dataset, progress=False)


def test_a_derived_goal_needs_its_numbers_in_the_source_feature() -> None:
    """A 20-number environment state has no numbers 36..38 to take the goal from: refused, not an empty goal."""
    from types import SimpleNamespace

    from flowforge.errors import ConfigError
    from flowforge.policy import PolicyConfig
    from flowforge.policy.data import check_observation_mode

    features = {"observation.environment_state": {"dtype": "float32", "shape": [20]}, "action": {"shape": [4]}}
    dataset = SimpleNamespace(features=features, root="short", camera_keys=[])
    config = PolicyConfig(language=False, state_key="observation.environment_state", goal_key="observation.goal")
    message = r"goal_key = 'observation.goal' is numbers 36\.\.38 of 'observation.environment_state'; short's"
    with pytest.raises(ConfigError, match=message):
        check_observation_mode(dataset, config)
    features["observation.environment_state"]["shape"] = [39]
    check_observation_mode(dataset, config)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("train.eval_every=5", r"\[train\] eval_every = 5: a policy run has no validation split"),
        ("train.patience=2", r"patience = 2: patience needs eval_every >= 1"),
        ("train.gradient_checkpointing=true", r"\[train\] gradient_checkpointing = true"),
    ],
)
def test_trainer_settings_a_policy_run_cannot_use_are_refused(setting: str, message: str) -> None:
    from flowforge.errors import ConfigError
    from flowforge.runs.policy import parse_policy_config

    with pytest.raises(ConfigError, match=message):
        parse_policy_config('[data]\nroot = "data/x"\n', overrides=[setting])


def test_a_policy_run_resumes_only_on_the_data_and_settings_it_started_with(tmp_path) -> None:
    """Other [train] settings are refused before the data is read; a data set collected anew under
    the same folder (other statistics) is refused by its fingerprint."""
    import json
    import shutil
    from pathlib import Path

    from typer.testing import CliRunner

    from flowforge.cli import app
    from tests.invariants import edit_checkpoint

    data = tmp_path / "data"
    shutil.copytree(Path(__file__).parent / "fixtures" / "lerobot_v3" / "shared", data)
    config = tmp_path / "policy.toml"
    config.write_text(
        f'[data]\nroot = "{data}"\n[policy]\nstate_key = "observation.state"\nlanguage = false\n'
        "horizon = 4\nn_action_steps = 2\nwidth = 16\nlayers = 1\nheads = 2\n"
        "[train]\nsteps = 4\nbatch_size = 4\nwarmup_steps = 0\ncheckpoint_every = 2\n"
    )
    run = tmp_path / "run"
    train = ["policy", "train", str(config), "--out", str(run), "--no-progress"]
    result = CliRunner().invoke(app, train)
    assert result.exit_code == 0, result.output
    edited = tmp_path / "edited"
    shutil.copytree(run, edited)
    text = (edited / "checkpoint.json").read_text()
    assert '"kind": "flow"' in text
    (edited / "checkpoint.json").write_text(text.replace('"kind": "flow"', '"kind": "ddpm"', 1))
    result = CliRunner().invoke(app, ["policy", "eval", str(edited), "--episodes", "1", "--max-steps", "2"])
    assert result.exit_code == 2 and "the manifest was edited" in result.stderr, result.output
    for out, message in ((run / "checkpoint.json", "is a checkpoint's manifest"), (data / "r.json", "lies inside")):
        result = CliRunner().invoke(app, ["policy", "eval", str(run), "--episodes", "1", "--out", str(out)])
        assert result.exit_code == 2 and message in result.stderr, result.output
    assert (run / "checkpoint.json").read_text().startswith("{") and not (data / "r.json").exists()
    result = CliRunner().invoke(app, ["policy", "train", str(config), "--out", str(data / "meta" / "run")])
    assert result.exit_code == 2 and "lies inside the episode data set" in result.stderr, result.output
    partial = tmp_path / "partial"
    shutil.copytree(run, partial)
    edit_checkpoint(partial, lambda record: record["trainer"]["state"].__setitem__("step", 2))
    result = CliRunner().invoke(app, ["policy", "eval", str(partial), "--episodes", "1"])
    assert f"note: {partial} is a run stopped at step 2 of 4" in result.stderr, result.output
    before_fingerprints = tmp_path / "before"  # a run saved before runs recorded their data set resumes
    shutil.copytree(run, before_fingerprints)
    edit_checkpoint(before_fingerprints, lambda record: record["metadata"].pop("data_set"))
    before = ["policy", "train", str(config), "--out", str(before_fingerprints), "--no-progress", "--resume"]
    result = CliRunner().invoke(app, [*before, "--set", "train.steps=4"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, [*train, "--resume", "--set", "train.lr=0.5"])
    assert result.exit_code == 2 and "metadata.policy_run.train.lr: 0.001 -> 0.5" in result.stderr, result.output
    stats_path = data / "meta" / "stats.json"
    stats = json.loads(stats_path.read_text())
    stats["timestamp"]["max"] = [value + 1 for value in stats["timestamp"]["max"]]  # not a normaliser's
    stats_path.write_text(json.dumps(stats))
    result = CliRunner().invoke(app, [*train, "--resume"])
    assert result.exit_code == 2 and "metadata.data_set.stats_sha256" in result.stderr, result.output


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ('kind = "mse"\nnoise_scale = 0.2', r"\[policy\] noise_scale = 0\.2: kind = 'mse' does not use it"),
        ('kind = "ddpm"\nsampling_steps = 50', r"\[policy\] sampling_steps = 50: kind = 'ddpm' does not use it"),
        ('kind = "flow"\ninference_steps = 5', r"\[policy\] inference_steps = 5: kind = 'flow' does not use it"),
        ('kind = "flow"\nshortcut_fraction = 0.3', r"shortcut_fraction = 0\.3: kind = 'flow' .* the shortcut head"),
        ('kind = "meanflow"\nkeyframe_stride = 2', r"keyframe_stride = 2: kind = 'meanflow' .* the hierarchical"),
    ],
)
def test_a_run_config_refuses_settings_its_head_would_ignore(settings: str, message: str) -> None:
    from flowforge.errors import ConfigError
    from flowforge.runs.policy import parse_policy_config

    with pytest.raises(ConfigError, match=message):
        parse_policy_config(f'[data]\nroot = "data/x"\n[policy]\n{settings}\n')
    parse_policy_config('[data]\nroot = "data/x"\n[policy]\nkind = "flow"\ndiffusion_steps = 100\n')  # the default
    parse_policy_config('[data]\nroot = "data/x"\n[policy]\nkind = "ddpm"\ndiffusion_steps = 7\ninference_steps = 3\n')


def test_a_flow_distributions_sample_shape_is_checked() -> None:
    distribution = RealNVP(2, transforms=2).distribution()
    assert distribution.sample((3, 2)).shape == (3, 2, 2) and distribution.sample().shape == (2,)
    for shape in ((-1,), (0,), (2.5,), 3):
        with pytest.raises(ValueError, match="sample_shape must be a tuple of positive ints"):
            distribution.rsample(shape)


def test_the_layers_settings_are_checked_where_they_enter() -> None:
    """The layers under the recipes check their own settings: a scale bound of 0 would make 0 tanh(0 / 0)
    a NaN log-determinant, and a fractional context would be cut down unseen."""
    from flowforge.distributions import GaussianMixture
    from flowforge.flows import Dequantized
    from flowforge.transforms import AffineCoupling, BatchNorm, LipschitzLinear, LULinear, ResidualBlock
    from flowforge.transforms.coupling import ImageAffineCoupling
    from flowforge.transforms.multiscale import Split

    refused = [
        (lambda: ImageAffineCoupling(4, scale_bound=0.0), ValueError, r"scale_bound must be a finite number > 0"),
        (lambda: Split(4, scale_bound=0.0), ValueError, r"scale_bound must be a finite number > 0, got 0\.0"),
        (lambda: AffineCoupling(torch.tensor([True, False]), context=2.5), ValueError, r"context must be an int"),
        (lambda: ImageAffineCoupling(4, context=2.5), ValueError, r"context must be an int >= 0, got 2\.5"),
        (lambda: ResidualBlock(2, inverse_tolerance=-1.0), ValueError, r"inverse_tolerance must be a finite number >"),
        (lambda: ResidualBlock(2, inverse_tolerance=float("nan")), ValueError, "inverse_tolerance must be"),
        (lambda: ResidualBlock(2, max_iterations=2.5), ValueError, r"max_iterations must be a positive int"),
        (lambda: LipschitzLinear(2, 2, tolerance=-1), ValueError, r"tolerance must be a finite number > 0"),
        (lambda: BatchNorm(2, momentum="0.1"), TypeError, r"momentum must be a finite number, got '0\.1'"),
        (lambda: LULinear(2, min_diagonal="a"), TypeError, r"min_diagonal must be a finite number, got 'a'"),
    ]
    for build, error, message in refused:
        with pytest.raises(error, match=message):
            build()
    assert GaussianMixture((2,)).sample(3).shape == (3, 2)  # a one-dimensional event given as a tuple

    model = Dequantized(RealNVP(2, transforms=1), levels=4)
    counts = torch.randint(0, 4, (5, 2))
    for draws in (0, -1, 1.5):
        with pytest.raises(ValueError, match=f"draws must be a positive int, got {draws}"):
            model.bits_per_dim(counts, draws=draws)
    with pytest.raises(ValueError, match="k has 0 rows"):
        model.bits_per_dim(counts[:0])
    with pytest.raises(TypeError, match=r"k must be a torch\.Tensor of counts, got ndarray"):
        model.log_prob(counts.numpy())


def test_likelihoods_that_differentiate_inside_refuse_inference_mode() -> None:
    """A CNF's divergence and a residual block's series need autograd, which inference mode cannot give
    back: a clear refusal, and under no_grad the same value as with gradients."""
    from flowforge.flows import CNF, ResidualFlow
    from flowforge.matching import FlowMatcher
    from flowforge.nn import VelocityMLP

    torch.manual_seed(0)
    x = torch.randn(3, 2)
    likelihoods = [
        CNF(2, hidden=(8,), method="rk4", steps=4).log_prob,
        ResidualFlow(2, transforms=1, hidden=(8,), logdet="exact").eval().log_prob,
        lambda points: FlowMatcher(VelocityMLP(2, hidden=(8,))).log_prob(points, method="rk4", steps=4),
    ]
    for log_prob in likelihoods:
        torch.manual_seed(1)
        expected = log_prob(x)
        with torch.inference_mode(), pytest.raises(RuntimeError, match=r"cannot run under torch\.inference_mode"):
            log_prob(x)
        torch.manual_seed(1)
        with torch.no_grad():
            torch.testing.assert_close(log_prob(x), expected.detach())


def test_numpy_scalars_in_a_config_are_python_numbers_and_the_model_saves(tmp_path) -> None:
    from flowforge.runs.data import DataConfig
    from flowforge.runs.density import ObjectiveConfig

    policy = _policy(state_dim=np.int64(3), horizon=np.int32(8), noise_scale=np.float32(0.5))
    config = policy.policy_config
    assert (type(config.state_dim), type(config.horizon), type(config.noise_scale)) == (int, int, float)
    save_model(tmp_path / "policy", policy)
    assert load_model(tmp_path / "policy").policy_config == config
    assert type(DataConfig(name="moons", size=np.int64(500)).size) is int
    with pytest.raises(ConfigError, match=r"state_dim = 2.5: expected an integer"):
        _policy(state_dim=np.float64(2.5))
    with pytest.raises(ConfigError, match=r"standardize = 'no': expected true or false \(or none\)"):
        DataConfig(name="wine", standardize="no")
    with pytest.raises(ConfigError, match="conditional = 'yes': expected true or false"):
        DataConfig(name="digits", conditional="yes")
    with pytest.raises(ConfigError, match=r"samples = 1.5: expected an integer >= 1"):
        ObjectiveConfig(samples=1.5)


def test_guided_sampling_inside_inference_mode_gives_the_chunk_it_gives_outside() -> None:
    policy = _policy().eval()
    observation, noise = {"state": torch.randn(1, 1, 3)}, torch.randn(1, 8, 2)
    guide = ChunkGuide(torch.randn(1, 8, 2), torch.linspace(1, 0, 8))
    outside = policy.predict_chunk(observation, noise=noise, guide=guide).actions
    with torch.inference_mode():  # the caller's tensors are made here, as an evaluation loop's are
        made_inside = {"state": observation["state"].clone()}
        inside = policy.predict_chunk(
            made_inside, noise=noise.clone(), guide=ChunkGuide(guide.actions.clone(), guide.weights.clone())
        ).actions
    torch.testing.assert_close(inside, outside)


def test_statistics_are_all_checked_before_any_is_set_and_a_config_must_be_a_policy_config() -> None:
    policy = _policy(state_normalization="mean_std", action_normalization="min_max")
    before = {name: tensor.clone() for name, tensor in policy.state_dict().items() if "normalizer" in name}
    stats = {"observation.state": {"mean": [5.0] * 3, "std": [2.0] * 3}, "action": {"mean": [0, 0], "std": [1, 1]}}
    with pytest.raises(DataError, match="statistics lack min, max"):
        policy.set_statistics(stats)  # the state's are valid, the action's are not
    for name, tensor in before.items():
        torch.testing.assert_close(policy.state_dict()[name], tensor)
    with pytest.raises(TypeError, match=r"config must be a PolicyConfig .* got dict"):
        ChunkPolicy({"kind": "flow"})
