"""The ``flowforge`` command line (also ``python -m flowforge``).

Thin by design: each command parses its arguments, calls the run layer once and prints. Errors a
user can cause (any :class:`~flowforge.errors.FlowforgeError`, an OS error on a path given, a
training run that diverges, a missing optional extra) are turned into one line on stderr and exit
code 2 in one place, :class:`_OneLineErrors` (option values that the parser refuses, such as a
number below an option's minimum, too); commands check their inputs before writing anything.
"""

from __future__ import annotations

import math
import os
import re
import sys
import tempfile
import time
import typing
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from typer.core import TyperGroup

import flowforge
from flowforge.config import MAX_SEED, name_list
from flowforge.envs.metaworld import MAX_EPISODE_STEPS, MAX_EPISODES
from flowforge.errors import ConfigError, FlowforgeError, is_out_of_memory, memory_asked
from flowforge.utils.progress import progress_enabled
from flowforge.validation import MAX_BATCH_SIZE, MAX_CANDIDATES, MAX_LAYERS, MAX_SAMPLER_STEPS, MAX_SAMPLES

#: The most solver steps a command takes (every family is at its best well below it).
#: Exceptions that mean "the user's input or environment", printed as one line with exit code 2.
USER_ERRORS = (FlowforgeError, OSError, FloatingPointError, ImportError)
#: The parser's exception classes, found through typer's public ``BadParameter`` because typer
#: either uses click's or carries its own copy.
_USAGE_ERROR, _CLICK_EXCEPTION = (
    next(cls for cls in typer.BadParameter.__mro__ if cls.__name__ == name) for name in ("UsageError", "ClickException")
)


