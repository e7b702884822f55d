"""Constructor and metric argument checks: bad values are refused where they enter, naming the argument."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import flowforge.distributions as distributions
import flowforge.transforms as transforms
from flowforge.eval.image_quality import DigitsClassifier, frechet_classifier_distance, frechet_distance
from flowforge.eval.metrics import mmd
from flowforge.eval.plots import _plot_curve, plot_density_2d
from flowforge.flows.recipes import MAF, NICE, NSF, Glow, MultiscaleRealNVP, RealNVP, ResidualFlow
from flowforge.matching.couplings import ExactOTCoupling, SinkhornCoupling
from flowforge.matching.paths import LinearPath, StochasticInterpolantPath, VariancePreservingPath
from flowforge.matching.time import LogitNormalTime, ShiftedBetaTime
from flowforge.nn.conv import ConvConditioner
from flowforge.nn.made import MADE
from flowforge.nn.mlp import MLP
from flowforge.nn.velocity import ResidualVelocityMLP, SinusoidalTimeEmbedding, VelocityMLP
from flowforge.transforms import MaskedAutoregressive, RationalQuadraticSpline

NAN, INF = float("nan"), float("inf")


# -- 1. velocity networks -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "error", "name"),
    [
        (lambda: VelocityMLP(2, context=-1), ValueError, "context"),
        (lambda: MLP(2, 2, dropout=-0.1), ValueError, "dropout"),
        (lambda: MLP(2, 2, dropout=NAN), ValueError, "dropout"),
        (lambda: MLP(2, 2, dropout="0.5"), TypeError, "dropout"),
        (lambda: MLP(True, 2), ValueError, "in_features"),
        (lambda: MLP(2, 2, hidden=8), TypeError, "hidden must be a sequence"),
        (lambda: MLP(2, 2, hidden=(2.5,)), ValueError, r"hidden\[0\]"),
        (lambda: VelocityMLP(2.5), ValueError, "features"),
        (lambda: VelocityMLP(True), ValueError, "features"),
        (lambda: VelocityMLP(2, hidden=(8.5,)), ValueError, "hidden"),
        (lambda: VelocityMLP(2, time_embedding=-2), ValueError, "time_embedding"),
        (lambda: VelocityMLP(2, time_embedding=3), ValueError, "time_embedding"),
        (lambda: VelocityMLP(2, step_input="yes"), TypeError, "step_input"),
        (lambda: ResidualVelocityMLP(2, context=1.5), ValueError, "context"),
        (lambda: ResidualVelocityMLP(0), ValueError, "features"),
        (lambda: ResidualVelocityMLP(2, width=0), ValueError, "width"),
        (lambda: ResidualVelocityMLP(2, blocks=1.0), ValueError, "blocks"),
        (lambda: SinusoidalTimeEmbedding(8, max_frequency=NAN), ValueError, "max_frequency"),
    ],
)
def test_velocity_networks_refuse_bad_sizes(build, error, name) -> None:
    with pytest.raises(error, match=name):
        build()


def test_velocity_network_accepts_numpy_ints() -> None:
    net = VelocityMLP(np.int64(2), context=np.int64(1), hidden=[8])
    assert net.features == 2 and type(net.features) is int
    assert net(torch.randn(3, 2), torch.rand(3), torch.randn(3, 1)).shape == (3, 2)


# -- 2. time samplers and paths -------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "name"),
    [
        (lambda: LogitNormalTime(NAN), "mean"),
        (lambda: LogitNormalTime(INF), "mean"),
        (lambda: LogitNormalTime(0.0, NAN), "std"),
        (lambda: LogitNormalTime(0.0, 0.0), "std"),
        (lambda: ShiftedBetaTime(NAN), "alpha"),
        (lambda: ShiftedBetaTime(1.5, INF), "beta"),
        (lambda: ShiftedBetaTime(1.5, 1.0, NAN), "scale"),
        (lambda: ShiftedBetaTime(1.5, 1.0, 1.5), "scale"),
        (lambda: StochasticInterpolantPath(gamma_scale=NAN), "gamma_scale"),
        (lambda: StochasticInterpolantPath(gamma_scale=INF), "gamma_scale"),
        (lambda: LinearPath(NAN), "sigma_min"),
        (lambda: VariancePreservingPath(beta_min=NAN), "beta_min"),
        (lambda: VariancePreservingPath(beta_max=INF), "beta_max"),
        (lambda: VariancePreservingPath(beta_min=2.0, beta_max=1.0), "beta_max"),
        (lambda: VariancePreservingPath(s_min=NAN), "s_min"),
        (lambda: VariancePreservingPath(s_min=0.0), "s_min"),
    ],
)
def test_time_samplers_and_paths_refuse_non_finite_parameters(build, name) -> None:
    with pytest.raises(ValueError, match=name):
        build()


def test_time_samplers_and_paths_refuse_non_numbers() -> None:
    with pytest.raises(TypeError, match="std"):
        LogitNormalTime(0.0, "1")
    with pytest.raises(TypeError, match="gamma_scale"):
        StochasticInterpolantPath(gamma_scale=None)
    with pytest.raises(TypeError, match="base"):
        StochasticInterpolantPath(base="linear")


def test_valid_time_sampler_and_path_still_work() -> None:
    t = LogitNormalTime(0.5, 2.0)(64, generator=torch.Generator().manual_seed(0))
    assert t.shape == (64,) and bool(((t > 0) & (t < 1)).all())
    path = StochasticInterpolantPath(LinearPath(0.01), gamma_scale=np.float32(0.5))
    assert path.gamma_scale == 0.5
    xt, ut = path.sample(torch.zeros(4, 2), torch.ones(4, 2), torch.rand(4))
    assert bool(torch.isfinite(xt).all() and torch.isfinite(ut).all())


# -- 3. couplings ---------------------------------------------------------------------------


@pytest.mark.parametrize("reg", [NAN, INF, 0.0, -1.0])
def test_sinkhorn_refuses_bad_regularisation(reg: float) -> None:
    with pytest.raises(ValueError, match="reg"):
        SinkhornCoupling(reg)


def test_couplings_refuse_non_bool_and_non_generator_arguments() -> None:
    with pytest.raises(TypeError, match="reg"):
        SinkhornCoupling("0.1")
    with pytest.raises(TypeError, match="per_condition"):
        SinkhornCoupling(0.1, per_condition="no")
    with pytest.raises(TypeError, match="per_condition"):
        ExactOTCoupling(per_condition=1)
    with pytest.raises(TypeError, match="generator"):
        SinkhornCoupling(0.1, generator=0)


# -- 4. multi-scale recipes -----------------------------------------------------------------


@pytest.mark.parametrize("recipe", [Glow, MultiscaleRealNVP])
@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"scale_bound": NAN}, ValueError, "scale_bound"),
        ({"scale_bound": 0.0}, ValueError, "scale_bound"),
        ({"scale_bound": "3"}, TypeError, "scale_bound"),
        ({"shape": (1, 8.9, 8)}, ValueError, "shape"),
        ({"shape": (1, 8, 8.0)}, ValueError, "shape"),
        ({"shape": (1, 8)}, ValueError, "shape"),
        ({"levels": True}, ValueError, "levels"),
        ({"levels": 1.5}, ValueError, "levels"),
        ({"steps": 2.0}, ValueError, "steps"),
        ({"hidden_channels": 0}, ValueError, "hidden_channels"),
        ({"context": -1}, ValueError, "context"),
        ({"context": 1.5}, ValueError, "context"),
    ],
)
def test_multiscale_recipes_refuse_bad_arguments(recipe, kwargs, error, name) -> None:
    arguments = {"shape": (1, 8, 8), "levels": 2, "steps": 1, "hidden_channels": 4, **kwargs}
    with pytest.raises(error, match=name):
        recipe(**arguments)


def test_glow_still_builds_with_numpy_shape() -> None:
    flow = Glow(np.array([1, 8, 8]), levels=2, steps=1, hidden_channels=4)
    assert flow.sample(2).shape == (2, 1, 8, 8)


# -- 5. recipes: seeds and flags ------------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda: RealNVP(3, seed=2.5),
        lambda: RealNVP(3, seed=None),
        lambda: NICE(3, seed=-1),
        lambda: NSF(3, autoregressive=False, seed="0"),
    ],
)
def test_recipes_refuse_bad_seeds(build) -> None:
    with pytest.raises(ValueError, match="seed"):
        build()


@pytest.mark.parametrize(
    ("build", "name"),
    [
        (lambda: NSF(2, autoregressive="no"), "autoregressive"),
        (lambda: NSF(2, autoregressive=0), "autoregressive"),
        (lambda: NSF(2, residual="yes"), "residual"),
        (lambda: MAF(3, residual="yes"), "residual"),
        (lambda: MAF(3, batch_norm=1), "batch_norm"),
        (lambda: ResidualFlow(2, actnorm="no"), "actnorm"),
        (lambda: MaskedAutoregressive(3, residual="yes"), "residual"),
    ],
)
def test_boolean_arguments_must_be_bools(build, name) -> None:
    with pytest.raises(TypeError, match=name):
        build()


def test_transform_and_spline_sizes_are_checked() -> None:
    with pytest.raises(ValueError, match="features"):
        MaskedAutoregressive(2.5)
    with pytest.raises(ValueError, match="context"):
        MaskedAutoregressive(3, context=-1)
    with pytest.raises(TypeError, match="transformer"):
        MaskedAutoregressive(3, "affine")
    with pytest.raises(ValueError, match="bound"):
        RationalQuadraticSpline(4, NAN)
    with pytest.raises(TypeError, match="bound"):
        RationalQuadraticSpline(4, "5")
    with pytest.raises(ValueError, match="bins"):
        RationalQuadraticSpline(1000)
    with pytest.raises(ValueError, match="mixing"):
        NSF(2, autoregressive=False, mixing="random")


def test_recipes_with_numpy_seed_and_bools_still_build() -> None:
    flow = RealNVP(3, transforms=3, hidden=(8,), seed=np.int64(3))
    assert flow.log_prob(torch.randn(4, 3)).shape == (4,)
    assert NSF(2, transforms=2, hidden=(8,), autoregressive=False).log_prob(torch.randn(3, 2)).shape == (3,)


# -- 6. MAF with batch norm samples in eval mode only ----------------------------------------


def test_maf_with_batch_norm_refuses_sampling_in_training_mode() -> None:
    flow = MAF(3, transforms=2, hidden=(8,), batch_norm=True)
    flow(torch.randn(16, 3))  # a training step's forward
    for draw in (lambda: flow.sample(5), lambda: flow.rsample(5), lambda: flow.sample_and_log_prob(5)):
        with pytest.raises(ValueError, match=r"batch_norm=True.*\.eval\(\)"):
            draw()
    flow.eval()
    samples, log_prob = flow.sample_and_log_prob(5)
    assert samples.shape == (5, 3) and bool(torch.isfinite(log_prob).all())
    assert flow.sample(5).shape == (5, 3)


def test_maf_without_batch_norm_samples_in_training_mode() -> None:
    flow = MAF(3, transforms=2, hidden=(8,))
    assert flow.training and flow.sample(5).shape == (5, 3)


# -- 7. metrics with too few rows -----------------------------------------------------------


def test_mmd_needs_two_rows_per_sample() -> None:
    with pytest.raises(ValueError, match=r"x must have shape .*n >= 2"):
        mmd(torch.randn(1, 2), torch.randn(5, 2))
    with pytest.raises(ValueError, match=r"y must have shape .*n >= 2"):
        mmd(torch.randn(5, 2), torch.randn(1, 2))
    assert math.isfinite(mmd(torch.randn(2, 2), torch.randn(2, 2)))


def test_frechet_distance_needs_two_rows() -> None:
    with pytest.raises(ValueError, match=r"features_a has 1 row\(s\).*at least 2"):
        frechet_distance(torch.randn(1, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"features_b has 1 row\(s\).*at least 2"):
        frechet_distance(np.zeros((5, 3)), np.zeros((1, 3)))


def test_frechet_classifier_distance_names_the_short_image_set() -> None:
    classifier = DigitsClassifier(channels=2, hidden=4)
    images = torch.rand(5, 1, 8, 8) * 16
    with pytest.raises(ValueError, match=r"samples has 1 row\(s\).*at least 2"):
        frechet_classifier_distance(classifier, images[:1], images)
    with pytest.raises(ValueError, match=r"reference has 0 row\(s\).*at least 2"):
        frechet_classifier_distance(classifier, images, images[:0])


# -- 8. a training curve of one point still shows ---------------------------------------------


def test_single_point_training_curve_is_drawn_with_a_marker() -> None:
    from matplotlib.figure import Figure

    ax = Figure().subplots()
    _plot_curve(ax, ([0], [1.5]))
    (line,) = ax.get_lines()
    assert line.get_marker() not in (None, "None", "", " ")
    assert line.get_xydata().tolist() == [[0.0, 1.5]]


def test_density_plot_with_a_one_step_loss_curve(tmp_path) -> None:
    flow = RealNVP(2, transforms=2, hidden=(8,))
    path = plot_density_2d(flow, torch.randn(50, 2), tmp_path / "density.png", losses=[1.0], samples=50)
    assert path.exists() and path.stat().st_size > 0


# -- 2. few-step models, the digits classifier, straightness --------------------------------


@pytest.mark.parametrize("kind", ["shortcut", "MeanFlow"])
def test_a_few_step_model_refuses_a_network_without_a_step_input_where_it_enters(kind: str) -> None:
    from flowforge.matching import MeanFlowMatcher, ShortcutMatcher

    model = ShortcutMatcher if kind == "shortcut" else MeanFlowMatcher
    with pytest.raises(ValueError, match=rf"velocity: a {kind} model .* this VelocityMLP has no step-size input"):
        model(VelocityMLP(2, hidden=(8,)))
    with pytest.raises(ValueError, match="ResidualVelocityMLP has no step-size input"):
        model(ResidualVelocityMLP(2, width=8, blocks=1))
    assert model(VelocityMLP(2, hidden=(8,), step_input=True)).loss(torch.randn(4, 2)).dim() == 0


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"learning_rate": True}, TypeError, "learning_rate must be a finite number, got True"),
        ({"learning_rate": NAN}, ValueError, "learning_rate must be a finite number > 0"),
        ({"seed": 1.5}, ValueError, r"seed must be an int in 0\.\.4294967295, got 1\.5"),
        ({"seed": "a"}, ValueError, "seed must be an int"),
    ],
)
def test_the_digits_classifier_names_a_bad_learning_rate_or_seed(arguments, error, message) -> None:
    from flowforge.eval.image_quality import train_digits_classifier

    with pytest.raises(error, match=message):
        train_digits_classifier(epochs=1, **arguments)


def test_straightness_takes_a_bool_for_normalized() -> None:
    from flowforge.matching import FlowMatcher, straightness

    with pytest.raises(TypeError, match=r"normalized must be a bool \(True or False\), got 'no'"):
        straightness(FlowMatcher(VelocityMLP(2, hidden=(8,))), n=4, steps=2, normalized="no")


# -- 3. flows and transforms ---------------------------------------------------------------


def _flow_parts():
    from flowforge.distributions import StandardNormal
    from flowforge.flows import Flow
    from flowforge.transforms import AffineCoupling

    return Flow, StandardNormal, AffineCoupling


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda F, N, C: F(N(2), C([True, False]), context_net=torch.nn.Linear(5, 3)),
            "context_net: the transform takes no context",
        ),
        (
            lambda F, N, C: F(N(2), C([True, False], context=3), context_net=torch.nn.Linear(5, 4)),
            "context_net gives 4 features but the transform takes a context of 3",
        ),
        (
            lambda F, N, C: F(N(2), C([True, False], context=3), context_features=5),
            r"context_features must be the transform's context size \(3\) without a context_net, got 5",
        ),
        (
            lambda F, N, C: F(N(2), C([True, False], context=3), context_features=-1),
            "context_features must be an int >= 0",
        ),
        (
            lambda F, N, C: F(N(2), C([True, False]), context_features=3),
            r"context_features must be the transform's context size \(0\)",
        ),
    ],
)
def test_a_flow_refuses_a_context_it_could_never_use(build, message) -> None:
    with pytest.raises(ValueError, match=message):
        build(*_flow_parts())


def test_a_flow_with_a_context_net_reads_its_context() -> None:
    Flow, StandardNormal, AffineCoupling = _flow_parts()
    torch.manual_seed(0)
    flow = Flow(StandardNormal(2), AffineCoupling([True, False], context=3), context_net=torch.nn.Linear(5, 3))
    torch.nn.init.normal_(flow.transform.conditioner[-1].weight)  # the conditioner starts at zero
    x = torch.randn(4, 2)
    assert not torch.equal(flow.log_prob(x, torch.randn(4, 5)), flow.log_prob(x, torch.randn(4, 5)))
    flow.log_prob(x, torch.randn(4, 5)).sum().backward()
    assert flow.context_net.weight.grad is not None and flow.context_net.weight.grad.abs().sum() > 0


def test_layers_that_take_contexts_of_different_sizes_are_not_composed() -> None:
    from flowforge.transforms import AffineCoupling, Compose, ImageAffineCoupling, Split

    with pytest.raises(ValueError, match=r"transforms take contexts of different sizes: \[2, 3\]"):
        Compose(AffineCoupling([True, False], context=2), AffineCoupling([False, True], context=3))
    mixed = Compose(AffineCoupling([True, False], context=2), AffineCoupling([False, True]))
    assert mixed.context_features == 2
    with pytest.raises(ValueError, match="inner takes a context of 3 features but Split's context is 2"):
        Split(4, inner=ImageAffineCoupling(2, context=3, hidden_channels=4), context=2, hidden_channels=4)
    assert Split(4, inner=ImageAffineCoupling(2, context=3, hidden_channels=4), hidden_channels=4).context_features == 3


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (
            lambda: transforms.Permutation([0.0, 1.9, 2.2]),
            ValueError,
            r"permutation must be .* got \[0\.0, 1\.9, 2\.2\]",
        ),
        (lambda: transforms.Permutation([True, False]), ValueError, "permutation must be"),
        (
            lambda: MaskedAutoregressive(3, order=[0.0, 1.5, 2.0]),
            ValueError,
            r"order must be a 1-D arrangement of the ints 0\.\.2",
        ),
        (
            lambda: MaskedAutoregressive(3, order=[0, 2]),
            ValueError,
            r"order must be a 1-D arrangement of the ints 0\.\.2",
        ),
        (lambda: transforms.Permutation.random(-2), ValueError, "features must be a positive int, got -2"),
        (lambda: transforms.Permutation.reverse(0), ValueError, "features must be a positive int, got 0"),
        (lambda: transforms.Permutation.random(3, seed=2.5), ValueError, "seed must be an int in 0..4294967295"),
        (lambda: transforms.ActNorm(3, image="no"), TypeError, "image must be a bool"),
        (
            lambda: transforms.ImageAffineCoupling(4, parity=1.0),
            ValueError,
            r"parity must be an int in 0\.\.1, got 1\.0",
        ),
        (
            lambda: transforms.ImageAffineCoupling(4, parity=True),
            ValueError,
            "parity must be an int in 0..1, got True",
        ),
        (lambda: distributions.DiagNormal(2, learnable="no"), TypeError, "learnable must be a bool"),
        (
            lambda: transforms.Standardize(torch.tensor([NAN, 0.0]), torch.ones(2)),
            ValueError,
            "mean must be finite, got nan at index 0",
        ),
        (
            lambda: transforms.Standardize(torch.zeros(2), torch.tensor([INF, 1.0])),
            ValueError,
            "std must be finite, got inf at index 0",
        ),
        (
            lambda: transforms.Standardize(torch.zeros(2), torch.tensor([1.0, 0.0])),
            ValueError,
            "std must be positive in every feature, got 0 at index 1",
        ),
        (lambda: transforms.Standardize("ab", torch.ones(2)), TypeError, "mean must be a vector of numbers"),
        (
            lambda: transforms.Coupling([True, False], torch.nn.Linear(2, 2)),
            TypeError,
            "transformer must be an ElementwiseTransformer",
        ),
        (lambda: transforms.InvertibleConv1x1(0), ValueError, "channels must be a positive int, got 0"),
        (
            lambda: transforms.ResidualBlock(2, hidden=(0,)),
            ValueError,
            r"hidden must be a sequence of positive ints",
        ),
        (
            lambda: transforms.ContinuousFlowTransform(None, 2, method="rk4", steps=2),
            TypeError,
            "velocity must be an nn.Module",
        ),
    ],
)
def test_transform_arguments_are_refused_naming_them(build, error, message) -> None:
    with pytest.raises(error, match=message):
        build()


def test_standardize_takes_numpy_statistics_into_a_float32_flow() -> None:
    from flowforge.distributions import StandardNormal
    from flowforge.flows import Flow
    from flowforge.transforms import AffineCoupling, Compose, Standardize

    data = np.random.default_rng(0).normal(3.0, 2.0, size=(50, 2))
    layer = Standardize(data.mean(0), [float(s) for s in data.std(0)])  # float64 array and a list
    flow = Flow(StandardNormal(2), Compose(layer, AffineCoupling([True, False])))
    x = torch.as_tensor(data[:4], dtype=torch.float32)
    expected = StandardNormal(2).log_prob((x - layer.mean) / layer.std) - layer.std.log().sum()
    torch.testing.assert_close(flow.log_prob(x), expected)


def test_a_residual_block_inverts_an_empty_batch() -> None:
    from flowforge.transforms import ResidualBlock

    x, logdet = ResidualBlock(2, hidden=(4,)).eval().inverse(torch.zeros(0, 2))
    assert x.shape == (0, 2) and logdet.shape == (0,)


# -- 4. networks ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda: MaskedAutoregressive(3, hidden="64"), ValueError, "hidden must be a sequence of positive ints"),
        (lambda: MADE(3, 2, hidden=(8.7,)), ValueError, "hidden must be a sequence of positive ints"),
        (lambda: MADE(3, 2, hidden=(8, 8), residual="no"), TypeError, "residual must be a bool"),
        (lambda: MADE(True, 2), ValueError, "features must be a positive int, got True"),
        (lambda: MADE(3, 2)(torch.randn(4, 3), torch.randn(4, 2)), ValueError, "this network takes no context"),
        (
            lambda: MADE(3, 2, context=2)(torch.randn(4, 3)),
            ValueError,
            r"this network is conditional: pass a context of shape \(batch, 2\)",
        ),
        (
            lambda: ConvConditioner(2, 4, context=3)(torch.randn(1, 2, 4, 4)),
            ValueError,
            r"context of shape \(batch, 3\)",
        ),
        (lambda: ConvConditioner(2.5, 4), ValueError, "in_channels must be a positive int, got 2.5"),
        (
            lambda: VelocityMLP(2)(torch.randn(4, 3), torch.rand(4)),
            ValueError,
            r"x must have shape \(batch, 2\), got \(4, 3\)",
        ),
        (lambda: ResidualVelocityMLP(2, width=8, blocks=1)(torch.randn(4), torch.rand(4)), ValueError, r"got \(4,\)"),
        (
            lambda: VelocityMLP(2, step_input=True)(torch.randn(4, 2), torch.rand(4), step=True),
            ValueError,
            "step must be a finite step size >= 0",
        ),
    ],
)
def test_network_arguments_and_inputs_are_refused_naming_them(build, error, message) -> None:
    with pytest.raises(error, match=message):
        build()


def test_a_velocity_mlp_takes_a_float64_state_into_a_float32_network() -> None:
    net = VelocityMLP(2, hidden=(8,))
    x = torch.randn(3, 2, dtype=torch.float64)
    assert net(x, torch.zeros(3)).dtype == torch.float32
    torch.testing.assert_close(net(x, torch.zeros(3)), net(x.float(), torch.zeros(3)))


def test_velocity_networks_honour_every_hook() -> None:
    net = VelocityMLP(2, hidden=(8,))
    fired: list[str] = []
    handles = [
        net.net.register_forward_hook(lambda *_: fired.append("net")),
        net.net[0].register_full_backward_hook(lambda *_: fired.append("first layer backward")),
    ]
    x = torch.randn(3, 2, requires_grad=True)
    net(x, torch.rand(3)).sum().backward()
    assert fired == ["net", "first layer backward"]
    for handle in handles:
        handle.remove()
    fired.clear()
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, *_: fired.append(type(module).__name__)
    )
    try:
        net(x, torch.rand(3))
    finally:
        handle.remove()
    assert fired.count("Linear") == 2 and "VelocityMLP" in fired


def test_flow_matching_validation_builds_no_graph() -> None:
    from flowforge.matching import FlowMatcher
    from flowforge.train import FlowMatchingObjective

    seen = []
    matcher = FlowMatcher(VelocityMLP(2, hidden=(8,)))
    matcher.velocity.register_forward_hook(lambda module, inputs, output: seen.append(output.requires_grad))
    FlowMatchingObjective().validation(matcher, (torch.randn(8, 2), None))
    assert seen == [False]


@pytest.mark.parametrize("setting", ["layers", "heads", "mlp_ratio"])
def test_the_policy_transformer_refuses_a_zero_size(setting: str) -> None:
    from flowforge.nn.transformer import PrefixSuffixTransformer

    with pytest.raises(ValueError, match=rf"{setting} must be a positive int, got 0"):
        PrefixSuffixTransformer(width=32, **{setting: 0})
