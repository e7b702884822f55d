r"""Consistency models (Song et al. 2023; Song & Dhariwal 2023) on flowforge's paths and time convention.

A consistency function maps any point of an ODE trajectory to the trajectory's data end,
:math:`f(x_t, t) = x_1`. Here it is built from a velocity network :math:`F_\theta(x, t, c)`,

.. math:: f_\theta(x, t) = x + (1 - t)\, F_\theta(x, t),

so :math:`f_\theta(x, 1) = x` exactly: the boundary condition is in the parametrisation, and
:math:`F` reads as the average velocity from :math:`t` to the data.

**Discretisation.** With :math:`x_t = t\,x_1 + (1 - t)\,x_0` (the linear path),
:math:`x_t / t = x_1 + \sigma\, x_0` with :math:`\sigma = (1 - t)/t`: the variance-exploding noise
level of the EDM papers. A grid of :math:`N` intervals is :math:`t_0 = 0 < t_1 < \dots < t_N = 1`,
its interior :math:`t_j = 1/(1 + \sigma_j)` at the Karras levels :math:`\sigma_j` from
``sigma_max`` down to ``sigma_min`` (exponent ``rho``).

**Consistency training** (``loss``, no teacher; the improved recipe of Song & Dhariwal 2023): draw
an interval :math:`(t_i, t_{i+1})` with the lognormal weights
:math:`p(i) \propto \operatorname{erf}\frac{\ln\sigma(t_i) - P_m}{\sqrt2 P_s}
- \operatorname{erf}\frac{\ln\sigma(t_{i+1}) - P_m}{\sqrt2 P_s}`, put one noise draw at both
ends, and minimise

.. math:: \lambda_i\, d\big(f_\theta(x_{t_i}, t_i),\ \operatorname{sg} f_\theta(x_{t_{i+1}}, t_{i+1})\big),
          \qquad d(a, b) = \sqrt{\lVert a - b\rVert^2 + c^2} - c,

the pseudo-Huber distance (:math:`c = 0.00054\sqrt{\dim}` by default), :math:`\lambda_i =
1/(t_{i+1} - t_i)`, the stop-gradient target from the same network (no EMA teacher). The
curriculum doubles :math:`N` from ``initial_intervals`` to ``final_intervals`` in equal stages
over ``total_steps`` training steps (a step counter is kept as a buffer, so resumed training
continues the curriculum).

**Consistency distillation** (``distillation_loss``, Song et al. 2023): intervals of a fixed grid
of ``distillation_intervals``, drawn uniformly; the less noisy point is one Heun step of a trained
:class:`~flowforge.matching.FlowMatcher`'s ODE from the noisier one; the squared distance with
weight 1, as the original distillation. (The training recipe's pseudo-Huber distance and
:math:`1/(t_{i+1} - t_i)` weight starve the wide middle intervals here: on 8gaussians the one-step
map of a distilled MLP missed the teacher's ODE map by 1.22 on average with them, against 0.17
with this loss.)

**Sampling** (``sample(n, steps=k)``): :math:`x \leftarrow f(x_0, 0)`; for :math:`k > 1`, multistep
consistency sampling re-noises the estimate to :math:`t_i = i/k` with fresh noise,
:math:`x_{t_i} = t_i\,x + (1 - t_i)\,\varepsilon`, and applies :math:`f` again: k evaluations.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from itertools import chain
from typing import Any, NoReturn

import torch
from torch import Tensor, nn

from flowforge.matching.matcher import FlowMatcher
from flowforge.matching.paths import LinearPath, _expand
from flowforge.matching.time import UniformTime
from flowforge.ode import solver_settings
from flowforge.registry import register
from flowforge.validation import check_count, check_real, model_dtype

#: How a consistency model is distilled from a flow teacher: ``"consistency"`` (the student's values at
#: adjacent grid times agree, the later one through one teacher step) or ``"trajectory"`` (regressed
#: onto the end of the teacher's own ODE trajectory); the policy heads offer both.
DISTILLATION_METHODS = ("consistency", "trajectory")


def karras_times(intervals: int, sigma_min: float, sigma_max: float, rho: float) -> Tensor:
    """The grid :math:`0 = t_0 < \\dots < t_N = 1` (float64): interior points at the Karras levels."""
    interior = intervals - 1
    if interior < 1:
        return torch.tensor([0.0, 1.0], dtype=torch.float64)
    ramp = torch.linspace(0.0, 1.0, interior, dtype=torch.float64)
    low, high = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigma = (high + ramp * (low - high)) ** rho  # sigma_max down to sigma_min
    return torch.cat([torch.zeros(1, dtype=torch.float64), 1 / (1 + sigma), torch.ones(1, dtype=torch.float64)])


def lognormal_interval_weights(times: Tensor, mean: float, std: float) -> Tensor:
    """The probability of each interval of ``times`` under a lognormal law of :math:`\\sigma = (1-t)/t`."""
    log_sigma = torch.log((1 - times) / times)  # +inf at t = 0, -inf at t = 1
    cdf = torch.erf((log_sigma - mean) / (math.sqrt(2) * std))
    weights = cdf[:-1] - cdf[1:]
    return weights / weights.sum()


def _check_teacher(teacher: object) -> None:
    """A teacher is a flow whose ODE runs on the student's path: the linear one with sigma_min = 0."""
    if not isinstance(teacher, FlowMatcher) or isinstance(teacher, ConsistencyMatcher):
        raise TypeError(f"teacher must be a trained FlowMatcher (an ODE to follow), got {type(teacher).__name__}")
    if type(teacher.path) is not LinearPath or teacher.path.sigma_min != 0:
        raise ValueError(
            f"the teacher's path is {teacher.path!r}: a consistency student follows the ODE of the linear path "
            "with sigma_min = 0 (its network reads as a velocity of that path), so only such a teacher can teach it"
        )