class _OneLineErrors(TyperGroup):
    """The one place where user errors become ``error: ...`` on stderr and exit code 2."""

    def invoke(self, ctx):  # ctx: the click context typer passes
        try:
            return super().invoke(ctx)
        except USER_ERRORS as error:
            message = " ".join(str(error).split()) or type(error).__name__
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt as error:  # Ctrl-C: training says what it saved
            typer.echo(f"interrupted{': ' + str(error) if str(error) else ''}", err=True)
            raise typer.Exit(code=130) from None
        except (MemoryError, RuntimeError) as error:
            if not is_out_of_memory(error):
                raise
            typer.echo(f"error: {_out_of_memory_message(error)}", err=True)
            raise typer.Exit(code=2) from None

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """The parser's own refusals (an unknown option, a value out of an option's range) as one
        line and exit code 2 too, instead of click's usage block."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        given = list(sys.argv[1:] if args is None else args)
        empty = _empty_argument(given)
        if empty is not None:
            typer.echo(f"error: {empty}", err=True)
            sys.exit(2)
        try:
            code = super().main(given, prog_name, complete_var, standalone_mode=False, **extra)
        except _CLICK_EXCEPTION as error:
            if type(error).__name__ == "NoArgsIsHelpError":
                error.show()  # the help text, asked for by giving no arguments
                sys.exit(error.exit_code)
            if isinstance(error, _USAGE_ERROR):
                typer.echo(f"error: {_usage_message(error, given)}", err=True)
                sys.exit(2)
            typer.echo(f"error: {' '.join(error.format_message().split())}", err=True)
            sys.exit(error.exit_code)
        except typer.Abort:
            typer.echo("Aborted.", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def _empty_argument(given: list[str]) -> str | None:
    """The refusal of an empty argument (``--out ''`` would otherwise mean the current folder), or None."""
    for index, token in enumerate(given):
        option, _, value = token.partition("=")
        if token == "" or (token.startswith("--") and "=" in token and value == ""):
            named = option if token else (given[index - 1] if index and given[index - 1].startswith("-") else None)
            return f"{named} '': an empty value; give one" if named else "an empty argument ''; give a value"
    return None


def _out_of_memory_message(error: BaseException) -> str:
    return (
        f"out of memory{memory_asked(error)}: a size in the config or options is too large for this machine; "
        "lower the batch size, the model's widths or the chunk length"
    )


def _usage_message(error: Exception, given: list[str]) -> str:
    """The parser's message on one line, with the value given where an option's value was refused
    (its last occurrence: the one the parser read)."""
    message = " ".join(error.format_message().split())
    param = getattr(error, "param", None)
    if isinstance(error, typer.BadParameter) and getattr(param, "param_type_name", None) == "option":
        for index in reversed(range(len(given))):
            token = given[index]
            for name in param.opts:
                if token == name and index + 1 < len(given):
                    return _refused_value(message, name, param, given[index + 1])
                if token.startswith(name + "="):
                    return _refused_value(message, name, param, token[len(name) + 1 :])
    return message


def _refused_value(message: str, option: str, param: Any, value: str) -> str:
    """The parser's refusal with the value given; for nan or inf, the whole range the option allows
    (the parser names only the first bound it compared)."""
    low, high = getattr(param, "min", None), getattr(param, "max", None)
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    try:
        finite = math.isfinite(float(value)) or float not in (annotation, *typing.get_args(annotation))
    except ValueError:
        finite = True
    if finite or (low is None and high is None):
        return f"{message} (got {value!r})"
    bounds = " and ".join(f"{sign} {bound:g}" for sign, bound in ((">=", low), ("<=", high)) if bound is not None)
    return f"Invalid value for '{option}': expected a finite number {bounds} (got {value!r})"


app = typer.Typer(
    cls=_OneLineErrors,
    help="flowforge: flow-based generative models and flow-matching robot policies.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


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


def _demo_models() -> tuple[str, ...]:
    """Registered flows over vectors with a ``transforms`` count: what the demo can train."""
    import inspect

    from flowforge import registry
    from flowforge.flows import Flow

    chosen = []
    for name in registry.names("model"):
        cls = registry.lookup("model", name)
        parameters = list(inspect.signature(cls.__init__).parameters)
        if issubclass(cls, Flow) and parameters[1] == "features" and "transforms" in parameters:
            chosen.append(name)
    return tuple(chosen)


@app.command()
def demo(
    dataset: Annotated[str, typer.Option(help="Built-in 2-D set (flowforge list).")] = "moons",
    model: Annotated[
        str, typer.Option(help="A flow over vectors: realnvp, nice, maf, iaf, nsf, residual.")
    ] = "realnvp",
    steps: Annotated[int, typer.Option(min=1, max=2**63 - 1, help="Training steps.")] = 2000,
    batch_size: Annotated[int, typer.Option(min=1, max=MAX_BATCH_SIZE)] = 256,
    transforms: Annotated[int, typer.Option(min=1, max=MAX_LAYERS, help="Flow layers.")] = 8,
    out: Annotated[Path, typer.Option(help="Folder for the plot.")] = Path("flowforge-demo"),
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED)] = 0,
    progress: Annotated[
        bool | None, typer.Option("--progress/--no-progress", help="Progress bar (default: on a terminal).")
    ] = None,
) -> None:
    """Train a flow on a built-in 2-D set, print its test NLL and plot the learned density."""
    from flowforge import registry
    from flowforge.data import TOY_DATASETS, toy_dataset
    from flowforge.eval import negative_log_likelihood, plot_density_2d
    from flowforge.train import fit_maximum_likelihood
    from flowforge.train.loop import check_batch_statistics

    if dataset not in TOY_DATASETS:
        raise ConfigError(f"--dataset: unknown data set {dataset!r}; choose one of {', '.join(TOY_DATASETS)}")
    models = _demo_models()
    if model not in models:
        raise ConfigError(f"--model: unknown model {model!r}; choose one of {', '.join(models)}")
    _output_path(out, "--out")
    torch.manual_seed(seed)
    train_data = toy_dataset(dataset, 20_000, seed=seed)
    test_data = toy_dataset(dataset, 10_000, seed=seed + 1)
    flow = registry.lookup("model", model)(2, transforms=transforms, hidden=(64, 64))
    try:
        check_batch_statistics(flow, batch_size)
    except ValueError as error:
        raise ConfigError(f"--batch-size: {error}") from error
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


def _output_path(path: Path, option: str, suffixes: tuple[str, ...] = ()) -> Path:
    """An output the command will write, checked before any work: a folder (no ``suffixes``) that
    is not an existing file, or a file with one of ``suffixes`` that is not a folder; either way
    under a folder that exists (or can be made) and can be written; a name without control characters."""
    if any(ord(character) < 32 or ord(character) == 127 for character in str(path)):
        raise ConfigError(f"{option} {str(path)!r}: a control character in the name; give a printable one")
    if not suffixes and path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {path}: exists and is not a folder; give a folder")
    if suffixes and path.is_dir():
        raise ConfigError(f"{option} {path}: is a folder; give a {' or '.join(suffixes)} file name")
    if suffixes and path.suffix.lower() not in suffixes:
        raise ConfigError(f"{option} {path}: expected a {' or '.join(suffixes)} file name")
    for parent in (path, *path.parents) if not suffixes else path.parents:
        if parent.exists():  # the nearest folder that exists: the rest is made under it
            if not parent.is_dir():
                raise ConfigError(f"{option} {path}: {parent} is a file, not a folder")
            if not _writable(parent):
                raise ConfigError(f"{option} {path}: cannot write in {parent}")
            break
    return path


def _writable(folder: Path) -> bool:
    """Whether a file can be made in ``folder`` (tried: permissions alone miss /proc and read-only mounts)."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def _run_folder(out: Path | None, config: Path, resume: bool) -> Path:
    """The run folder: ``--out`` or ``runs/<config name>``, checked by :func:`_output_path`; a folder
    that holds a run already is continued with ``--resume`` only, never overwritten, and a data set's
    folder is refused."""
    folder = _output_path(out if out is not None else Path("runs") / config.stem, "--out")
    if (folder / "checkpoint.json").is_file() and not resume:
        raise ConfigError(
            f"--out {folder}: holds a trained run already; pass --resume to continue it, or give another folder"
        )
    from flowforge.data.episodes import data_set_holding

    data_set = data_set_holding(folder)
    if data_set is not None:
        if data_set == folder.resolve():
            raise ConfigError(f"--out {folder}: is an episode data set; give a folder for the run")
        raise ConfigError(
            f"--out {folder}: lies inside the episode data set {data_set}, which a collection rewrites; "
            "give a folder outside it"
        )
    return folder


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="Run config (TOML); see configs/ and `flowforge list`.")],
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override a setting: table.key=value (TOML value).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (default runs/<config name>).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the checkpoint in the run folder.")] = False,
    progress: Annotated[bool | None, typer.Option("--progress/--no-progress", help="Progress bar.")] = None,
) -> None:
    """Train the model a config describes; writes a checkpoint, metrics.csv and a plot, prints the metrics."""
    from flowforge import runs
    from flowforge.eval.report import format_metrics
    from flowforge.train import init_distributed_from_environment

    extra = _overrides_with_progress(overrides, progress)
    run_config = runs.load_config(config, extra)
    folder = _run_folder(out, config, resume)
    _, rank = init_distributed_from_environment()  # under torchrun: one process per rank
    prepared = runs.prepare_run(run_config, folder, str(config))
    if rank != 0:
        runs.train_run(prepared, resume=resume)
        return
    if resume:
        prepared.trainer.check_resume()
    typer.echo(
        f"training {run_config.model.kind} ({run_config.objective_kind()}) for {run_config.train.steps} steps "
        f"into {folder}{_resumed_at(folder, resume, run_config.train.steps)}"
    )
    start = time.perf_counter()
    run = runs.train_run(prepared, resume=resume)
    typer.echo(f"trained in {time.perf_counter() - start:.1f} s")
    held_out = None if prepared.data is None else prepared.data.test_units
    typer.echo(format_metrics(runs.evaluate_run(run, held_out)))
    typer.echo(f"wrote {runs.plot_run(run, folder / 'plot.png', held_out)}")


