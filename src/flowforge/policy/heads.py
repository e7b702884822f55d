r"""Policy heads: how a chunk is trained and sampled against the action expert's cache.

Every head has one contract, so that a policy is an encoder, an expert and any head:

* ``loss(target, cache, pad)``: the training loss of a normalised chunk ``target`` (B, H, A)
  given the observation's :class:`~flowforge.policy.expert.ExpertCache`; ``pad`` (B, H) marks the
  steps past an episode's end, which neither count in the loss nor reach the model (each head
  replaces them with the last real action first, :func:`fill_padding`, so whatever a data set
  stores there, NaN included, changes nothing).
* ``sample(cache, noise, *, steps, method, noise_scale)``: a normalised chunk from a standard
  normal draw ``noise`` (B, H, A), returned as an :class:`~flowforge.matching.functional.Integration`
  (the chunk and the expert's evaluations, NFE).
* ``sampling(steps, method, noise_scale)``: the settings of one call, each argument or the
  config's default, checked; nothing is stored.

A head is one class registered by name (:func:`head`) and chosen by ``policy.kind``:

* ``flow`` (:class:`FlowHead`): conditional flow matching on the linear path,
  :math:`x_t = t\,A + (1 - t)\,\varepsilon`, :math:`u_t = A - \varepsilon`, with times from
  ``time_sampler`` (by default pi0's shifted Beta, weighted towards noise), through
  :func:`~flowforge.matching.functional.flow_matching_loss`; sampled by
  :func:`~flowforge.matching.functional.integrate` from :math:`\tau\varepsilon` (``noise_scale``
  :math:`\tau`, the temperature) with any flowforge solver. With ``prediction = "sample"`` the
  expert outputs the clean chunk :math:`\hat A` instead, read as the velocity
  :math:`(\hat A - x_t) / (1 - t)` (:meth:`FlowHead.velocity`) and trained through
  :func:`~flowforge.matching.functional.data_prediction_loss`.
* ``hierarchical`` (:class:`HierarchicalFlowHead`): two flow heads. The first generates every
  ``keyframe_stride``-th action with the policy's expert; the second generates the whole chunk with
  its own expert, whose prefix is the observation plus one token per keyframe. NFE: steps per level.
* ``mse`` (:class:`RegressionHead`): learned queries regress the chunk (masked mean squared error),
  one pass.
* ``ddpm`` (:class:`DiffusionHead`): DDPM (Ho et al. 2020) with a cosine schedule
  :math:`\bar\alpha_k` over ``diffusion_steps`` = K steps, :math:`A_k = \sqrt{\bar\alpha_k}\,A +
  \sqrt{1 - \bar\alpha_k}\,\varepsilon`, the expert predicting :math:`\varepsilon` at time
  :math:`k / K`; sampled by a scheduler object, :class:`DDPMScheduler` (the ancestral chain over all
  K steps) or :class:`DDIMScheduler` (Song et al. 2021, deterministic, on ``steps`` evenly spaced
  steps).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from flowforge.matching.functional import (
    Integration,
    data_prediction_loss,
    flow_matching_loss,
    integrate,
    masked_mean,
    mean_flow_loss,
    shortcut_loss,
    shortcut_step,
)
from flowforge.matching.paths import LinearPath
from flowforge.matching.time import UniformTime
from flowforge.ode import ADAPTIVE_METHODS, TABLEAUS, solver_settings
from flowforge.policy.expert import ActionExpert, ExpertCache
from flowforge.registry import lookup, register_class
from flowforge.validation import (
    MAX_SAMPLER_STEPS,
    all_finite,
    check_choice,
    check_count,
    check_noise_scale,
    check_real,
    is_count,
)

#: The registry category of heads; ``policy.kind`` names one.
HEAD_CATEGORY = "head"
#: What the flow head's expert may output (``prediction``): the velocity, or the clean chunk.
PREDICTIONS = ("velocity", "sample")


def head(name: str) -> Callable[[type], type]:
    """Class decorator: register a head under ``name`` (a value of ``policy.kind``)."""

    def decorate(cls: type) -> type:
        return register_class(cls, name, HEAD_CATEGORY)

    return decorate


@dataclass(frozen=True)
class Sampling:
    """How one chunk is sampled, resolved from a call's arguments and the config's defaults.

    ``steps``: solver steps (flow heads; None for an adaptive solver, which chooses its own) or
    denoising steps (diffusion); ``method``: a flowforge solver (flow heads) or
    ``"ddim"``/``"ddpm"``; ``noise_scale``: the flow heads' temperature.
    """

    steps: int | None
    method: str
    noise_scale: float


@dataclass(frozen=True)
class ChunkGuide:
    r"""Real-time chunking's inpainting target (Black et al. 2025): sample a chunk whose first steps
    agree with ``actions`` (B, H, A), step i weighted by ``weights[i]`` (H,) in [0, 1] (1: frozen, the
    steps that execute while the chunk is computed; decaying over the rest of the overlap; 0: free).

    At every integration step the flow head predicts the final chunk
    :math:`\hat A = x_t + (1 - t)\,v(x_t, t)` and adds the guidance
    :math:`c_t\,(\partial \hat A / \partial x_t)^\top [W \odot (Y - \hat A)]` (one vector-Jacobian
    product) to the velocity, with :math:`c_t = \min\big(\beta, \frac{1 - t}{t\, r_t^2}\big)`,
    :math:`r_t^2 = \frac{(1 - t)^2}{t^2 + (1 - t)^2}` and :math:`\beta` = ``max_guidance``.

    ``jacobian``: ``"vjp"`` (the paper's) or ``"identity"``, which takes
    :math:`\partial \hat A / \partial x_t = I` and adds :math:`c_t\, W \odot (Y - \hat A)` with no
    backward pass. A policy that is sure of its chunk given the observation has a Jacobian far
    below the identity, so the vector-Jacobian product barely moves it; the identity keeps its grip.
    On a fully sure policy (:math:`\hat A` the same for every :math:`x_t`) the velocity undoes every
    guidance step but the last: k Euler steps end at :math:`\hat A + \frac{c}{k} W \odot (Y - \hat A)`,
    :math:`c = \min\big(\beta, \frac{(k - 1)^2 + 1}{k - 1}\big)` the last step's strength. At
    k = 10 the paper's :math:`\beta = 5` goes half of the way, :math:`\beta \ge 9.1` nine tenths.
    """

    actions: Tensor
    weights: Tensor
    max_guidance: float = 5.0  # the paper's
    jacobian: str = "vjp"  # the paper's; see GUIDANCE_JACOBIANS

    def normalized(self, normalize: Callable[[Tensor], Tensor], shape: tuple[int, ...]) -> ChunkGuide:
        """The guide in the model's units, checked against the chunk's ``shape``."""
        actions, weights = torch.as_tensor(self.actions), torch.as_tensor(self.weights)
        _check_float_tensor("guide.actions", actions, shape)
        if not weights.is_floating_point() or tuple(weights.shape) != (shape[1],):
            raise ValueError(f"guide.weights must be {shape[1]} floating-point numbers, got {weights.dtype} {weights}")
        if not bool(((weights >= 0) & (weights <= 1)).all()):
            raise ValueError(f"guide.weights must be {shape[1]} numbers in [0, 1], got {weights.tolist()}")
        check_real("max_guidance", self.max_guidance, non_negative=True)
        check_choice("guide.jacobian", self.jacobian, GUIDANCE_JACOBIANS)
        actions = normalize(actions.to(torch.get_default_dtype()) if not actions.is_floating_point() else actions)
        return ChunkGuide(actions, weights.to(actions), float(self.max_guidance), self.jacobian)


#: How real-time chunking's guidance reaches the noisy chunk (see :class:`ChunkGuide`); the first,
#: the paper's vector-Jacobian product, is the default.
GUIDANCE_JACOBIANS = ("vjp", "identity")


def _check_float_tensor(name: str, value: Tensor, shape: tuple[int, ...]) -> None:
    """A guide's or prefix's actions: floating point, of the chunk's shape, finite (named otherwise)."""
    if not value.is_floating_point() or tuple(value.shape) != tuple(shape):
        raise ValueError(
            f"{name} must be floating-point of shape {tuple(shape)}, got {value.dtype} {tuple(value.shape)}"
        )
    if not all_finite(value):
        raise ValueError(f"{name} holds NaN or inf; expected finite actions")


#: Real-time chunking's prefix-weight schedules over the overlap after the frozen steps (see
#: :func:`rtc_weights`); the first, the paper's, is the default.
RTC_SCHEDULES = ("exp", "linear", "ones", "zeros")


def rtc_weights(horizon: int, frozen: int, overlap: int, schedule: str = RTC_SCHEDULES[0]) -> Tensor:
    r"""Real-time chunking's prefix weights (H,): 1 on the ``frozen`` steps, then a schedule over
    the rest of the ``overlap`` o (steps that still have a planned action), 0 after.

    With :math:`c_i = \frac{o - i}{o - d + 1}` (d = ``frozen``), the schedules are ``"exp"``
    :math:`c_i \frac{e^{c_i} - 1}{e - 1}` (the paper's, decaying to 0), ``"linear"`` :math:`c_i`,
    ``"ones"`` 1 (hold the whole overlap to the old plan, leaving the least room to react to the
    new observation) and ``"zeros"`` 0 (only the frozen steps are guided).

    >>> [round(w, 2) for w in rtc_weights(6, frozen=2, overlap=5).tolist()]
    [1.0, 1.0, 0.49, 0.19, 0.04, 0.0]
    >>> [round(w, 2) for w in rtc_weights(6, frozen=2, overlap=5, schedule="linear").tolist()]
    [1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
    """
    check_choice("schedule", schedule, RTC_SCHEDULES)
    horizon = check_count("horizon", horizon)
    frozen = check_count("frozen", frozen, low=0, high=horizon)
    overlap = check_count("overlap", overlap, low=0)
    index = torch.arange(horizon, dtype=torch.float64)
    overlap = min(max(overlap, frozen), horizon)
    c = (overlap - index) / (overlap - frozen + 1)
    over_overlap = {
        "exp": c * (torch.exp(c) - 1) / (math.e - 1),
        "linear": c,
        "ones": torch.ones_like(c),
        "zeros": torch.zeros_like(c),
    }[schedule]
    weights = torch.where(index < frozen, torch.ones_like(index), torch.where(index < overlap, over_overlap, 0.0))
    return weights.float()


def fill_padding(chunk: Tensor, pad: Tensor | None) -> Tensor:
    """``chunk`` (B, H, A) with every step flagged in ``pad`` (B, H) replaced by the last real step
    before it, so that whatever a data set stores past an episode's end cannot reach the model."""
    if pad is None:
        return chunk
    steps = torch.arange(chunk.shape[1], device=chunk.device).expand(chunk.shape[0], -1)
    last_real = torch.where(pad, torch.zeros_like(steps), steps).cummax(dim=1).values
    return chunk.gather(1, last_real[..., None].expand(-1, -1, chunk.shape[2]))


def _kept(pad: Tensor | None) -> Tensor | None:
    return None if pad is None else ~pad


class PolicyHead(nn.Module):
    """The head contract (see the module docstring). ``config``: the policy's ``PolicyConfig``."""

    #: the policy's expert reads learned queries instead of a noisy chunk.
    queries: ClassVar[bool] = False
    #: the head samples from noise in steps (``predict_chunk(steps=k)``); ``False``: one pass, no noise.
    samples_from_noise: ClassVar[bool] = True
    #: the policy's expert also reads a time interval (few-step heads).
    interval: ClassVar[bool] = False
    #: set by heads that sample with their own update instead of a solver (why only ``"euler"``).
    own_steps: ClassVar[str] = ""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config

    @property
    def expert_horizon(self) -> int:
        """Suffix tokens of the policy's expert."""
        return self.config.horizon

    def sampling(
        self, steps: int | None = None, method: str | None = None, noise_scale: float | None = None
    ) -> Sampling:
        raise NotImplementedError

    def loss(self, target: Tensor, cache: ExpertCache, pad: Tensor | None) -> Tensor:
        raise NotImplementedError

    def sample(self, cache: ExpertCache, noise: Tensor, *, steps: int, method: str, noise_scale: float) -> Integration:
        raise NotImplementedError


@head("flow")
class FlowHead(PolicyHead):
    """Flow matching on the linear path (see the module docstring).

    >>> import torch
    >>> from types import SimpleNamespace
    >>> from flowforge.policy.expert import ActionExpert
    >>> config = SimpleNamespace(horizon=4, sampling_steps=10, method="euler", noise_scale=1.0)
    >>> expert, flow = ActionExpert(2, 4, 16, 1, 2), FlowHead(config)
    >>> cache = expert.encode(torch.randn(3, 5, 16))
    >>> flow.loss(torch.randn(3, 4, 2), cache, None).shape
    torch.Size([])
    >>> flow.sample(cache, torch.randn(3, 4, 2), steps=4, method="midpoint", noise_scale=1.0).nfe
    8
    """

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.path = LinearPath()
        # Policies saved before the settings existed (and plain namespaces) train with pi0's law
        # and predict the velocity.
        self.time_sampler = lookup("time", getattr(config, "time_sampler", "shifted-beta"))()
        self.prediction = check_choice("prediction", getattr(config, "prediction", "velocity"), PREDICTIONS)

    def velocity(self, cache: ExpertCache) -> Callable[[Tensor, Tensor], Tensor]:
        r"""The velocity field ``v(x, t)`` of the chunk given the observation's ``cache``: the
        expert's output, or with ``prediction = "sample"`` the velocity of its clean chunk
        :math:`\hat A`, :math:`(\hat A - x) / (1 - t)` (floored at :data:`SAMPLE_VELOCITY_FLOOR`
        so that it stays finite at t = 1; only :data:`SAMPLE_PREDICTION_METHODS` integrate it)."""
        if self.prediction == "velocity":
            return cache.denoise
        return _SampleVelocity(cache.denoise, self.path)

    def sampling(
        self, steps: int | None = None, method: str | None = None, noise_scale: float | None = None
    ) -> Sampling:
        config = self.config
        if self.own_steps:  # a head with its own update: Euler-like steps only
            method = "euler" if method is None else method
            if method != "euler":
                raise ValueError(f"method = {method!r}: {self.own_steps}; use 'euler'")
        method = config.method if method is None else method
        if method in TABLEAUS:  # an adaptive method reads no step count
            steps = check_count("steps", config.sampling_steps if steps is None else steps, high=MAX_SAMPLER_STEPS)
        steps = solver_settings(method, steps)[0]  # checks the method; refuses steps for an adaptive one
        sampling = Sampling(steps, method, config.noise_scale if noise_scale is None else noise_scale)
        check_noise_scale(sampling.noise_scale)
        return sampling

    def loss(self, target: Tensor, cache: ExpertCache, pad: Tensor | None) -> Tensor:
        return self.filled_loss(fill_padding(target, pad), cache, pad)

    def filled_loss(self, target: Tensor, cache: ExpertCache, pad: Tensor | None) -> Tensor:
        r""":meth:`loss` of a chunk whose padded steps are already filled (:func:`fill_padding`).

        With ``rtc_training_delay`` d > 0 (training-time real-time chunking) each row's first L
        actions (:meth:`prefix_lengths`: L = 0 in a fraction f of the rows,
        ``rtc_unprefixed_fraction``, else uniform on 1..d; by default uniform on 0..d,
        f = 1 / (d + 1)) are given at time 1 and carry no loss; with ``rtc_prefix_noise``
        :math:`\sigma` they are given as :math:`a + \sigma\epsilon`, the loss's target unchanged.
        Step i is then trained only in the rows with L <= i, a fraction
        :math:`P(L \le i) = f + (1 - f)\min(i, d) / d`, so its loss is weighted by
        :math:`1 / P(L \le i)` (:meth:`prefix_step_weights`): every step keeps the weight it has
        without prefixes. Unweighted, the first steps, which a chunk with no prefix executes (the
        first of an episode, and every one at D = 0), got f of it (MT10, d = 4, f = 1/5: the
        first action 0.21 from the expert's against the plain policy's 0.12, reach 58% against
        93% at D = 0; weighted, 0.16 and 78%).
        """
        noise = torch.randn_like(target)
        t = self.time_sampler(target.shape[0], device=target.device, dtype=target.dtype)
        kept, weights = _kept(pad), None
        config = self.config
        if getattr(config, "rtc_training_delay", 0):
            steps = torch.arange(target.shape[1], device=target.device)
            given = steps[None] < self.prefix_lengths(target.shape[0]).to(target.device)[:, None]
            t = torch.where(given, torch.ones_like(t)[:, None], t[:, None])
            kept = ~given if kept is None else kept & ~given
            weights = self.prefix_step_weights(target.shape[1]).to(target)[None].expand(target.shape[:2])
            if config.rtc_prefix_noise:  # the prefix enters as x_1 (time 1): perturb it there only
                jittered = target + config.rtc_prefix_noise * torch.randn_like(target)
                target = torch.where(given[..., None], jittered, target)
        if self.prediction == "sample":
            return data_prediction_loss(cache.denoise, noise, target, t, self.path, mask=kept, weights=weights)
        return flow_matching_loss(cache.denoise, noise, target, t, self.path, mask=kept, weights=weights)

    def prefix_lengths(self, rows: int) -> Tensor:
        """Training-time RTC: each row's clean prefix length (see :meth:`filled_loss`)."""
        delay, fraction = self.config.rtc_training_delay, self.config.rtc_unprefixed_fraction
        if fraction is None:
            return torch.randint(0, delay + 1, (rows,))
        lengths = torch.randint(1, delay + 1, (rows,))
        return torch.where(torch.rand(rows) < fraction, torch.zeros_like(lengths), lengths)

    def prefix_step_weights(self, horizon: int) -> Tensor:
        """Training-time RTC: the loss weight (horizon,) of each step of a chunk, 1 / P(L <= i) for
        the prefix lengths L of :meth:`prefix_lengths` (see :meth:`filled_loss`).

        >>> from types import SimpleNamespace
        >>> head = FlowHead(SimpleNamespace(rtc_training_delay=3, rtc_unprefixed_fraction=None))
        >>> [round(w, 2) for w in head.prefix_step_weights(6).tolist()]
        [4.0, 2.0, 1.33, 1.0, 1.0, 1.0]
        >>> head.config.rtc_unprefixed_fraction = 0.5
        >>> [round(w, 2) for w in head.prefix_step_weights(6).tolist()]
        [2.0, 1.5, 1.2, 1.0, 1.0, 1.0]
        """
        delay, fraction = self.config.rtc_training_delay, self.config.rtc_unprefixed_fraction
        if fraction is None:
            fraction = 1 / (delay + 1)
        covered = torch.arange(horizon, dtype=torch.float64).clamp(max=delay) / delay
        return (1 / (fraction + (1 - fraction) * covered)).float()

    #: the head's sampling can be guided towards given actions (:class:`ChunkGuide`).
    guidable: ClassVar[bool] = True

    def sample(
        self,
        cache: ExpertCache,
        noise: Tensor,
        *,
        steps: int,
        method: str,
        noise_scale: float,
        guide: ChunkGuide | None = None,
        prefix: ChunkPrefix | None = None,
    ) -> Integration:
        if self.prediction == "sample":
            check_sample_prediction_method(method)
        field = self.velocity(cache)
        if guide is not None:
            field = _GuidedField(field, guide)
        start = noise_scale * noise
        if prefix is not None:  # the given actions start (and stay) as they are
            field = _PrefixField(field, prefix)
            start = torch.cat([prefix.actions[:, : prefix.length], start[:, prefix.length :]], dim=1)
        return integrate(field, start, method=method, steps=steps, check_end=False)  # the policy checks its chunks

    def log_prob(
        self,
        chunk: Tensor,
        cache: ExpertCache,
        *,
        trace: str = "auto",
        method: str = "dopri5",
        steps: int | None = None,
        noise_scale: float = 1.0,
        atol: float | None = None,
        rtol: float | None = None,
    ) -> Tensor:
        r"""Log-density (B,) of normalised chunks (B, H, A) under this head's ODE, given ``cache``.

        The instantaneous change of variables integrates the chunk from data (t = 1) back to noise
        (t = 0) with :math:`\dot\ell = \nabla\cdot v`:
        :math:`\log p(A) = \log \mathcal N(z; 0, \tau^2 I) - \int_0^1 \nabla\cdot v(x_t, t)\,dt`,
        :math:`\tau` = ``noise_scale`` (the density of what sampling at that temperature draws).
        ``trace``: ``"exact"`` (H A backward passes per evaluation), ``"hutchinson"`` (one
        Rademacher probe per solve, unbiased), or ``"auto"``: exact up to :data:`EXACT_TRACE_LIMIT`
        numbers per chunk. ``steps`` (default 20) for a fixed-step ``method``, ``atol``/``rtol``
        (default 1e-5) for an adaptive one, as :class:`~flowforge.transforms.ContinuousFlowTransform`.
        """
        from flowforge.transforms.continuous import ContinuousFlowTransform

        if self.prediction == "sample":
            # dx/dt = (Â - x) / (1 - t) carries every x to Â(x, 1) at t = 1: no density is left.
            raise ValueError(
                "prediction = 'sample': the velocity (Â - x) / (1 - t) of a head that predicts the clean "
                "chunk is singular at the data end, so its chunks have no density; a policy trained with "
                "prediction = 'velocity' gives likelihoods"
            )
        check_choice("trace", trace, ("auto", "exact", "hutchinson"))
        check_noise_scale(noise_scale, positive=True)
        if steps is not None:
            check_count("steps", steps, high=MAX_SAMPLER_STEPS)
        features = chunk.shape[1] * chunk.shape[2]
        if trace == "auto":
            trace = "exact" if features <= EXACT_TRACE_LIMIT else "hutchinson"
        velocity = _ChunkVelocity(self.velocity(cache), chunk.shape[1:])
        transform = ContinuousFlowTransform(velocity, features, 0, trace, method, steps, atol, rtol)
        transform.check_end = False  # the policy names the rows whose likelihood is not finite
        # Without an outer graph each step's divergence takes only its own Jacobian, and nothing is
        # kept across solver steps (with one, an exact trace at batch 64 held 24 GB).
        with torch.no_grad():
            z, logabsdet = transform(chunk.reshape(chunk.shape[0], features))
        normal_constant = features * (math.log(noise_scale) + 0.5 * math.log(2 * math.pi))
        base = -0.5 * (z / noise_scale).square().sum(1) - normal_constant
        return (base + logabsdet).detach()


@dataclass(frozen=True)
class ChunkPrefix:
    """Training-time real-time chunking: the first ``length`` actions of the chunk are given
    (``actions`` (B, H, A), of which only those are read): they stay fixed at time 1 (data) while the
    rest is integrated, as the policy was trained (``rtc_training_delay``)."""

    actions: Tensor
    length: int

    def normalized(self, normalize: Callable[[Tensor], Tensor], shape: tuple[int, ...], trained: int) -> ChunkPrefix:
        """The prefix in the model's units, checked against the chunk's ``shape`` and the trained length."""
        actions = torch.as_tensor(self.actions)
        _check_float_tensor("prefix.actions", actions, shape)
        if not is_count(self.length, 0, trained):
            raise ValueError(
                f"prefix.length = {self.length}: the policy was trained with prefixes of 0 to {trained} actions"
            )
        return ChunkPrefix(normalize(actions), int(self.length))  # the caller moves it to the model's dtype


class _PrefixField:
    """The velocity of a chunk whose first actions are given: they sit at time 1 and do not move."""

    def __init__(self, velocity: Callable[[Tensor, Tensor], Tensor], prefix: ChunkPrefix) -> None:
        self.velocity, self.prefix = velocity, prefix

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        length = self.prefix.length
        given = torch.arange(x.shape[1], device=x.device)[None] < length
        times = torch.where(given, torch.ones_like(t)[:, None], t[:, None])
        v = self.velocity(x, times)
        return torch.cat([torch.zeros_like(v[:, :length]), v[:, length:]], dim=1)


class _GuidedField:
    """The velocity plus real-time chunking's inpainting guidance (see :class:`ChunkGuide`)."""

    def __init__(self, velocity: Callable[[Tensor, Tensor], Tensor], guide: ChunkGuide) -> None:
        self.velocity, self.guide = velocity, guide

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        # Per-token times (B, H) come from a given prefix (time 1: nothing remains to integrate
        # there, so its prediction is itself); the guidance strength follows the chunk's flow time.
        per_token = t.dim() == 2
        remaining = (1 - t)[..., None] if per_token else (1 - t).reshape(-1, 1, 1)
        times, t = t, (t.min(dim=1).values if per_token else t)
        if self.guide.jacobian == "identity":
            v = self.velocity(x, times)
            pull = (self.guide.actions - (x + remaining * v)) * self.guide.weights[None, :, None]
        else:
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                v = self.velocity(x, times)
                predicted = x + remaining * v
                error = (self.guide.actions - predicted) * self.guide.weights[None, :, None]
                (pull,) = torch.autograd.grad(predicted, x, error)
        r2 = (1 - t) ** 2 / (t**2 + (1 - t) ** 2)
        # A clip beyond the dtype's range clips nothing (torch refuses to convert it).
        clip = min(self.guide.max_guidance, torch.finfo(t.dtype).max)
        strength = ((1 - t) / (t * r2).clamp_min(1e-12)).clamp(max=clip)
        return v.detach() + strength.reshape(-1, 1, 1) * pull


#: Chunks of at most this many numbers get the exact divergence in :meth:`FlowHead.log_prob` by default.
EXACT_TRACE_LIMIT = 64


class _ChunkVelocity(nn.Module):
    """A head's velocity on flattened chunks, as the CNF machinery integrates it."""

    def __init__(self, velocity: Callable[[Tensor, Tensor], Tensor], shape: torch.Size) -> None:
        super().__init__()
        self.velocity, self.shape = velocity, tuple(shape)

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None) -> Tensor:
        return self.velocity(x.reshape(x.shape[0], *self.shape), t).reshape(x.shape[0], -1)


