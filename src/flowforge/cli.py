"""The ``flowforge`` command line (also ``python -m flowforge``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import torch
import typer

import flowforge
from flowforge.data import TOY_DATASETS, toy_dataset
from flowforge.eval import negative_log_likelihood, plot_density_2d
from flowforge.flows import IAF, MAF, NICE, NSF, RealNVP
from flowforge.train import fit_maximum_likelihood

app = typer.Typer(
    help="flowforge: flow-based generative models and flow-matching robot policies.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_RECIPES = {"realnvp": RealNVP, "nice": NICE, "maf": MAF, "iaf": IAF, "nsf": NSF}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"flowforge {flowforge.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """flowforge: flow-based generative models and flow-matching robot policies."""


@app.command()
def demo(
    dataset: Annotated[str, typer.Option(help=f"Built-in 2-D set: {', '.join(TOY_DATASETS)}.")] = "moons",
    model: Annotated[str, typer.Option(help=f"Recipe: {', '.join(_RECIPES)}.")] = "realnvp",
    steps: Annotated[int, typer.Option(min=1, help="Training steps.")] = 2000,
    batch_size: Annotated[int, typer.Option(min=1)] = 256,
    transforms: Annotated[int, typer.Option(min=1, help="Flow layers.")] = 8,
    out: Annotated[Path, typer.Option(help="Folder for the plot.")] = Path("flowforge-demo"),
    seed: Annotated[int, typer.Option()] = 0,
    progress: Annotated[
        bool | None, typer.Option("--progress/--no-progress", help="Progress bar (default: on a terminal).")
    ] = None,
) -> None:
    """Train a flow on a built-in 2-D set, print its test NLL and plot the learned density."""
    if dataset not in TOY_DATASETS:
        raise typer.BadParameter(
            f"unknown data set {dataset!r}; choose one of {', '.join(TOY_DATASETS)}", param_hint="--dataset"
        )
    if model not in _RECIPES:
        raise typer.BadParameter(f"unknown model {model!r}; choose one of {', '.join(_RECIPES)}", param_hint="--model")
    torch.manual_seed(seed)
    train_data = toy_dataset(dataset, 20_000, seed=seed)
    test_data = toy_dataset(dataset, 10_000, seed=seed + 1)
    flow = _RECIPES[model](2, transforms=transforms, hidden=(64, 64))
    typer.echo(f"training {model} ({transforms} layers) on {dataset}: {steps} steps, batch {batch_size}")
    start = time.perf_counter()
    losses = fit_maximum_likelihood(flow, train_data, steps=steps, batch_size=batch_size, seed=seed, progress=progress)
    elapsed = time.perf_counter() - start
    nll = negative_log_likelihood(flow, test_data)
    typer.echo(f"trained in {elapsed:.1f} s; test NLL = {nll:.4f} nats")
    figure = plot_density_2d(
        flow,
        test_data,
        out / f"{model}_{dataset}.png",
        losses=losses,
        title=f"{model} on {dataset}: test NLL {nll:.3f} nats",
    )
    typer.echo(f"wrote {figure}")


def main() -> None:
    """Console-script entry point."""
    app()