def _overrides_with_progress(overrides: list[str] | None, progress: bool | None) -> list[str]:
    """The ``--set`` overrides plus ``--progress/--no-progress`` as ``train.progress``; both at once is refused."""
    extra = list(overrides or [])
    if progress is None:
        return extra
    for override in extra:
        if override.split("=", 1)[0].strip().replace(" ", "") == "train.progress":
            flag = "--progress" if progress else "--no-progress"
            raise ConfigError(f"{flag} and --set {override}: both set the progress bar; give one")
    return [*extra, f"train.progress={'true' if progress else 'false'}"]


def _resumed_at(folder: Path, resume: bool, steps: int) -> str:
    """What a ``--resume`` continues from, for the line that announces training (after the
    checkpoint was checked): the step its checkpoint reached, or that the run had finished (then it
    is only evaluated again). Without a checkpoint it starts from step 0 (so that a script can always
    pass ``--resume``), said on stderr."""
    if not resume:
        return ""
    if not (folder / "checkpoint.json").exists():
        typer.echo(f"note: --resume: no checkpoint in {folder} yet; training from step 0", err=True)
        return ""
    step, end, _ = _checkpoint_progress(folder)
    if step is None or step <= 0:
        return ""
    stopped_early = step == end and step < steps
    if step < steps and not stopped_early:
        return f", resuming at step {step}"
    return f": finished at step {step}{' (stopped early)' if stopped_early else ''}, nothing left to train"


def _checkpoint_progress(folder: Path) -> tuple[int | None, int | None, dict[str, Any]]:
    """The step a run's checkpoint reached, the step it ends at (its trainer config's steps, or the
    step where its patience ran out; ``None`` where the manifest holds none) and that config."""
    from flowforge.checkpoint import read_manifest

    manifest = read_manifest(folder)
    trainer, config = manifest.get("trainer"), manifest.get("trainer_config")
    state = trainer.get("state") if isinstance(trainer, dict) else None
    state = state if isinstance(state, dict) else {}
    config = config if isinstance(config, dict) else {}
    step, steps = state.get("step"), config.get("steps")
    step, steps = (step if isinstance(step, int) else None), (steps if isinstance(steps, int) else None)
    patience, waited = config.get("patience"), state.get("evaluations_without_improvement")
    if step is not None and isinstance(patience, int) and isinstance(waited, int) and waited >= patience:
        steps = step  # stopped early: the run ended there
    return step, steps, config


def _sampler_steps(run, steps: int | None) -> int:
    """``--steps`` of ``sample`` and ``eval``: 10 by default; refused for a model that samples in one pass."""
    from flowforge.matching import FlowMatcher

    if steps is not None and not isinstance(run.model, FlowMatcher):
        raise ConfigError(
            f"--steps {steps}: a {run.config.model.kind} model samples without a step count; --steps is for "
            "flow-matching runs (flow-matching, shortcut, meanflow, consistency)"
        )
    return 10 if steps is None else steps