#: Where ``prediction = "sample"`` reads the time left to the data, 1 - t, as at least this: the
#: velocity stays finite at t = 1, and Euler's last step (t = 1 - 1/k) is exact up to k = 1,000.
SAMPLE_VELOCITY_FLOOR = 1e-3
#: The fixed-step methods whose stages stay short of each step's end (every c < 1): the only ones
#: that integrate the velocity of a head predicting the clean chunk, which is singular at t = 1
#: (there it reads the floor's value, not the limit; Heun's, RK4's and adaptive methods' last
#: stage lands on it).
SAMPLE_PREDICTION_METHODS = tuple(name for name, tableau in TABLEAUS.items() if max(tableau.c) < 1)


def check_sample_prediction_method(method: str, error: type[Exception] = ValueError) -> None:
    """Refuse an integration ``method`` that evaluates a clean-chunk prediction's velocity at t = 1."""
    check_choice("method", method, (*TABLEAUS, *ADAPTIVE_METHODS))
    if method not in SAMPLE_PREDICTION_METHODS:
        raise error(
            f"method = {method!r}: a flow head with prediction = 'sample' reads the velocity "
            "(A - x) / (1 - t), singular at t = 1 where this method evaluates it; use one of "
            + ", ".join(map(repr, SAMPLE_PREDICTION_METHODS))
        )


