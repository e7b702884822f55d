"""MeanFlow and consistency models next to the other flow-matching families: their mathematics, and
the one sampling interface ``sample(n, context, steps=k)`` every family shares."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flowforge.matching import ConsistencyMatcher, FlowMatcher, MeanFlowMatcher, ShortcutMatcher
from flowforge.matching.consistency import karras_times, lognormal_interval_weights
from flowforge.nn import VelocityMLP

MU, SCALE = torch.tensor([1.0, -2.0], dtype=torch.float64), 0.5


class GaussianTargetVelocity(nn.Module):
    r"""The exact marginal velocity of the linear path from N(0, I) to N(MU, SCALE^2 I):
    :math:`v = \mu + \frac{\dot\sigma_t}{\sigma_t}(x - t\mu)`, :math:`\sigma_t^2 = t^2 s^2 + (1 - t)^2`."""

    features = 2

    def forward(self, x, t, context=None):
        t = t[:, None]
        return MU + (t * SCALE**2 - (1 - t)) / _sigma(t) ** 2 * (x - t * MU)


def _sigma(t):
    return (t**2 * SCALE**2 + (1 - t) ** 2).sqrt()


def exact_consistency_map(x, t):
    """Where the Gaussian flow's trajectory through (x, t) ends: mu + s (x - t mu) / sigma_t."""
    return MU + SCALE * (x - t[:, None] * MU) / _sigma(t[:, None])


class AffineInState(nn.Module):
    """F(x, t) = a(t) x + b(t): can represent the Gaussian flow's consistency map exactly."""

    features = 2

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 4))

    def forward(self, x, t, context=None):
        a, b = self.net(t[:, None]).chunk(2, dim=1)
        return a * x + b


def test_the_consistency_function_is_the_identity_at_the_data_end_exactly() -> None:
    torch.manual_seed(0)
    model = ConsistencyMatcher(VelocityMLP(3, hidden=(16,)))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    x = torch.randn(64, 3) * 10
    ones = torch.ones(64)
    assert torch.equal(model.consistency_function(x, ones), x)
    assert not torch.equal(model.consistency_function(x, torch.full((64,), 0.5)), x)


def test_consistency_distillation_from_a_closed_form_teacher_learns_the_closed_form_map() -> None:
    """The teacher's ODE carries N(0, I) to N(mu, s^2 I) with a known flow map; the distilled
    consistency function matches that map on its grid (up to the teacher's Heun steps), and its
    one-step samples have the target's moments."""
    torch.manual_seed(0)
    teacher = FlowMatcher(GaussianTargetVelocity()).double()
    student = ConsistencyMatcher(AffineInState(), distillation_intervals=18).double()
    optimizer = torch.optim.Adam(student.parameters(), lr=5e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 1200)
    x = torch.randn(4000, 2, dtype=torch.float64)
    start = torch.zeros(4000, dtype=torch.float64)
    with torch.no_grad():
        untrained = (student.consistency_function(x, start) - exact_consistency_map(x, start)).abs().mean()
    for _ in range(1200):
        loss = student.distillation_loss(MU + SCALE * torch.randn(128, 2, dtype=torch.float64), teacher)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    grid = karras_times(18, student.sigma_min, student.sigma_max, student.rho)
    for t in grid[[0, 4, 8, 16]].tolist():
        times = torch.full((4000,), t, dtype=torch.float64)
        x_t = t * (MU + SCALE * torch.randn_like(x)) + (1 - t) * x
        with torch.no_grad():
            error = (student.consistency_function(x_t, times) - exact_consistency_map(x_t, times)).abs()
        assert float(error.mean()) < 0.08, (t, float(error.mean()))  # the teacher is followed in 18 Heun steps
    assert float(untrained) > 0.5
    samples = student.sample(20_000, steps=1)
    torch.testing.assert_close(samples.mean(0), MU, atol=0.1, rtol=0)
    torch.testing.assert_close(samples.std(0), torch.full((2,), SCALE, dtype=torch.float64), atol=0.1, rtol=0)