def _held_out(run, data: str | None) -> torch.Tensor | None:
    """Evaluation points in data units: a file or built-in set given by ``data``, else the run's own test split."""
    from flowforge import runs
    from flowforge.data import load_table

    if data is None:
        return runs.held_out_data(run)
    if Path(data).is_dir():
        raise ConfigError(f"--data {data!r}: a folder; give a data file (.csv, .npy, .npz, .parquet) or a built-in set")
    if Path(data).suffix:
        return runs.checked_points(run, load_table(data, columns=None), f"--data {data}")
    try:
        config = runs.DataConfig(name=data, standardize=False)
    except ConfigError as error:
        raise ConfigError(
            f"--data {data!r}: neither a file (.csv, .npy, .npz, .parquet) nor a built-in set ({error})"
        ) from error
    return runs.checked_points(run, runs.load_data(config).test_units, f"--data {data}")


@app.command()
def sample(
    checkpoint: Annotated[Path, typer.Argument(help="Run folder written by `flowforge train`.")],
    n: Annotated[int, typer.Option("-n", min=1, max=MAX_SAMPLES, help="Number of samples.")] = 1000,
    output: Annotated[Path, typer.Option("-o", "--output", help="Output file (.npy or .csv).")] = Path("samples.npy"),
    steps: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=MAX_SAMPLER_STEPS,
            help="Solver steps of a flow-matching model (default 10): midpoint steps (flow matching), Euler steps "
            "told to the network (shortcut, meanflow: 1 or 2 for few-step samples), consistency steps.",
        ),
    ] = None,
    label: Annotated[
        int | None,
        typer.Option(
            min=0, help="Class-conditional runs: draw every sample of this class (default: the classes in turn)."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED)] = 0,
    progress: Annotated[bool | None, typer.Option("--progress/--no-progress", help="Progress bar.")] = None,
) -> None:
    """Draw samples from a trained run and write them to a file (in the data's own units: pixel counts
    for digits). A class-conditional run draws the classes in turn (row i is of class i mod K) or --label."""
    from flowforge import runs

    _output_path(output, "-o", (".npy", ".csv"))
    _refuse_metadata_file(output, "-o")
    run = runs.load_run(checkpoint)
    steps = _sampler_steps(run, steps)
    classes = runs.run_classes(run)
    if label is not None and not classes:
        raise ConfigError(f"--label {label}: this run is not class-conditional ([data] conditional = false)")
    if label is not None and label >= classes:
        raise ConfigError(f"--label {label}: expected a class 0..{classes - 1}")
    torch.manual_seed(seed)
    drawn = runs.draw_samples(run, n, steps, progress=progress, labels=label)
    typer.echo(f"wrote {runs.write_samples(drawn, output)}")
    if classes:
        which = f"all of class {label}" if label is not None else f"row i is of class i mod {classes}"
        typer.echo(f"classes: {which}")


@app.command("eval")
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="Run folder written by `flowforge train`.")],
    data: Annotated[
        str | None, typer.Option(help="A built-in set or a file (default: the run's held-out split).")
    ] = None,
    samples: Annotated[
        int | None,
        typer.Option(
            min=2, max=MAX_SAMPLES, help="Points for the sample metrics (default 2000, at most the held-out data's)."
        ),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(min=1, max=MAX_SAMPLER_STEPS, help="Sampler steps of a flow-matching model (as for sample)."),
    ] = None,
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED)] = 0,
) -> None:
    """Print NLL, bits/dim, MMD, energy distance and sliced W2 (or KL to the target). A flow-matching
    model on digits: the Fréchet distance on a digits classifier's features, its conditional accuracy."""
    from flowforge import runs
    from flowforge.eval.report import format_metrics

    run = runs.load_run(checkpoint)
    steps = _sampler_steps(run, steps)
    held_out = _held_out(run, data)
    if samples is not None and held_out is not None and not run.reverse_kl and samples > held_out.shape[0]:
        typer.echo(f"note: --samples {samples}: the held-out data has {held_out.shape[0]} points; using all", err=True)
    counted = {} if samples is None else {"samples": samples}  # evaluate_run's default otherwise
    typer.echo(format_metrics(runs.evaluate_run(run, held_out, seed=seed, steps=steps, **counted)))


@app.command()
def plot(
    checkpoint: Annotated[Path, typer.Argument(help="Run folder written by `flowforge train`.")],
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Image file: .png, .pdf or .svg (default <run>/plot.png).")
    ] = None,
) -> None:
    """Plot a run: density and samples (2-D) or sample pairs (more dimensions), and its training curve."""
    from flowforge import runs

    _output_path(output or checkpoint / "plot.png", "-o" if output else "-o (default)", (".png", ".pdf", ".svg"))
    run = runs.load_run(checkpoint)
    typer.echo(f"wrote {runs.plot_run(run, output or checkpoint / 'plot.png', _held_out(run, None))}")