class _SampleVelocity:
    """The velocity of an expert that predicts the clean chunk (``prediction = "sample"``)."""

    def __init__(self, predict: Callable[[Tensor, Tensor], Tensor], path: LinearPath) -> None:
        self.predict, self.path = predict, path

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        return self.path.data_to_velocity(self.predict(x, t), x, t, sigma_floor=SAMPLE_VELOCITY_FLOOR)


@head("hierarchical")
class HierarchicalFlowHead(PolicyHead):
    """Two flow heads: keyframes first (the policy's expert), then the chunk given them (its own expert).

    Keyframes are actions ``stride - 1, 2 stride - 1, ...`` of the chunk (``stride`` =
    ``keyframe_stride``); each becomes one extra prefix token of the second level (a linear
    embedding plus a learned position).
    """

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.stride = config.keyframe_stride
        keyframes = config.horizon // self.stride
        self.coarse = FlowHead(config)
        self.fine = FlowHead(config)
        self.fine_expert = ActionExpert(
            config.action_dim,
            config.horizon,
            config.width,
            config.layers,
            config.heads,
            time_frequency=config.time_embedding_frequency,
        )
        self.keyframe_embedding = nn.Linear(config.action_dim, config.width)
        self.keyframe_position = nn.Parameter(0.02 * torch.randn(keyframes, config.width))

    @property
    def expert_horizon(self) -> int:
        return self.config.horizon // self.stride

    def keyframes(self, chunk: Tensor) -> Tensor:
        return chunk[:, self.stride - 1 :: self.stride]

    def fine_cache(self, cache: ExpertCache, keyframes: Tensor) -> ExpertCache:
        """The second level's cache: the observation's prefix followed by one token per keyframe."""
        tokens = self.keyframe_embedding(keyframes) + self.keyframe_position
        if cache.uses_cache:
            return self.fine_expert.encode(torch.cat([cache.prefix_tokens(), tokens], dim=1))
        return self.fine_expert.encode(lambda: torch.cat([cache.prefix_tokens(), tokens], dim=1), use_cache=False)

    sampling = FlowHead.sampling

    def loss(self, target: Tensor, cache: ExpertCache, pad: Tensor | None) -> Tensor:
        target = fill_padding(target, pad)  # once: a padded keyframe holds the last real action
        keyframes = self.keyframes(target)
        coarse = self.coarse.filled_loss(keyframes, cache, None if pad is None else self.keyframes(pad))
        return coarse + self.fine.filled_loss(target, self.fine_cache(cache, keyframes), pad)

    def sample(self, cache: ExpertCache, noise: Tensor, *, steps: int, method: str, noise_scale: float) -> Integration:
        """One draw seeds both levels: the first starts from the draw's keyframe steps."""
        settings = {"steps": steps, "method": method, "noise_scale": noise_scale}
        coarse = self.coarse.sample(cache, self.keyframes(noise), **settings)
        fine = self.fine.sample(self.fine_cache(cache, coarse.x), noise, **settings)
        return Integration(fine.x, coarse.nfe + fine.nfe)