class OneStepMap(nn.Module):
    """F(x, 0) = shift + (SCALE - 1) x: one consistency step maps N(0, I) to N(shift, SCALE^2 I)."""

    features = 2

    def __init__(self, shift) -> None:
        super().__init__()
        self.shift = shift

    def forward(self, x, t, context=None):
        return self.shift + (SCALE - 1) * x


def test_consistency_validation_scores_one_step_samples_against_the_data() -> None:
    """The curriculum changes what the loss measures, so validation (and the best weights kept by
    early stopping) compares one-step samples with held-out data: the exact map scores near zero, a
    shifted one does not; fixed noise makes it repeatable and the caller's random stream is untouched."""
    from flowforge.eval.metrics import energy_distance
    from flowforge.train.objectives import FlowMatchingObjective, one_step_sample_distance

    torch.manual_seed(0)
    data = MU + SCALE * torch.randn(1500, 2, dtype=torch.float64)
    exact = ConsistencyMatcher(OneStepMap(MU)).double()
    shifted = ConsistencyMatcher(OneStepMap(MU + 0.5)).double()
    state = torch.get_rng_state()
    score = FlowMatchingObjective().validation(exact, (data, None))
    assert torch.equal(torch.get_rng_state(), state)
    assert score == one_step_sample_distance(exact, data)
    assert score < 0.01 < one_step_sample_distance(shifted, data)
    torch.manual_seed(0)
    assert score == energy_distance(exact.sample(1500), data)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"x1 must hold one or more held-out rows, got shape \(0, 2\)"):
        one_step_sample_distance(exact, data[:0])
    assert one_step_sample_distance(exact, data, max_rows=100) == energy_distance(exact.sample(100), data[:100])


def test_a_student_distilled_from_a_teacher_starts_as_its_one_step_euler_map() -> None:
    from flowforge.matching import ExactOTCoupling, VariancePreservingPath

    torch.manual_seed(0)
    teacher = FlowMatcher(VelocityMLP(2, hidden=(16,), context=3), coupling=ExactOTCoupling(), context_dropout=0.1)
    with torch.no_grad():
        teacher.null_context.normal_()
    student = ConsistencyMatcher.distilled_from(teacher, distillation_intervals=8)
    assert student.coupling is teacher.coupling and student.distillation_intervals == 8
    assert student.context_features == 3 and student.context_dropout == 0.1
    x, t, context = torch.randn(32, 2), torch.rand(32), torch.randn(32, 3)
    with torch.no_grad():
        expected = x + (1 - t)[:, None] * teacher.velocity(x, t, context)
        torch.testing.assert_close(student.consistency_function(x, t, context), expected)
        torch.testing.assert_close(student.null_context, teacher.null_context)
        next(student.velocity.parameters()).add_(1.0)  # a copy: training the student leaves the teacher alone
    assert not torch.equal(next(student.velocity.parameters()), next(teacher.velocity.parameters()))
    assert next(ConsistencyMatcher.distilled_from(teacher.double()).parameters()).dtype == torch.float64
    with pytest.raises(TypeError, match="teacher must be a trained FlowMatcher"):
        ConsistencyMatcher.distilled_from(student)
    with pytest.raises(ValueError, match="linear path"):
        ConsistencyMatcher.distilled_from(FlowMatcher(VelocityMLP(2, hidden=(16,)), path=VariancePreservingPath()))


def test_multistep_consistency_sampling_renoises_through_the_models_coupling() -> None:
    from flowforge.matching import ExactOTCoupling

    class Recording(ExactOTCoupling):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

        def __call__(self, x0, x1, context=None):
            paired = super().__call__(x0, x1, context)
            self.calls.append((x1.clone(), paired))
            return paired

    coupling = Recording()
    torch.manual_seed(0)
    model = ConsistencyMatcher(VelocityMLP(2, hidden=(16,)), coupling=coupling).eval()
    model.sample(6, steps=3)
    assert len(coupling.calls) == 2  # steps 2 and 3 re-noise; the first starts from plain noise
    for estimate, noise in coupling.calls:
        # The OT pairing: no swap of two noise rows lowers the total squared distance to the estimates.
        cost = torch.cdist(noise, estimate).square()
        total = cost.diagonal().sum()
        for i in range(6):
            for j in range(6):
                swapped = total - cost[i, i] - cost[j, j] + cost[i, j] + cost[j, i]
                assert swapped >= total - 1e-5