@app.command("list")
def list_choices() -> None:
    """List every registered model, policy and part, the data sets, objectives and reverse-KL targets."""
    import flowforge.policy  # noqa: F401 - registers the policy heads
    from flowforge import registry, runs
    from flowforge.data import SKLEARN_DATASETS, TARGETS, TOY_DATASETS
    from flowforge.runs.data import COUNT_DATASETS

    rows = [
        ("models", runs.model_kinds()),  # [model] kind values; a dequantized wrapper is made by the run
        ("dequantization", runs.density.DEQUANTIZATIONS),
        ("policy heads", registry.names("head")),
        ("velocity nets", registry.names("velocity")),
        ("paths", registry.names("path")),
        ("couplings", registry.names("coupling")),
        ("time samplers", registry.names("time")),
        ("activations", registry.names("activation")),
        ("objectives", runs.OBJECTIVES),
        ("2-D sets", TOY_DATASETS),
        ("tables", [s for s in SKLEARN_DATASETS if s not in COUNT_DATASETS]),
        ("pixel counts", COUNT_DATASETS),
        ("targets", TARGETS),
    ]
    for label, values in rows:
        typer.echo(f"{label + ':':16}{', '.join(values)}")
    typer.echo(f"{'files:':15}path = a .csv, .npy, .npz or .parquet file")


data_app = typer.Typer(help="Robot demonstration data sets (LeRobot v3 layout).", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("collect")
def data_collect(
    out: Annotated[Path, typer.Option(help="Data set folder (created; an interrupted one is resumed).")],
    tasks: Annotated[str, typer.Option(help="Comma-separated MetaWorld v3 tasks, e.g. reach-v3,push-v3.")],
    episodes: Annotated[
        int, typer.Option(min=1, max=MAX_EPISODES, help="Successful episodes per task (each task's seeds its own).")
    ] = 10,
    env: Annotated[str, typer.Option(help="Simulator (metaworld).")] = "metaworld",
    images: Annotated[bool, typer.Option("--images/--no-images", help="Also store camera images.")] = False,
    camera: Annotated[str | None, typer.Option(help="Camera for --images (default corner).")] = None,
    cameras: Annotated[
        str | None,
        typer.Option(help="Several cameras for --images, comma-separated MetaWorld names (corner,gripperPOV)."),
    ] = None,
    size: Annotated[int | None, typer.Option(min=8, max=512, help="Image size in pixels (default 84).")] = None,
    seed: Annotated[int, typer.Option(min=0, max=MAX_SEED)] = 0,
    action_noise: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Perturb what the robot receives by noise of this spread (DART): action then holds the "
            "expert's action at every state visited, action.executed what was sent.",
        ),
    ] = 0.0,
    noisy_tasks: Annotated[
        str | None,
        typer.Option(help="Only these of --tasks (comma-separated) get --action-noise; the others are clean."),
    ] = None,
    progress: Annotated[bool | None, typer.Option("--progress/--no-progress", help="Progress bar.")] = None,
) -> None:
    """Roll out the scripted experts, keep successful episodes, write them in the LeRobot v3 layout."""
    if env != "metaworld":
        raise ConfigError(f"--env: unknown simulator {env!r}; available: metaworld")
    from flowforge.envs.metaworld import CAMERAS, INSTRUCTIONS

    names = name_list("--tasks", tasks, INSTRUCTIONS, "MetaWorld v3 task")
    if camera is not None and cameras is not None:
        raise ConfigError(f"--camera {camera!r} and --cameras {cameras!r}: give one camera or the list, not both")
    camera_names = None if cameras is None else name_list("--cameras", cameras, CAMERAS, "MetaWorld camera")
    if camera is not None:
        name_list("--camera", camera, CAMERAS, "MetaWorld camera")
    noisy_names = None
    if noisy_tasks is not None:
        noisy_names = name_list("--noisy-tasks", noisy_tasks, INSTRUCTIONS, "MetaWorld v3 task")
        if not action_noise:
            raise ConfigError(f"--noisy-tasks {noisy_tasks!r}: names the tasks that get --action-noise; give that too")
        outside = [task for task in noisy_names if task not in names]
        if outside:
            raise ConfigError(f"--noisy-tasks {noisy_tasks!r}: {', '.join(outside)} not among --tasks")
    if (camera is not None or cameras is not None or size is not None) and not images:
        raise ConfigError("--camera, --cameras and --size describe the images of --images: add --images")
    _output_path(out, "--out")
    from flowforge.data.episodes import data_set_or_run_holding

    holder = data_set_or_run_holding(out.resolve().parent)  # --out itself may be a data set to resume
    if holder is not None:
        raise ConfigError(f"--out {out}: lies inside the {holder[1]} {holder[0]}; give a folder outside it")
    from flowforge.envs.collect import collect

    start = time.perf_counter()
    try:
        counts = collect(
            names,
            episodes,
            out,
            images=images,
            cameras=camera_names,
            seed=seed,
            action_noise=action_noise,
            noisy_tasks=noisy_names,
            progress=progress,
            # collect's own defaults (camera corner, 84 pixels) where the options were not given
            **{k: v for k, v in (("camera", camera), ("size", size)) if v is not None},
        )
    except ValueError as error:  # an unknown task or camera, or a seed too large: named as the flag
        message = _COLLECT_SUBJECT.sub(lambda match: "--" + match.group(1).replace("_", "-"), str(error))
        raise ConfigError(message) from error
    for task, count in counts.items():
        rate = count["succeeded"] / max(count["attempted"], 1)
        more = (
            f"; it held {count['succeeded']} already, more than --episodes {episodes}"
            if count["succeeded"] > episodes
            else ""
        )
        typer.echo(
            f"{task}: kept {count['succeeded']} of {count['attempted']} expert episodes ({rate:.0%} success){more}"
        )
    typer.echo(f"wrote {out} in {time.perf_counter() - start:.1f} s")


