"""Figures a person would rather look at than read. matplotlib's object API is used directly,
so importing flowforge never changes the process-wide plotting backend."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from flowforge.flows.base import Flow


@torch.no_grad()
def density_grid(
    flow: Flow, bounds: tuple[float, float, float, float], resolution: int = 200
) -> tuple[Tensor, Tensor, Tensor]:
    """Evaluate a 2-D flow's density on a ``resolution`` x ``resolution`` grid over ``bounds``.

    Returns ``(xs, ys, density)`` with ``density[i, j]`` the density at ``(xs[j], ys[i])``.
    """
    if tuple(flow.event_shape) != (2,):
        raise ValueError(f"density_grid needs a flow over 2 features, got event shape {tuple(flow.event_shape)}")
    parameter = next(flow.parameters())
    x0, x1, y0, y1 = bounds
    xs = torch.linspace(x0, x1, resolution, dtype=parameter.dtype, device=parameter.device)
    ys = torch.linspace(y0, y1, resolution, dtype=parameter.dtype, device=parameter.device)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)
    density = flow.log_prob(grid).exp().reshape(resolution, resolution)
    return xs.cpu(), ys.cpu(), density.cpu()


def plot_density_2d(
    flow: Flow,
    data: Tensor,
    path: str | Path,
    *,
    losses: Sequence[float] | None = None,
    samples: int = 2000,
    title: str = "",
) -> Path:
    """Write a PNG with the data, the learned density, flow samples and (optionally) the loss curve."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = data.detach().cpu()
    low, high = data.min(0).values, data.max(0).values
    pad = 0.15 * (high - low)
    bounds = (float(low[0] - pad[0]), float(high[0] + pad[0]), float(low[1] - pad[1]), float(high[1] + pad[1]))
    xs, ys, density = (t.numpy() for t in density_grid(flow, bounds))
    drawn = flow.sample(samples).cpu().numpy()

    panels = 4 if losses else 3
    fig = Figure(figsize=(4 * panels, 4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels)
    shown = data[torch.randperm(data.shape[0])[:samples]].numpy()
    axes[0].scatter(shown[:, 0], shown[:, 1], s=2, alpha=0.5, color="tab:blue")
    axes[0].set_title("data")
    axes[1].pcolormesh(xs, ys, density, shading="auto", cmap="viridis")
    axes[1].set_title("learned density")
    axes[2].scatter(drawn[:, 0], drawn[:, 1], s=2, alpha=0.5, color="tab:orange")
    axes[2].set_title("flow samples")
    for ax in axes[:3]:
        ax.set_xlim(bounds[0], bounds[1])
        ax.set_ylim(bounds[2], bounds[3])
        ax.set_aspect("equal")
    if losses:
        axes[3].plot(losses, lw=0.8)
        axes[3].set_title("training NLL (nats)")
        axes[3].set_xlabel("step")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    """Lay out and write a matplotlib figure as PNG, atomically (temporary file, then rename)."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    try:
        fig.savefig(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