def test_the_curriculum_doubles_the_intervals_in_equal_stages_and_resumes_from_its_counter() -> None:
    model = ConsistencyMatcher(VelocityMLP(2, hidden=(8,)), total_steps=800, initial_intervals=10, final_intervals=80)
    # log2(80 / 10) = 3 doublings: four stages of 200 steps.
    assert [model.intervals(step) for step in (0, 199, 200, 400, 600, 799, 5000)] == [10, 10, 20, 40, 80, 80, 80]
    model.train()
    for _ in range(3):
        model.loss(torch.randn(4, 2))
    assert int(model.training_step) == 3
    assert "training_step" in model.state_dict()  # saved, so a resumed run continues the curriculum
    model.eval()
    model.loss(torch.randn(4, 2))
    assert int(model.training_step) == 3  # evaluation losses do not advance it


def test_the_grid_and_the_lognormal_interval_weights() -> None:
    times = karras_times(10, 0.002, 80.0, 7.0)
    assert times[0] == 0 and times[-1] == 1 and bool((times.diff() > 0).all())
    sigma = (1 - times[1:-1]) / times[1:-1]
    torch.testing.assert_close(sigma[[0, -1]], torch.tensor([80.0, 0.002], dtype=torch.float64))
    weights = lognormal_interval_weights(times, -1.1, 2.0)
    assert weights.shape == (10,) and math.isclose(float(weights.sum()), 1.0)
    # Each weight is the lognormal law's mass of sigma between the interval's ends.
    normal = torch.distributions.Normal(-1.1, 2.0)
    inner = normal.cdf(torch.log(sigma[3])) - normal.cdf(torch.log(sigma[4]))
    torch.testing.assert_close(weights[4], inner.to(weights.dtype))


def test_consistency_training_moves_every_parameter_and_refuses_what_it_cannot_do() -> None:
    torch.manual_seed(0)
    model = ConsistencyMatcher(VelocityMLP(2, hidden=(8,), context=3), context_dropout=0.1)
    model.loss(torch.randn(16, 2), torch.randn(16, 3)).backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters())
    with pytest.raises(ValueError, match="method must be 'euler', got 'rk4'"):
        model.sample(2, torch.randn(1, 3), method="rk4")
    with pytest.raises(ValueError, match="draws its times"):
        model.loss(torch.randn(4, 2), torch.randn(4, 3), t=torch.rand(4))
    with pytest.raises(ValueError, match="linear path"):
        from flowforge.matching import CosinePath

        ConsistencyMatcher(VelocityMLP(2, hidden=(8,)), CosinePath())
    with pytest.raises(TypeError, match="teacher must be a trained FlowMatcher"):
        model.distillation_loss(torch.randn(4, 2), nn.Linear(2, 2), torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"x1.*(finite|NaN)"):
        model.distillation_loss(torch.full((4, 2), float("nan")), FlowMatcher(VelocityMLP(2, 3)), torch.randn(4, 3))
    with pytest.raises(ValueError, match="final_intervals"):
        ConsistencyMatcher(VelocityMLP(2, hidden=(8,)), initial_intervals=20, final_intervals=10)


def test_meanflow_trains_every_parameter_and_steps_with_its_average_velocity() -> None:
    torch.manual_seed(0)
    model = MeanFlowMatcher(VelocityMLP(2, hidden=(8,), step_input=True), span_fraction=1.0)
    model.loss(torch.randn(16, 2)).backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters())
    # One Euler step is x0 + u(x0, 0, 1); the network is told the span 1/k.
    torch.manual_seed(1)
    one = model.sample(5, steps=1)
    torch.manual_seed(1)
    x0 = torch.randn(5, 2)
    with torch.no_grad():
        expected = x0 + model.velocity(x0, torch.zeros(5), None, step=torch.ones(5))
    torch.testing.assert_close(one, expected)
    assert model.span_for("euler", 4) == 0.25 and model.span_for("rk4", 4) == 0.0