@register("consistency")
class ConsistencyMatcher(FlowMatcher):
    """A consistency model, trained from scratch (``loss``) or distilled from a flow matcher.

    Arguments:
        velocity: ``net(x, t, context=None) -> F`` (the velocity-field contract).
        args, matcher_options: the other arguments of :class:`FlowMatcher` (coupling,
            context_dropout, ...). The path is the linear one (the parametrisation assumes it).
            Consistency sampling takes no guidance, so ``context_dropout`` > 0 acts only as a
            regulariser here: the null context it trains is never sampled from.
        total_steps: training steps the curriculum spans.
        initial_intervals, final_intervals: the curriculum's first and last N (powers of two apart).
        sigma_min, sigma_max, rho: the Karras grid.
        time_mean, time_std: the lognormal law of sigma that weighs the intervals.
        huber_constant: c of the pseudo-Huber distance; ``None``: :math:`0.00054\\sqrt{\\dim}`.
        distillation_intervals: N of the fixed grid of distillation.

    >>> import torch
    >>> from flowforge.nn import VelocityMLP
    >>> model = ConsistencyMatcher(VelocityMLP(2, hidden=(16,)), total_steps=100)
    >>> model.loss(torch.randn(8, 2)).shape, model.sample(3, steps=2).shape
    (torch.Size([]), torch.Size([3, 2]))
    """

    def __init__(
        self,
        velocity: nn.Module,
        *args: Any,
        total_steps: int = 10_000,
        initial_intervals: int = 10,
        final_intervals: int = 1280,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        time_mean: float = -1.1,
        time_std: float = 2.0,
        huber_constant: float | None = None,
        distillation_intervals: int = 18,
        **matcher_options: Any,
    ) -> None:
        super().__init__(velocity, *args, **matcher_options)
        if type(self.path) is not LinearPath or self.path.sigma_min != 0:
            raise ValueError(f"a consistency model uses the linear path with sigma_min = 0; got path={self.path!r}")
        if not isinstance(self.time_sampler, UniformTime):
            raise ValueError(
                f"time_sampler = {self.time_sampler!r}: a consistency model draws its times on its Karras grid, "
                "weighted by time_mean and time_std; leave time_sampler out"
            )
        self.total_steps = check_count("total_steps", total_steps)
        self.initial_intervals = check_count("initial_intervals", initial_intervals)
        self.final_intervals = check_count("final_intervals", final_intervals)
        ratio, rest = divmod(self.final_intervals, self.initial_intervals)
        if rest or ratio & (ratio - 1):  # the curriculum doubles N in equal stages: a power of two apart
            raise ValueError(
                f"final_intervals ({final_intervals}) must be initial_intervals ({initial_intervals}) times a power "
                "of two (the curriculum doubles the intervals, e.g. 10 and 1280)"
            )
        self.sigma_min = check_real("sigma_min", sigma_min, positive=True)
        self.sigma_max = check_real("sigma_max", sigma_max, positive=True)
        if self.sigma_max <= self.sigma_min:
            raise ValueError(f"sigma_max ({sigma_max}) must exceed sigma_min ({sigma_min})")
        self.rho = check_real("rho", rho, positive=True)
        self.time_mean = check_real("time_mean", time_mean)
        self.time_std = check_real("time_std", time_std, positive=True)
        self.huber_constant = check_real("huber_constant", huber_constant, positive=True, optional=True)
        self.distillation_intervals = check_count("distillation_intervals", distillation_intervals)
        # Persistent: a resumed run continues the curriculum where it stopped.
        self.register_buffer("training_step", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------ the consistency function
    def consistency_function(self, x: Tensor, t: Tensor, context: Tensor | None = None) -> Tensor:
        """:math:`f(x, t) = x + (1 - t) F(x, t)`, unchecked (``t`` of shape (batch,))."""
        return x + _expand(1 - t, x) * self.velocity(x, t, context)

    def intervals(self, step: int | None = None) -> int:
        """N at a training step (default: the current one): doubling from the initial to the final N."""
        step = int(self.training_step) if step is None else check_count("step", step, low=0)
        doublings = math.floor(math.log2(self.final_intervals / self.initial_intervals))
        stage_length = max(self.total_steps // (doublings + 1), 1)
        return min(self.initial_intervals * 2 ** (step // stage_length), self.final_intervals)

    def _pair_times(self, rows: int, intervals: int, like: Tensor, weighted: bool) -> tuple[Tensor, Tensor]:
        times = karras_times(intervals, self.sigma_min, self.sigma_max, self.rho)
        if weighted:
            probabilities = lognormal_interval_weights(times, self.time_mean, self.time_std)
            index = torch.multinomial(probabilities, rows, replacement=True)
        else:
            index = torch.randint(0, intervals, (rows,))
        times = times.to(device=like.device, dtype=like.dtype)
        index = index.to(like.device)
        return times[index], times[index + 1]

    def _distance(self, a: Tensor, b: Tensor) -> Tensor:
        """Pseudo-Huber distance per row."""
        squared = (a - b).flatten(1).square().sum(1)
        c = self.huber_constant if self.huber_constant is not None else 0.00054 * math.sqrt(a[0].numel())
        return (squared + c * c).sqrt() - c

    # ------------------------------------------------------------------ training
    def loss(
        self,
        x1: Tensor,
        context: Tensor | None = None,
        *,
        x0: Tensor | None = None,
        t: Tensor | None = None,
    ) -> Tensor:
        """Consistency training (improved recipe) on a data batch; arguments as :meth:`FlowMatcher.loss`
        except ``t``, which a consistency model draws on its grid (passing one is a ``ValueError``)."""
        if t is not None:
            raise ValueError("a consistency model draws its times on its discretisation grid; pass t=None")
        x1, context, x0, _ = self._loss_inputs(x1, context, x0, None)
        context = self._drop_context(context)
        early, late = self._pair_times(x1.shape[0], self.intervals(), x1, weighted=True)
        if self.training:
            self.training_step += 1
        noisy = self.path.sample(x0, x1, early)[0]
        cleaner = self.path.sample(x0, x1, late)[0]
        with torch.no_grad():
            target = self.consistency_function(cleaner, late, context)
        prediction = self.consistency_function(noisy, early, context)
        return (self._distance(prediction, target) / (late - early)).mean()

    @classmethod
    def distilled_from(cls, teacher: FlowMatcher, **options: Any) -> ConsistencyMatcher:
        r"""A student for :meth:`distillation_loss` that starts as ``teacher``'s one-step map.

        Its network is a copy of the teacher's velocity network, so at the start
        :math:`f(x, t) = x + (1 - t)\,v(x, t)`: one Euler step of the teacher to the data end.
        Distillation then only has to bend that jump onto the ODE's map, as Song et al. (2023)
        start from the pretrained model (on 8 gaussians, 3,000 steps, W2 of one-step samples 0.30
        against 0.36 from a fresh network). ``options``: the other arguments of the constructor;
        the coupling, context size and context dropout default to the teacher's.
        """
        _check_teacher(teacher)
        options = {
            "coupling": teacher.coupling,
            "event_shape": teacher.event_shape,
            "context": teacher.context_features,
            "context_dropout": teacher.context_dropout,
            **options,
        }
        student = cls(copy.deepcopy(teacher.velocity), **options)
        if student.null_context is not None and teacher.null_context is not None:
            with torch.no_grad():
                student.null_context.copy_(teacher.null_context)
        anchor = next(chain(teacher.parameters(), teacher.buffers()), None)
        device = anchor.device if anchor is not None else None
        return student.to(device=device, dtype=model_dtype(teacher))

    def distillation_loss(
        self,
        x1: Tensor,
        teacher: FlowMatcher,
        context: Tensor | None = None,
        *,
        x0: Tensor | None = None,
    ) -> Tensor:
        """Consistency distillation from ``teacher``'s ODE: the less noisy end of each interval is one
        Heun step of the teacher's velocity from the noisier one (no gradient through the teacher);
        the mean squared distance between the two ends' consistency functions."""
        _check_teacher(teacher)
        x1, context, x0, _ = self._loss_inputs(x1, context, x0, None)
        if tuple(teacher.event_shape) != self.event_shape:
            raise ValueError(f"the teacher's event shape {teacher.event_shape} is not this model's {self.event_shape}")
        if teacher.context_features != self.context_features:
            raise ValueError(
                f"the teacher takes a context of {teacher.context_features}, this model {self.context_features}: "
                "distil from a teacher with the same condition"
            )
        if model_dtype(teacher) != model_dtype(self):
            raise ValueError(
                f"the teacher is {model_dtype(teacher)}, this model {model_dtype(self)}: cast one to the other's dtype"
            )
        teacher_context = context
        context = self._drop_context(context)
        early, late = self._pair_times(x1.shape[0], self.distillation_intervals, x1, weighted=False)
        noisy = self.path.sample(x0, x1, early)[0]
        with torch.no_grad():
            step = _expand(late - early, noisy)
            first = teacher._velocity(noisy, early, teacher_context)
            guess = noisy + step * first
            cleaner = noisy + 0.5 * step * (first + teacher._velocity(guess, late, teacher_context))
            target = self.consistency_function(cleaner, late, context)
        prediction = self.consistency_function(noisy, early, context)
        return (prediction - target).flatten(1).square().sum(1).mean()

    # ------------------------------------------------------------------ sampling
    def rsample(
        self,
        n: int,
        context: Tensor | None = None,
        steps: int | None = None,
        method: str = "euler",
        guidance_scale: float | None = None,
        atol: float | None = None,
        rtol: float | None = None,
    ) -> Tensor:
        """Differentiable samples: one evaluation of :math:`f` from noise, or ``steps`` (default 1)
        evaluations of multistep consistency sampling (step i re-noises the estimate to
        :math:`t = i/k` with fresh noise paired to it by the model's coupling, as in training, and
        applies :math:`f` again). ``method`` must be ``"euler"`` (the only way this model steps) and
        ``guidance_scale`` ``None``; ``atol``/``rtol``, in the common signature, are refused, as for
        any fixed-step method."""
        if method != "euler":
            raise ValueError(f"a consistency model samples by its own steps: method must be 'euler', got {method!r}")
        steps = solver_settings(method, steps, atol, rtol, default_steps=1)[0]
        if guidance_scale is not None:
            raise ValueError(f"a consistency model samples without guidance; got guidance_scale={guidance_scale}")
        x0, context, shape = self._noise_and_context(n, context)
        self.last_nfe = 0
        if x0.shape[0] == 0:
            return x0.reshape(shape)
        t = torch.zeros(x0.shape[0], device=x0.device, dtype=x0.dtype)
        x = self.consistency_function(x0, t, context)
        for i in range(1, steps):
            t = torch.full_like(t, i / steps)
            # Re-noise as training paired noise with data: through the model's coupling. With an OT
            # coupling, independent noise gives inputs it never saw, and every step made samples worse.
            noise = self.coupling(torch.randn_like(x), x, context)
            x = self.consistency_function(self.path.sample(noise, x, t)[0], t, context)
        self.last_nfe = steps
        return x.reshape(shape)

    def log_prob(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """Refused: a consistency function maps noise to data in jumps and defines no density; a
        :class:`FlowMatcher` or :class:`~flowforge.matching.MeanFlowMatcher` (its instantaneous field)
        gives one."""
        raise ValueError(
            "a consistency model has no tractable density (its map from noise to data is not an ODE flow); "
            "use a FlowMatcher or MeanFlowMatcher for log_prob"
        )

    def _no_velocity(self, what: str) -> NoReturn:
        raise ValueError(
            f"{what}: a consistency model's network maps a noisy point to the data end; it is not a velocity "
            "field, so there is no ODE or SDE to solve with it; sample with sample(n, steps=k)"
        )

    def velocity_at(self, *args: Any, **kwargs: Any) -> Tensor:
        """Refused: the network is not a velocity (see :meth:`sampling_field`)."""
        self._no_velocity("velocity_at")

    def sample_sde(self, *args: Any, **kwargs: Any) -> Tensor:
        """Refused: there is no velocity, so no SDE with the ODE's marginals."""
        self._no_velocity("sample_sde")

    def sampling_field(self, *args: Any, **kwargs: Any) -> Callable[[Tensor, Tensor], Tensor]:
        """Refused: an ODE solve (reflow pairs, straightness) would read :math:`F` as a velocity."""
        self._no_velocity("an ODE solve")

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, total_steps={self.total_steps}, intervals={self.initial_intervals}.."
            f"{self.final_intervals}, sigma=[{self.sigma_min}, {self.sigma_max}], rho={self.rho}, "
            f"time=lognormal({self.time_mean}, {self.time_std}), huber_constant={self.huber_constant}, "
            f"distillation_intervals={self.distillation_intervals}"
        )


__all__ = ["DISTILLATION_METHODS", "ConsistencyMatcher", "karras_times", "lognormal_interval_weights"]
