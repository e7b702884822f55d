"""Figures a person would rather look at than read. matplotlib's object API is used directly,
so importing flowforge never changes the process-wide plotting backend."""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import chain
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flowforge.flows.base import Flow
from flowforge.validation import model_dtype


@torch.no_grad()
def density_grid(
    flow: Flow, bounds: tuple[float, float, float, float], resolution: int = 200
) -> tuple[Tensor, Tensor, Tensor]:
    """Evaluate a 2-D flow's density on a ``resolution`` x ``resolution`` grid over ``bounds``.

    Returns ``(xs, ys, density)`` with ``density[i, j]`` the density at ``(xs[j], ys[i])``.
    """
    if tuple(flow.event_shape) != (2,):
        raise ValueError(f"density_grid needs a flow over 2 features, got event shape {tuple(flow.event_shape)}")
    # a flow of fixed layers (a permutation, a standardisation) may hold buffers only, or nothing
    held = next(chain(flow.parameters(), flow.buffers()), None)
    dtype, device = model_dtype(flow), held.device if held is not None else torch.device("cpu")
    x0, x1, y0, y1 = bounds
    xs = torch.linspace(x0, x1, resolution, dtype=dtype, device=device)
    ys = torch.linspace(y0, y1, resolution, dtype=dtype, device=device)
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
    bounds = plot_bounds(data)
    losses = None if losses is None else np.asarray(losses, dtype=float).reshape(-1)
    xs, ys, density = (t.numpy() for t in density_grid(flow, bounds))
    drawn = flow.sample(samples).cpu().numpy()

    curve = losses is not None and losses.size > 0
    panels = 4 if curve else 3
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
    if curve:
        axes[3].plot(losses, lw=0.8, **_curve_markers(len(losses)))
        axes[3].set_title("training NLL (nats)")
        axes[3].set_xlabel("step")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    """Lay out and write a matplotlib figure, atomically (temporary file, then rename), in the format
    its suffix names (``.png``, ``.pdf``, ``.svg``, ...; PNG for a name without a known one)."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kind = path.suffix.lower().lstrip(".")
    if kind not in fig.canvas.get_supported_filetypes():
        kind = "png"
    tmp = path.with_name(f"{path.name}.tmp.{kind}")
    try:
        fig.savefig(tmp, format=kind)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def image_grid(images: Tensor, rows: int, levels: float) -> np.ndarray:
    """The first ``rows**2`` images ``(N, C, H, W)`` (or flattened square images) tiled with 1-pixel gaps, in [0, 1]."""
    images = images.detach().cpu().float()
    if images.dim() == 2:
        side = math.isqrt(images.shape[1])
        if side * side != images.shape[1]:
            raise ValueError(f"flattened images need a square number of pixels, got {images.shape[1]}")
        images = images.reshape(-1, 1, side, side)
    tiles = (images[: rows * rows, 0] / (levels - 1)).clamp(0, 1).numpy()
    height, width = tiles.shape[1:]
    grid = np.zeros((rows * (height + 1) + 1, rows * (width + 1) + 1))
    for k, tile in enumerate(tiles):
        top, left = 1 + (height + 1) * (k // rows), 1 + (width + 1) * (k % rows)
        grid[top : top + height, left : left + width] = tile
    return grid


def plot_image_run(
    path: str | Path,
    title: str,
    reference: Tensor | None,
    samples: Tensor,
    levels: float,
    curve: tuple[Sequence[float], Sequence[float]],
    rows: int = 6,
) -> Path:
    """Held-out images, model samples (grids of ``rows`` x ``rows``) and the training curve, as one PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    if reference is not None:
        axes[0].imshow(image_grid(reference, rows, levels), cmap="gray_r", vmin=0, vmax=1)
    axes[0].set_title("held-out images")
    axes[1].imshow(image_grid(samples, rows, levels), cmap="gray_r", vmin=0, vmax=1)
    axes[1].set_title("model samples")
    for ax in axes[:2]:
        ax.set_axis_off()
    _plot_curve(axes[2], curve)
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_points_run(
    path: str | Path,
    title: str,
    reference: Tensor,
    samples: Tensor,
    curve: tuple[Sequence[float], Sequence[float]],
    density: tuple[Tensor, Tensor, Tensor] | None = None,
    target_density: tuple[Tensor, Tensor, Tensor] | None = None,
    bounds: tuple[float, float, float, float] | None = None,
) -> Path:
    """A run over points at a glance: data (or the target's density), the model's density on a grid
    (2-D), its samples and its training curve. For more than two dimensions, the first two coordinates."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    reference, samples = reference.detach().cpu().float(), samples.detach().cpu().float()
    bounds = bounds if bounds is not None else plot_bounds(reference)
    fig = Figure(figsize=(16, 4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 4)
    if target_density is not None:
        xs, ys, grid = target_density
        axes[0].pcolormesh(xs.numpy(), ys.numpy(), grid.numpy(), shading="auto", cmap="viridis")
        axes[0].set_title("target density")
    else:
        shown = reference[torch.randperm(reference.shape[0])[: samples.shape[0]]].numpy()
        axes[0].scatter(shown[:, 0], shown[:, 1], s=2, alpha=0.5, color="tab:blue")
        axes[0].set_title("held-out data")
    if density is not None:
        xs, ys, grid = density
        axes[1].pcolormesh(xs.numpy(), ys.numpy(), grid.numpy(), shading="auto", cmap="viridis")
        axes[1].set_title("model density")
    else:
        axes[1].text(0.5, 0.5, f"{reference.shape[1]}-D data:\nfirst two coordinates shown", ha="center")
        axes[1].set_axis_off()
    drawn = samples.numpy()
    axes[2].scatter(drawn[:, 0], drawn[:, 1], s=2, alpha=0.5, color="tab:orange")
    axes[2].set_title("model samples")
    for ax in (axes[0], axes[1], axes[2]) if density is not None else (axes[0], axes[2]):
        ax.set_xlim(bounds[0], bounds[1])
        ax.set_ylim(bounds[2], bounds[3])
    _plot_curve(axes[3], curve)
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_line_run(
    path: str | Path,
    title: str,
    reference: Tensor,
    samples: Tensor,
    curve: tuple[Sequence[float], Sequence[float]],
    density: tuple[Tensor, Tensor] | None = None,
) -> Path:
    """A run over one-dimensional points at a glance: histograms of the data (with the model's
    density ``(xs, p(xs))`` over it) and of the model's samples, and the training curve."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    reference, samples = reference.detach().cpu().float()[:, 0], samples.detach().cpu().float()[:, 0]
    low, high, _, _ = plot_bounds(torch.stack([reference, reference], 1))
    fig = Figure(figsize=(12, 4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    bins = np.linspace(low, high, 60)
    axes[0].hist(reference.numpy(), bins=bins, density=True, color="tab:blue", alpha=0.6, label="held-out data")
    if density is not None:
        axes[0].plot(density[0].numpy(), density[1].numpy(), color="black", label="model density")
    axes[0].legend(loc="upper right", fontsize=8)
    axes[0].set_title("data and model density")
    axes[1].hist(samples.numpy(), bins=bins, density=True, color="tab:orange", alpha=0.6)
    axes[1].set_title("model samples")
    for ax in axes[:2]:
        ax.set_xlim(low, high)
    _plot_curve(axes[2], curve)
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_bounds(points: Tensor, pad: float = 0.15) -> tuple[float, float, float, float]:
    """``(x0, x1, y0, y1)`` around the first two coordinates of ``points``, padded by ``pad`` of the
    range (a coordinate that does not vary gets a range of 1 around its value, not an empty one).
    Rows holding NaN or inf (a diverged model's samples) are left out; with no finite row at all the
    points are refused."""
    if not isinstance(points, Tensor) or points.dim() != 2 or points.shape[1] < 2:
        shape = tuple(points.shape) if isinstance(points, Tensor) else type(points).__name__
        raise ValueError(f"points must have shape (n, d) with d >= 2, got {shape}")
    finite = points[:, :2][torch.isfinite(points[:, :2]).all(1)]
    if finite.shape[0] == 0:
        raise ValueError(f"points has no finite row to bound the plot ({points.shape[0]} rows, none finite)")
    low, high = finite.min(0).values, finite.max(0).values
    width = high - low
    margin = torch.where(width > 0, pad * width, torch.full_like(width, 0.5))
    return (
        float(low[0] - margin[0]),
        float(high[0] + margin[0]),
        float(low[1] - margin[1]),
        float(high[1] + margin[1]),
    )


def grid_points(bounds: tuple[float, float, float, float], resolution: int = 100) -> tuple[Tensor, Tensor, Tensor]:
    """``(xs, ys, points)``: a square grid over ``bounds``, ``points`` of shape ``(resolution**2, 2)``."""
    xs = torch.linspace(bounds[0], bounds[1], resolution)
    ys = torch.linspace(bounds[2], bounds[3], resolution)
    return xs, ys, torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)


def _curve_markers(points: int) -> dict[str, object]:
    """Markers for a short curve: a line of one point draws nothing, and a few points read better as dots."""
    return {"marker": "o", "markersize": 3} if points <= _MARKED_CURVE_POINTS else {}


#: Curves with at most this many points are drawn with a marker on every point.
_MARKED_CURVE_POINTS = 50


def _plot_curve(ax, curve: tuple[Sequence[float], Sequence[float]]) -> None:
    steps, losses = curve
    steps, losses = np.asarray(steps), np.asarray(losses)
    ax.plot(steps, losses, lw=0.8, **_curve_markers(len(losses)))
    ax.set_title("training loss")
    ax.set_xlabel("step")


def plot_chunk_boundaries(
    traces: dict[str, tuple[np.ndarray, Sequence[int]]],
    path: str | Path,
    dims: Sequence[int] = (0, 1, 2),
    names: Sequence[str] = ("dx", "dy", "dz", "gripper"),
) -> Path:
    """Action trajectories of one episode per execution method, with the steps where a new chunk
    took over marked: where a robot would "jump". ``traces``: method -> (actions (T, A) as sent,
    switch steps); one row of panels per method, one panel per action dimension in ``dims``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not traces:
        raise ValueError("traces is empty: give at least one execution method's actions")
    fig = Figure(figsize=(3.2 * len(dims), 2.2 * len(traces)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(traces), len(dims), squeeze=False)
    for row, (method, (actions, switches)) in enumerate(traces.items()):
        actions = np.asarray(actions)
        for column, dim in enumerate(dims):
            ax = axes[row][column]
            ax.plot(np.arange(len(actions)), actions[:, dim], lw=1.0, color="tab:blue")
            for step in switches:
                ax.axvline(step - 0.5, color="tab:red", lw=0.5, alpha=0.5)
            ax.set_ylim(-1.05, 1.05)
            if row == 0:
                ax.set_title(names[dim] if dim < len(names) else f"action {dim}")
            if column == 0:
                ax.set_ylabel(method)
            if row == len(traces) - 1:
                ax.set_xlabel("control step")
    fig.suptitle("actions sent; red lines: a new chunk takes over", fontsize=10)
    return save_figure(fig, path)


def plot_class_grid(
    samples: Tensor | Sequence[Tensor],
    labels: Tensor | None,
    path: str | Path,
    *,
    columns: int = 10,
    value_range: tuple[float, float] | None = None,
    class_names: Sequence[str] | None = None,
    title: str = "",
) -> Path:
    """Write a PNG grid of image samples, one row per class, up to ``columns`` images in each.

    ``samples`` and ``labels`` take one of three forms:

    * ``samples`` ``(N, C, H, W)`` and ``labels`` ``(N,)`` class numbers (or ``(N, K)`` one-hot rows);
    * ``samples`` ``(n, K, C, H, W)`` and ``labels=None``: column ``i``, class ``k`` is ``samples[i, k]``,
      the shape :meth:`flowforge.matching.FlowMatcher.sample` returns for a context of K rows (one per class);
    * ``samples`` a list of K tensors ``(n_k, C, H, W)``, one per class, and ``labels=None``.

    Images have 1 channel (drawn dark on light, as the digits figures) or 3 (RGB). ``value_range``
    ``(low, high)`` maps to the colour scale (values outside are clipped); by default the samples'
    own minimum and maximum (use ``(0, 16)`` for digit pixel counts). Rows are labelled with
    ``class_names`` (default: the class numbers); a class with no samples gets an empty row.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = _class_rows(samples, labels)
    if class_names is not None:
        if len(class_names) < len(rows):
            raise ValueError(f"class_names has {len(class_names)} names for {len(rows)} classes")
        rows = rows + [rows[0][:0]] * (len(class_names) - len(rows))
    if isinstance(columns, bool) or not isinstance(columns, int) or columns < 1:
        raise ValueError(f"columns must be a positive int, got {columns!r}")
    channels, height, width = rows[0].shape[1:]
    if channels not in (1, 3):
        raise ValueError(f"samples must have 1 or 3 channels, got {channels}")
    shown = [row[:columns].detach().cpu().double() for row in rows]
    for k, row in enumerate(shown):
        if not bool(torch.isfinite(row).all()):
            index = int((~torch.isfinite(row)).flatten(1).any(1).nonzero()[0])
            raise ValueError(f"samples of class {k} hold NaN or inf (its sample {index}): nothing to show for it")
    drawn = torch.cat(shown) if any(row.shape[0] for row in shown) else torch.zeros(1)
    if value_range is None:
        low, high = float(drawn.min()), float(drawn.max())
    else:
        low, high = (float(v) for v in value_range)
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(f"value_range must be two finite numbers, got {value_range!r}")
    if not high > low:
        if value_range is not None:
            raise ValueError(f"value_range must be (low, high) with low < high, got {value_range!r}")
        high = low + 1.0  # constant images
    # One mosaic with 1-pixel gaps; the gaps show as the background (white).
    mosaic = np.ones((len(rows) * (height + 1) + 1, columns * (width + 1) + 1, channels))
    for r, row in enumerate(shown):
        for c, image in enumerate(row):
            tile = ((image - low) / (high - low)).clamp(0, 1).permute(1, 2, 0).numpy()
            top, left = 1 + r * (height + 1), 1 + c * (width + 1)
            mosaic[top : top + height, left : left + width] = 1.0 - tile if channels == 1 else tile
    fig = Figure(figsize=(0.5 + 0.45 * columns, 0.3 + 0.45 * len(rows)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.imshow(mosaic[..., 0] if channels == 1 else mosaic, cmap="gray" if channels == 1 else None, vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([1 + r * (height + 1) + (height - 1) / 2 for r in range(len(rows))])
    ax.set_yticklabels(list(class_names) if class_names is not None else [str(k) for k in range(len(rows))])
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        ax.set_title(title)
    return save_figure(fig, path)


def _class_rows(samples: Tensor | Sequence[Tensor], labels: Tensor | None) -> list[Tensor]:
    """The samples of each class ``0..K-1``, as a list of ``(n_k, C, H, W)`` tensors (see :func:`plot_class_grid`)."""
    if isinstance(samples, Tensor):
        if labels is None:
            if samples.dim() != 5:
                raise ValueError(
                    "without labels, samples must have shape (n, classes, C, H, W) or be a list of one "
                    f"(n_k, C, H, W) tensor per class; got shape {tuple(samples.shape)}"
                )
            return list(samples.transpose(0, 1))
        if samples.dim() != 4:
            raise ValueError(f"samples must have shape (N, C, H, W) with labels (N,), got {tuple(samples.shape)}")
        if not isinstance(labels, Tensor):
            raise TypeError(
                f"labels must be a torch.Tensor of shape ({samples.shape[0]},), got {type(labels).__name__}"
            )
        if labels.dim() == 2 and labels.shape[0] == samples.shape[0] and labels.shape[1] > 1:
            if not bool(((labels == 0) | (labels == 1)).all()) or not bool((labels.sum(1) == 1).all()):
                raise ValueError("labels of shape (N, classes) must be one-hot: 0s and one 1 in each row")
            labels = labels.argmax(1)
        elif labels.dim() == 2 and labels.shape == (samples.shape[0], 1):
            labels = labels[:, 0]  # a column of class numbers
        if labels.shape != (samples.shape[0],):
            raise ValueError(
                f"labels must have shape ({samples.shape[0]},) (one class per sample) or "
                f"({samples.shape[0]}, classes) (one-hot), got {tuple(labels.shape)}"
            )
        if labels.numel() == 0:
            raise ValueError("samples has 0 rows: nothing to draw")
        if labels.is_floating_point() and not torch.equal(labels, labels.round()):
            raise ValueError("labels must hold whole class numbers")
        labels = labels.long().cpu()
        if int(labels.min()) < 0:
            raise ValueError(f"labels must be class numbers >= 0, got {int(labels.min())}")
        return [samples[(labels == k).to(samples.device)] for k in range(int(labels.max()) + 1)]
    if labels is not None:
        raise ValueError("labels must be None when samples is a list of one tensor per class")
    rows = list(samples)
    if not rows:
        raise ValueError("samples is an empty list: give one (n_k, C, H, W) tensor per class")
    for k, row in enumerate(rows):
        if not isinstance(row, Tensor) or row.dim() != 4 or tuple(row.shape[1:]) != tuple(rows[0].shape[1:]):
            shape = tuple(row.shape) if isinstance(row, Tensor) else type(row).__name__
            raise ValueError(
                f"samples[{k}] must be a tensor of shape (n_k, C, H, W) like samples[0] "
                f"{tuple(getattr(rows[0], 'shape', ()))}, got {shape}"
            )
    return rows
