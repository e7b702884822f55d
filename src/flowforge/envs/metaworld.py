"""MetaWorld v3 as a gymnasium environment with dict observations and a language instruction.

:class:`MetaWorldEnv` wraps one of MetaWorld's 50 v3 tasks (PyPI ``metaworld``, the optional
``robot`` extra: ``pip install 'flowforge[robot]'``):

* observations are a dict: ``state``, the robot's own state (hand position x, y, z and gripper
  opening: the first four numbers of MetaWorld's vector, float32), ``environment_state``, the whole
  39-d vector (hand, gripper, the objects' positions and orientations now and at the previous
  step, the goal position in its last three numbers; float32), and with ``image=True`` one
  ``image.<camera>`` per camera (``size`` x ``size`` x 3 uint8 RGB, upright; :data:`CAMERAS`) and
  ``image``, the first camera's. The names are LeRobot's (``observation.state``,
  ``observation.environment_state``, ``observation.images.<camera>``): a real robot knows its own
  state, not the objects' poses. Some goals are hard to see: reach's goal is a red sphere of
  about 2x2 pixels in the 84x84 corner view, the colour of the arm, whose height one view cannot
  tell, and no marker at all in the gripper's view; a policy on the robot's state and images is
  then told the goal (``policy.goal_key = "observation.goal"``: the last three numbers of
  ``environment_state``, taken by the policy's executor);
* ``instruction`` is the task in words (:data:`INSTRUCTIONS`, one per task), also in ``info``;
* ``info["is_success"]`` is MetaWorld's success flag as a bool;
* :meth:`MetaWorldEnv.expert` returns the task's scripted expert from ``metaworld.policies``.

Rendering is headless: set ``MUJOCO_GL=egl`` (GPU or Mesa EGL) or ``osmesa`` before the first
import of mujoco; this module sets ``egl`` when the variable is unset. Shadows and reflections
are switched off, which renders an 84x84 frame several times faster on a CPU. Several cameras
share one offscreen renderer, switched between cameras for each frame; :func:`render_rate`
measures the frames per second of each camera.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Any

import numpy as np

from flowforge.config import MAX_SEED
from flowforge.validation import check_bool, check_count

os.environ.setdefault("MUJOCO_GL", "egl")

#: The robot's own state: hand position (x, y, z) and gripper opening, MetaWorld's first four numbers.
ROBOT_STATE_DIM = 4
#: MetaWorld ends every episode after this many steps (its ``max_path_length``), whatever the time limit.
MAX_EPISODE_STEPS = 500
#: The first seeds of consecutive tasks in a collection or evaluation are this far apart (a prime).
TASK_SEED_STRIDE = 10_007
#: The most episodes per task one collection or evaluation runs: below the stride, so that each
#: task's evaluation seeds stay its own.
MAX_EPISODES = 10_000
#: MetaWorld's MT10 benchmark: its ten tasks in the benchmark's order.
MT10 = (
    "reach-v3",
    "push-v3",
    "pick-place-v3",
    "door-open-v3",
    "drawer-open-v3",
    "drawer-close-v3",
    "button-press-topdown-v3",
    "peg-insert-side-v3",
    "window-open-v3",
    "window-close-v3",
)
#: The cameras of MetaWorld's Sawyer scenes (``model.cam``), by name.
CAMERAS = ("topview", "corner", "corner2", "corner3", "corner4", "behindGripper", "gripperPOV")

#: One instruction per MetaWorld v3 task, in the imperative a person would use.
INSTRUCTIONS: dict[str, str] = {
    "assembly-v3": "put the ring onto the peg",
    "basketball-v3": "dunk the ball into the basket",
    "bin-picking-v3": "move the cube from one bin to the other",
    "box-close-v3": "put the lid on the box",
    "button-press-topdown-v3": "press the button from the top",
    "button-press-topdown-wall-v3": "press the button from the top behind the wall",
    "button-press-v3": "press the button",
    "button-press-wall-v3": "press the button behind the wall",
    "coffee-button-v3": "press the button on the coffee machine",
    "coffee-pull-v3": "pull the mug away from the coffee machine",
    "coffee-push-v3": "push the mug under the coffee machine",
    "dial-turn-v3": "turn the dial",
    "disassemble-v3": "take the ring off the peg",
    "door-close-v3": "close the door",
    "door-lock-v3": "lock the door",
    "door-open-v3": "open the door",
    "door-unlock-v3": "unlock the door",
    "hand-insert-v3": "put the object into the hole",
    "drawer-close-v3": "close the drawer",
    "drawer-open-v3": "open the drawer",
    "faucet-open-v3": "turn the faucet on",
    "faucet-close-v3": "turn the faucet off",
    "hammer-v3": "hammer the nail into the wall",
    "handle-press-side-v3": "press the handle down from the side",
    "handle-press-v3": "press the handle down",
    "handle-pull-side-v3": "pull the handle up from the side",
    "handle-pull-v3": "pull the handle up",
    "lever-pull-v3": "pull the lever up",
    "pick-place-wall-v3": "pick up the puck and place it at the goal behind the wall",
    "pick-out-of-hole-v3": "pick the peg out of the hole",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "plate-slide-v3": "slide the plate into the goal",
    "plate-slide-side-v3": "slide the plate sideways into the goal",
    "plate-slide-back-v3": "slide the plate back out of the goal",
    "plate-slide-back-side-v3": "slide the plate sideways back out of the goal",
    "peg-insert-side-v3": "insert the peg into the hole from the side",
    "peg-unplug-side-v3": "unplug the peg sideways",
    "soccer-v3": "kick the ball into the goal",
    "stick-push-v3": "grab the stick and push the box with it",
    "stick-pull-v3": "grab the stick and pull the box with it",
    "push-v3": "push the puck to the goal",
    "push-wall-v3": "push the puck to the goal behind the wall",
    "push-back-v3": "pull the puck back to the goal",
    "reach-v3": "reach the goal position",
    "reach-wall-v3": "reach the goal position behind the wall",
    "shelf-place-v3": "place the puck on the shelf",
    "sweep-into-v3": "sweep the puck into the hole",
    "sweep-v3": "sweep the puck off the table",
    "window-open-v3": "open the window",
    "window-close-v3": "close the window",
}

#: Tasks whose expert's class name does not follow the task name.
_POLICY_NAMES = {"peg-insert-side-v3": "SawyerPegInsertionSideV3Policy"}


def _require_metaworld():
    try:
        import metaworld
    except ImportError as error:
        raise ImportError("MetaWorld is not installed: pip install 'flowforge[robot]'") from error
    return metaworld


def expert_policy(task: str) -> Any:
    """MetaWorld's scripted expert for ``task`` (``policy.get_action(state) -> action``)."""
    _check_task(task)
    _require_metaworld()
    import metaworld.policies as policies

    # The experts' controllers overshoot by design; every action is clipped to [-1, 1] before it is
    # stepped and recorded (flowforge.envs.episode), so the warning would only add noise to stderr.
    warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high", module=r"metaworld\.")
    name = _POLICY_NAMES.get(task)
    if name is None:
        key = re.sub(r"[^a-z0-9]", "", task)
        classes = [n for n in dir(policies) if n.startswith("Sawyer")]  # not the same-named modules
        candidates = {
            re.sub(r"[^a-z0-9]", "", n.lower().removeprefix("sawyer").removesuffix("policy")): n for n in classes
        }
        name = candidates[key]
    return getattr(policies, name)()


