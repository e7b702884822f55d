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
