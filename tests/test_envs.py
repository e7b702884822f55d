"""The MetaWorld adapter (robot extra): tasks, experts, dict observations, upright headless images."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

metaworld = pytest.importorskip("metaworld", reason="MetaWorld is the robot extra: pip install 'flowforge[robot]'")

from flowforge.envs.metaworld import INSTRUCTIONS, MetaWorldEnv, expert_policy  # noqa: E402


def test_every_v3_task_has_an_instruction_and_an_expert() -> None:
    assert sorted(INSTRUCTIONS) == sorted(metaworld.ALL_V3_ENVIRONMENTS)
    for task in INSTRUCTIONS:
        assert hasattr(expert_policy(task), "get_action"), task


def test_reach_expert_succeeds_with_state_observations() -> None:
    env = MetaWorldEnv("reach-v3", seed=3)
    observation, info = env.reset()
    assert set(observation) == {"state", "environment_state"}
    assert observation["environment_state"].shape == (39,) and observation["state"].shape == (4,)
    assert observation["state"].dtype == observation["environment_state"].dtype == np.float32
    # The robot's own state is the hand position and gripper opening at the head of the full vector.
    np.testing.assert_array_equal(observation["state"], observation["environment_state"][:4])
    assert info["instruction"] == "reach the goal position" and info["is_success"] is False
    expert = env.expert()
    for _ in range(200):
        observation, reward, _, _, info = env.step(expert.get_action(observation["environment_state"]))
        if info["is_success"]:
            break
    assert info["is_success"] is True and isinstance(reward, float)
    env.close()


def test_seeds_fix_the_scene() -> None:
    first = MetaWorldEnv("push-v3", seed=0).reset()[0]["environment_state"]
    again = MetaWorldEnv("push-v3", seed=0).reset()[0]["environment_state"]
    other = MetaWorldEnv("push-v3", seed=1).reset()[0]["environment_state"]
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_reset_seed_alone_decides_the_scene() -> None:
    """MetaWorld itself ignores reset(seed=...) and cycles through 50 fixed goals; the adapter must
    give every seed a scene of its own, the same whatever was reset before."""
    env = MetaWorldEnv("reach-v3")
    goals = [env.reset(seed=s)[0]["environment_state"][-3:] for s in (11, 12, 13, 11)]
    fresh = MetaWorldEnv("reach-v3", seed=99).reset(seed=11)[0]["environment_state"][-3:]
    np.testing.assert_array_equal(goals[0], goals[3])
    np.testing.assert_array_equal(goals[0], fresh)
    assert len({tuple(g) for g in goals[:3]}) == 3
    # 60 seeds, 60 distinct goals: not a draw from a short list of fixed ones.
    assert len({tuple(env.reset(seed=s)[0]["environment_state"][-3:]) for s in range(100, 160)}) == 60
    env.close()


def test_images_are_rendered_headless_at_the_requested_size() -> None:
    env = MetaWorldEnv("reach-v3", seed=0, image=True, camera="corner", size=64)
    observation, _ = env.reset()
    image = observation["image"]
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert image.std() > 10  # a scene, not a blank frame
    assert env.observation_space.contains(observation)
    env.close()


def test_the_first_frame_draws_the_goal_where_the_reset_put_it() -> None:
    """A reset moves the goal's site in the model, and the scene's positions follow only when the
    physics runs forward: the first frame must already show the scene as it is (reach's goal marker
    is its only sight of the goal)."""
    import mujoco

    env = MetaWorldEnv("reach-v3", image=True, size=84)
    for seed in (2, 3):
        first = env.reset(seed=seed)[0]["image"]
        scene = env.env.unwrapped
        mujoco.mj_forward(scene.model, scene.data)
        np.testing.assert_array_equal(first, env.render_camera())
    env.close()


def test_the_adapters_arguments_are_checked_naming_them() -> None:
    for settings, error, message in [
        ({"seed": -1}, ValueError, r"seed must be an int in 0\.\.4294967295, got -1"),
        ({"seed": 1.5}, ValueError, "seed must be an int"),
        ({"size": 84.5}, ValueError, r"size must be an int >= 8, got 84\.5"),
        ({"size": 4}, ValueError, "size must be an int >= 8, got 4"),
        ({"image": "no"}, TypeError, "image must be a bool"),
    ]:
        with pytest.raises(error, match=message):
            MetaWorldEnv("reach-v3", **settings)
    with pytest.raises(ValueError, match="seed must be an int in"):
        MetaWorldEnv("reach-v3").reset(seed=2**40)


def test_unknown_tasks_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown MetaWorld task 'fly-v3'"):
        MetaWorldEnv("fly-v3")
    with pytest.raises(ValueError, match=r"max_steps must be an int in 1\.\.500, got 501"):
        MetaWorldEnv("reach-v3", max_steps=501)  # MetaWorld itself ends every episode at 500


def test_the_core_package_does_not_import_metaworld() -> None:
    code = (
        "import sys, flowforge, flowforge.flows, flowforge.matching, flowforge.train; print('metaworld' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"action_dim": 7}, r"the policy's actions have 7 numbers; reach-v3's have 4"),
        (
            {"state_key": "observation.state", "state_dim": 5},
            r"does not fit reach-v3's observations: observation\['state'\] must be 5 numbers",
        ),
        (
            {"image_shape": (3, 36, 36), "cameras": ["wrist", "top"]},
            r"the policy sees the cameras wrist, top; MetaWorld has no 'wrist'",
        ),
    ],
)
def test_a_policy_for_another_robot_is_refused_before_the_first_episode(tmp_path, settings: dict, message: str) -> None:
    from typer.testing import CliRunner

    from flowforge.checkpoint import save_model
    from flowforge.cli import app
    from flowforge.policy import ChunkPolicy, PolicyConfig

    save_model(tmp_path / "policy", ChunkPolicy(PolicyConfig(width=16, layers=1, heads=2, language=False, **settings)))
    out = tmp_path / "result.json"
    args = ["policy", "eval", str(tmp_path / "policy"), "--tasks", "reach-v3", "--episodes", "1", "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--no-progress"])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and re.search(message, lines[0]), result.output
    assert not out.exists()


def test_a_task_named_twice_is_refused_and_guidance_settings_reach_rtc(tmp_path) -> None:
    from typer.testing import CliRunner

    from flowforge.checkpoint import save_model
    from flowforge.cli import app
    from flowforge.policy import ChunkPolicy, PolicyConfig

    save_model(tmp_path / "policy", ChunkPolicy(PolicyConfig(width=16, layers=1, heads=2, language=False)))
    args = ["policy", "eval", str(tmp_path / "policy"), "--tasks", "reach-v3,push-v3,reach-v3", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "reach-v3 named more than once" in result.stderr, result.output
    result = CliRunner().invoke(
        app, [*args[:3], "--tasks", "reach-v3", "--noise-scale", "1e38", "--episodes", "1", "--max-steps", "5"]
    )
    assert result.exit_code == 2 and "--noise-scale must be at most 100" in result.stderr, result.output
    import torch

    diverged = ChunkPolicy(PolicyConfig(width=16, layers=1, heads=2, language=False))
    with torch.no_grad():
        for parameter in diverged.parameters():
            parameter.mul_(1e30)  # weights that overflow: every chunk is inf or NaN
    save_model(tmp_path / "diverged", diverged)
    result = CliRunner().invoke(
        app, [*args[:2], str(tmp_path / "diverged"), "--tasks", "reach-v3", "--episodes", "1", "--max-steps", "5"]
    )
    assert result.exit_code == 2 and "is not finite" in result.stderr and "Traceback" not in result.output
    for execution, message in (
        ("foo", "--execution 'foo': expected one of sync, async"),
        ("rtc-trained", "trained without it"),
    ):
        result = CliRunner().invoke(app, [*args[:3], "--execution", execution, "--delay", "2"])
        assert result.exit_code == 2 and message in result.stderr, result.output
    guided = [*args[:3], "--tasks", "reach-v3", "--episodes", "1", "--max-steps", "12", "--execution", "rtc"]
    settings = ["--rtc-schedule", "ones", "--max-guidance", "10", "--rtc-jacobian", "identity"]
    out = tmp_path / "rtc.json"
    result = CliRunner().invoke(app, [*guided, "--delay", "2", *settings, "--candidates", "3", "--out", str(out)])
    assert result.exit_code == 0 and "reach-v3" in result.output, result.output
    recorded = json.loads(out.read_text())["settings"]
    assert recorded["execution"] == "rtc" and recorded["delay"] == 2 and recorded["episodes"] == 1
    sampling = recorded["sampling"]
    assert sampling["guidance_schedule"] == "ones" and sampling["max_guidance"] == 10
    assert sampling["guidance_jacobian"] == "identity" and sampling["candidates"] == 3
    trained = ChunkPolicy(PolicyConfig(width=16, layers=1, heads=2, language=False, rtc_training_delay=2))
    save_model(tmp_path / "trained", trained)
    both = [*guided[:2], str(tmp_path / "trained"), *guided[3:-1], "rtc-trained", "--delay", "2", "--out", str(out)]
    result = CliRunner().invoke(app, [*both, "--max-guidance", "10"])
    assert result.exit_code == 2 and "rtc-trained; add --overlap-guidance" in result.stderr, result.output
    result = CliRunner().invoke(app, [*both[:-4], "--delay", "2-4"])  # a range, as it was given
    assert result.exit_code == 2 and "'rtc-trained' with --delay 2-4 needs" in result.stderr, result.output
    result = CliRunner().invoke(app, [*both, "--overlap-guidance", "--max-guidance", "10"])
    assert result.exit_code == 0 and "reach-v3" in result.output, result.output
    recorded = json.loads(out.read_text())["settings"]
    assert recorded["execution"] == "rtc-trained"
    assert recorded["sampling"] == {"overlap_guidance": True, "max_guidance": 10}


def test_a_non_finite_or_misshapen_action_never_reaches_the_simulator() -> None:
    from flowforge.envs.episode import run_episode

    env = MetaWorldEnv("reach-v3", seed=0)
    try:
        with pytest.raises(ValueError, match=r"action holds nan at index 0: a robot command must be finite"):
            run_episode(env, lambda observation: np.full(4, np.nan), seed=1, max_steps=3)
        env.reset(seed=1)
        with pytest.raises(ValueError, match=r"action must have shape \(4,\) .* got \(3,\)"):
            env.step(np.array([0.5, 0.0, 0.0]))
        for arguments, message in (
            ({"max_steps": 0}, "max_steps must be a positive int, got 0"),
            ({"max_steps": 3, "pace": float("nan")}, "pace must be a finite number > 0"),
            ({"max_steps": 3, "pace": -1.0}, "pace must be a finite number > 0"),
        ):
            with pytest.raises(ValueError, match=message):
                run_episode(env, lambda observation: np.zeros(4), seed=1, **arguments)
    finally:
        env.close()


def test_evaluation_settings_are_checked_before_any_episode(monkeypatch) -> None:
    from flowforge.envs import evaluate as evaluation
    from flowforge.policy import ChunkPolicy, PolicyConfig

    policy = ChunkPolicy(PolicyConfig(width=16, layers=1, heads=2, language=False))
    started = []
    monkeypatch.setattr(evaluation, "_evaluate_in_processes", lambda *arguments, **settings: started.append(1))
    for arguments, message in (
        ({"tasks": ["reach-v3", "reach-v9"]}, "unknown MetaWorld task 'reach-v9'"),
        ({"max_steps": 0}, "max_steps must be an int in 1..500, got 0"),
        ({"max_steps": 10**6}, "max_steps must be an int in 1..500"),
        ({"image_size": 2}, "image_size must be an int >= 8, got 2"),
    ):
        settings = {"tasks": ["reach-v3", "push-v3"], "episodes": 1, "max_steps": 2, "progress": False, **arguments}
        with pytest.raises(ValueError, match=message):
            evaluation.evaluate(policy, settings.pop("tasks"), settings.pop("episodes"), processes=2, **settings)
    assert started == []


def test_render_rate_names_a_bad_frame_count() -> None:
    from flowforge.envs.metaworld import render_rate

    for frames in (-5, 2.5, 9):
        with pytest.raises(ValueError, match="frames must be an int >= 10"):
            render_rate(cameras=["corner"], size=16, frames=frames)
