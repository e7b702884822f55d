"""Constructor and metric argument checks: bad values are refused where they enter, naming the argument."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flowforge.eval.image_quality import DigitsClassifier, frechet_classifier_distance, frechet_distance
from flowforge.eval.metrics import mmd
from flowforge.eval.plots import _plot_curve, plot_density_2d
from flowforge.flows.recipes import MAF, NICE, NSF, Glow, MultiscaleRealNVP, RealNVP, ResidualFlow
from flowforge.matching.couplings import ExactOTCoupling, SinkhornCoupling
from flowforge.matching.paths import LinearPath, StochasticInterpolantPath, VariancePreservingPath
from flowforge.matching.time import LogitNormalTime, ShiftedBetaTime
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