def test_meanflow_guidance_is_trained_into_the_target() -> None:
    """With guidance_scale w, the target's velocity mixes the conditional velocity with the
    network's own unconditional instantaneous velocity: w v + (1 - w) u(x, t, null, 0)."""
    torch.manual_seed(0)
    net = VelocityMLP(2, context=2, hidden=(8,), step_input=True)
    guided = MeanFlowMatcher(net, context_dropout=0.5, guidance_scale=3.0, span_fraction=0.0, adaptive_power=0.0)
    with torch.no_grad():
        guided.null_context.add_(1.0)
    guided.eval()  # no rows dropped: every row guided
    x1, context, x0, t = torch.randn(6, 2), torch.randn(6, 2), torch.randn(6, 2), torch.rand(6)
    loss = guided.loss(x1, context, x0=x0, t=t)
    x_t = t[:, None] * x1 + (1 - t[:, None]) * x0
    with torch.no_grad():
        unconditional = net(x_t, t, guided.null_context.expand(6, 2), step=torch.zeros(6))
        target = 3.0 * (x1 - x0) - 2.0 * unconditional
        expected = (net(x_t, t, context, step=torch.zeros(6)) - target).square().mean()
    torch.testing.assert_close(loss.detach(), expected)
    with pytest.raises(ValueError, match="needs context_dropout"):
        MeanFlowMatcher(VelocityMLP(2, context=2, hidden=(8,), step_input=True), guidance_scale=2.0)


FAMILIES = {
    "flow-matching": lambda: FlowMatcher(VelocityMLP(2, hidden=(8,), context=3)),
    "shortcut": lambda: ShortcutMatcher(VelocityMLP(2, hidden=(8,), context=3, step_input=True)),
    "meanflow": lambda: MeanFlowMatcher(VelocityMLP(2, hidden=(8,), context=3, step_input=True)),
    "consistency": lambda: ConsistencyMatcher(VelocityMLP(2, hidden=(8,), context=3)),
}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_every_family_samples_through_one_interface_and_reports_its_nfe(family: str, steps: int) -> None:
    torch.manual_seed(0)
    model = FAMILIES[family]()
    context = torch.randn(4, 3)
    samples = model.sample(5, context, steps=steps)
    assert samples.shape == (5, 4, 2) and bool(samples.isfinite().all())
    assert model.last_nfe == steps
    assert model.sample(3, context[:0], steps=steps).shape == (3, 0, 2)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        model.sample(2, context, steps=0)


def test_quality_against_nfe_covers_fixed_steps_adaptive_and_the_cnf() -> None:
    from flowforge.eval.metrics import quality_against_nfe
    from flowforge.flows import CNF

    torch.manual_seed(0)
    mean_norm = lambda x: float(x.norm(dim=-1).mean())  # noqa: E731
    curve = quality_against_nfe(FAMILIES["flow-matching"](), mean_norm, 64, context=torch.randn(2, 3), steps=(1, 3))
    assert [p.label for p in curve] == ["1 step", "3 steps", "dopri5"]
    assert [p.nfe for p in curve[:2]] == [1, 3] and curve[2].nfe > 3
    consistency = quality_against_nfe(FAMILIES["consistency"](), mean_norm, 8, context=torch.randn(1, 3), steps=(1, 2))
    assert [(p.label, p.nfe) for p in consistency] == [("1 step", 1), ("2 steps", 2)]  # no adaptive field
    cnf = quality_against_nfe(CNF(2, hidden=(8,)), mean_norm, 16)
    assert len(cnf) == 1 and cnf[0].label == "adaptive" and cnf[0].nfe > 0
    with pytest.raises(TypeError, match="reports no NFE"):
        quality_against_nfe(nn.Linear(2, 2), mean_norm, 4)


def test_the_consistency_interval_count_is_asked_for_a_training_step() -> None:
    model = ConsistencyMatcher(VelocityMLP(2, hidden=(8,)))
    assert model.intervals(0) == model.initial_intervals and model.intervals(10**9) == model.final_intervals
    for step in (-1, 1.5, "a"):
        with pytest.raises(ValueError, match=r"step must be an int >= 0"):
            model.intervals(step)