@head("shortcut")
class ShortcutHead(FlowHead):
    """A flow head that also learns shortcuts (Frans et al. 2025): the expert reads the step size
    :math:`d` and predicts the average velocity over the step, so 1, 2 or 4 Euler steps sample well.

    Training: ``shortcut_fraction`` of each batch's rows get the self-consistency target
    (:func:`~flowforge.matching.functional.shortcut_loss`), the rest flow matching at :math:`d = 0`.
    Sampling with ``steps = k`` and Euler tells the expert :math:`d = 1/k` (a trained power of two);
    other counts and solvers use the instantaneous velocity (:math:`d = 0`).
    """

    interval = True
    guidable = False

    def filled_loss(self, target: Tensor, cache: ExpertCache, pad: Tensor | None) -> Tensor:
        rows = target.shape[0]
        shortcut_rows = min(max(round(rows * self.config.shortcut_fraction), 1), rows - 1) if rows > 1 else 0
        noise = torch.randn_like(target)
        flow, short = slice(shortcut_rows, rows), slice(0, shortcut_rows)
        kept = _kept(pad)
        t = self.time_sampler(rows - shortcut_rows, device=target.device, dtype=target.dtype)
        flow_cache, short_cache = cache.rows(flow), cache.rows(short)

        def instantaneous(x: Tensor, time: Tensor) -> Tensor:
            return flow_cache.denoise(x, time, torch.zeros_like(time))

        loss = flow_matching_loss(
            instantaneous, noise[flow], target[flow], t, self.path, mask=None if kept is None else kept[flow]
        )
        if not shortcut_rows:
            return loss
        consistency = shortcut_loss(
            short_cache.denoise,
            noise[short],
            target[short],
            self.path,
            max_halvings=self.config.shortcut_halvings,
            mask=None if kept is None else kept[short],
        )
        return (loss * (rows - shortcut_rows) + consistency * shortcut_rows) / rows

    def sample(self, cache: ExpertCache, noise: Tensor, *, steps: int, method: str, noise_scale: float) -> Integration:
        step = shortcut_step(method, steps, self.config.shortcut_halvings)

        def field(x: Tensor, t: Tensor) -> Tensor:
            return cache.denoise(x, t, torch.full_like(t, step))

        return integrate(field, noise_scale * noise, method=method, steps=steps, check_end=False)

    def log_prob(self, chunk: Tensor, cache: ExpertCache, **settings: Any) -> Tensor:
        """The likelihood of the instantaneous field (:math:`d = 0`), as :meth:`FlowHead.log_prob`."""
        return super().log_prob(chunk, _InstantaneousCache(cache), **settings)