@data_app.command("info")
def data_info(
    root: Annotated[Path, typer.Argument(help="Data set folder.")],
    verify: Annotated[
        bool, typer.Option("--verify/--no-verify", help="Read every data file and check it against the metadata.")
    ] = True,
) -> None:
    """Print a data set's schema, episode and frame counts, and the expert success rates (verified)."""
    from flowforge.data.episodes import describe

    typer.echo(describe(root, verify=verify))


policy_app = typer.Typer(help="Flow-matching action policies and their baselines on MetaWorld.", no_args_is_help=True)
app.add_typer(policy_app, name="policy")


@policy_app.command("train")
def policy_train(
    config: Annotated[Path, typer.Argument(help="Policy run config (TOML tables [policy], [data], [train]).")],
    out: Annotated[Path | None, typer.Option(help="Run folder (default: runs/<config name>).")] = None,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override a setting: table.key=value (TOML value).")
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run's checkpoint.")] = False,
    start_from: Annotated[
        Path | None,
        typer.Option(
            help="Fine-tune: start from this trained policy run's weights (same kind, network and inputs); "
            "states, actions and pixels are normalised with this data set's statistics. A resumed run "
            "continues from its own checkpoint and must name the same run."
        ),
    ] = None,
    progress: Annotated[bool | None, typer.Option("--progress/--no-progress", help="Progress bar.")] = None,
) -> None:
    """Train a policy (flow, hierarchical, mse or ddpm) on an episode data set."""
    from flowforge.runs.policy import check_resume_tables, load_policy_config, prepare_policy_run

    extra = _overrides_with_progress(overrides, progress)
    run = load_policy_config(config, extra)
    directory = _run_folder(out, config, resume)
    if run.data.frames == "cache":
        _output_path(run.data.cache_folder(), "[data] cache")
    if resume:
        check_resume_tables(run, directory)  # before the data set is read or a frame cache made
    prepared = prepare_policy_run(run, directory, start_from)
    if resume:
        prepared.trainer.check_resume()
    began = f" from the weights of {start_from}" if start_from is not None else ""
    resumed = _resumed_at(directory, resume, run.train.steps)
    typer.echo(f"training a {run.policy.kind} policy for {run.train.steps} steps{began} into {directory}{resumed}")
    start = time.perf_counter()
    prepared.trainer.fit(resume=resume)
    parameters = sum(p.numel() for p in prepared.policy.parameters())
    typer.echo(
        f"trained on {len(prepared.tensors['action'])} frames, {parameters:,} parameters, "
        f"{time.perf_counter() - start:.1f} s"
    )


