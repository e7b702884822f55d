"""The settings that rebuild a policy: :class:`PolicyConfig` (kept as JSON in its checkpoint).

``kind`` chooses the head (:mod:`flowforge.policy.heads`); the rest sizes the encoder and the
expert and sets the sampling defaults. Every field is checked when the config is built, so a bad
value fails with the key's name before any model exists.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from flowforge.config import check_choice, check_flag, check_integer, check_range, plain_numbers
from flowforge.errors import ConfigError
from flowforge.matching.shortcut import MAX_HALVINGS
from flowforge.ode import ADAPTIVE_METHODS, TABLEAUS
from flowforge.policy.encoders import IMAGE_NORMALIZATIONS
from flowforge.policy.heads import HEAD_CATEGORY, PREDICTIONS, check_sample_prediction_method
from flowforge.policy.vision import AUGMENTATIONS, IMAGE_ENCODERS, min_image_size
from flowforge.registry import lookup, names, refuse_unread, register
from flowforge.validation import MAX_HORIZON, MAX_LAYERS, MAX_NOISE_SCALE, MAX_SAMPLER_STEPS, MAX_WIDTH, is_count

#: The data set features a policy can read as its state.
STATE_KEYS = ("observation.environment_state", "observation.state")
#: The task's goal as an observation of its own (``policy.goal_key``).
GOAL_KEY = "observation.goal"
#: Features a policy may read that a data set can also lack and derive from another one:
#: ``feature -> (source feature, first index, end index)``. ``observation.goal`` is MetaWorld's goal
#: position (x, y, z), the last three of its 39 numbers (``SawyerXYZEnv._get_obs``: hand 0-2,
#: gripper 3, two objects' positions and quaternions 4-17, the same 18 numbers one step earlier
#: 18-35, goal 36-38).
DERIVED_FEATURES = {GOAL_KEY: ("observation.environment_state", 36, 39)}
_CAMERA_NAME = re.compile(r"[A-Za-z0-9_-]+")


#: Settings only the DDPM baseline reads, and the sampling settings only flow heads read.
#: The largest image side (and keypoint count) a policy takes: frames are used at the size collected.
MAX_IMAGE_SIDE = 1024
DDPM_SETTINGS = ("diffusion_steps", "inference_steps", "sampler")
FLOW_SAMPLING_SETTINGS = ("sampling_steps", "method", "noise_scale")
#: The heads whose flow-matching loss draws its times from ``time_sampler`` (MeanFlow and
#: consistency draw their own, uniform times; MSE and DDPM have no flow time).
FLOW_TIME_KINDS = ("flow", "hierarchical", "shortcut")
#: The settings each other head reads and no other head does.
#: Settings only a policy that sees images reads (``image_shape`` set; ``cameras`` has its own check).
VISION_SETTINGS = (
    "image_encoder",
    "keypoints",
    "image_channels",
    "augmentation",
    "augmentation_pixels",
    "color_jitter",
    "image_normalization",
)
HEAD_SETTINGS = {
    "flow": ("prediction",),
    "ddpm": DDPM_SETTINGS,
    "hierarchical": ("keyframe_stride",),
    "shortcut": ("shortcut_fraction", "shortcut_halvings"),
    "meanflow": ("meanflow_fraction", "meanflow_adaptive_power"),
    "consistency": ("consistency_delta", "consistency_velocity_weight", "consistency_segments"),
}


@register("policy-config", "config")
@dataclass
class PolicyConfig:
    r"""Everything that rebuilds a policy (kept as JSON in its checkpoint).

    Arguments:
        kind: the head, a name registered in :mod:`flowforge.policy.heads`: ``"flow"``,
            ``"hierarchical"``, ``"mse"``, ``"ddpm"``, or the few-step ``"shortcut"``,
            ``"meanflow"`` and ``"consistency"`` (which a run can also distil from a trained flow
            policy: ``[distill]`` of :mod:`flowforge.runs.policy`).
        state_key: the data set's feature the policy reads as its state:
            ``"observation.environment_state"`` (the simulator's whole state, object and goal poses
            included) or ``"observation.state"`` (the robot's own state: hand position and gripper).
            In an environment the policy reads the observation dict's entry of the same name
            without the ``observation.`` prefix (``environment_state`` or ``state``).
        state_dim, action_dim: sizes of the state and action vectors.
        horizon: :math:`H`, actions per chunk.
        obs_horizon: observation frames the policy sees (the current one and those before it).
        n_action_steps: actions executed from each chunk before replanning (``None``: half the chunk).
        width, layers, heads: the transformer's size.
        image_shape: ``(3, 84, 84)`` to use images, ``None`` for state only. A policy prepared from a
            data set (``flowforge policy train``) must name the (channels, height, width) of the
            data's images: frames are not resized.
        language: add an instruction token (frozen MiniLM embedding).
        instructions: the instructions seen in training; their embeddings live in the weights.
        sampling_steps, method: the flow's integration (``euler`` by default; any flowforge solver).
        noise_scale: the flow policies' sampling temperature tau: integration starts from
            tau * eps with eps ~ N(0, I). 1 samples the learned distribution; below 1 concentrates
            the samples towards its mode (Glow's temperature), which suits near-deterministic
            demonstrations; 0 makes the policy deterministic.
        time_sampler: the law of the flow time t (0 noise, 1 data) at which the flow-matching loss
            is taken, a name registered in :mod:`flowforge.matching.time` (the heads of
            :data:`FLOW_TIME_KINDS`). ``"shifted-beta"``, pi0's: :math:`t = 0.999\,(1 - u)`,
            :math:`u \sim \mathrm{Beta}(1.5, 1)`, density proportional to
            :math:`(1 - t/0.999)^{1/2}`: most of it at the noise end, none at the data end.
            ``"uniform"``: :math:`t \sim U(0, 1)`, as much weight near the data, where the last
            integration steps set a chunk's fine detail. ``"logit-normal"``:
            :math:`\operatorname{sigmoid}(\mathcal N(0, 1))`, most of it in the middle.
        prediction: what the flow head's expert outputs (``kind = "flow"`` only), one of
            :data:`PREDICTIONS`. ``"velocity"``: :math:`v(x_t, t)`, trained by the velocity loss.
            ``"sample"`` (x-prediction): the clean chunk :math:`\hat A(x_t, t)`, read as the
            velocity :math:`(\hat A - x_t) / (1 - t)` when sampling (the last Euler step lands on
            the expert's own prediction, as DDIM's last step does) and trained by the same
            velocity loss written in the chunk's units, its weight
            :math:`1 / (1 - t)^2` bounded near the data
            (:func:`~flowforge.matching.functional.data_prediction_loss`). Its velocity is singular
            at t = 1, so it integrates with ``euler`` or ``midpoint`` only, whose stages stay short
            of a step's end.
        keyframe_stride: hierarchical policies plan every ``keyframe_stride``-th action first.
        shortcut_fraction, shortcut_halvings: the shortcut head's share of self-consistency rows
            (0.5, in (0, 1): each batch trains both parts) and its number M of step sizes: it learns
            steps 1, 1/2, ..., 2^(1-M) from self-consistency, built from the instantaneous
            velocity's Euler step 2^-M. A policy samples in 1-4 steps, and a short ladder (M = 3)
            with half the rows on it keeps the one-step map close to the demonstrations (MT10
            figures in the README).
        meanflow_fraction: the meanflow head's share of rows with a span (the rest flow matching), in
            [0, 1]; strictly between, every batch of two rows or more trains both parts.
        meanflow_adaptive_power: the power p of the meanflow head's adaptive loss weight (0: plain
            squared error; see ``mean_flow_loss``). The default 1 keeps the loss bounded at the
            default time-embedding frequency; with ``time_embedding_frequency = 4`` the plain
            squared error (0) trains better (MT10, 20 episodes a task: 94.5% at one step against
            76.5% with 1).
        consistency_delta, consistency_velocity_weight: the consistency head's time gap between the
            two points of a path it makes agree, and the weight of its velocity term. The velocity
            term must stay small (Consistency-FM uses 1e-5): near a segment's end the other term
            vanishes, and a weight of 1 there held the velocity to its own later value, so the data
            never reached the head (one-step chunks as far from the expert's as noise).
        consistency_segments: the consistency head's time segments; the end of each is where its
            consistency function points (Consistency-FM's multi-segment training). One segment,
            the data end for every time, did best for one-step chunks on MT10 (91.6% against 85.6%
            with two; 89.4% against 90.8% at two steps).
        time_embedding_frequency: the highest frequency of the action expert's sinusoidal time (and
            interval) embeddings, >= 1. A MeanFlow head wants a low one (4): its loss differentiates
            the expert in time, and at 100 the derivative of the embedding swamped the targets (MT10,
            one-step chunks 0.08 from the expert's in median squared error at 100, 0.011 at 4).
        rtc_training_delay: training-time real-time chunking (flow head): each training chunk
            starts with a clean prefix of 0 to ``rtc_training_delay`` actions at time 1 (data),
            which carry no loss, so that the policy can complete a chunk whose first actions are
            given (``execution="rtc-trained"``); 0: off. Each step's loss is divided by the
            fraction of rows that train it (a prefix covers it in the others), so that every step
            of a chunk keeps its weight (see :meth:`~flowforge.policy.heads.FlowHead.filled_loss`).
        rtc_prefix_noise: the spread (in normalised action units, actions scaled to [-1, 1] by
            ``min_max``) of Gaussian noise added to the clean prefixes of training-time real-time
            chunking (still given at time 1). At run time the given actions come from the
            policy's own earlier chunk, not from the expert; a policy trained on exact expert
            prefixes leans on them (MT10 at D = 4, temperature 1: 91.0% with 0, 93.5% with 0.1,
            94.8% with 0.2, 94.6% with 0.3).
            0: exact prefixes; needs ``rtc_training_delay`` >= 1.
        rtc_unprefixed_fraction: the fraction f (0 < f < 1) of training rows given no prefix; the
            others draw their length uniformly from 1 to ``rtc_training_delay``. ``None``: lengths uniform on
            0..``rtc_training_delay`` (the fraction 1 / (d + 1)). More rows without a prefix keep
            the policy reading its observation where a prefix would tell it the way (MT10, d = 4,
            prefix noise 0.2, temperature 1, D = 4: 95.7% with 0.5 against 94.8% with ``None``;
            reach 93% against 85%). Needs ``rtc_training_delay`` >= 1.
        diffusion_steps, inference_steps, sampler: the DDPM baseline (``"ddim"`` or ``"ddpm"``).
        state_normalization, action_normalization: ``"mean_std"`` or ``"min_max"``.
        previous_state: also give the policy, with each frame's state, the state of the frame
            before it (the episode's first frame repeats itself): the hand's velocity without a
            second image. The state vector is ``[state, previous state, goal]``.
        goal_key: ``None``, or ``"observation.goal"``: the task's goal position appended to the
            state. For tasks whose goal cannot be seen (reach's goal marker is not rendered) a
            policy on the robot's own state and images needs it to be told; read from a data
            set's feature of that name or derived from ``observation.environment_state``
            (:data:`DERIVED_FEATURES`), and from an environment's ``goal`` entry.
        cameras: the camera names whose images the policy sees, one token group each with its own
            image encoder and positions (MetaWorld's: ``corner``, ``gripperPOV``, ...; a data set's
            feature ``observation.images.<name>``, an environment's entry ``image.<name>``).
            ``None``: one unnamed camera, the data set's first (earlier policies); a policy
            prepared from data records the name.
        image_encoder: ``"conv"`` (three convolutions, a token grid) or ``"resnet-keypoints"``
            (residual GroupNorm stages of ``image_channels`` channels and ``keypoints``
            spatial-softmax keypoints as tokens; :mod:`flowforge.policy.vision`).
        augmentation: training-only image augmentation: ``"none"``, ``"shift"`` (DrQ) or ``"crop"``
            (Diffusion Policy; the centre window in evaluation), by ``augmentation_pixels``;
            ``color_jitter``: brightness, contrast and saturation jitter strength in [0, 1).
        image_normalization: ``"fixed"`` (pixels to [-1, 1]) or ``"mean_std"`` (per camera and
            channel, the training frames' statistics over the evaluation view).
    """

    kind: str = "flow"
    state_key: str = "observation.environment_state"
    state_dim: int = 39
    action_dim: int = 4
    horizon: int = 16
    obs_horizon: int = 1
    n_action_steps: int | None = None
    width: int = 128
    layers: int = 4
    heads: int = 4
    image_shape: list[int] | None = None
    language: bool = True
    instructions: list[str] = field(default_factory=list)
    sampling_steps: int = 10
    method: str = "euler"
    noise_scale: float = 1.0
    time_sampler: str = "shifted-beta"
    prediction: str = "velocity"
    keyframe_stride: int = 4
    shortcut_fraction: float = 0.5
    shortcut_halvings: int = 3
    meanflow_fraction: float = 0.25
    meanflow_adaptive_power: float = 1.0
    consistency_delta: float = 0.05
    consistency_velocity_weight: float = 1e-4
    consistency_segments: int = 1
    time_embedding_frequency: float = 100.0
    rtc_training_delay: int = 0
    rtc_prefix_noise: float = 0.0
    rtc_unprefixed_fraction: float | None = None
    diffusion_steps: int = 100
    inference_steps: int = 10
    sampler: str = "ddim"
    state_normalization: str = "mean_std"
    action_normalization: str = "min_max"
    previous_state: bool = False
    goal_key: str | None = None
    cameras: list[str] | None = None
    image_encoder: str = "conv"
    keypoints: int = 32
    image_channels: list[int] = field(default_factory=lambda: [16, 32, 64])
    augmentation: str = "none"
    augmentation_pixels: int = 4
    color_jitter: float = 0.0
    image_normalization: str = "fixed"

    @property
    def goal_size(self) -> int:
        """The goal's numbers at the end of the state vector (0 without ``goal_key``)."""
        if self.goal_key is None or self.goal_key not in DERIVED_FEATURES:
            return 0
        _, start, end = DERIVED_FEATURES[self.goal_key]
        return end - start

    def check_state_layout(self) -> None:
        """Refuse a ``state_dim`` no observation can fill: the state_key's numbers (twice with
        ``previous_state``) plus the goal's. Checked when a policy is built (a run's config takes
        ``state_dim`` from its data set)."""
        own = self.state_dim - self.goal_size
        if own < 1 or (self.previous_state and own % 2):
            layout = "twice the state_key's numbers (previous_state)" if self.previous_state else "the state_key's"
            goal = f" plus the goal's {self.goal_size}" if self.goal_key is not None else ""
            raise ConfigError(f"state_dim = {self.state_dim}: expected {layout}{goal}, at least 1 of the state_key's")

    @property
    def state_features(self) -> list[str]:
        """The features whose numbers make the state vector, in order (``state_key``, ``goal_key``);
        with ``previous_state`` the first one's previous frame follows it."""
        return [self.state_key] + ([self.goal_key] if self.goal_key is not None else [])

    @property
    def image_keys(self) -> list[str]:
        """A batch's keys of the cameras' images: ``image.<camera>`` each, or ``image`` for the unnamed one."""
        if self.image_shape is None:
            return []
        return ["image"] if self.cameras is None else [f"image.{camera}" for camera in self.cameras]

    @property
    def observation_key(self) -> str:
        """The entry of an environment's observation dict that holds the state (``state_key``
        without ``observation.``)."""
        return self.state_key.removeprefix("observation.")

    def __post_init__(self) -> None:
        plain_numbers(self)
        check_choice("kind", self.kind, names(HEAD_CATEGORY))
        check_choice("state_key", self.state_key, STATE_KEYS)
        check_flag("language", self.language)
        if not isinstance(self.instructions, list | tuple) or not all(isinstance(t, str) for t in self.instructions):
            raise ConfigError(f"instructions = {self.instructions!r}: expected a list of strings")
        if len(set(self.instructions)) != len(self.instructions):
            raise ConfigError(f"instructions = {self.instructions!r}: an instruction is listed twice")
        for name in ("state_dim", "action_dim"):
            check_integer(name, getattr(self, name), high=MAX_WIDTH)

        check_integer("width", self.width, high=MAX_WIDTH)
        check_integer("heads", self.heads, high=self.width, note=f" (at most width = {self.width})")
        check_integer("obs_horizon", self.obs_horizon, high=MAX_HORIZON)
        check_integer("horizon", self.horizon, high=MAX_HORIZON)
        check_integer("layers", self.layers, high=MAX_LAYERS)
        if self.width % self.heads:
            raise ConfigError(f"width = {self.width}: expected a multiple of heads = {self.heads}")
        if self.n_action_steps is None:
            self.n_action_steps = max(1, self.horizon // 2)
        check_integer("n_action_steps", self.n_action_steps)
        if self.n_action_steps > self.horizon:
            raise ConfigError(f"n_action_steps = {self.n_action_steps}: expected at most horizon = {self.horizon}")
        self._check_vision()
        check_integer("sampling_steps", self.sampling_steps, high=MAX_SAMPLER_STEPS)
        check_choice("method", self.method, (*TABLEAUS, *ADAPTIVE_METHODS))
        own_steps = getattr(lookup(HEAD_CATEGORY, self.kind), "own_steps", "")
        if own_steps and self.method != "euler":
            raise ConfigError(f"method = {self.method!r}: {own_steps}; use 'euler'")
        check_range("noise_scale", self.noise_scale, low=0, high=MAX_NOISE_SCALE)
        check_choice("time_sampler", self.time_sampler, names("time"))
        check_choice("prediction", self.prediction, PREDICTIONS)
        if self.prediction == "sample":
            check_sample_prediction_method(self.method, ConfigError)
        check_integer("keyframe_stride", self.keyframe_stride)
        if self.kind == "hierarchical" and self.horizon % self.keyframe_stride:
            raise ConfigError(
                f"keyframe_stride = {self.keyframe_stride}: expected a divisor of horizon = {self.horizon}"
            )
        # Both parts are needed: the self-consistency rows make the few steps, the flow-matching rows anchor them.
        check_range("shortcut_fraction", self.shortcut_fraction, low=0, high=1, low_open=True, high_open=True)
        check_integer("shortcut_halvings", self.shortcut_halvings, high=MAX_HALVINGS)
        check_range("meanflow_fraction", self.meanflow_fraction, low=0, high=1)
        check_range("meanflow_adaptive_power", self.meanflow_adaptive_power, low=0)
        check_range("consistency_delta", self.consistency_delta, low=0, high=1, low_open=True, high_open=True)
        check_range("consistency_velocity_weight", self.consistency_velocity_weight, low=0)
        check_integer("consistency_segments", self.consistency_segments)
        check_range("time_embedding_frequency", self.time_embedding_frequency, low=1)
        check_integer(
            "rtc_training_delay",
            self.rtc_training_delay,
            low=0,
            high=self.horizon - 1,
            note=" (0: off; at most horizon - 1)",
        )
        if self.rtc_training_delay and self.kind != "flow":
            raise ConfigError(f"rtc_training_delay = {self.rtc_training_delay}: training-time RTC is for kind = 'flow'")
        check_range("rtc_prefix_noise", self.rtc_prefix_noise, low=0)
        # At 0 a prefix always covers a chunk's first step, which is then never trained; at 1 the
        # policy never sees a prefix, which rtc-trained execution would still give it.
        check_range(
            "rtc_unprefixed_fraction",
            self.rtc_unprefixed_fraction,
            low=0,
            high=1,
            low_open=True,
            high_open=True,
            optional=True,
        )
        for name, value in (
            ("rtc_prefix_noise", self.rtc_prefix_noise or None),
            ("rtc_unprefixed_fraction", self.rtc_unprefixed_fraction),
        ):
            if value is not None and not self.rtc_training_delay:
                raise ConfigError(
                    f"{name} = {value}: it shapes training-time RTC's prefixes, which "
                    "rtc_training_delay = 0 does not give (set rtc_training_delay >= 1)"
                )
        check_integer("diffusion_steps", self.diffusion_steps, high=MAX_SAMPLER_STEPS)
        check_integer("inference_steps", self.inference_steps, high=MAX_SAMPLER_STEPS)
        if self.kind == "ddpm" and self.inference_steps > self.diffusion_steps:
            raise ConfigError(
                f"inference_steps = {self.inference_steps}: expected at most diffusion_steps = {self.diffusion_steps}"
            )
        check_choice("sampler", self.sampler, ("ddim", "ddpm"))
        check_choice("state_normalization", self.state_normalization, ("mean_std", "min_max"))
        check_choice("action_normalization", self.action_normalization, ("mean_std", "min_max"))
        check_flag("previous_state", self.previous_state)
        if self.goal_key is not None:
            check_choice("goal_key", self.goal_key, (GOAL_KEY,))
        check_used_settings(self)

    def _check_vision(self) -> None:
        check_choice("image_encoder", self.image_encoder, IMAGE_ENCODERS)
        check_integer("keypoints", self.keypoints, high=MAX_IMAGE_SIDE)
        channels = self.image_channels
        if not isinstance(channels, list) or not 1 <= len(channels) <= 5:
            raise ConfigError(f"image_channels = {channels!r}: expected a list of 1 to 5 channel counts")
        for index, value in enumerate(channels):
            check_integer(f"image_channels[{index}]", value, high=MAX_WIDTH)
        check_choice("augmentation", self.augmentation, AUGMENTATIONS)
        check_integer("augmentation_pixels", self.augmentation_pixels, low=0)
        check_range("color_jitter", self.color_jitter, low=0, high=1, high_open=True)
        check_choice("image_normalization", self.image_normalization, IMAGE_NORMALIZATIONS)
        if self.cameras is not None:
            if not isinstance(self.cameras, list) or not self.cameras:
                raise ConfigError(f"cameras = {self.cameras!r}: expected a list of camera names, or none")
            for camera in self.cameras:
                if not isinstance(camera, str) or not _CAMERA_NAME.fullmatch(camera):
                    raise ConfigError(
                        f"cameras: {camera!r} is not a camera name (letters, digits, '_' and '-', e.g. 'corner')"
                    )
            if len(set(self.cameras)) != len(self.cameras):
                raise ConfigError(f"cameras = {self.cameras}: a camera is named twice")
            if self.image_shape is None:
                raise ConfigError(f"cameras = {self.cameras}: set image_shape (e.g. [3, 84, 84]) to use images")
        if self.image_shape is None:
            return
        if not isinstance(self.image_shape, list | tuple) or not all(
            is_count(side, 1, MAX_IMAGE_SIDE) for side in self.image_shape
        ):
            raise ConfigError(
                f"image_shape = {self.image_shape!r}: expected [3, H, W] of integers in 1..{MAX_IMAGE_SIDE}, or none"
            )
        self.image_shape = [int(s) for s in self.image_shape]
        if len(self.image_shape) != 3 or self.image_shape[0] != 3 or min(self.image_shape) < 1:
            raise ConfigError(f"image_shape = {self.image_shape}: expected [3, H, W] (RGB) or none")
        if self.augmentation == "shift" and 2 * self.augmentation_pixels >= min(self.image_shape[1:]):
            raise ConfigError(
                f"augmentation_pixels = {self.augmentation_pixels}: a shift moves the image by less than half its "
                f"side; expected at most {(min(self.image_shape[1:]) - 1) // 2} for image_shape = {self.image_shape}"
            )
        removed = 2 * self.augmentation_pixels if self.augmentation == "crop" else 0
        seen = min(self.image_shape[1:]) - removed
        needed = min_image_size(self.image_encoder, len(channels))
        if seen < needed:
            cropped = (
                f" after augmentation = 'crop' removes {removed} pixels from each side's length" if removed else ""
            )
            raise ConfigError(
                f"image_shape = {self.image_shape}: image_encoder = {self.image_encoder!r} needs at least "
                f"{needed}x{needed} pixels{cropped}; the encoders take: "
                + ", ".join(f"{name!r} >= {min_image_size(name, len(channels))}" for name in IMAGE_ENCODERS)
            )


def check_used_settings(config: PolicyConfig) -> None:
    """Refuse a head's own settings given to a head that would ignore them (a temperature for the
    MSE baseline, DDIM steps for a flow) and image settings a policy would not read (any without
    ``image_shape``, the keypoint encoder's with the conv encoder, shift pixels without
    augmentation): a config says what its policy does. (``sampling_steps`` beside an adaptive
    ``method``, like ``inference_steps`` beside ``sampler = "ddpm"``, stays: it is the step count
    of a call that asks for a fixed-step method.) Every new
    :class:`PolicyConfig` is checked; saved policies of earlier releases, which may carry such
    settings, still rebuild (:func:`flowforge.registry.refuse_unread`)."""
    for kind, settings in HEAD_SETTINGS.items():
        if config.kind != kind:
            user = "the DDPM baseline" if kind == "ddpm" else f"the {kind} head"
            given = {name: getattr(config, name) for name in settings}
            refuse_unread(PolicyConfig, given, f"kind = {config.kind!r} does not use it (it is for {user})")
    if config.kind in ("mse", "ddpm"):
        given = {name: getattr(config, name) for name in FLOW_SAMPLING_SETTINGS}
        refuse_unread(PolicyConfig, given, f"kind = {config.kind!r} does not use it (it is for the flow heads)")
    if config.kind not in FLOW_TIME_KINDS:
        why = f"kind = {config.kind!r} draws no flow time from it (it is for the {', '.join(FLOW_TIME_KINDS)} heads)"
        refuse_unread(PolicyConfig, {"time_sampler": config.time_sampler}, why)
    if config.kind == "mse":
        why = "kind = 'mse' regresses chunks from learned queries, with no flow time to embed"
        refuse_unread(PolicyConfig, {"time_embedding_frequency": config.time_embedding_frequency}, why)
    if config.image_shape is None:
        given = {name: getattr(config, name) for name in VISION_SETTINGS}
        refuse_unread(PolicyConfig, given, "image_shape is not set: a state-only policy has no camera to read")
        return
    if config.image_encoder == "conv":
        why = "image_encoder = 'conv' has its own three convolutions (this is the resnet-keypoints encoder's)"
        refuse_unread(PolicyConfig, {"keypoints": config.keypoints, "image_channels": config.image_channels}, why)
    if config.augmentation == "none":
        why = "augmentation = 'none' moves no pixel"
        refuse_unread(PolicyConfig, {"augmentation_pixels": config.augmentation_pixels}, why)


__all__ = [
    "DDPM_SETTINGS",
    "DERIVED_FEATURES",
    "FLOW_SAMPLING_SETTINGS",
    "FLOW_TIME_KINDS",
    "GOAL_KEY",
    "HEAD_SETTINGS",
    "PREDICTIONS",
    "STATE_KEYS",
    "VISION_SETTINGS",
    "PolicyConfig",
    "check_used_settings",
]
