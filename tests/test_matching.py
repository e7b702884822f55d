"""Flow matching: paths, conversions, couplings, time samplers, the FlowMatcher, reflow and shortcut models.

Many checks use Gaussian data, x1 ~ N(m, s^2 I), where the marginal velocity of every affine path
is known in closed form: the likelihood, the samplers and the conversions must reproduce the
Gaussian exactly (up to solver error), with no training.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import Tensor, nn

from flowforge.matching import (
    ConsistencyMatcher,
    CosinePath,
    ExactOTCoupling,
    FlowMatcher,
    IndependentCoupling,
    LinearPath,
    LogitNormalTime,
    ShiftedBetaTime,
    ShortcutMatcher,
    SinkhornCoupling,
    StochasticInterpolantPath,
    UniformTime,
    VariancePreservingPath,
    reflow_pairs,
    straightness,
)
from flowforge.matching.functional import flow_matching_loss, mean_flow_loss, shortcut_loss
from flowforge.matching.paths import AffinePath
from flowforge.nn import ResidualVelocityMLP, VelocityMLP
from tests.invariants import density_mass_2d, parameters_without_gradient

PATHS = {
    "linear": LinearPath(),
    "linear-sigma-min": LinearPath(sigma_min=0.05),
    "cosine": CosinePath(),
    "variance-preserving": VariancePreservingPath(),
    "interpolant": StochasticInterpolantPath(gamma_scale=0.7),
}


class GaussianVelocity(nn.Module):
    """The exact marginal velocity of ``path`` for data N(mean, scale^2 I) and noise N(0, I)."""

    def __init__(self, path: AffinePath, mean: Tensor, scale: float) -> None:
        super().__init__()
        self.path, self.mean, self.scale = path, mean, scale
        self.features, self.context_features = mean.shape[0], 0

    def posterior_data_mean(self, x: Tensor, t: Tensor) -> Tensor:
        alpha, sigma, _, _ = (c[:, None] for c in self.path.schedule(t))
        variance = alpha.square() * self.scale**2 + sigma.square()
        return self.mean + alpha * self.scale**2 / variance * (x - alpha * self.mean)

    def score(self, x: Tensor, t: Tensor) -> Tensor:
        alpha, sigma, _, _ = (c[:, None] for c in self.path.schedule(t))
        return -(x - alpha * self.mean) / (alpha.square() * self.scale**2 + sigma.square())

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None) -> Tensor:
        alpha, sigma, d_alpha, d_sigma = (c[:, None] for c in self.path.schedule(t))
        variance = alpha.square() * self.scale**2 + sigma.square()
        noise = sigma * (x - alpha * self.mean) / variance  # E[x0 | x_t], finite where sigma = 0
        return d_alpha * self.posterior_data_mean(x, t) + d_sigma * noise


def _gaussian_matcher(path: AffinePath | None = None) -> tuple[FlowMatcher, Tensor, float]:
    mean, scale = torch.tensor([1.0, -0.5], dtype=torch.float64), 0.6
    return FlowMatcher(GaussianVelocity(path or LinearPath(), mean, scale)).double(), mean, scale


# ---------------------------------------------------------------- paths
@pytest.mark.parametrize("name", list(PATHS))
def test_target_velocity_is_the_time_derivative_of_the_path(name: str) -> None:
    path = PATHS[name]
    x0, x1 = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    t = torch.tensor([0.0, 0.1, 0.5, 0.8, 0.97], dtype=torch.float64)

    def point(times: Tensor) -> Tensor:
        torch.manual_seed(0)  # the interpolant's extra noise z is the same in every call
        return path.sample(x0, x1, times)[0]

    torch.manual_seed(0)
    _, target = path.sample(x0, x1, t)
    _, derivative = torch.func.jvp(point, (t,), (torch.ones_like(t),))
    torch.testing.assert_close(target, derivative)


@pytest.mark.parametrize("name", list(PATHS))
def test_schedule_derivatives_match_autograd(name: str) -> None:
    path = PATHS[name]
    t = torch.linspace(0.02, 0.98, 11, dtype=torch.float64)
    _, _, d_alpha, d_sigma = path.schedule(t)
    for index, derivative in ((0, d_alpha), (1, d_sigma)):
        _, numeric = torch.func.jvp(lambda s, i=index: path.schedule(s)[i], (t,), (torch.ones_like(t),))
        torch.testing.assert_close(derivative, numeric)


@pytest.mark.parametrize("name", list(PATHS))
def test_schedule_derivatives_at_the_data_end_are_their_limits(name: str) -> None:
    # the interpolant's spread sqrt(sigma^2 + gamma^2) vanishes at t = 1, where its slope is 0/0
    path = PATHS[name]
    ends = torch.tensor([1.0 - 1e-7, 1.0], dtype=torch.float64)
    torch.testing.assert_close(*path.schedule(ends)[3], atol=1e-5, rtol=0)
    matcher, _, _ = _gaussian_matcher(path)
    x, t = torch.randn(3, 2, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    v = matcher.velocity(x, t)
    assert torch.isfinite(path.velocity_to_data(v, x, t)).all()


@pytest.mark.parametrize("name", list(PATHS))
def test_conversions_recover_the_gaussian_posterior_and_score(name: str) -> None:
    path = PATHS[name]
    matcher, _, _ = _gaussian_matcher(path)
    field = matcher.velocity
    x = torch.randn(7, 2, dtype=torch.float64)
    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    v = field(x, t)
    data, score = field.posterior_data_mean(x, t), field.score(x, t)
    torch.testing.assert_close(path.velocity_to_data(v, x, t), data)
    torch.testing.assert_close(path.velocity_to_score(v, x, t), score)
    noise = path.velocity_to_noise(v, x, t)
    for back in (
        path.data_to_velocity(data, x, t),
        path.noise_to_velocity(noise, x, t),
        path.score_to_velocity(score, x, t),
    ):
        torch.testing.assert_close(back, v)


def test_path_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="sigma_min"):
        LinearPath(sigma_min=1.0)
    with pytest.raises(ValueError, match="beta_min"):
        VariancePreservingPath(beta_min=0.0)
    with pytest.raises(ValueError, match="gamma_scale"):
        StochasticInterpolantPath(gamma_scale=-1.0)


# ---------------------------------------------------------------- couplings
def _brute_force_cost(x0: Tensor, x1: Tensor) -> float:
    n = x0.shape[0]
    return min(float((x0[list(p)] - x1).square().sum()) for p in itertools.permutations(range(n)))


@pytest.mark.parametrize("seed", range(5))
def test_exact_ot_returns_the_optimal_permutation(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x0, x1 = torch.randn(6, 2, generator=g, dtype=torch.float64), torch.randn(6, 2, generator=g, dtype=torch.float64)
    paired = ExactOTCoupling()(x0, x1)
    rows = [int((x0 == row).all(1).nonzero()[0, 0]) for row in paired]
    assert sorted(rows) == list(range(6)), "not a permutation of the noise batch"
    assert float((paired - x1).square().sum()) == pytest.approx(_brute_force_cost(x0, x1), rel=1e-12)


def test_exact_ot_is_a_permutation_on_degenerate_and_large_batches() -> None:
    x0 = torch.arange(8.0)[:, None].repeat(1, 2)
    paired = ExactOTCoupling()(x0, torch.zeros(8, 2))  # every pairing has the same cost
    assert sorted(paired[:, 0].tolist()) == x0[:, 0].tolist()
    x0, x1 = torch.randn(256, 3), torch.randn(256, 3)
    paired = ExactOTCoupling()(x0, x1)
    assert torch.equal(paired.sort(0).values, x0.sort(0).values)
    assert (paired - x1).square().sum() < (x0 - x1).square().sum()


def test_ot_couplings_pair_within_each_condition() -> None:
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(40, 2, generator=g), torch.randn(40, 2, generator=g) + 3
    labels = torch.randint(0, 3, (40,), generator=g)
    context = nn.functional.one_hot(labels, 3).float()
    for coupling in (ExactOTCoupling(), SinkhornCoupling(reg=0.05, seed=0)):
        paired = coupling(x0, x1, context)
        for label in range(3):
            members = labels == label
            allowed = {tuple(r) for r in x0[members].tolist()}
            assert {tuple(r) for r in paired[members].tolist()} <= allowed
    exact = ExactOTCoupling(per_condition=True)(x0, x1, context)
    for label in range(3):  # within a group the pairing is the group's optimal one
        members = (labels == label).nonzero().flatten()
        group = ExactOTCoupling()(x0[members], x1[members])
        torch.testing.assert_close(exact[members], group)


def test_sinkhorn_with_small_regularisation_approaches_exact_ot() -> None:
    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g)
    exact = float((ExactOTCoupling()(x0, x1) - x1).square().sum())
    independent = float((IndependentCoupling()(x0, x1) - x1).square().sum())
    sinkhorn = float((SinkhornCoupling(reg=0.02, seed=1)(x0, x1) - x1).square().sum())
    # Draws with replacement can even undercut the best permutation, so compare in both directions.
    assert abs(sinkhorn - exact) < 0.1 * (independent - exact)


def test_couplings_reject_mismatched_batches() -> None:
    with pytest.raises(ValueError, match="same shape"):
        ExactOTCoupling()(torch.randn(4, 2), torch.randn(5, 2))
    with pytest.raises(ValueError, match="reg"):
        SinkhornCoupling(reg=0.0)
    with pytest.raises(ValueError, match=r"seed must be an int in 0..4294967295, got -1"):
        SinkhornCoupling(seed=-1)


def test_sinkhorn_pairs_a_batch_with_a_far_outlier() -> None:
    # one data row far from the rest makes C / reg pass float64's exp range in plain Sinkhorn
    g = torch.Generator().manual_seed(3)
    x0, x1 = torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g)
    x1[0] = 20.0
    paired = SinkhornCoupling(reg=0.05, seed=0)(x0, x1)
    rows = {tuple(r) for r in x0.tolist()}
    assert all(tuple(r) in rows for r in paired.tolist())
    # the outlier draws the noise row nearest to it, as the exact pairing gives it one far out
    assert float((paired[0] - x1[0]).norm()) < float((x0 - x1[0]).norm(dim=1).median())


def test_sinkhorn_draws_follow_its_seed_and_survive_a_reload(tmp_path) -> None:
    from flowforge.checkpoint import load_model, save_model

    g = torch.Generator().manual_seed(4)
    x0, x1 = torch.randn(32, 2, generator=g), torch.randn(32, 2, generator=g)
    first, second = SinkhornCoupling(reg=0.5, seed=11), SinkhornCoupling(reg=0.5, seed=11)
    torch.testing.assert_close(first(x0, x1), second(x0, x1))
    matcher = FlowMatcher(VelocityMLP(2, hidden=(4,)), coupling=SinkhornCoupling(reg=0.5, seed=11))
    save_model(tmp_path / "m", matcher)
    rebuilt = load_model(tmp_path / "m").coupling
    torch.testing.assert_close(rebuilt(x0, x1), SinkhornCoupling(reg=0.5, seed=11)(x0, x1))


class _SqueezedVelocity(nn.Module):
    """A network that forgets the feature axis: (batch,) for a (batch, 1) state."""

    features = 1

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 1)

    def forward(self, x: Tensor, t: Tensor, *more: Tensor) -> Tensor:
        extra = more[-1][:, None] if more and isinstance(more[-1], Tensor) else torch.zeros_like(t)[:, None]
        return self.linear(torch.cat([x, t[:, None], extra], 1)).squeeze(-1)


def test_losses_refuse_a_velocity_of_another_shape_than_the_state() -> None:
    x0, x1 = torch.randn(8, 1), torch.randn(8, 1)
    net = _SqueezedVelocity()
    with pytest.raises(ValueError, match=r"velocity returned \(8,\) for a state of shape \(8, 1\)"):
        flow_matching_loss(net, x0, x1, torch.rand(8), LinearPath())
    with pytest.raises(ValueError, match=r"velocity returned \(8,\) for a state of shape \(8, 1\)"):
        shortcut_loss(net, x0, x1, LinearPath(), max_halvings=3)
    span = torch.full((8,), 0.25)
    for spans in (span, torch.zeros(8)):  # with the Jacobian-vector product and without
        with pytest.raises(ValueError, match=r"average_velocity returned \(8,\) for a state of shape \(8, 1\)"):
            mean_flow_loss(net, x0, x1, torch.rand(8) * 0.5, spans, LinearPath())
    with pytest.raises(ValueError, match=r"velocity returned \(4, 1\) for a state of shape \(4, 2\)"):
        flow_matching_loss(lambda x, t: x[:, :1], torch.randn(4, 2), torch.randn(4, 2), torch.rand(4), LinearPath())


def test_flow_matching_loss_refuses_times_of_another_batch_or_an_integer_type() -> None:
    x0, x1 = torch.randn(4, 2), torch.randn(4, 2)
    with pytest.raises(ValueError, match=r"t must have a leading shape of the data's \(4, 2\), got \(1,\)"):
        flow_matching_loss(lambda x, t: x, x0, x1, torch.tensor([0.5]), LinearPath())
    with pytest.raises(ValueError, match=r"got \(\)"):
        flow_matching_loss(lambda x, t: x, x0, x1, torch.tensor(0.5), LinearPath())
    with pytest.raises(TypeError, match=r"t must hold floating-point times, got torch\.int64"):
        flow_matching_loss(lambda x, t: x, x0, x1, torch.zeros(4, dtype=torch.long), LinearPath())


# ---------------------------------------------------------------- time samplers
def _ks_statistic(samples: Tensor, cdf) -> float:
    ordered = samples.double().sort().values
    n = ordered.shape[0]
    empirical = torch.arange(1, n + 1, dtype=torch.float64) / n
    return float((cdf(ordered) - empirical).abs().max())


def test_time_samplers_follow_their_laws() -> None:
    g = torch.Generator().manual_seed(0)
    n = 20_000
    threshold = 1.95 / math.sqrt(n)  # Kolmogorov-Smirnov at 0.1 % significance
    assert _ks_statistic(UniformTime()(n, generator=g), lambda t: t) < threshold
    # pi0: t = s (1 - u), u ~ Beta(1.5, 1): P(T <= t) = 1 - (1 - t/s)^1.5
    assert (
        _ks_statistic(ShiftedBetaTime()(n, generator=g), lambda t: 1 - (1 - t / 0.999).clamp(min=0) ** 1.5) < threshold
    )
    logit = LogitNormalTime(0.5, 2.0)(n, generator=g).double().logit()
    normal = torch.distributions.Normal(0.5, 2.0)
    assert _ks_statistic(logit, normal.cdf) < threshold
    assert ShiftedBetaTime()(5, dtype=torch.float64).dtype == torch.float64


# ---------------------------------------------------------------- exact Gaussian flows
@pytest.mark.parametrize(
    "path",
    # beta_max = 60: alpha_0 = e^-15, so the VP path starts at N(0, I) to float64 precision (see its docstring)
    [LinearPath(), CosinePath(), VariancePreservingPath(beta_max=60.0)],
    ids=["linear", "cosine", "variance-preserving"],
)
def test_log_prob_of_the_exact_gaussian_velocity_is_the_gaussian_density(path: AffinePath) -> None:
    matcher, mean, scale = _gaussian_matcher(path)
    x = mean + scale * torch.randn(16, 2, dtype=torch.float64)
    truth = torch.distributions.Normal(mean, scale).log_prob(x).sum(1)
    log_prob = matcher.log_prob(x, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(log_prob, truth, atol=2e-5, rtol=0)


@pytest.mark.parametrize("method", ["euler", "rk4", "sde"])
def test_samplers_reproduce_the_gaussian(method: str) -> None:
    torch.manual_seed(0)
    matcher, mean, scale = _gaussian_matcher()
    if method == "sde":
        x = matcher.sample_sde(4000, steps=100, noise_scale=1.0)
    else:
        x = matcher.sample(4000, steps=100 if method == "euler" else 10, method=method)
    assert x.shape == (4000, 2)
    # standard errors: 0.6 / sqrt(4000) = 0.009 for the mean, 0.007 for the standard deviation
    torch.testing.assert_close(x.mean(0), mean, atol=0.04, rtol=0)
    torch.testing.assert_close(x.std(0), torch.full((2,), scale, dtype=torch.float64), atol=0.04, rtol=0)


def test_sde_samples_follow_the_generator_alone() -> None:
    matcher, _, _ = _gaussian_matcher()
    draws = []
    for global_seed in (1, 2):  # the global state plays no part
        torch.manual_seed(global_seed)
        draws.append(matcher.sample_sde(5, steps=4, generator=torch.Generator().manual_seed(7)))
    torch.testing.assert_close(draws[0], draws[1], rtol=0, atol=0)
    torch.manual_seed(1)
    state = torch.get_rng_state()
    matcher.sample_sde(5, steps=4, generator=torch.Generator().manual_seed(8))
    assert torch.equal(torch.get_rng_state(), state)  # nor is it moved
    with pytest.raises(TypeError, match=r"generator must be a torch\.Generator or None, got int"):
        matcher.sample_sde(5, steps=4, generator=7)


def test_sde_with_zero_noise_is_the_euler_ode() -> None:
    matcher, _, _ = _gaussian_matcher(CosinePath())
    torch.manual_seed(3)
    ode = matcher.sample(50, steps=20, method="euler")
    torch.manual_seed(3)
    sde = matcher.sample_sde(50, steps=20, noise_scale=0.0)
    torch.testing.assert_close(ode, sde)


def test_straightness_is_zero_for_a_constant_field_and_positive_for_a_rotation() -> None:
    class Field(nn.Module):
        def __init__(self, rotate: bool) -> None:
            super().__init__()
            self.rotate, self.features = rotate, 2

        def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None) -> Tensor:
            return torch.stack([-x[:, 1], x[:, 0]], 1) if self.rotate else torch.ones_like(x)

    assert straightness(FlowMatcher(Field(False)), n=64, steps=10) == pytest.approx(0.0, abs=1e-12)
    assert straightness(FlowMatcher(Field(True)), n=64, steps=50, normalized=True) > 0.05


def test_reflow_pairs_are_the_ode_map() -> None:
    matcher, _, _ = _gaussian_matcher()
    torch.manual_seed(0)
    x0, x1 = reflow_pairs(matcher, 100, steps=20, batch_size=32)
    torch.manual_seed(0)
    torch.testing.assert_close(x1, matcher.sample(100, steps=20, method="rk4"))
    assert x0.shape == x1.shape == (100, 2)


# ---------------------------------------------------------------- trained models
def _train(matcher: FlowMatcher, data: Tensor, steps: int, context: Tensor | None = None, lr: float = 3e-3) -> None:
    optimizer = torch.optim.Adam(matcher.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        rows = torch.randint(0, data.shape[0], (256,), generator=g)
        loss = matcher.loss(data[rows], None if context is None else context[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.fixture(scope="module")
def trained_2d() -> FlowMatcher:
    torch.manual_seed(0)
    centers = torch.tensor([[1.5, 0.0], [-1.5, 0.0]], dtype=torch.float64)
    data = centers[torch.randint(0, 2, (4096,))] + 0.4 * torch.randn(4096, 2, dtype=torch.float64)
    matcher = FlowMatcher(VelocityMLP(2, hidden=(32, 32), time_embedding=8), coupling=ExactOTCoupling()).double()
    _train(matcher, data, 300)
    return matcher.eval()


def test_trained_density_integrates_to_one(trained_2d: FlowMatcher) -> None:
    mass = density_mass_2d(lambda x: trained_2d.log_prob(x, method="rk4", steps=16), bound=5.0, resolution=60)
    assert mass == pytest.approx(1.0, abs=0.03)


def test_hutchinson_log_prob_agrees_with_exact_within_noise(trained_2d: FlowMatcher) -> None:
    x = trained_2d.sample(6, steps=20)
    with torch.no_grad():
        # The same fixed-step solver for both, so the only difference is the trace estimator.
        exact = trained_2d.log_prob(x, method="rk4", steps=16)
        draws = torch.stack([trained_2d.log_prob(x, trace="hutchinson", method="rk4", steps=16) for _ in range(100)])
    standard_error = draws.std(0) / 10
    assert ((draws.mean(0) - exact).abs() < 4 * standard_error + 1e-6).all()
    assert (draws.std(0) > 0).all()


def test_guidance_scale_one_is_the_conditional_model() -> None:
    torch.manual_seed(0)
    matcher = FlowMatcher(VelocityMLP(2, context=3, hidden=(16,), time_embedding=8), context_dropout=0.2).double()
    with torch.no_grad():
        matcher.null_context.normal_()
    x, t, c = torch.randn(9, 2, dtype=torch.float64), torch.rand(9, dtype=torch.float64), torch.randn(9, 3).double()
    torch.testing.assert_close(matcher.velocity_at(x, t, c, guidance_scale=1.0), matcher.velocity(x, t, c))
    unconditional = matcher.velocity(x, t, matcher.null_context.expand(9, 3))
    torch.testing.assert_close(matcher.velocity_at(x, t, c, guidance_scale=0.0), unconditional)
    torch.manual_seed(1)
    guided = matcher.sample(3, c[:4], steps=5, guidance_scale=1.0)
    torch.manual_seed(1)
    plain = matcher.sample(3, c[:4], steps=5)
    assert guided.shape == (3, 4, 2)
    torch.testing.assert_close(guided, plain)


def test_conditional_training_learns_each_condition_and_guidance_sharpens_it() -> None:
    torch.manual_seed(0)
    labels = torch.randint(0, 2, (4096,))
    context = nn.functional.one_hot(labels, 2).double()
    data = torch.stack([labels * 4.0 - 2.0, torch.zeros(4096)], 1).double() + 0.3 * torch.randn(4096, 2).double()
    matcher = FlowMatcher(
        VelocityMLP(2, context=2, hidden=(32, 32), time_embedding=8),
        coupling=ExactOTCoupling(),
        context_dropout=0.2,
    ).double()
    _train(matcher, data, 200, context)
    matcher.eval()
    conditions = torch.eye(2, dtype=torch.float64)
    samples = matcher.sample(2000, conditions, steps=20, method="midpoint")
    torch.testing.assert_close(samples.mean(0)[:, 0], torch.tensor([-2.0, 2.0], dtype=torch.float64), atol=0.15, rtol=0)
    guided = matcher.sample(2000, conditions, steps=20, method="midpoint", guidance_scale=3.0)
    assert guided[:, :, 0].std(0).max() < samples[:, :, 0].std(0).max()


def test_loss_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    for velocity in (
        VelocityMLP(2, context=2, hidden=(8,), time_embedding=4),
        ResidualVelocityMLP(2, context=2, width=8, blocks=2, time_embedding=4),
    ):
        matcher = FlowMatcher(velocity, context_dropout=0.5)
        loss = matcher.loss(torch.randn(64, 2), torch.randn(64, 2))
        assert parameters_without_gradient(matcher, loss) == []


def test_shortcut_model_trains_every_parameter_and_samples_in_one_step() -> None:
    torch.manual_seed(0)
    model = ShortcutMatcher(ResidualVelocityMLP(2, width=16, blocks=1, time_embedding=4, step_input=True))
    assert parameters_without_gradient(model, model.loss(torch.randn(64, 2))) == []
    assert model.sample(7, steps=1).shape == (7, 2)
    assert model.sample(7, steps=4, method="rk4").shape == (7, 2)
    assert [model.step_input_for("euler", k) for k in (1, 2, 4, 10, 128)] == [1.0, 0.5, 0.25, 0.0, 0.0]
    assert model.step_input_for("rk4", 2) == 0.0
    with pytest.raises(ValueError, match="self_consistency_fraction"):
        ShortcutMatcher(VelocityMLP(2, step_input=True), self_consistency_fraction=1.0)


def test_shortcut_self_consistency_target_of_an_exact_average_velocity_is_zero_loss() -> None:
    """A field that is constant in x and t is its own average velocity at every step size."""

    class Constant(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features, self.context_features = 2, 0
            self.value = nn.Parameter(torch.tensor([0.5, -1.0]))

        def forward(self, x, t, context=None, step=None) -> Tensor:
            return self.value.expand_as(x)

    model = ShortcutMatcher(Constant(), coupling=IndependentCoupling())
    x1 = torch.randn(32, 2)
    x0 = x1 - torch.tensor([0.5, -1.0])  # pairs whose straight velocity is the constant
    assert model.loss(x1, x0=x0).item() == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------- input checks
def test_flow_matcher_checks_its_inputs() -> None:
    matcher = FlowMatcher(VelocityMLP(2, context=3, hidden=(8,)))
    with pytest.raises(ValueError, match="conditional"):
        matcher.loss(torch.randn(4, 2))
    with pytest.raises(ValueError, match=r"context must have shape \(batch, 3\)"):
        matcher.loss(torch.randn(4, 2), torch.randn(4, 2))
    with pytest.raises(ValueError, match=r"x1 must have shape \(batch, 2\)"):
        matcher.loss(torch.randn(4, 3), torch.randn(4, 3))
    with pytest.raises(ValueError, match="NaN"):
        matcher.loss(torch.full((4, 2), float("nan")), torch.randn(4, 3))
    with pytest.raises(ValueError, match="guidance needs"):
        matcher.velocity_at(torch.randn(4, 2), torch.rand(4), torch.randn(4, 3), guidance_scale=2.0)
    with pytest.raises(ValueError, match="unknown method"):
        matcher.sample(2, torch.randn(1, 3), method="rk5")
    with pytest.raises(ValueError, match="context_dropout needs"):
        FlowMatcher(VelocityMLP(2), context_dropout=0.1)
    with pytest.raises(ValueError, match="event_shape"):
        FlowMatcher(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="step-size input"):
        VelocityMLP(2)(torch.randn(3, 2), torch.rand(3), step=0.5)
    with pytest.raises(ValueError, match="one time per sample"):
        VelocityMLP(2)(torch.randn(3, 2), torch.rand(1))


def test_event_shapes_beyond_vectors() -> None:
    class ChunkVelocity(nn.Module):
        """Velocity for (batch, 4, 2) action chunks: an MLP on the flattened chunk."""

        def __init__(self) -> None:
            super().__init__()
            self.net = VelocityMLP(8, hidden=(16,))

        def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None) -> Tensor:
            return self.net(x.flatten(1), t).reshape(x.shape)

    matcher = FlowMatcher(ChunkVelocity(), event_shape=(4, 2))
    chunks = torch.randn(5, 4, 2)
    assert matcher.loss(chunks).shape == ()
    assert matcher.sample(3, steps=2).shape == (3, 4, 2)
    assert matcher.log_prob(chunks, method="rk4", steps=4).shape == (5,)


@pytest.mark.parametrize("context", [0, 3])
@pytest.mark.parametrize("step_input", [False, True])
def test_precomputed_time_conditioning_equals_the_forward_pass(context: int, step_input: bool) -> None:
    torch.manual_seed(0)
    net = VelocityMLP(2, context=context, hidden=(8, 8), time_embedding=6, step_input=step_input).double()
    times = torch.tensor([0.0, 0.3, 0.9], dtype=torch.float64)
    x = torch.randn(5, 2, dtype=torch.float64)
    c = torch.randn(5, context, dtype=torch.float64) if context else None
    step = 0.25 if step_input else None
    at_time = net.time_conditioning(times, c, step)
    for k in range(3):
        torch.testing.assert_close(at_time(x, k), net(x, times[k].expand(5), c, step=step))


@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_samplers_with_and_without_the_precomputed_grid_agree(method: str) -> None:
    torch.manual_seed(0)
    matcher = FlowMatcher(VelocityMLP(2, context=2, hidden=(16,), time_embedding=8)).double()
    context = torch.randn(4, 2, dtype=torch.float64)
    torch.manual_seed(1)
    fast = matcher.sample(3, context, steps=5, method=method)
    matcher.velocity.time_conditioning = None  # the sampler falls back to calling the network with t
    torch.manual_seed(1)
    plain = matcher.sample(3, context, steps=5, method=method)
    torch.testing.assert_close(fast, plain)


class _PlainVelocity(nn.Module):
    """A velocity network as a user writes it: no time features to precompute."""

    def __init__(self, features: int = 2, context: int = 0, branch_on_values: bool = False) -> None:
        super().__init__()
        self.features, self.context_features, self.branch_on_values = features, context, branch_on_values
        self.net = nn.Sequential(nn.Linear(features + 1 + context, 16), nn.SiLU(), nn.Linear(16, features))

    def forward(self, x, t, context=None):
        v = self.net(torch.cat([x, t[:, None]] + ([] if context is None else [context]), dim=1))
        if self.branch_on_values and float(x.sum()) > 0:  # Python control flow a trace cannot follow
            v = -v
        return v


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4"])
@pytest.mark.parametrize("context", [0, 3])
def test_traced_fixed_step_sampling_equals_the_eager_loop(method: str, context: int) -> None:
    from flowforge.matching import matcher as matcher_module

    torch.manual_seed(0)
    model = FlowMatcher(_PlainVelocity(context=context)).eval()
    condition = torch.randn(4, context) if context else None
    model.sample(5, condition, steps=6, method=method)  # a signature's first solve runs eagerly
    assert not any(callable(v) for v in matcher_module._TRACED.get(model.velocity, {}).values())
    torch.manual_seed(1)
    traced = model.sample(5, condition, steps=6, method=method)  # it came back: traced
    assert any(callable(v) for v in matcher_module._TRACED[model.velocity].values()), "the solve was not traced"
    model.trace_fixed_steps = False
    torch.manual_seed(1)
    eager = model.sample(5, condition, steps=6, method=method)
    torch.testing.assert_close(traced, eager, rtol=1e-6, atol=1e-6)


def test_traced_sampling_follows_parameter_updates_and_falls_back_where_a_trace_cannot_follow() -> None:
    torch.manual_seed(0)
    model = FlowMatcher(_PlainVelocity()).eval()
    model.sample(8, steps=4)
    model.sample(8, steps=4)  # traced now (the signature came back)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))  # an optimizer step, in place
    torch.manual_seed(2)
    after = model.sample(8, steps=4)
    model.trace_fixed_steps = False
    torch.manual_seed(2)
    torch.testing.assert_close(after, model.sample(8, steps=4))

    branching = FlowMatcher(_PlainVelocity(branch_on_values=True)).eval()
    results = []
    for trace in (True, False):
        branching.trace_fixed_steps = trace
        branching.sample(1, steps=5)  # the first solve of a signature runs eagerly
        torch.manual_seed(3)
        results.append(branching.sample(1, steps=5))
    torch.testing.assert_close(results[0], results[1])  # the probe caught the value branch: sampled eagerly

    # With gradients (rsample) the eager loop runs, and gradients reach the network.
    model.trace_fixed_steps = True
    model.rsample(4, steps=3).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_reflow_and_straightness_check_their_arguments_as_sampling_does() -> None:
    flow = FlowMatcher(VelocityMLP(2, hidden=(8,)))
    cases = [
        (lambda: reflow_pairs(flow, 4, steps=2, batch_size=-1), ValueError, "batch_size must be a positive int"),
        (lambda: reflow_pairs(flow, 4, guidance_scale=3.0), ValueError, "guidance needs a conditional model"),
        (lambda: reflow_pairs(flow, 4, context=torch.randn(4, 3)), ValueError, "this model takes no context"),
        (lambda: reflow_pairs(flow, 4, method="euler_ish"), ValueError, "method"),
        (lambda: straightness(flow, 8, steps=0), ValueError, "steps must be a positive int"),
        (lambda: straightness(flow, 8, steps=2.5), ValueError, "steps must be a positive int"),
    ]
    conditional = FlowMatcher(VelocityMLP(2, hidden=(8,), context=3))
    cases += [
        (lambda: reflow_pairs(conditional, 4), ValueError, "this model is conditional"),
        (lambda: reflow_pairs(conditional, 4, context=torch.randn(3, 3)), ValueError, "one row per pair"),
        (lambda: straightness(conditional, 2, context=torch.full((2, 3), math.nan)), ValueError, "NaN"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    x0, x1 = reflow_pairs(flow, 5, steps=2, batch_size=2)  # every row filled across uneven batches
    assert x1.shape == (5, 2) and torch.isfinite(x1).all() and not torch.equal(x0, x1)


def test_a_consistency_model_refuses_to_be_solved_as_an_ode() -> None:
    model = ConsistencyMatcher(VelocityMLP(2, hidden=(8,)))
    for call in (
        lambda: model.sample_sde(4),
        lambda: model.velocity_at(torch.randn(2, 2), 0.5),
        lambda: reflow_pairs(model, 4),
        lambda: straightness(model, 4),
    ):
        with pytest.raises(ValueError, match="it is not a velocity field"):
            call()
    assert model.sample(3, steps=2).shape == (3, 2)
    with pytest.raises(ValueError, match=r"atol = 0\.001: method 'euler' takes equal steps and reads no tolerance"):
        model.sample(3, atol=1e-3)
    with pytest.raises(ValueError, match="draws its times on its Karras grid"):
        ConsistencyMatcher(VelocityMLP(2, hidden=(8,)), time_sampler=LogitNormalTime())


@pytest.mark.parametrize("path", [CosinePath(), LinearPath(sigma_min=0.05)])
def test_consistency_distillation_refuses_a_teacher_on_another_path(path: AffinePath) -> None:
    student = ConsistencyMatcher(VelocityMLP(2, hidden=(8,)))
    teacher = FlowMatcher(VelocityMLP(2, hidden=(8,)), path)
    calls = (lambda: student.distillation_loss(torch.randn(8, 2), teacher), lambda: student.distilled_from(teacher))
    for call in calls:
        with pytest.raises(ValueError, match="linear path with sigma_min = 0"):
            call()


def test_a_float64_network_samples_in_float64() -> None:
    flow = FlowMatcher(VelocityMLP(2, hidden=(8,), context=3).double(), context_dropout=0.1)
    context = torch.randn(2, 3, dtype=torch.float64)
    assert flow.sample(4, context, steps=2, guidance_scale=2.0).dtype == torch.float64
    assert flow.sample_sde(4, context, steps=2).dtype == torch.float64


def test_seeded_sampling_is_the_same_whether_or_not_the_solve_was_just_traced() -> None:
    """The second call with one signature traces the solve; its probes leave the caller's random state alone."""
    flow = FlowMatcher(VelocityMLP(2, hidden=(8,)))
    draws = []
    for _ in range(3):
        torch.manual_seed(0)
        draws.append((flow.sample(3, steps=4), torch.randn(1)))
    for samples, after in draws[1:]:
        torch.testing.assert_close(samples, draws[0][0])
        assert torch.equal(after, draws[0][1])


def test_couplings_and_time_laws_show_the_arguments_they_were_built_with() -> None:
    assert repr(ExactOTCoupling()) == "ExactOTCoupling(per_condition=True)"
    assert repr(LogitNormalTime(mean=0.5)) == "LogitNormalTime(mean=0.5, std=1.0)"
    assert repr(UniformTime()) == "UniformTime()"
    shown = FlowMatcher(VelocityMLP(2, hidden=(4,)), coupling=SinkhornCoupling(reg=0.1)).extra_repr()
    assert "coupling=SinkhornCoupling(reg=0.1, per_condition=True, seed=None)" in shown
    assert "_rebuild" not in shown and "Signature" not in shown