@policy_app.command("eval")
def policy_eval(
    checkpoint: Annotated[Path, typer.Argument(help="Trained policy folder.")],
    tasks: Annotated[str | None, typer.Option(help="Comma-separated tasks (default: the policy's own).")] = None,
    episodes: Annotated[
        int, typer.Option(min=1, max=MAX_EPISODES, help="Episodes per task (fresh seeds, each task's its own).")
    ] = 10,
    max_steps: Annotated[
        int, typer.Option(min=1, max=MAX_EPISODE_STEPS, help="Step limit per episode (MetaWorld ends one at 500).")
    ] = 500,
    video: Annotated[Path | None, typer.Option(help="Folder for rollout GIFs (2 per task).")] = None,
    steps: Annotated[
        int | None, typer.Option(min=1, max=MAX_SAMPLER_STEPS, help="Override the sampling steps.")
    ] = None,
    noise_scale: Annotated[
        float | None, typer.Option(min=0.0, help="Flow policies: sampling temperature (initial noise scale).")
    ] = None,
    execution: Annotated[
        str, typer.Option(help="How chunks run while the next is computed: sync, async, rtc or rtc-trained.")
    ] = "sync",
    delay: Annotated[
        str,
        typer.Option(help="Inference delay in control steps (MetaWorld: 80 Hz): D, LOW-HIGH drawn per chunk, or real."),
    ] = "0",
    max_guidance: Annotated[
        float | None,
        typer.Option(min=0.0, help="--execution rtc: the guidance clip beta (default 5, the paper's)."),
    ] = None,
    rtc_schedule: Annotated[
        str | None,
        typer.Option(
            help="--execution rtc: prefix weights over the overlap after the frozen steps: exp (the paper's, "
            "default), linear, ones or zeros."
        ),
    ] = None,
    rtc_jacobian: Annotated[
        str | None,
        typer.Option(
            help="--execution rtc: how the guidance reaches the noisy chunk: vjp (the paper's, default) or "
            "identity (no backward pass; keeps its grip on a policy sure of its chunks)."
        ),
    ] = None,
    rtc_overlap: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="--execution rtc: how many steps after the frozen ones are guided, the schedule decaying over "
            "them (default: all the current plan still has, the paper's).",
        ),
    ] = None,
    overlap_guidance: Annotated[
        bool,
        typer.Option(
            "--overlap-guidance",
            help="--execution rtc-trained: also guide the chunk towards the rest of the current plan, as rtc "
            "does (then --max-guidance, --rtc-schedule, --rtc-jacobian and --rtc-overlap apply).",
        ),
    ] = False,
    candidates: Annotated[
        int,
        typer.Option(
            min=1,
            max=MAX_CANDIDATES,
            help="Sample this many chunks for every chunk after an episode's first and keep the one whose "
            "action where it takes over lies closest to the last action sent (noise-sampling heads).",
        ),
    ] = 1,
    n_action_steps: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Actions executed from each chunk before the next is asked for (default: the policy's "
            "n_action_steps; at most its chunk).",
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Write the results to this .json file.")] = None,
    processes: Annotated[
        int,
        typer.Option(
            min=1, help="Evaluate the tasks in this many processes (at most one per task; same seeds, same report)."
        ),
    ] = 1,
    progress: Annotated[bool | None, typer.Option("--progress/--no-progress", help="Progress bar.")] = None,
) -> None:
    """Roll a trained policy out in MetaWorld; print success per task with 95% intervals, latency and NFE."""
    import json

    from flowforge.envs.evaluate import evaluate
    from flowforge.envs.metaworld import INSTRUCTIONS
    from flowforge.policy import ChunkExecutor
    from flowforge.policy.execution import EXECUTIONS
    from flowforge.policy.heads import GUIDANCE_JACOBIANS, RTC_SCHEDULES
    from flowforge.runs.policy import load_policy

    if out is not None:
        _output_path(out, "--out", (".json",))
        _refuse_metadata_file(out, "--out")
    if video is not None:
        _output_path(video, "--video")
        _refuse_metadata_file(video, "--video")
    if execution not in EXECUTIONS:
        raise ConfigError(f"--execution {execution!r}: expected one of {', '.join(EXECUTIONS)}")
    # RTC's settings given: option -> (ChunkExecutor argument, value, its choices or None for a number)
    guidance = {
        _EXECUTOR_FLAGS[name]: (name, value, choices)
        for name, value, choices in (
            ("max_guidance", max_guidance, None),
            ("guidance_schedule", rtc_schedule, RTC_SCHEDULES),
            ("guidance_jacobian", rtc_jacobian, GUIDANCE_JACOBIANS),
            ("guided_overlap", rtc_overlap, None),
        )
        if value is not None
    }
    if overlap_guidance and execution != "rtc-trained":
        raise ConfigError(f"--overlap-guidance: guides --execution rtc-trained, not {execution}; leave it out")
    if guidance and execution != "rtc" and not overlap_guidance:
        given = ", ".join(f"{option} {value}" for option, (_, value, _) in guidance.items())
        hint = "add --overlap-guidance" if execution == "rtc-trained" else "leave it out"
        raise ConfigError(
            f"{given}: guides --execution rtc (or rtc-trained with --overlap-guidance), not {execution}; {hint}"
        )
    for option, (_, value, choices) in guidance.items():
        if choices is not None and value not in choices:
            raise ConfigError(f"{option} {value!r}: expected one of {', '.join(choices)}")
    delay_steps = _delay_option(delay)
    names = None if tasks is None else name_list("--tasks", tasks, INSTRUCTIONS, "MetaWorld v3 task")
    policy = load_policy(checkpoint)
    _tell_if_unfinished(checkpoint)
    config = policy.policy_config
    if rtc_overlap is not None and rtc_overlap > config.horizon:
        raise ConfigError(f"--rtc-overlap {rtc_overlap}: at most the policy's chunk of {config.horizon} steps")
    sampling = {k: v for k, v in (("steps", steps), ("noise_scale", noise_scale)) if v is not None}
    sampling |= {name: value for name, value, _ in guidance.values()}
    if overlap_guidance:
        sampling["overlap_guidance"] = True
    if candidates > 1:
        sampling["candidates"] = candidates
    if n_action_steps is not None:
        if n_action_steps > config.horizon:
            raise ConfigError(
                f"--n-action-steps {n_action_steps}: at most the policy's chunk of {config.horizon} steps"
            )
        sampling["n_action_steps"] = n_action_steps
    try:
        ChunkExecutor(policy, execution=execution, delay=delay_steps, **sampling)  # checks every setting once
    except ValueError as error:  # e.g. a temperature for a DDPM policy, rtc for a regression head
        message = _as_eval_flags(str(error)).replace(f"--delay {delay_steps!r}", f"--delay {delay}")
        raise ConfigError(message) from error
    if names is None:
        by_instruction = {text: task for task, text in INSTRUCTIONS.items()}
        names = [by_instruction[text] for text in config.instructions if text in by_instruction]
        if not names:
            raise ConfigError("the policy's instructions name no MetaWorld task: choose them with --tasks")
    if processes > len(names):
        raise ConfigError(f"--processes {processes}: at most one per task ({len(names)})")
    report = evaluate(
        policy,
        names,
        episodes,
        max_steps=max_steps,
        video_dir=video,
        progress=progress_enabled(progress),
        sampling=sampling,
        execution=execution,
        delay=delay_steps,
        processes=processes,
    )
    typer.echo(report.table())
    if out is not None:
        from flowforge.checkpoint import write_atomic

        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(out, (json.dumps(report.to_dict(), indent=2) + "\n").encode())
        except OSError as error:  # a full disk or a file-size limit: the earlier file is kept whole
            raise ConfigError(f"--out {out}: cannot write the results ({error.strerror or error})") from error
        typer.echo(f"wrote {out}")