class _InstantaneousCache:
    """A cache whose ``denoise(x, t)`` asks an interval expert for the instantaneous velocity (interval 0)."""

    def __init__(self, cache: ExpertCache) -> None:
        self.cache = cache

    def denoise(self, x: Tensor, t: Tensor) -> Tensor:
        return self.cache.denoise(x, t, torch.zeros_like(t))


@head("meanflow")
class MeanFlowHead(FlowHead):
    r"""MeanFlow (Geng et al. 2025): the expert reads a time :math:`s` and a span :math:`h` and predicts
    the average velocity :math:`u` over :math:`[s, s + h]`, trained with the MeanFlow identity
    (:func:`~flowforge.matching.functional.mean_flow_loss`, a Jacobian-vector product through the
    expert), so that one step from noise, :math:`A = \varepsilon + u(\varepsilon, 0, 1)`, samples.

    Times: ``meanflow_fraction`` of each batch's rows get a span: two uniform draws on [0, 1],
    :math:`s` the smaller and :math:`s + h` the larger; the rest :math:`h = 0` (plain flow
    matching, as the paper), also at uniform times. Only the span rows pay for the
    Jacobian-vector product. The flow head's shifted Beta, which favours the noise end, trains the
    spans that reach the data end too rarely: on MT10 (time embedding frequency 4) it gave 86.0%
    at two steps where uniform times give about 94% (one step: about 74% with either).
    The loss is weighted adaptively (``meanflow_adaptive_power``, the paper's :math:`p = 1` by default).
    Sampling with ``steps = k``: :math:`x \leftarrow x + \tfrac1k u(x, i/k, 1/k)`, k evaluations.
    """

    interval = True
    guidable = False
    own_steps = "a meanflow head steps with its average velocity"

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.time_sampler = UniformTime()

    def filled_loss(self, target: Tensor, cache: ExpertCache, pad: Tensor | None) -> Tensor:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        rows = target.shape[0]
        fraction = self.config.meanflow_fraction
        if fraction in (0.0, 1.0):  # plain flow matching, or spans only: as asked
            span_rows = round(rows * fraction)
        else:  # both parts in every batch that has two rows
            span_rows = min(max(round(rows * fraction), 1), rows - 1) if rows > 1 else rows
        first = self.time_sampler(rows, device=target.device, dtype=target.dtype)
        second = self.time_sampler(rows, device=target.device, dtype=target.dtype)
        spanned = torch.arange(rows, device=target.device) < span_rows
        start = torch.where(spanned, torch.minimum(first, second), first)
        span = torch.where(spanned, (first - second).abs(), torch.zeros_like(first))
        noise, kept = torch.randn_like(target), _kept(pad)
        total = target.new_zeros(())
        for part in (slice(0, span_rows), slice(span_rows, rows)):  # the JVP for the span rows alone
            if part.start == part.stop:
                continue
            # The fused attention kernels have no forward-mode derivative: the JVP runs the plain one.
            with sdpa_kernel(SDPBackend.MATH) if part.start == 0 else nullcontext():
                loss = mean_flow_loss(
                    cache.rows(part).denoise,
                    noise[part],
                    target[part],
                    start[part],
                    span[part],
                    self.path,
                    mask=None if kept is None else kept[part],
                    adaptive_power=self.config.meanflow_adaptive_power,
                )
            total = total + loss * (part.stop - part.start)
        return total / rows

    def sample(self, cache: ExpertCache, noise: Tensor, *, steps: int, method: str, noise_scale: float) -> Integration:
        x = noise_scale * noise
        span = torch.full((x.shape[0],), 1.0 / steps, device=x.device, dtype=x.dtype)
        for i in range(steps):
            x = x + span.reshape(-1, 1, 1) * cache.denoise(x, torch.full_like(span, i / steps), span)
        return Integration(x, steps)

    def log_prob(self, chunk: Tensor, cache: ExpertCache, **settings: Any) -> Tensor:
        """The likelihood of the instantaneous field (:math:`h = 0`), as :meth:`FlowHead.log_prob`."""
        return super().log_prob(chunk, _InstantaneousCache(cache), **settings)