def _check_task(task: str) -> None:
    if task not in INSTRUCTIONS:
        raise ValueError(f"unknown MetaWorld task {task!r}; the 50 v3 tasks are: {', '.join(INSTRUCTIONS)}")


def check_cameras(cameras: list[str]) -> list[str]:
    """``cameras`` as a list of MetaWorld camera names; a ``ValueError`` names an unknown one and the cameras."""
    if isinstance(cameras, str) or not list(cameras):
        raise ValueError(f"cameras must be a non-empty list of camera names, got {cameras!r}")
    cameras = list(cameras)
    for camera in cameras:
        if camera not in CAMERAS:
            raise ValueError(f"unknown MetaWorld camera {camera!r}; the cameras are: {', '.join(CAMERAS)}")
    if len(set(cameras)) != len(cameras):
        raise ValueError(f"cameras = {cameras}: a camera is named twice")
    return cameras


def _task_select_wrapper(env: Any) -> Any:
    """The wrapper in MetaWorld's chain that switches between its pre-sampled tasks."""
    while env is not None:
        if hasattr(env, "toggle_sample_tasks_on_reset"):
            return env
        env = getattr(env, "env", None)
    raise RuntimeError("this MetaWorld version has no task-select wrapper; flowforge expects metaworld 3.x")


