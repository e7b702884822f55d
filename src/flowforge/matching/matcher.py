r"""Flow matching: train a velocity field by regression, sample it as an ODE or SDE, evaluate its density.

Conditional flow matching (Lipman et al. 2023; Liu et al. 2023; Albergo & Vanden-Eijnden 2023)
regresses a network :math:`v_\theta(x, t, c)` onto the velocity of a conditional path,

.. math:: \mathcal L(\theta) = \mathbb E_{t,\ (x_0, x_1) \sim \pi,\ c}\,
          \big\| v_\theta(x_t, t, c) - u_t(x_0, x_1) \big\|^2,

where the path (:mod:`flowforge.matching.paths`) gives :math:`x_t, u_t`, the coupling
(:mod:`flowforge.matching.couplings`) gives the joint :math:`\pi` of noise and data, and the time
sampler (:mod:`flowforge.matching.time`) the law of :math:`t`. The minimiser is the marginal
velocity, whose ODE carries :math:`\mathcal N(0, I)` at :math:`t = 0` to the data at :math:`t = 1`.

**Classifier-free guidance** (Ho & Salimans 2022): with ``context_dropout = p`` the context of
each training row is replaced, with probability p, by a learned null context; at sampling,
:math:`\tilde v = v(x, t, \varnothing) + w\,(v(x, t, c) - v(x, t, \varnothing))`, so ``w = 1`` is
the conditional model and ``w > 1`` sharpens it. Both velocities come from one batched call.

**Sample shapes** follow :class:`flowforge.flows.Flow`: ``sample(n)`` is ``(n, *event)``, and
with a context of batch B, ``sample(n, context)`` is ``(n, B, *event)`` (``(n, 0, *event)`` for B = 0).

**Inputs** follow the input rule of :mod:`flowforge.validation`: floating-point ``x1``, ``x0``,
``t``, ``x`` and ``context`` of another dtype than the model's are cast to the model's dtype on
entry (results come back in it), integer tensors are refused with a ``TypeError``, every tensor and
setting (``steps``, ``method``, ``atol``, ``rtol``, ``guidance_scale``, ``noise_scale``) is checked
once where it enters, never inside the solver loop; ``log_prob`` of 0 rows is an empty ``(0,)``
tensor, ``loss`` of 0 rows a ``ValueError``.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Sequence
from itertools import chain
from math import prod

import torch
from torch import Tensor, nn

from flowforge.distributions import StandardNormal
from flowforge.matching.couplings import Coupling, IndependentCoupling
from flowforge.matching.functional import flow_matching_loss, integrate
from flowforge.matching.paths import AffinePath, LinearPath, _expand
from flowforge.matching.time import TimeSampler, UniformTime
from flowforge.ode import ButcherTableau, FixedStepSolve, sdeint, solver_settings
from flowforge.registry import Rebuildable, refuse_unread, register
from flowforge.transforms.continuous import ContinuousFlowTransform
from flowforge.validation import (
    check_batched,
    check_count,
    check_dropout,
    check_real,
    check_sample_count,
    check_times,
    model_dtype,
)


class _FlatVelocity(nn.Module):
    """The (possibly guided) velocity on flattened events: what the CNF machinery integrates."""

    def __init__(self, matcher: FlowMatcher, guidance_scale: float | None) -> None:
        super().__init__()
        self.matcher = matcher
        self.guidance_scale = guidance_scale

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None) -> Tensor:
        event = x.reshape(x.shape[0], *self.matcher.event_shape)
        return self.matcher._velocity(event, t, context, self.guidance_scale).reshape(x.shape[0], -1)


#: marks a solve signature met once and not yet traced.
_SEEN_ONCE = object()
#: traced fixed-step solves, per velocity network and solve signature (``None``: not traceable).
_TRACED: weakref.WeakKeyDictionary[nn.Module, dict[tuple, Callable | None]] = weakref.WeakKeyDictionary()


def _traced_solve(
    net: nn.Module, tableau: ButcherTableau, steps: int, h: float, inputs: tuple[Tensor, ...]
) -> Callable | None:
    """The fixed-step solve around ``net`` (:class:`~flowforge.ode.FixedStepSolve`) traced to
    TorchScript for inputs shaped like ``inputs`` = ``(x0, stage times[, context])``, or ``None``
    when tracing fails or the trace disagrees with the eager solve on fresh inputs (a network with
    Python control flow on values, say).

    A signature is traced when it comes back (its first solve runs eagerly): a trace costs several
    solves (a U-Net's unrolled 10-step solve at batch 1,438: 116 s traced against 20 s eager), which
    only repeated solves, a control loop's, earn back; a one-off draw never pays it.

    The trace shares the network's parameters, so in-place updates (an optimizer,
    ``load_state_dict``) reach it; the key holds the parameters' identities and the train/eval
    mode, so replacing a parameter or switching modes traces again.
    """
    key = (
        tableau.name,
        steps,
        h,
        tuple((tuple(a.shape), a.dtype, a.device) for a in inputs),
        net.training,
        tuple(id(p) for p in net.parameters()),
    )
    cache = _TRACED.setdefault(net, {})
    if key not in cache:
        if len(cache) >= 8:  # a few signatures in use at once (a control loop, an evaluation batch)
            cache.pop(next(iter(cache)))
        cache[key] = _SEEN_ONCE
        return None
    if cache[key] is _SEEN_ONCE:
        cache[key] = _trace(FixedStepSolve(net, tableau, steps, h), inputs)
    return cache[key]


def _trace(solve: nn.Module, inputs: tuple[Tensor, ...]) -> Callable | None:
    # Two probes: fresh noise, and the example mirrored (a branch on a sign flips on it). Tracing
    # and probing leave the caller's random state as it was: a seeded sample is the same either way.
    example = inputs[0]
    generator = torch.Generator(device=example.device).manual_seed(0)
    noise = torch.randn(example.shape, generator=generator, dtype=example.dtype, device=example.device)
    probes = [(noise, *inputs[1:]), (-example, *inputs[1:])]
    devices = [example.device] if example.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings: the probes below are the real check
            traced = torch.jit.trace(solve, inputs, check_trace=False)
            faithful = all(torch.allclose(traced(*probe), solve(*probe), rtol=1e-5, atol=1e-6) for probe in probes)
    except Exception:  # any network tracing cannot follow is sampled eagerly instead
        return None
    # The script's own forward: a trace has no hooks, so the module call machinery is skipped.
    return traced.forward if faithful else None


class _SamplingField:
    """``f(x, t)`` for the solvers, and two shortcuts for a fixed-step solve over a known time grid:

    * ``solve_on_grid``: without gradients, guidance or extra network inputs, a solve that repeats runs
      as one TorchScript trace of the step loop around the network (:func:`_traced_solve`), which
      removes the Python work of every step and module call: what dominates a small network at a
      small batch (a control loop). A trace is checked against the eager loop on two probes (fresh
      noise, the example mirrored) and dropped if they disagree; a network that branches in Python
      on its inputs' values in ways such probes may miss should opt out with
      ``FlowMatcher.trace_fixed_steps = False``.
    * ``on_grid``: a network that offers ``time_conditioning`` (``VelocityMLP``) precomputes the
      time features of every stage.
    """

    def __init__(
        self, matcher: FlowMatcher, context: Tensor | None, guidance_scale: float | None, net_inputs: dict
    ) -> None:
        self.matcher, self.context, self.guidance_scale, self.net_inputs = matcher, context, guidance_scale, net_inputs
        conditioning = getattr(matcher.velocity, "time_conditioning", None)
        if conditioning is None or guidance_scale is not None or set(net_inputs) - {"step"}:
            self.on_grid = None
        if guidance_scale is not None or net_inputs or not matcher.trace_fixed_steps:
            self.solve_on_grid = None

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        return self.matcher._velocity(x, t, self.context, self.guidance_scale, **self.net_inputs)

    def on_grid(self, times: Tensor) -> Callable[[Tensor, int], Tensor]:
        return self.matcher.velocity.time_conditioning(times, self.context, **self.net_inputs)

    def solve_on_grid(self, x0: Tensor, times: Tensor, h: float, steps: int, tableau: ButcherTableau) -> Tensor | None:
        # Under torch.compile the solve is traced by the compiler itself: a TorchScript function
        # would break its graph.
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return None
        stage_times = times.unsqueeze(1).expand(-1, x0.shape[0])
        inputs = (x0, stage_times) if self.context is None else (x0, stage_times, self.context)
        solve = _traced_solve(self.matcher.velocity, tableau, steps, h, inputs)
        return None if solve is None else solve(*inputs)


@register("flow-matching")
class FlowMatcher(Rebuildable, nn.Module):
    """A velocity network with the path, coupling and time law it is trained with.

    Arguments:
        velocity: ``net(x, t, context=None) -> v`` (the velocity-field contract).
        path: the probability path (default :class:`~flowforge.matching.LinearPath`).
        coupling: noise-data pairing (default :class:`~flowforge.matching.IndependentCoupling`).
        time_sampler: the law of the training time (default uniform).
        event_shape: shape of one sample; taken from ``velocity.features`` when omitted (and, when
            the network has that attribute, it must agree).
        context: size of the context vector; taken from ``velocity.context_features`` when omitted
            (the same rule).
        context_dropout: probability of training a row with the null context (classifier-free
            guidance needs it > 0).

    Inputs follow the input rule of :mod:`flowforge.validation` (other float dtypes are cast to the
    model's, integer tensors refused, every argument checked on entry).

    >>> import torch
    >>> from flowforge.nn import VelocityMLP
    >>> matcher = FlowMatcher(VelocityMLP(2, hidden=(16,)))
    >>> loss = matcher.loss(torch.randn(8, 2))
    >>> loss.shape, matcher.sample(5, steps=4).shape
    (torch.Size([]), torch.Size([5, 2]))
    """

    def __init__(
        self,
        velocity: nn.Module,
        path: AffinePath | None = None,
        coupling: Coupling | None = None,
        time_sampler: TimeSampler | None = None,
        *,
        event_shape: int | Sequence[int] | None = None,
        context: int | None = None,
        context_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value, kind in (
            ("velocity", velocity, nn.Module),
            ("path", path, AffinePath),
            ("coupling", coupling, Coupling),
            ("time_sampler", time_sampler, TimeSampler),
        ):
            if (value is not None or name == "velocity") and not isinstance(value, kind):
                article = "an" if kind.__name__[0] in "AEIOU" else "a"
                raise TypeError(f"{name} must be {article} {kind.__name__} (an object, not a name), got {value!r}")
        self.velocity = velocity
        self.path = path if path is not None else LinearPath()
        self.coupling = coupling if coupling is not None else IndependentCoupling()
        self.time_sampler = time_sampler if time_sampler is not None else UniformTime()
        net_features = getattr(velocity, "features", None)
        if event_shape is None:
            event_shape = net_features
            if event_shape is None:
                raise ValueError("give event_shape: the velocity network has no `features` attribute to infer it from")
        self.base = StandardNormal(event_shape)
        self.event_shape = tuple(self.base.event_shape)
        if net_features is not None and tuple(StandardNormal(net_features).event_shape) != self.event_shape:
            raise ValueError(f"event_shape = {event_shape!r}: the velocity network's features are {net_features!r}")
        net_context = getattr(velocity, "context_features", None)
        if context is not None:
            context = check_count("context", context, low=0)
        if context is not None and net_context is not None and context != net_context:
            raise ValueError(
                f"context = {context}: the velocity network takes a context of {net_context}; build the network "
                f"with context={context}, or leave context out"
            )
        self.context_features = int(context if context is not None else (net_context or 0))  # Python int
        context_dropout = check_dropout("context_dropout", context_dropout)
        if context_dropout and not self.context_features:
            raise ValueError("context_dropout needs a conditional model (context > 0)")
        self.context_dropout = float(context_dropout)
        if not self.context_features and hasattr(self.coupling, "per_condition"):
            why = "an unconditional model has no conditions to pair noise within"
            refuse_unread(type(self.coupling), {"per_condition": self.coupling.per_condition}, why)
        self.null_context = nn.Parameter(torch.zeros(self.context_features)) if context_dropout else None
        anchor = next((p for p in chain(velocity.parameters(), velocity.buffers()) if p.is_floating_point()), None)
        if anchor is not None:  # the noise and the null context in the network's dtype and on its device
            self.base.to(device=anchor.device, dtype=anchor.dtype)
            if self.null_context is not None:
                self.null_context.data = self.null_context.data.to(device=anchor.device, dtype=anchor.dtype)

    # ------------------------------------------------------------------ checks
    def _check(self, name: str, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``x`` and ``context`` checked and cast to the model's dtype (the input rule)."""
        dtype = model_dtype(self)
        x = check_batched(name, x, self.event_shape, finite=True, dtype=dtype)
        if self.context_features:
            if context is None:
                raise ValueError(f"this model is conditional: pass a context of shape (batch, {self.context_features})")
            context = check_batched(
                "context", context, (self.context_features,), batch=x.shape[0], batch_of=name, finite=True, dtype=dtype
            )
        elif context is not None:
            raise ValueError("this model takes no context (context=0); got one")
        return x, context

    def _check_context(self, context: Tensor | None) -> Tensor | None:
        if self.context_features:
            if context is None:
                raise ValueError(f"this model is conditional: pass a context of shape (B, {self.context_features})")
            return check_batched("context", context, (self.context_features,), finite=True, dtype=model_dtype(self))
        if context is not None:
            raise ValueError("this model takes no context (context=0); got one")
        return None

    def _check_guidance(self, guidance_scale: object, context: Tensor | None) -> float | None:
        guidance_scale = check_real("guidance_scale", guidance_scale, optional=True)
        if guidance_scale is not None and not self.context_features:
            raise ValueError(f"guidance_scale = {guidance_scale}: guidance needs a conditional model; pass None")
        if guidance_scale is not None and context is not None and self.null_context is None:
            raise ValueError(
                "guidance needs a model trained with context_dropout > 0 (it learns the null context); got "
                f"guidance_scale={guidance_scale}, pass guidance_scale=None"
            )
        return guidance_scale

    # ------------------------------------------------------------------ training
    def loss(
        self,
        x1: Tensor,
        context: Tensor | None = None,
        *,
        x0: Tensor | None = None,
        t: Tensor | None = None,
    ) -> Tensor:
        """The flow-matching loss on a data batch ``x1`` (batch, *event): mean squared velocity error.

        Arguments:
            x1: data.
            context: condition per row (batch, context), for a conditional model.
            x0: noise already paired with ``x1`` (reflow pairs); when given the coupling is skipped.
            t: training times (batch,) in [0, 1]; drawn from the time sampler when omitted.

        Raises:
            ValueError: ``x1`` has 0 rows (the mean of nothing), or a tensor has the wrong shape,
                holds NaN or inf, or ``t`` leaves [0, 1].
            TypeError: an argument is not a floating-point tensor.
        """
        x1, context, x0, t = self._loss_inputs(x1, context, x0, t)
        if t is None:
            t = self.time_sampler(x1.shape[0], device=x1.device, dtype=x1.dtype)
        context = self._drop_context(context)
        return flow_matching_loss(lambda x, time: self.velocity(x, time, context), x0, x1, t, self.path)

    def _loss_inputs(
        self, x1: Tensor, context: Tensor | None, x0: Tensor | None, t: Tensor | None
    ) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        """Check a training batch, cast it to the model's dtype and pair ``x1`` with noise: drawn and
        coupled, or the given ``x0``. Returns ``(x1, context, x0, t)``."""
        x1, context = self._check("x1", x1, context)
        if x1.shape[0] == 0:
            raise ValueError(
                f"x1 has 0 rows (shape {tuple(x1.shape)}): the loss is a mean over rows and needs at least one"
            )
        if t is not None:
            t = check_times("t", t, batch=x1.shape[0], batch_of="x1", dtype=x1.dtype)
        if x0 is None:
            return x1, context, self.coupling(torch.randn_like(x1), x1, context), t
        x0 = check_batched("x0", x0, self.event_shape, batch=x1.shape[0], batch_of="x1", finite=True, dtype=x1.dtype)
        return x1, context, x0, t

    def _dropped_rows(self, context: Tensor | None) -> Tensor | None:
        """Which rows train with the null context, (batch, 1) bool; ``None`` when none can."""
        if context is None or not self.context_dropout or not self.training:
            return None
        return torch.rand(context.shape[0], 1, device=context.device) < self.context_dropout

    def _drop_context(self, context: Tensor | None, dropped: Tensor | None = None) -> Tensor | None:
        """``context`` with the null context on the ``dropped`` rows (drawn when not given)."""
        if dropped is None:
            dropped = self._dropped_rows(context)
        if dropped is None:
            return context
        return torch.where(dropped, self.null_context.to(context.dtype), context)

    # ------------------------------------------------------------------ velocity
    def velocity_at(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor | None = None,
        guidance_scale: float | None = None,
        **net_inputs: Tensor | float,
    ) -> Tensor:
        r"""The model's velocity; with ``guidance_scale = w``, :math:`v_\varnothing + w (v_c - v_\varnothing)`.

        Arguments:
            x: states (batch, *event).
            t: times (batch,) in [0, 1], or one time (a number or 0-dim tensor) for every row.
            context: (batch, context) for a conditional model.
            guidance_scale: classifier-free guidance weight (None: the plain conditional model).
            net_inputs: passed to the network as keywords (the step size of a shortcut model).

        Everything is checked and cast on entry (:mod:`flowforge.validation`); the solvers call the
        unchecked field instead.
        """
        x, context = self._check("x", x, context)
        if not isinstance(t, Tensor):
            t = torch.full((x.shape[0],), check_real("t", t), device=x.device, dtype=x.dtype)
        elif t.dim() == 0:
            t = t.expand(x.shape[0])
        t = check_times("t", t, batch=x.shape[0], batch_of="x", dtype=x.dtype)
        guidance_scale = self._check_guidance(guidance_scale, context)
        return self._velocity(x, t, context, guidance_scale, **net_inputs)

    def _velocity(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor | None = None,
        guidance_scale: float | None = None,
        **net_inputs: Tensor | float,
    ) -> Tensor:
        """:meth:`velocity_at` without the checks: what the solvers call at every stage."""
        if guidance_scale is None or context is None:
            return self.velocity(x, t, context, **net_inputs)
        if self.null_context is None:
            raise ValueError("guidance needs a model trained with context_dropout > 0 (it learns the null context)")
        null = self.null_context.to(context.dtype).expand_as(context)
        doubled = {k: torch.cat([v, v]) if isinstance(v, Tensor) and v.dim() else v for k, v in net_inputs.items()}
        both = self.velocity(torch.cat([x, x]), torch.cat([t, t]), torch.cat([context, null]), **doubled)
        conditional, unconditional = both.chunk(2)
        return unconditional + guidance_scale * (conditional - unconditional)

    # ------------------------------------------------------------------ sampling
    def _noise_and_context(
        self, n: int, context: Tensor | None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor | None, tuple[int, ...]]:
        """Noise for ``n`` draws (per context row), the context repeated to match, the output shape.
        With a context of 0 rows the noise is empty: the samplers return it without a solve. With a
        ``generator`` the noise is drawn from it (the global random state is left as it was)."""
        n = check_sample_count(n)
        context = self._check_context(context)
        rows = n if context is None else n * context.shape[0]
        shape = (n, *self.event_shape) if context is None else (n, context.shape[0], *self.event_shape)
        if rows == 0:
            return self.base.sample(1)[:0], context, shape
        if generator is None:
            x0 = self.base.sample(rows)  # on the model's device and dtype (the base holds a buffer)
        else:
            # any base distribution draws from the global state: seed a private copy of it from the generator
            devices = {
                tensor.device for tensor in (*self.parameters(), *self.buffers()) if tensor.device.type == "cuda"
            }
            with torch.random.fork_rng(devices=list(devices)):
                torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator, device=generator.device)))
                x0 = self.base.sample(rows)
        if context is not None:
            context = context.repeat(n, 1)  # draw-major: rows i*B .. i*B+B-1 are draw i
        return x0, context, shape

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
        """Differentiable samples: integrate the ODE from noise (t = 0) to data (t = 1).

        Arguments:
            n: draws (per context row).
            context: (B, context) for a conditional model.
            steps: steps of a fixed-step method, default 10 (the NFE is ``steps`` x stages of ``method``).
            method: ``"euler"``, ``"midpoint"``, ``"heun"``, ``"rk4"`` or an adaptive method
                (``"dopri5"``, ...; then ``atol``/``rtol`` apply and ``steps`` is refused).
            guidance_scale: classifier-free guidance weight (None: the plain conditional model).
            atol, rtol: tolerances of an adaptive method (finite, > 0; default 1e-5); refused with
                a fixed-step one.

        Every argument is checked here, once (:func:`~flowforge.ode.solver_settings`).
        """
        steps, atol, rtol = solver_settings(method, steps, atol, rtol)
        x0, context, shape = self._noise_and_context(n, context)
        guidance_scale = self._check_guidance(guidance_scale, context)
        if x0.shape[0] == 0:
            self.last_nfe = 0
            return x0.reshape(shape)
        field = self.sampling_field(context, guidance_scale, method, steps)
        result = integrate(field, x0, method=method, steps=steps, atol=atol, rtol=rtol)
        self.last_nfe = result.nfe
        return result.x.reshape(shape)

    def sampling_field(
        self, context: Tensor | None, guidance_scale: float | None, method: str, steps: int | None
    ) -> Callable[[Tensor, Tensor], Tensor]:
        """The field ``f(x, t)`` the ODE sampler integrates (a few-step model also uses the step size;
        ``steps`` is None for an adaptive method)."""
        return _SamplingField(self, context, guidance_scale, {})

    @torch.no_grad()
    def sample(
        self,
        n: int,
        context: Tensor | None = None,
        steps: int | None = None,
        method: str = "euler",
        guidance_scale: float | None = None,
        atol: float | None = None,
        rtol: float | None = None,
    ) -> Tensor:
        """Samples from the ODE, without gradients; arguments as :meth:`rsample`."""
        return self.rsample(n, context, steps, method, guidance_scale, atol, rtol)

    @torch.no_grad()
    def sample_sde(
        self,
        n: int,
        context: Tensor | None = None,
        steps: int = 100,
        noise_scale: float = 1.0,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        r"""Samples from an SDE with the same marginals as the ODE (Euler-Maruyama).

        For any diffusion :math:`g_t`, :math:`dx = [v(x, t) + \tfrac12 g_t^2 \nabla\log p_t(x)]\,dt
        + g_t\, dW` has the marginals :math:`p_t` of the ODE (the score comes from the velocity,
        :meth:`AffinePath.velocity_to_score`). Here :math:`g_t = \text{noise\_scale}\cdot\sigma_t`,
        which vanishes at the data end where the score is singular, so
        :math:`\tfrac12 g_t^2 \nabla\log p_t = -\tfrac12\,\text{noise\_scale}^2\,\sigma_t\,\hat x_0`
        stays finite. ``noise_scale = 0`` is the Euler ODE sampler. ``steps`` (a positive int) and
        ``noise_scale`` (finite, >= 0) are checked here, once. ``generator`` draws both the starting
        noise and the Brownian increments: the same seed gives the same samples.
        """
        check_count("steps", steps)
        noise_scale = check_real("noise_scale", noise_scale, non_negative=True)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        x0, context, shape = self._noise_and_context(n, context, generator)
        guidance_scale = self._check_guidance(guidance_scale, context)
        if x0.shape[0] == 0:
            self.last_nfe = 0
            return x0.reshape(shape)
        path = self.path

        def drift(x: Tensor, t: Tensor) -> Tensor:
            v = self._velocity(x, t, context, guidance_scale)
            if noise_scale == 0:
                return v
            sigma = _expand(path.schedule(t)[1], x)
            return v - 0.5 * noise_scale**2 * sigma * path.velocity_to_noise(v, x, t)

        def diffusion(x: Tensor, t: Tensor) -> Tensor:
            return noise_scale * _expand(path.schedule(t)[1], x)

        x = sdeint(drift, diffusion, x0, (0.0, 1.0), steps, generator=generator)
        self.last_nfe = steps  # one drift evaluation (one velocity) per step
        return x.reshape(shape)

    # ------------------------------------------------------------------ likelihood
    def log_prob(
        self,
        x: Tensor,
        context: Tensor | None = None,
        trace: str = "exact",
        method: str = "dopri5",
        steps: int | None = None,
        atol: float | None = None,
        rtol: float | None = None,
        guidance_scale: float | None = None,
    ) -> Tensor:
        r"""Log-density of the model's ODE at ``x`` (batch, *event), by the instantaneous change of variables.

        Integrates :math:`(x, \ell)` from data (t = 1) back to noise (t = 0) with
        :math:`\dot\ell = \nabla\!\cdot v` (:class:`~flowforge.transforms.ContinuousFlowTransform`);
        ``trace="exact"`` or ``"hutchinson"`` (unbiased, one Rademacher probe per solve). ``steps``
        (default 50) for a fixed-step ``method``, ``atol``/``rtol`` (default 1e-5) for an adaptive
        one; the other kind is refused. Every argument is checked here, once; ``x`` of 0 rows gives
        an empty ``(0,)`` tensor.
        """
        steps, atol, rtol = solver_settings(method, steps, atol, rtol, default_steps=50)
        x, context = self._check("x", x, context)
        guidance_scale = self._check_guidance(guidance_scale, context)
        features = prod(self.event_shape)
        # The transform checks trace as it is built.
        transform = ContinuousFlowTransform(
            _FlatVelocity(self, guidance_scale), features, self.context_features, trace, method, steps, atol, rtol
        )
        if x.shape[0] == 0:
            self.last_nfe = 0
            return x.new_zeros(0)
        z, logabsdet = transform(x.reshape(x.shape[0], features), context)
        self.last_nfe = transform.last_nfe
        return self.base.log_prob(z.reshape(x.shape)) + logabsdet

    #: network evaluations of the most recent sample or log_prob call.
    last_nfe: int = 0
    #: fixed-step sampling without gradients runs as a TorchScript trace of the step loop (checked
    #: against the eager loop on fresh inputs; see ``_SamplingField``). ``False``: always eager.
    trace_fixed_steps: bool = True

    def extra_repr(self) -> str:
        return (
            f"event_shape={self.event_shape}, context={self.context_features}, path={self.path!r}, "
            f"coupling={self.coupling!r}, time_sampler={self.time_sampler!r}, context_dropout={self.context_dropout}"
        )


__all__ = ["FlowMatcher"]
