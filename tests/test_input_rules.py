"""The input rule of :mod:`flowforge.validation` across flows, CNFs and matchers.

Other float dtypes are cast to the model's dtype on entry (same numbers as casting by hand, result
in the model's dtype); integer tensors are refused with a TypeError naming the argument (integer
counts are the data of ``Dequantized.log_prob``); empty batches give empty results or a ValueError;
every sampler, loss and constructor argument is checked where it enters.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from flowforge.flows import CNF, MAF, NSF, Dequantized, RealNVP
from flowforge.matching import ConsistencyMatcher, FlowMatcher, LinearPath, ShortcutMatcher
from flowforge.nn import VelocityMLP
from flowforge.transforms.continuous import ContinuousFlowTransform

NAN, INF = float("nan"), float("inf")


def _matcher(context: int = 0, dropout: float = 0.0) -> FlowMatcher:
    torch.manual_seed(0)
    return FlowMatcher(VelocityMLP(2, context=context, hidden=(8,), time_embedding=4), context_dropout=dropout)


def _shortcut() -> ShortcutMatcher:
    torch.manual_seed(0)
    return ShortcutMatcher(VelocityMLP(2, hidden=(8,), time_embedding=4, step_input=True))


def _same_random(fn, seed: int = 1):
    torch.manual_seed(seed)
    return fn()


# ------------------------------------------------------------------ dtypes: cast on entry
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.float64])
def test_flow_casts_other_float_dtypes(model_dtype: torch.dtype) -> None:
    other = torch.float64 if model_dtype == torch.float32 else torch.float32
    torch.manual_seed(0)
    flow = RealNVP(2, context=3, transforms=2).to(model_dtype)
    x, c = torch.randn(5, 2, dtype=other), torch.randn(5, 3, dtype=other)
    out = flow.log_prob(x, c)
    assert out.dtype == model_dtype
    torch.testing.assert_close(out, flow.log_prob(x.to(model_dtype), c.to(model_dtype)), rtol=0, atol=0)
    assert flow.sample(2, c).dtype == model_dtype
    torch.testing.assert_close(
        _same_random(lambda: flow.rsample(2, c)), _same_random(lambda: flow.rsample(2, c.to(model_dtype)))
    )
    samples, log_prob = _same_random(lambda: flow.sample_and_log_prob(2, c))
    assert samples.dtype == log_prob.dtype == model_dtype


def test_cnf_casts_float64_input() -> None:
    torch.manual_seed(0)
    flow = CNF(2, hidden=(8,), method="rk4", steps=3)
    x = torch.randn(4, 2, dtype=torch.float64)
    out = flow.log_prob(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, flow.log_prob(x.float()), rtol=0, atol=0)
    lp, _, _ = flow.log_prob_and_regularization(x)
    torch.testing.assert_close(lp, out)


def test_matcher_casts_float64_inputs() -> None:
    matcher = _matcher(context=3)
    x1, c = torch.randn(6, 2, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    x0, t = torch.randn(6, 2, dtype=torch.float64), torch.rand(6, dtype=torch.float64)
    loss = matcher.loss(x1, c, x0=x0, t=t)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, matcher.loss(x1.float(), c.float(), x0=x0.float(), t=t.float()), rtol=0, atol=0)
    # drawn noise and times follow the model's dtype, so the same seed gives the same loss
    torch.testing.assert_close(
        _same_random(lambda: matcher.loss(x1, c)), _same_random(lambda: matcher.loss(x1.float(), c.float()))
    )
    v = matcher.velocity_at(x1, t, c)
    assert v.dtype == torch.float32
    torch.testing.assert_close(v, matcher.velocity_at(x1.float(), t.float(), c.float()), rtol=0, atol=0)
    lp = matcher.log_prob(x1, c, method="rk4", steps=3)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp, matcher.log_prob(x1.float(), c.float(), method="rk4", steps=3), rtol=0, atol=0)
    for sampler in (
        lambda context: matcher.sample(2, context, steps=3),
        lambda context: matcher.rsample(2, context, steps=3),
        lambda context: matcher.sample_sde(2, context, steps=3),
    ):
        out = _same_random(lambda: sampler(c))  # noqa: B023 - called right here
        assert out.dtype == torch.float32
        # The repeated fixed-step solve runs as a trace (see _traced_solve): equal to rounding.
        torch.testing.assert_close(out, _same_random(lambda: sampler(c.float())))  # noqa: B023


def test_float64_matcher_casts_float32_inputs() -> None:
    matcher = _matcher().double()
    x1, t = torch.randn(5, 2), torch.rand(5)
    loss = matcher.loss(x1, t=t, x0=torch.randn(5, 2))
    assert loss.dtype == torch.float64
    assert matcher.log_prob(x1, method="euler", steps=2).dtype == torch.float64


def test_shortcut_casts_float64_inputs() -> None:
    model = _shortcut()
    x1, x0 = torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    t = torch.rand(8, dtype=torch.float64)
    loss = _same_random(lambda: model.loss(x1, x0=x0, t=t))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, _same_random(lambda: model.loss(x1.float(), x0=x0.float(), t=t.float())))


# ------------------------------------------------------------------ integers
def test_dequantized_takes_integer_counts() -> None:
    torch.manual_seed(0)
    model = Dequantized(RealNVP(4, transforms=2), levels=5)
    k = torch.randint(0, 5, (6, 4))
    for counts in (k, k.to(torch.uint8)):
        out = _same_random(lambda: model.log_prob(counts))  # noqa: B023
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, _same_random(lambda: model.log_prob(k.float())))
    with pytest.raises(ValueError, match=r"k must hold integers in 0\.\.4: k\[0, 0\] is 5\.0"):
        model.log_prob(k.clamp(max=0) + torch.tensor([5, 0, 0, 0]))
    with pytest.raises(ValueError, match=r"k must hold integers in 0\.\.4: k\[0, 1\] is nan"):
        model.log_prob(torch.tensor([[0.0, float("nan"), 0.0, 0.0]]))
    with pytest.raises(TypeError, match="k must hold counts"):
        model.log_prob(k.bool())


def test_integer_inputs_are_refused_naming_the_argument() -> None:
    flow = RealNVP(2, context=3, transforms=1)
    with pytest.raises(TypeError, match=r"x must be a floating-point tensor, got dtype torch\.int64"):
        flow.log_prob(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 3))
    with pytest.raises(TypeError, match="context must be a floating-point tensor"):
        flow.sample(2, torch.zeros(2, 3, dtype=torch.long))
    matcher = _matcher(context=3)
    x1, c = torch.randn(4, 2), torch.randn(4, 3)
    with pytest.raises(TypeError, match="x1 must be a floating-point"):
        matcher.loss(x1.long(), c)
    with pytest.raises(TypeError, match="context must be a floating-point"):
        matcher.loss(x1, c.long())
    with pytest.raises(TypeError, match="x0 must be a floating-point"):
        matcher.loss(x1, c, x0=x1.long())
    with pytest.raises(TypeError, match="t must be a floating-point"):
        matcher.loss(x1, c, t=torch.zeros(4, dtype=torch.long))


# ------------------------------------------------------------------ empty batches
def test_cnf_log_prob_of_no_rows_is_empty() -> None:
    flow = CNF(2, hidden=(8,))  # adaptive dopri5: an empty state used to underflow the step size
    out = flow.log_prob(torch.zeros(0, 2))
    assert out.shape == (0,) and out.dtype == torch.float32
    assert flow.log_prob_and_regularization(torch.zeros(0, 2))[0].shape == (0,)


def test_matcher_log_prob_of_no_rows_is_empty() -> None:
    out = _matcher().log_prob(torch.zeros(0, 2))
    assert out.shape == (0,) and out.dtype == torch.float32


@pytest.mark.parametrize("model", [_matcher, _shortcut])
def test_loss_of_no_rows_is_refused(model) -> None:
    with pytest.raises(ValueError, match="x1 has 0 rows"):
        model().loss(torch.zeros(0, 2))


def test_sampling_for_no_context_rows_is_empty() -> None:
    matcher = _matcher(context=3)
    c = torch.zeros(0, 3)
    assert matcher.sample(2, c, steps=2).shape == (2, 0, 2)
    assert matcher.sample(2, c, method="dopri5").shape == (2, 0, 2)
    assert matcher.sample_sde(2, c, steps=2).shape == (2, 0, 2)
    flow = RealNVP(2, context=3, transforms=1)
    assert flow.sample(2, c).shape == (2, 0, 2)
    x, log_prob = flow.sample_and_log_prob(2, c)
    assert x.shape == (2, 0, 2) and log_prob.shape == (2, 0)


# ------------------------------------------------------------------ loss arguments
@pytest.mark.parametrize("model", [_matcher, _shortcut])
def test_loss_arguments_are_checked(model) -> None:
    m, x1 = model(), torch.randn(4, 2)
    with pytest.raises(ValueError, match="x0 contains NaN or inf"):
        m.loss(x1, x0=torch.full((4, 2), NAN))
    with pytest.raises(ValueError, match=r"t must hold times in \[0, 1\].*nan"):
        m.loss(x1, t=torch.full((4,), NAN))
    with pytest.raises(ValueError, match=r"t must hold times in \[0, 1\].*1\.5"):
        m.loss(x1, t=torch.full((4,), 1.5))
    with pytest.raises(ValueError, match=r"t must hold times in \[0, 1\].*-0\.1"):
        m.loss(x1, t=torch.full((4,), -0.1))
    with pytest.raises(ValueError, match=r"t must have shape \(4,\).*got 3"):
        m.loss(x1, t=torch.full((3,), 0.5))
    with pytest.raises(ValueError, match=r"t must have shape \(batch,\)"):
        m.loss(x1, t=torch.full((4, 1), 0.5))


def test_velocity_at_checks_its_arguments() -> None:
    matcher = _matcher()
    x = torch.randn(3, 2)
    assert matcher.velocity_at(x, 0.5).shape == (3, 2)
    with pytest.raises(ValueError, match=r"t must hold times in \[0, 1\]"):
        matcher.velocity_at(x, torch.full((3,), 2.0))
    with pytest.raises(ValueError, match=r"t must have shape \(3,\)"):
        matcher.velocity_at(x, torch.full((2,), 0.5))
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        matcher.velocity_at(torch.full((3, 2), NAN), torch.full((3,), 0.5))


# ------------------------------------------------------------------ sampler arguments
@pytest.mark.parametrize("steps", [0, -1, 2.5, True, "4"])
def test_steps_must_be_a_positive_int_for_every_sampler(steps) -> None:
    matcher, shortcut = _matcher(), _shortcut()
    x = torch.randn(2, 2)
    for call in (
        lambda: matcher.sample(2, steps=steps),
        lambda: matcher.rsample(2, steps=steps),
        lambda: matcher.sample_sde(2, steps=steps),
        lambda: matcher.log_prob(x, method="rk4", steps=steps),
        lambda: shortcut.sample(2, steps=steps),
        lambda: shortcut.sample_sde(2, steps=steps),
    ):
        with pytest.raises(ValueError, match=f"steps must be a positive int, got {steps!r}"):
            call()


def test_method_must_be_a_known_solver() -> None:
    for call in (
        lambda: _matcher().sample(2, method="eulr"),
        lambda: _shortcut().sample(2, method="eulr"),
        lambda: _matcher().log_prob(torch.randn(2, 2), method="eulr"),
    ):
        with pytest.raises(ValueError, match=r"unknown method 'eulr'; choose one of .*'euler'"):
            call()


@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_guidance_and_noise_scales_must_be_finite(value: float) -> None:
    matcher = _matcher(context=3, dropout=0.2)
    c = torch.randn(2, 3)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        matcher.sample(1, c, steps=2, guidance_scale=value)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        matcher.sample_sde(1, c, steps=2, guidance_scale=value)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        matcher.log_prob(torch.randn(2, 2), c, method="euler", steps=2, guidance_scale=value)
    with pytest.raises(ValueError, match="noise_scale must be a finite number >= 0"):
        matcher.sample_sde(1, c, steps=2, noise_scale=value)
    with pytest.raises(TypeError, match="guidance_scale must be a finite number or None"):
        matcher.sample(1, c, steps=2, guidance_scale="2")


def test_guidance_without_a_null_context_is_refused_on_entry() -> None:
    with pytest.raises(ValueError, match=r"guidance needs a model trained with context_dropout.*guidance_scale=2\.0"):
        _matcher(context=3).sample(1, torch.randn(2, 3), steps=2, guidance_scale=2.0)


@pytest.mark.parametrize("name", ["atol", "rtol"])
@pytest.mark.parametrize("value", [0.0, -1e-5, NAN, INF])
def test_sampler_tolerances_must_be_finite_and_positive(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"{name} must be a finite number > 0"):
        _matcher().sample(2, method="dopri5", **{name: value})


def test_shortcut_sample_steps_are_checked() -> None:
    model = _shortcut()
    with pytest.raises(ValueError, match="steps must be a positive int, got 0"):
        model.sample(2, steps=0)
    with pytest.raises(ValueError, match=r"steps must be a positive int, got 2\.5"):
        model.sample(2, steps=2.5)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        model.step_input_for("euler", 0)
    assert model.sample(2, steps=1).shape == (2, 2)


# ------------------------------------------------------------------ constructors
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"method": "rk4", "steps": 0}, "steps must be a positive int, got 0"),
        ({"method": "rk4", "steps": 2.5}, "steps must be a positive int, got 2.5"),
        ({"steps": 20}, "steps = 20: method 'dopri5' chooses its own steps"),
        ({"method": "rk4", "atol": 1e-5}, "atol = 1e-05: method 'rk4' takes equal steps and reads no tolerance"),
        ({"method": "euler", "rtol": 1e-3}, "rtol = 0.001: method 'euler' takes equal steps"),
        ({"atol": 0.0}, "atol must be a finite number > 0, got 0.0"),
        ({"rtol": NAN}, "rtol must be a finite number > 0, got nan"),
        ({"atol": INF}, "atol must be a finite number > 0, got inf"),
        ({"method": "rk5"}, "unknown method 'rk5'"),
        ({"trace": "approx"}, "trace must be 'exact' or 'hutchinson', got 'approx'"),
    ],
)
def test_cnf_arguments_are_checked_at_construction(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        CNF(2, hidden=(4,), **options)
    with pytest.raises(ValueError, match=re.escape(message)):
        ContinuousFlowTransform(VelocityMLP(2, hidden=(4,)), 2, **options)


def test_constructor_types_are_checked() -> None:
    with pytest.raises(TypeError, match="atol must be a finite number"):
        CNF(2, hidden=(4,), atol="1e-5")
    with pytest.raises(ValueError, match="features must be a positive int"):
        ContinuousFlowTransform(VelocityMLP(2, hidden=(4,)), 0)


def test_fixed_step_sampling_still_works_with_checks() -> None:
    matcher = _matcher()
    assert math.isfinite(float(matcher.sample(3, steps=2, method="rk4").sum()))
    assert matcher.sample(3, method="dopri5", atol=1e-3, rtol=1e-3).shape == (3, 2)


# ------------------------------------------------------------------ the newer families' arguments
def _net(**options) -> VelocityMLP:
    return VelocityMLP(2, hidden=(8,), time_embedding=4, **options)


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda: FlowMatcher(_net(), context=3), ValueError, "context = 3: the velocity network takes a context of 0"),
        (lambda: FlowMatcher(_net(), context=True), ValueError, "context must be an int >= 0"),
        (lambda: FlowMatcher(_net(), event_shape=3), ValueError, "event_shape = 3: the velocity network's features"),
        (lambda: FlowMatcher(_net(), event_shape=2.5), ValueError, "event shape must be a positive int"),
        (lambda: FlowMatcher(_net(), path="linear"), TypeError, "path must be an AffinePath"),
        (lambda: FlowMatcher(_net(), coupling="ot"), TypeError, "coupling must be a Coupling"),
        (lambda: FlowMatcher("net"), TypeError, "velocity must be a Module"),
        (lambda: FlowMatcher(None, event_shape=2), TypeError, "velocity must be a Module"),
        (lambda: FlowMatcher(_net(), context_dropout="0.1"), TypeError, "context_dropout must be a finite number"),
        (
            lambda: ShortcutMatcher(_net(step_input=True), max_halvings=21),
            ValueError,
            "max_halvings must be an int in 1..20",
        ),
        (
            lambda: ShortcutMatcher(_net(step_input=True), self_consistency_fraction="0.5"),
            TypeError,
            "self_consistency_fraction must be a finite number",
        ),
        (
            lambda: ConsistencyMatcher(_net(), initial_intervals=10, final_intervals=15),
            ValueError,
            "final_intervals (15) must be initial_intervals (10) times a power of two",
        ),
        (
            lambda: ConsistencyMatcher(_net(), path=LinearPath(0.1)),
            ValueError,
            "a consistency model uses the linear path with sigma_min = 0",
        ),
    ],
)
def test_matcher_constructors_refuse_what_would_misbehave_later(build, error: type, message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        build()


def test_guidance_on_an_unconditional_model_is_refused() -> None:
    with pytest.raises(ValueError, match="guidance needs a conditional model"):
        _matcher().sample(2, steps=2, guidance_scale=2.0)


def test_distillation_refuses_a_teacher_of_another_condition_or_dtype() -> None:
    student = ConsistencyMatcher(_net())
    with pytest.raises(ValueError, match="the teacher takes a context of 3, this model 0"):
        student.distillation_loss(torch.randn(4, 2), FlowMatcher(_net(context=3)))
    with pytest.raises(ValueError, match=r"the teacher is torch\.float64, this model torch\.float32"):
        student.distillation_loss(torch.randn(4, 2), FlowMatcher(_net()).double())


def test_vae_latent_inputs_are_checked() -> None:
    from flowforge.flows import VAE

    vae = VAE(4, 2, hidden=(8,), likelihood="gaussian")
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match=re.escape("z must have shape (..., 2), got (3, 5)")):
        vae.prior_log_prob(torch.randn(3, 5))
    with pytest.raises(ValueError, match="z must be finite"):
        vae.prior_log_prob(torch.full((3, 2), NAN))
    with pytest.raises(ValueError, match="z must be finite"):
        vae.log_likelihood(x, torch.full((1, 3, 2), NAN))
    with pytest.raises(TypeError, match="z must be a floating-point tensor"):
        vae.log_likelihood(x, torch.zeros(1, 3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="eps contains NaN or inf"):
        vae.posterior(x, torch.full((1, 3, 2), NAN))
    assert vae.prior_log_prob(torch.zeros(5, 3, 2)).shape == (5, 3)


def test_quality_against_nfe_checks_its_arguments_before_sampling() -> None:
    from flowforge.eval.metrics import quality_against_nfe

    model = _matcher()
    calls = []

    def metric(samples: torch.Tensor) -> float:
        calls.append(1)
        return 0.0

    for options, message in (
        ({"steps": 4}, "steps must be a list of step counts"),
        ({"steps": (1, 2.5)}, "steps must hold ints in 1..1000"),
        ({"adaptive": "foo"}, "adaptive = 'foo' is not one of dopri5"),
        ({"seed": 2**70}, "seed = "),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            quality_against_nfe(model, metric, 8, **options)
    assert calls == []  # refused before the first point was drawn
    with pytest.raises(FloatingPointError, match="metric gave nan"):
        quality_against_nfe(model, lambda samples: NAN, 8, steps=(1,), adaptive=None)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"features": (1, 8, 8.7)}, "features must be an image shape (C, H, W) of positive ints"),
        ({"channel_multipliers": (1, 1.5)}, "channel_multipliers must be one or more positive ints"),
        ({"context": True}, "context must be an int >= 0, got True"),
        ({"blocks": 1.5}, "blocks must be a positive int, got 1.5"),
        ({"time_embedding": 2.0}, "time_embedding must be an int >= 0, got 2.0"),
        ({"attention": "no"}, "attention must be true or false, got 'no'"),
        ({"step_input": "yes"}, "step_input must be true or false, got 'yes'"),
    ],
)
def test_unet_constructor_refuses_values_it_would_round_or_reinterpret(options: dict, message: str) -> None:
    from flowforge.nn import UNetVelocity

    settings = {"features": (1, 8, 8), "channels": 8, "groups": 4, **options}
    with pytest.raises(ValueError, match=re.escape(message)):
        UNetVelocity(**settings)


def test_unet_forward_casts_x_and_checks_t_and_step() -> None:
    from flowforge.nn import UNetVelocity

    net = UNetVelocity((1, 8, 8), channels=8, groups=4, step_input=True)
    x = torch.randn(2, 1, 8, 8)
    assert net(x.double(), torch.rand(2)).dtype == torch.float32
    with pytest.raises(
        ValueError, match=re.escape("t must have shape (2,) (a tensor: one time per sample), got float")
    ):
        net(x, 0.5)
    with pytest.raises(ValueError, match=re.escape("step must have shape () or (2,), got (3,)")):
        net(x, torch.rand(2), step=torch.rand(3))
    with pytest.raises(ValueError, match="step must be a finite step size >= 0"):
        net(x, torch.rand(2), step=NAN)


def test_adjoint_with_a_fixed_step_method_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="adjoint = True needs an adaptive method; method 'rk4' takes fixed steps"):
        CNF(2, hidden=(4,), method="rk4", adjoint=True)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: RealNVP(2, seed=3), "seed = 3: no permutation is drawn (2 features, 8 couplings"),
        (lambda: RealNVP(4, transforms=2, seed=3), "seed = 3: no permutation is drawn (4 features, 2 couplings"),
        (lambda: NSF(4, seed=1), "seed = 1: autoregressive layers draw no permutation"),
        (lambda: NSF(4, autoregressive=False, residual=True), "residual = True: coupling layers"),
        (lambda: NSF(4, autoregressive=False, mixing="lu"), "mixing = 'lu': coupling layers"),
        (lambda: MAF(3, hidden=(16,), residual=True), "residual = True: hidden = [16] has no layer after the first"),
        (lambda: MAF(3, transforms=1, mixing="lu"), "mixing = 'lu': transforms = 1 leaves no gap between layers"),
        (lambda: MAF(3, transforms=1, batch_norm=True), "batch_norm = True: transforms = 1 leaves no gap"),
        (lambda: Dequantized(RealNVP(2), 17, hidden=64), "hidden = 64: uniform dequantization"),
        (lambda: RealNVP(2, hidden=(), activation=torch.nn.Tanh), "activation = 'tanh': hidden = [] makes each"),
        (lambda: VelocityMLP(2, hidden=(), activation=torch.nn.GELU), "activation = 'gelu': hidden = [] makes one"),
    ],
)
def test_a_recipe_refuses_a_setting_its_other_options_leave_unread(build, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message) + ".*; leave it out"):
        build()


def test_the_settings_a_recipe_reads_still_build_and_a_saved_one_rebuilds() -> None:
    from flowforge.registry import from_config

    torch.manual_seed(0)
    read = [
        RealNVP(3, transforms=3, seed=3),
        NSF(4, autoregressive=False, seed=2),
        MAF(3, hidden=(8, 8), residual=True),
        Dequantized(RealNVP(2), 17, variational=True, hidden=8),
    ]
    assert [type(model).__name__ for model in read] == ["RealNVP", "NSF", "MAF", "Dequantized"]
    # saved before the rule: a 2-feature RealNVP with a seed of its own still loads, same weights
    flow = RealNVP(2, transforms=2, hidden=(4,))
    saved = flow.to_config()
    saved["arguments"]["seed"] = 5
    rebuilt = from_config(saved)
    rebuilt.load_state_dict(flow.state_dict())
    x = torch.randn(4, 2)
    torch.testing.assert_close(rebuilt.log_prob(x), flow.log_prob(x))


def test_a_coupling_grouped_by_condition_needs_a_conditional_model() -> None:
    from flowforge.matching import ExactOTCoupling

    with pytest.raises(ValueError, match="per_condition = False: an unconditional model has no conditions"):
        FlowMatcher(VelocityMLP(2, hidden=(4,)), coupling=ExactOTCoupling(per_condition=False))
    conditional = FlowMatcher(VelocityMLP(2, 3, hidden=(4,)), coupling=ExactOTCoupling(per_condition=False))
    assert conditional.coupling.per_condition is False