# ChunkExecutor's arguments as `policy eval` spells them, so that its refusals name the flag given
_EXECUTOR_FLAGS = {
    "overlap_guidance": "--overlap-guidance",
    "noise_scale": "--noise-scale",
    "n_action_steps": "--n-action-steps",
    "guidance_schedule": "--rtc-schedule",
    "guidance_jacobian": "--rtc-jacobian",
    "guided_overlap": "--rtc-overlap",
    "max_guidance": "--max-guidance",
    "candidates": "--candidates",
    "execution": "--execution",
    "delay": "--delay",
    "steps": "--steps",
}
_EXECUTOR_ARGUMENT = re.compile(r"\b(" + "|".join(_EXECUTOR_FLAGS) + r")\s*=\s*(True\b)?")
_EXECUTOR_SUBJECT = re.compile(r"^(" + "|".join(_EXECUTOR_FLAGS) + r")(?= must\b)")


_COLLECT_SUBJECT = re.compile(r"^(seed|episodes|size|action_noise|cameras|tasks)(?= must\b)")


def _as_eval_flags(message: str) -> str:
    """A ``ChunkExecutor`` refusal with its arguments spelled as the flags: ``noise_scale = 0.5``
    becomes ``--noise-scale 0.5``, ``overlap_guidance = True`` ``--overlap-guidance``, and a message
    that opens ``max_guidance must be ...`` opens ``--max-guidance must be ...``."""

    def flag(match: re.Match[str]) -> str:
        name = _EXECUTOR_FLAGS[match.group(1)]
        return name if match.group(2) else name + " "

    message = _EXECUTOR_SUBJECT.sub(lambda match: _EXECUTOR_FLAGS[match.group(1)], message)
    return _EXECUTOR_ARGUMENT.sub(flag, message)


def _refuse_metadata_file(path: Path, option: str) -> None:
    """Refuse to write over a checkpoint's manifest or a run's training history, or into a data
    set: results written there would destroy the run or the data set they describe."""
    resolved = path.resolve()
    if resolved.name == "checkpoint.json" and resolved.is_file():
        raise ConfigError(f"{option} {path}: is a checkpoint's manifest; write the results to another file")
    if resolved.name == "metrics.csv" and (resolved.parent / "checkpoint.json").is_file():
        raise ConfigError(f"{option} {path}: is the training history of the run beside it; write to another file")
    from flowforge.data.episodes import data_set_holding

    data_set = data_set_holding(path)
    if data_set is not None:
        raise ConfigError(f"{option} {path}: lies inside the episode data set {data_set}; write it elsewhere")


def _tell_if_unfinished(folder: Path) -> None:
    """Say on stderr when a run stopped before its last step is evaluated (a killed or running
    training): its weights are the last checkpoint's, not the moving average a finished run keeps."""
    step, steps, config = _checkpoint_progress(folder)
    if step is not None and steps is not None and step < steps:
        average = " (not the moving average a finished run keeps)" if config.get("ema_decay") else ""
        typer.echo(
            f"note: {folder} is a run stopped at step {step} of {steps}; its last checkpoint's weights{average} "
            "are evaluated",
            err=True,
        )


def _delay_option(text: str) -> int | tuple[int, int] | str:
    """``--delay``: ``D``, ``LOW-HIGH`` (non-negative integers) or ``real``."""
    from flowforge.policy.execution import MAX_DELAY

    if text == "real":
        return text
    parts = text.split("-")
    if len(parts) in (1, 2) and all(re.fullmatch(r"\s*[0-9]+\s*", p) for p in parts):  # ASCII: '²' is a digit too
        values = [int(p) for p in parts]
        if values[-1] > MAX_DELAY or values[0] > values[-1]:
            raise ConfigError(f"--delay {text!r}: expected control steps in 0..{MAX_DELAY}, a range's low end first")
        return values[0] if len(values) == 1 else (values[0], values[1])
    raise ConfigError(f"--delay {text!r}: expected control steps D, a range LOW-HIGH or real, e.g. 4, 2-6 or real")


def main() -> None:
    """Console-script entry point."""
    app()