@head("consistency")
class ConsistencyHead(FlowHead):
    r"""Consistency flow matching (Yang et al. 2024), as FlowPolicy (Zhang et al. 2024) uses it for
    actions. Time is cut into :math:`S` segments (``consistency_segments``); on the segment that ends
    at :math:`e(t)` the expert's velocity :math:`v` defines the predicted segment end

    .. math:: f(x_t, t) = x_t + (e(t) - t)\,v(x_t, t),

    so :math:`f(x, 1) = x` at the data end by construction (the boundary condition is in the
    parametrisation). Training makes :math:`f` and :math:`v` agree at two times :math:`t` and
    :math:`r = \min(t + \Delta, 1)` of each straight path :math:`x_t = t\,A + (1 - t)\,\varepsilon`,
    the later one held fixed (no gradient) and pointing at the same segment end:

    .. math:: \lVert f(x_t, t) - [x_r + (e(t) - r)\,v(x_r, r)] \rVert^2
              + \alpha\,\lVert v(x_t, t) - v(x_r, r) \rVert^2,

    :math:`t` uniform in [0, 1), :math:`\Delta` = ``consistency_delta``, :math:`\alpha` =
    ``consistency_velocity_weight``. The rows whose :math:`r` is clamped to 1 anchor :math:`f` to the
    demonstrated chunk itself. The first term pulls :math:`v(x_t, t)` a step of
    :math:`(r - t) / (e - t)` from :math:`v(x_r, r)` towards the straight path's velocity
    :math:`A - \varepsilon`; the second holds it at :math:`v(x_r, r)`, so :math:`\alpha` must stay
    far below :math:`(e - t)^2` or the anchors never propagate (with :math:`\alpha = 1` and no clamp
    a head learned no velocity at all: 1% success on MT10). Segments shorten the chain of
    agreements from each anchor. Sampling: Euler steps of :math:`v` from :math:`\tau\varepsilon`, k steps of
    :math:`1/k` (one step: :math:`A = \tau\varepsilon + v(\tau\varepsilon, 0)`).
    """

    guidable = False
    own_steps = "a consistency head samples by its own steps"

    def segment_end(self, t: Tensor) -> Tensor:
        """:math:`e(t)`, the end of the segment that holds ``t`` (a segment's end belongs to it)."""
        segments = self.config.consistency_segments
        return (torch.ceil(t * segments) / segments).clamp(min=1.0 / segments)

    def predicted_chunk(
        self, cache: ExpertCache, x: Tensor, t: Tensor, end: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """:math:`(f(x, t), v(x, t))`, :math:`f` pointing at ``end`` (by default :math:`e(t)`)."""
        v = cache.denoise(x, t)
        end = self.segment_end(t) if end is None else end
        return x + (end - t).reshape(-1, 1, 1) * v, v

    def filled_loss(self, target: Tensor, cache: ExpertCache, pad: Tensor | None) -> Tensor:
        noise = torch.randn_like(target)
        t = torch.rand(target.shape[0], device=target.device, dtype=target.dtype)
        later = (t + self.config.consistency_delta).clamp(max=1.0)
        end = self.segment_end(t)
        x_t, _ = self.path.sample(noise, target, t)
        x_later, _ = self.path.sample(noise, target, later)
        predicted, velocity = self.predicted_chunk(cache, x_t, t, end)
        with torch.no_grad():
            predicted_later, velocity_later = self.predicted_chunk(cache, x_later, later, end)
        error = (predicted - predicted_later).square()
        error = error + self.config.consistency_velocity_weight * (velocity - velocity_later).square()
        return masked_mean(error, _kept(pad))

    def _check_one_segment(self) -> None:
        if self.config.consistency_segments != 1:
            raise ValueError(
                f"consistency_segments = {self.config.consistency_segments}: distillation follows the "
                "teacher's ODE to the data end, which needs one segment"
            )

    def distillation_loss(
        self,
        target: Tensor,
        cache: ExpertCache,
        pad: Tensor | None,
        teacher: Callable[[Tensor, Tensor], Tensor],
        intervals: int,
    ) -> Tensor:
        r"""Consistency distillation (Song et al. 2023) from a flow head's ODE, for one segment.

        ``teacher(x, t)`` is the teacher's velocity for the same observations (its
        :meth:`FlowHead.velocity`). An interval :math:`(t_i, t_{i+1}) = (i/N, (i+1)/N)` of the
        uniform grid of :math:`N` = ``intervals`` is drawn per row, :math:`x_{t_i}` put on the
        straight path to the demonstrated chunk, and one Heun step of the teacher carries it to
        :math:`\hat x_{t_{i+1}}` (on the last interval, for a teacher that predicts the clean chunk,
        whose velocity is singular at 1, an Euler step: it lands on that chunk, as DDIM's last step
        does); the loss makes the consistency function agree at both ends,

        .. math:: \lVert f(x_{t_i}, t_i) - \operatorname{sg} f(\hat x_{t_{i+1}}, t_{i+1}) \rVert^2,

        :math:`f(x, t) = x + (1 - t)\,v(x, t)` (so :math:`f(x, 1) = x`: the last interval anchors
        :math:`f` to the teacher's own step onto the data end). Its fixed point is the teacher's
        ODE map, which one step of this head then follows; the demonstrated chunk only places
        :math:`x_{t_i}` where the teacher's trajectories pass. Padded steps carry no loss.
        """
        self._check_one_segment()
        check_count("intervals", intervals)
        target = fill_padding(target, pad)
        rows = target.shape[0]
        index = torch.randint(0, intervals, (rows,), device=target.device)
        early = index.to(target.dtype) / intervals
        late = (index + 1).to(target.dtype) / intervals
        noisy, _ = self.path.sample(torch.randn_like(target), target, early)
        with torch.no_grad():
            step = (late - early).reshape(-1, 1, 1)
            first = teacher(noisy, early)
            guess = noisy + step * first
            cleaner = noisy + 0.5 * step * (first + teacher(guess, late))
            if isinstance(teacher, _SampleVelocity):  # singular at t = 1: end on its clean chunk
                cleaner = torch.where((late == 1).reshape(-1, 1, 1), guess, cleaner)
            goal, _ = self.predicted_chunk(cache, cleaner, late)
        predicted, _ = self.predicted_chunk(cache, noisy, early)
        return masked_mean((predicted - goal).square(), _kept(pad))

    #: The temperatures of the teacher trajectories' starts in :meth:`trajectory_distillation_loss`
    #: (uniform in this range): one step from a narrowed noise must follow the teacher there too.
    TRAJECTORY_TEMPERATURES = (0.25, 1.0)

    def trajectory_distillation_loss(
        self,
        target: Tensor,
        cache: ExpertCache,
        pad: Tensor | None,
        teacher: Callable[[Tensor, Tensor], Tensor],
        steps: int,
    ) -> Tensor:
        r"""Trajectory distillation (Luhman & Luhman 2021's knowledge distillation, at every point of
        the path): the teacher's velocity ``teacher(x, t)`` is integrated by ``steps`` Euler steps
        from :math:`x_0 = \tau\varepsilon` (:math:`\tau` uniform in :attr:`TRAJECTORY_TEMPERATURES`),
        one grid point :math:`x_{t_k}`, :math:`t_k = k/\text{steps}`, is kept per row, and the
        consistency function regresses the trajectory's end,

        .. math:: \lVert f(x_{t_k}, t_k) - \operatorname{sg} x_1 \rVert^2,

        :math:`f(x, t) = x + (1 - t)\,v(x, t)`. At :math:`k = 0` this is the one-step map itself,
        the teacher's whole sampler in one evaluation; it needs no chain of agreements, so it
        converges as a regression does, for ``steps`` teacher evaluations per row. ``target``
        gives only the shape (and ``pad`` the steps without loss).
        """
        self._check_one_segment()
        check_count("steps", steps)
        rows = target.shape[0]
        low, high = self.TRAJECTORY_TEMPERATURES
        scale = low + (high - low) * torch.rand(rows, 1, 1, device=target.device, dtype=target.dtype)
        kept_step = torch.randint(0, steps, (rows,), device=target.device)
        with torch.no_grad():
            x = scale * torch.randn_like(target)
            start = x
            for k in range(steps):
                t = torch.full((rows,), k / steps, device=target.device, dtype=target.dtype)
                start = torch.where((kept_step == k).reshape(-1, 1, 1), x, start)
                x = x + teacher(x, t) / steps
        predicted, _ = self.predicted_chunk(cache, start, kept_step.to(target.dtype) / steps)
        return masked_mean((predicted - x).square(), _kept(pad))

    # Sampling: FlowHead's, with ``method`` held to Euler by ``own_steps``.


@head("mse")
class RegressionHead(PolicyHead):
    """Deterministic regression of the chunk by learned queries (the MSE baseline): one pass, no noise."""

    queries = True
    samples_from_noise = False

    def sampling(
        self, steps: int | None = None, method: str | None = None, noise_scale: float | None = None
    ) -> Sampling:
        """A regression head has nothing to sample: every override is refused."""
        for name, value in (("steps", steps), ("method", method), ("noise_scale", noise_scale)):
            if value is not None:
                raise ValueError(
                    f"{name} = {value!r}: a regression (mse) policy predicts in one pass and takes no {name}"
                )
        return Sampling(1, "regression", 0.0)

    def loss(self, target: Tensor, cache: ExpertCache, pad: Tensor | None) -> Tensor:
        target = fill_padding(target, pad)
        return masked_mean((cache.denoise(None, None) - target).square(), _kept(pad))

    def sample(self, cache: ExpertCache, noise: Tensor, *, steps: int, method: str, noise_scale: float) -> Integration:
        return Integration(cache.denoise(None, None), 1)


def cosine_alpha_bar(steps: int, offset: float = 0.008, max_beta: float = 0.999) -> Tensor:
    r""":math:`\bar\alpha_k`, k = 1..K, of the cosine schedule (Nichol & Dhariwal 2021), with the
    betas clipped at ``max_beta``."""

    def f(k: Tensor) -> Tensor:
        return torch.cos((k / steps + offset) / (1 + offset) * math.pi / 2) ** 2

    k = torch.arange(steps + 1, dtype=torch.float64)
    betas = (1 - f(k[1:]) / f(k[:-1])).clamp(max=max_beta)
    return torch.cumprod(1 - betas, 0).float()


class DDIMScheduler:
    r"""DDIM (eta = 0) on ``steps`` evenly spaced diffusion steps, from K - 1 down to 0.

    One step keeps the predicted noise and moves the data estimate
    :math:`\hat A = (x - \sqrt{1 - \bar\alpha_k}\,\hat\varepsilon) / \sqrt{\bar\alpha_k}` to the
    next noise level. ``clip``: bound of the data estimate (the training actions lie in [-1, 1]
    with min-max normalisation), or ``None``.
    """

    def __init__(
        self, alpha_bar: Tensor, steps: int, clip: float | None = None, timesteps: list[int] | None = None
    ) -> None:
        check_count("steps", steps, high=len(alpha_bar))
        self.alpha_bar, self.clip = alpha_bar, check_real("clip", clip, positive=True, optional=True)
        #: ``timesteps``: the schedule made before (:meth:`DiffusionHead.sampling` keeps them), so
        #: that sampling reads no value back from a tensor and compiles in one piece.
        self.timesteps = self.schedule(len(alpha_bar), steps) if timesteps is None else timesteps

    @staticmethod
    def schedule(total: int, steps: int) -> list[int]:
        """The ``steps`` diffusion steps visited, evenly spaced from ``total - 1`` down to 0."""
        return torch.linspace(total - 1, 0, steps).round().long().tolist()

    def _levels(self, i: int) -> tuple[Tensor, Tensor]:
        """:math:`\\bar\\alpha` at step ``i`` of the schedule and at the step after it (1 past the end)."""
        alpha_bar = self.alpha_bar[self.timesteps[i]]
        last = i + 1 == len(self.timesteps)
        return alpha_bar, torch.ones_like(alpha_bar) if last else self.alpha_bar[self.timesteps[i + 1]]

    def data_estimate(self, x: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
        data = (x - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
        return data if self.clip is None else data.clamp(-self.clip, self.clip)

    def step(self, x: Tensor, eps: Tensor, i: int) -> Tensor:
        """``x`` at step ``i`` of :attr:`timesteps` to the next noise level, given the predicted noise."""
        alpha_bar, previous = self._levels(i)
        data = self.data_estimate(x, eps, alpha_bar)
        eps = (x - alpha_bar.sqrt() * data) / (1 - alpha_bar).sqrt()
        return previous.sqrt() * data + (1 - previous).sqrt() * eps


class DDPMScheduler(DDIMScheduler):
    r"""The ancestral DDPM chain over every training step: each step draws from the posterior
    :math:`q(x_{k-1} \mid x_k, \hat A)` with the current data estimate :math:`\hat A`; the last
    step returns the estimate itself. It always runs all K steps: ``steps`` is not read."""

    @staticmethod
    def schedule(total: int, steps: int) -> list[int]:
        return list(range(total - 1, -1, -1))

    def step(self, x: Tensor, eps: Tensor, i: int) -> Tensor:
        alpha_bar, previous = self._levels(i)
        data = self.data_estimate(x, eps, alpha_bar)
        if i + 1 == len(self.timesteps):
            return data
        beta = 1 - alpha_bar / previous
        mean = (previous.sqrt() * beta * data + (1 - beta).sqrt() * (1 - previous) * x) / (1 - alpha_bar)
        variance = beta * (1 - previous) / (1 - alpha_bar)
        return mean + variance.sqrt() * torch.randn_like(x)


#: Diffusion samplers by ``method``.
SCHEDULERS: dict[str, type[DDIMScheduler]] = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}


@head("ddpm")
class DiffusionHead(PolicyHead):
    """DDPM training with DDPM or DDIM sampling (the diffusion baseline; see the module docstring)."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        # Derived from the config, so not saved: a checkpoint carries only what training learned.
        self.register_buffer("alpha_bar", cosine_alpha_bar(config.diffusion_steps), persistent=False)
        # Each (method, steps)'s diffusion steps, made once by sampling(), outside any compiled region.
        self._schedules: dict[tuple[str, int], list[int]] = {}

    def sampling(
        self, steps: int | None = None, method: str | None = None, noise_scale: float | None = None
    ) -> Sampling:
        """``steps``: DDIM steps (``inference_steps`` by default; DDPM always runs every training
        step); ``method``: ``"ddim"`` or ``"ddpm"`` (``sampler`` by default). No temperature."""
        config = self.config
        if noise_scale is not None:
            raise ValueError(f"noise_scale = {noise_scale!r}: only the flow policies take a sampling temperature")
        method = config.sampler if method is None else method
        check_choice("method", method, tuple(SCHEDULERS))
        given = steps is not None
        steps = config.inference_steps if steps is None else steps
        if not is_count(steps, 1, config.diffusion_steps):
            raise ValueError(f"steps must be an int in 1..{config.diffusion_steps} (the training steps), got {steps!r}")
        if method == "ddpm" and given and steps != config.diffusion_steps:
            raise ValueError(
                f"steps = {steps!r}: DDPM sampling runs every one of the {config.diffusion_steps} training steps; "
                "use the DDIM sampler for fewer (method='ddim', or sampler = 'ddim' in the policy config)"
            )
        steps = config.diffusion_steps if method == "ddpm" else int(steps)
        if (method, steps) not in self._schedules:
            self._schedules[method, steps] = SCHEDULERS[method].schedule(config.diffusion_steps, steps)
        return Sampling(steps, method, 1.0)

    def loss(self, target: Tensor, cache: ExpertCache, pad: Tensor | None) -> Tensor:
        target = fill_padding(target, pad)
        total = self.config.diffusion_steps
        k = torch.randint(0, total, (target.shape[0],), device=target.device)
        alpha_bar = self.alpha_bar[k][:, None, None]
        noise = torch.randn_like(target)
        noisy = alpha_bar.sqrt() * target + (1 - alpha_bar).sqrt() * noise
        predicted = cache.denoise(noisy, (k + 1).to(target.dtype) / total)
        return masked_mean((predicted - noise).square(), _kept(pad))

    def sample(self, cache: ExpertCache, noise: Tensor, *, steps: int, method: str, noise_scale: float) -> Integration:
        clip = 1.5 if self.config.action_normalization == "min_max" else None  # a little room around [-1, 1]
        scheduler = SCHEDULERS[method](self.alpha_bar, steps, clip, self._schedules.get((method, steps)))
        total = self.config.diffusion_steps
        x = noise
        for i, k in enumerate(scheduler.timesteps):
            t = torch.full((x.shape[0],), (k + 1) / total, device=x.device, dtype=x.dtype)
            x = scheduler.step(x, cache.denoise(x, t), i)
        return Integration(x, len(scheduler.timesteps))


__all__ = [
    "EXACT_TRACE_LIMIT",
    "GUIDANCE_JACOBIANS",
    "HEAD_CATEGORY",
    "RTC_SCHEDULES",
    "SCHEDULERS",
    "ChunkGuide",
    "ChunkPrefix",
    "ConsistencyHead",
    "DDIMScheduler",
    "DDPMScheduler",
    "DiffusionHead",
    "FlowHead",
    "HierarchicalFlowHead",
    "MeanFlowHead",
    "PolicyHead",
    "RegressionHead",
    "Sampling",
    "ShortcutHead",
    "cosine_alpha_bar",
    "fill_padding",
    "head",
    "rtc_weights",
]