class MetaWorldEnv:
    """One MetaWorld v3 task behind the gymnasium API, with dict observations.

    Arguments:
        task: a v3 task name (``"reach-v3"``, ...; see :data:`INSTRUCTIONS`).
        seed: the scene (goal and object positions) of a ``reset()`` without a seed; ``reset(seed=s)``
            gives the scene of ``s``, the same every time and whatever came before.
        image: also return camera images.
        camera: MetaWorld camera name (``corner``, ``corner2``, ``corner3``, ``topview``, ``gripperPOV``, ...).
        cameras: several camera names (``None``: ``[camera]``); the observation's ``image`` is the first one's.
        size: image height and width.
        max_steps: episode length before truncation, 1 to 500 (MetaWorld's own limit, the default).
    """

    metadata = {"render_modes": ["rgb_array"]}  # noqa: RUF012 - gymnasium reads this class attribute

    def __init__(
        self,
        task: str,
        seed: int = 0,
        image: bool = False,
        camera: str = "corner",
        size: int = 84,
        max_steps: int | None = None,
        cameras: list[str] | None = None,
    ) -> None:
        _check_task(task)
        self.cameras = check_cameras([camera] if cameras is None else cameras)
        seed = check_count("seed", seed, low=0, high=MAX_SEED)
        image = check_bool("image", image)
        size = check_count("size", size, low=8)
        _require_metaworld()
        import gymnasium as gym

        self.task, self.image, self.camera, self.size = task, image, self.cameras[0], size
        options: dict[str, Any] = {"env_name": task, "seed": seed}
        if image:
            options.update(render_mode="rgb_array", camera_name=self.camera, width=size, height=size)
        if max_steps is not None:
            options["max_episode_steps"] = check_count("max_steps", max_steps, high=MAX_EPISODE_STEPS)
        # the passive checker only warns, about bounds MetaWorld declares loosely, on every env built
        self.env = gym.make("Meta-World/MT1", disable_env_checker=True, **options)
        self._seed = seed
        # MetaWorld v3 ignores reset(seed=...): its MT1 wrapper picks one of 50 goal settings
        # fixed when the env is built. Set one task once (MetaWorld requires it), then stop the
        # wrapper from switching tasks and draw every reset's goal and object positions from the
        # env's own generator, reseeded by reset(): a seed is then a scene of its own.
        self.env.reset()
        _task_select_wrapper(self.env).toggle_sample_tasks_on_reset(False)
        scene = self.env.unwrapped
        scene._freeze_rand_vec = False
        scene.seeded_rand_vec = True
        self._renderer_ready = False
        spaces = {
            "state": gym.spaces.Box(-np.inf, np.inf, (ROBOT_STATE_DIM,), np.float32),
            "environment_state": gym.spaces.Box(-np.inf, np.inf, (39,), np.float32),
        }
        if image:
            spaces["image"] = gym.spaces.Box(0, 255, (size, size, 3), np.uint8)
            for name in self.cameras:
                spaces[f"image.{name}"] = spaces["image"]
        self.observation_space = gym.spaces.Dict(spaces)
        self.action_space = self.env.action_space

    @property
    def instruction(self) -> str:
        """The task in words."""
        return INSTRUCTIONS[self.task]

    def expert(self) -> Any:
        """The scripted expert for this task (``get_action(environment_state)``: it reads object poses)."""
        return expert_policy(self.task)

    def render_camera(self, camera: str | None = None) -> np.ndarray:
        """The current frame of ``camera`` (the first camera when None): (size, size, 3) uint8, upright."""
        if not self.image:
            raise ValueError("this environment renders no images: build it with image=True")
        renderer = self.env.unwrapped.mujoco_renderer
        if not self._renderer_ready:
            import mujoco

            self.env.render()  # creates the offscreen renderer
            viewer = renderer._get_viewer("rgb_array")
            viewer.scn.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
            viewer.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
            model = self.env.unwrapped.model
            self._camera_ids = {
                name: mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, name) for name in self.cameras
            }
            missing = [name for name, i in self._camera_ids.items() if i < 0]
            if missing:
                raise ValueError(f"the {self.task} scene has no camera {missing[0]!r}")
            self._renderer_ready = True
        camera = self.cameras[0] if camera is None else camera
        if camera not in self.cameras:
            raise ValueError(f"camera {camera!r} is not one of this environment's cameras: {', '.join(self.cameras)}")
        renderer.camera_id = self._camera_ids[camera]  # one renderer, switched between the cameras
        frame = self.env.render()
        # MetaWorld's cameras render upside down: turn the image the right way up.
        return np.ascontiguousarray(frame[::-1, ::-1])

    def _observation(self, state: np.ndarray) -> dict[str, np.ndarray]:
        full = np.asarray(state, dtype=np.float32)
        observation = {"state": full[:ROBOT_STATE_DIM].copy(), "environment_state": full}
        if self.image:
            for name in self.cameras:
                observation[f"image.{name}"] = self.render_camera(name)
            observation["image"] = observation[f"image.{self.cameras[0]}"]
        return observation

    def reset(self, seed: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Start an episode; its scene (goal and object positions) is a function of ``seed`` alone
        (the constructor's seed when None)."""
        self.env.unwrapped.seed(self._seed if seed is None else check_count("seed", seed, low=0, high=MAX_SEED))
        state, info = self.env.reset()
        if self.image:
            # The reset moved the goal's site in the model; the scene's positions follow only at the
            # next physics step, so the first frame would draw the goal marker where it was before.
            import mujoco

            scene = self.env.unwrapped
            mujoco.mj_forward(scene.model, scene.data)
        info = {**info, "task": self.task, "instruction": self.instruction, "is_success": False}
        return self._observation(state), info

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        action = np.asarray(action, dtype=np.float32)
        # MuJoCo meets a NaN control by resetting its state and going on: the episode would end as an
        # ordinary failure. A wrong size is only a stripped-out assert under ``python -O``.
        expected = tuple(self.env.action_space.shape)
        if action.shape != expected:
            raise ValueError(f"action must have shape {expected} (hand x, y, z and gripper), got {action.shape}")
        if not np.isfinite(action).all():
            bad = int(np.flatnonzero(~np.isfinite(action))[0])
            raise ValueError(f"action holds {action[bad]} at index {bad}: a robot command must be finite")
        state, reward, terminated, truncated, info = self.env.step(action)
        info = {
            **info,
            "task": self.task,
            "instruction": self.instruction,
            "is_success": bool(info.get("success", 0.0)),
        }
        return self._observation(state), float(reward), bool(terminated), bool(truncated), info

    def close(self) -> None:
        self.env.close()


def render_rate(
    task: str = "reach-v3", cameras: list[str] | None = None, size: int = 84, frames: int = 200, seed: int = 0
) -> dict[str, float]:
    """Frames per second the renderer gives each of ``cameras`` (default: corner and gripperPOV) at
    ``size`` x ``size``, in this process: ``frames`` renders per camera (at least 10, rounded down
    to a multiple of 10) along an expert episode (restarted when it ends), only the rendering timed
    (median over blocks of 10 frames, so a busy machine's pauses count less)."""
    import time

    frames = check_count("frames", frames, low=10)
    cameras = check_cameras(cameras or ["corner", "gripperPOV"])
    env = MetaWorldEnv(task, seed=seed, image=True, cameras=cameras, size=size)
    try:
        expert = env.expert()
        observation, _ = env.reset(seed=seed)  # renders every camera once: the renderer exists before timing
        times: dict[str, list[float]] = {name: [] for name in cameras}
        for block in range(max(1, frames // 10)):
            for name in cameras:
                start = time.perf_counter()
                for _ in range(10):
                    env.render_camera(name)
                times[name].append((time.perf_counter() - start) / 10)
            observation, _, terminated, truncated, info = env.step(expert.get_action(observation["environment_state"]))
            if terminated or truncated or info["is_success"]:
                observation, _ = env.reset(seed=seed + block + 1)
    finally:
        env.close()
    return {name: 1.0 / float(np.median(values)) for name, values in times.items()}


__all__ = [
    "CAMERAS",
    "INSTRUCTIONS",
    "ROBOT_STATE_DIM",
    "MetaWorldEnv",
    "check_cameras",
    "expert_policy",
    "render_rate",
]
