"""What `flowforge eval` prints: metrics in one line, and a clear error for a model whose samples are not finite."""

from __future__ import annotations

import pytest
import torch

from flowforge.errors import FlowforgeError
from flowforge.eval.report import format_metrics, likelihood_metrics, sample_metrics


def test_likelihood_metrics_convert_nats_to_bits_per_dimension() -> None:
    metrics = likelihood_metrics(torch.full((10,), -2 * torch.log(torch.tensor(2.0)).item()), dims=2)
    assert metrics["nll"] == pytest.approx(2 * 0.6931471805599453) and metrics["bits_per_dim"] == pytest.approx(1.0)
    assert format_metrics({"nll": 1.23456}) == "nll 1.2346"


def test_non_finite_model_samples_are_a_flowforge_error_naming_the_model() -> None:
    generated = torch.randn(20, 2)
    generated[3, 1] = float("nan")
    with pytest.raises(FlowforgeError, match="1 of the model's 20 samples hold NaN or inf"):
        sample_metrics(generated, torch.randn(20, 2))


def test_figures_are_written_in_the_format_their_suffix_names(tmp_path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from flowforge.eval.plots import save_figure

    for name, start in (("a.svg", b"<?xml"), ("a.pdf", b"%PDF"), ("a.png", b"\x89PNG"), ("sigma_0.5", b"\x89PNG")):
        fig = plt.figure()
        path = save_figure(fig, tmp_path / name)
        plt.close(fig)
        assert path.read_bytes().startswith(start), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pdf", "a.png", "a.svg", "sigma_0.5"]  # no temporary left


def test_plot_bounds_give_a_constant_coordinate_a_range() -> None:
    from flowforge.eval.plots import plot_bounds

    points = torch.tensor([[1.0, -2.0], [3.0, -2.0]])
    assert plot_bounds(points) == pytest.approx((0.7, 3.3, -2.5, -1.5))


def test_likelihood_metrics_refuse_what_has_no_nll() -> None:
    from flowforge.errors import NumericalError

    with pytest.raises(ValueError, match="dims must be a positive int, got 0"):
        likelihood_metrics(torch.tensor([1.0]), 0)
    with pytest.raises(ValueError, match="dims must be a positive int, got -2"):
        likelihood_metrics(torch.tensor([1.0]), -2)
    for log_probs in (torch.tensor([]), torch.zeros(3, 4)):
        with pytest.raises(ValueError, match=r"log_probs must have shape \(n,\) with n >= 1"):
            likelihood_metrics(log_probs, 2)
    with pytest.raises(NumericalError, match="1 of 2 log-densities are NaN"):
        likelihood_metrics(torch.tensor([1.0, float("nan")]), 2)
    assert likelihood_metrics(torch.tensor([0.0, -float("inf")]), 2)["nll"] == float("inf")
    with pytest.raises(ValueError, match=r"generated must hold at least 2 samples"):
        sample_metrics(torch.randn(1, 2), torch.randn(5, 2))


def test_plots_bound_finite_points_and_take_parameterless_flows_and_array_losses(tmp_path) -> None:
    import numpy as np

    from flowforge.distributions import StandardNormal
    from flowforge.eval.plots import density_grid, plot_bounds, plot_density_2d
    from flowforge.flows import Flow
    from flowforge.transforms import Permutation

    assert plot_bounds(torch.tensor([[float("nan"), 0.0], [0.0, 0.0], [2.0, 1.0]])) == pytest.approx(
        (-0.3, 2.3, -0.15, 1.15)
    )
    with pytest.raises(ValueError, match=r"points has no finite row to bound the plot \(1 rows, none finite\)"):
        plot_bounds(torch.tensor([[float("inf"), 0.0]]))
    with pytest.raises(ValueError, match=r"points must have shape \(n, d\) with d >= 2"):
        plot_bounds(torch.zeros(3))
    fixed = Flow(StandardNormal(2), Permutation([1, 0]))  # no parameters at all
    _, _, density = density_grid(fixed, (-1.0, 1.0, -1.0, 1.0), 5)
    torch.testing.assert_close(density[2, 2], torch.tensor(1 / (2 * torch.pi)))
    written = plot_density_2d(fixed, torch.randn(20, 2), tmp_path / "d.png", losses=np.array([3.0, 2.0]), samples=10)
    assert written.stat().st_size > 0


def test_a_class_grid_refuses_non_finite_pixels_and_reads_a_column_of_labels(tmp_path) -> None:
    from flowforge.eval.plots import _class_rows, plot_class_grid

    samples = torch.rand(6, 1, 4, 4)
    rows = _class_rows(samples, torch.tensor([[0], [0], [1], [1], [2], [2]]))
    assert [row.shape[0] for row in rows] == [2, 2, 2]
    with pytest.raises(ValueError, match="must be one-hot"):
        _class_rows(samples, torch.full((6, 3), 1 / 3))
    samples[3, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"samples of class 1 hold NaN or inf \(its sample 0\)"):
        plot_class_grid(samples, torch.tensor([0, 0, 0, 1, 1, 1]), tmp_path / "g.png")
    assert not (tmp_path / "g.png").exists()
