"""Density runs described by a config file: what ``flowforge train/sample/eval/plot`` do.

A run config is a TOML file with four tables, each checked against a dataclass by the one config
reader (:mod:`flowforge.config`): an unknown key, a wrong type or a bad value is refused with the
file, table, key, value and what is allowed, before anything is written.

.. code-block:: toml

    [model]
    kind = "realnvp"              # any registered model (flowforge list)
    options = { transforms = 8, hidden = [64, 64], activation = "tanh" }

    [data]
    name = "moons"                # a built-in set, or path = "points.csv"

    [objective]
    kind = "maximum-likelihood"   # or "flow-matching", "reverse-kl" (with target = "banana"), "adversarial"

    [train]                       # flowforge.train.TrainerConfig
    steps = 2000

The checkpoint holds the model's registry config (every constructor argument), the run config and
the data's standardisation, so ``sample``, ``eval`` and ``plot`` need only the run folder.
"""

from __future__ import annotations

import csv
import inspect
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from flowforge import registry
from flowforge.checkpoint import load_model, read_manifest, write_atomic
from flowforge.config import build_dataclass, check_choice, check_range, read_config
from flowforge.data import DIGIT_LEVELS, TARGETS, Standardizer, target
from flowforge.errors import CheckpointError, ConfigError, DataError
from flowforge.eval.plots import grid_points, plot_bounds, plot_image_run, plot_points_run
from flowforge.eval.report import likelihood_metrics, sample_metrics
from flowforge.flows import Dequantized
from flowforge.matching import ConsistencyMatcher, FlowMatcher, MeanFlowMatcher, ShortcutMatcher
from flowforge.runs.data import COUNT_DATASETS, DataConfig, RunData, load_data
from flowforge.train import AdversarialML, FlowMatchingObjective, MaximumLikelihood, ReverseKL, Trainer, TrainerConfig
from flowforge.utils.progress import progress_bar

OBJECTIVES = ("maximum-likelihood", "flow-matching", "reverse-kl", "adversarial")
#: Models that train by flow matching (the others by a likelihood or reverse KL).
MATCHING_MODELS = ("flow-matching", "shortcut", "meanflow", "consistency")
#: matching models whose network reads a step size (the shortcut step, the MeanFlow span).
STEP_INPUT_MODELS = ("shortcut", "meanflow")
#: Registered models a run cannot name directly (the run builds them around another model).
_WRAPPERS = ("dequantized",)
DEQUANTIZATIONS = ("uniform", "variational")


def model_kinds() -> tuple[str, ...]:
    """The ``[model] kind`` values a run accepts: every registered model but wrappers."""
    return tuple(name for name in registry.names("model") if name not in _WRAPPERS)


@dataclass
class ModelConfig:
    """The ``[model]`` table.

    Arguments:
        kind: a registered model (``flowforge list``).
        options: keyword arguments of the model's constructor (``activation`` by registered name,
            e.g. ``"tanh"``). Flow-matching models take the velocity network's arguments
            (``hidden``, ``time_embedding``, ...; ``velocity = "residual-velocity-mlp"`` for the
            other network) and the matcher's (``coupling``, ``path``, ``time_sampler`` by registered
            name; ``coupling = "ot"`` is ``"exact-ot"``).
        dequantization: for integer data (digits), ``"uniform"`` or ``"variational"`` noise, drawn
            afresh for every batch.
    """

    kind: str = "realnvp"
    options: dict = field(default_factory=dict)
    dequantization: str = "uniform"

    def __post_init__(self) -> None:
        if self.kind in _WRAPPERS:
            raise ConfigError(
                f"kind = {self.kind!r} wraps another flow; name that flow (e.g. 'glow') and train on integer "
                "data (digits, digits-images): the run dequantizes it"
            )
        check_choice("kind", self.kind, model_kinds())
        check_choice("dequantization", self.dequantization, DEQUANTIZATIONS)


@dataclass
class ObjectiveConfig:
    """The ``[objective]`` table: ``kind`` (``None``: the model's natural one); ``target`` and
    ``samples`` for reverse KL; ``ml_weight`` and ``adversarial_weight`` for Flow-GAN."""

    kind: str | None = None
    target: str = "banana"
    samples: int = 256
    ml_weight: float = 1.0
    adversarial_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.kind is not None:
            check_choice("kind", self.kind, OBJECTIVES)
        check_choice("target", self.target, TARGETS)
        if self.samples < 1:
            raise ConfigError(f"samples = {self.samples}: expected an integer >= 1")
        check_range("ml_weight", self.ml_weight, low=0)
        check_range("adversarial_weight", self.adversarial_weight, low=0)
        if self.ml_weight == 0 and self.adversarial_weight == 0:
            raise ConfigError("ml_weight = 0 and adversarial_weight = 0: at least one must be > 0")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainerConfig = field(default_factory=TrainerConfig)

    def __post_init__(self) -> None:
        objective, kind = self.objective_kind(), self.model.kind
        if objective == "flow-matching" and kind not in MATCHING_MODELS:
            raise ConfigError(f"[objective] kind = 'flow-matching' needs [model] kind {' or '.join(MATCHING_MODELS)}")
        if objective != "flow-matching" and kind in MATCHING_MODELS:
            raise ConfigError(f"[model] kind = {kind!r} trains with [objective] kind = 'flow-matching'")
        if objective != "reverse-kl" and self.data.name is None and self.data.path is None:
            raise ConfigError("[data] needs name (a built-in set: flowforge list) or path (a data file)")
        if self.data.name in COUNT_DATASETS and kind in MATCHING_MODELS:
            raise ConfigError(f"[data] name = {self.data.name!r} holds pixel counts; train a flow on it, not {kind}")

    def objective_kind(self) -> str:
        if self.objective.kind is not None:
            return self.objective.kind
        return "flow-matching" if self.model.kind in MATCHING_MODELS else "maximum-likelihood"


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read and check a run config file (plus ``table.key=value`` overrides)."""
    return read_config(RunConfig, path, overrides)


# ---------------------------------------------------------------- models
def _registered_option(options: dict[str, Any], key: str, category: str, aliases: dict[str, str] | None = None) -> None:
    """Replace a registered name in ``options[key]`` by the class or an instance of it."""
    if key not in options:
        return
    name = (aliases or {}).get(options[key], options[key])
    try:
        cls = registry.lookup(category, name)
    except ValueError as error:
        raise ConfigError(f"[model] options.{key}: {error}") from error
    options[key] = cls if category == "activation" else cls()


def _accepted(cls: type, options: dict[str, Any]) -> dict[str, Any]:
    parameters = inspect.signature(cls.__init__).parameters
    return {k: options.pop(k) for k in list(options) if k in parameters}


def build_model(config: RunConfig, data: RunData | None, source: str = "config") -> nn.Module:
    """The model a run trains, from its config and the data's shape (dequantized for integer data)."""
    kind = config.model.kind
    options = dict(config.model.options)
    event_shape = data.event_shape if data is not None else (TARGETS[config.objective.target].features,)
    cls = registry.lookup("model", kind)
    try:
        _registered_option(options, "activation", "activation")
        if kind in MATCHING_MODELS:
            velocity_name = options.pop("velocity", "velocity-mlp")
            velocity_cls = registry.lookup("velocity", velocity_name)
            _registered_option(options, "coupling", "coupling", {"ot": "exact-ot"})
            _registered_option(options, "path", "path")
            _registered_option(options, "time_sampler", "time")
            options.setdefault("coupling", registry.lookup("coupling", "exact-ot")())
            velocity_options = {"hidden": (256, 256, 256), "time_embedding": 32, **_accepted(velocity_cls, options)}
            velocity_options.pop("features", None)
            if len(event_shape) != 1:
                raise ConfigError(f"[model] kind = {kind!r} takes vectors; the data has shape {event_shape}")
            velocity = velocity_cls(event_shape[0], step_input=kind in STEP_INPUT_MODELS, **velocity_options)
            if kind == "consistency":
                options.setdefault("total_steps", config.train.steps)  # the curriculum spans the run
            return cls(velocity, **options)
        parameters = list(inspect.signature(cls.__init__).parameters)
        if parameters[1] == "shape":
            if len(event_shape) != 3:
                raise ConfigError(
                    f"[model] kind = {kind!r} takes (C, H, W) images; the data has shape {event_shape} "
                    "(use [data] name = 'digits-images')"
                )
            model = cls(event_shape, **options)
        else:
            if len(event_shape) != 1:
                raise ConfigError(
                    f"[model] kind = {kind!r} takes vectors; the data has shape {event_shape} "
                    "(use glow or multiscale-realnvp for images, or [data] name = 'digits')"
                )
            model = cls(event_shape[0], **options)
        if data is not None and data.levels is not None:
            model = Dequantized(model, data.levels, variational=config.model.dequantization == "variational")
        return model
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from error
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{source}: [model] options do not build a {kind} model: {error}") from error


def build_objective(config: RunConfig, features: int):
    kind = config.objective_kind()
    if kind == "adversarial":
        return AdversarialML(
            features, ml_weight=config.objective.ml_weight, adversarial_weight=config.objective.adversarial_weight
        )
    if kind == "maximum-likelihood":
        return MaximumLikelihood()
    if kind == "flow-matching":
        return FlowMatchingObjective()
    return ReverseKL(config.objective.target, config.objective.samples)


# ---------------------------------------------------------------- build, train, load
@dataclass
class Run:
    """A trained run: its config, model (in eval mode), the data's standardisation and folder."""

    config: RunConfig
    model: nn.Module
    standardizer: Standardizer | None
    directory: Path

    @property
    def reverse_kl(self) -> bool:
        return self.config.objective_kind() == "reverse-kl"


@dataclass
class PreparedRun:
    """Everything a run needs before it trains: built and checked, nothing written yet."""

    config: RunConfig
    data: RunData | None
    model: nn.Module
    trainer: Trainer


def prepare_run(config: RunConfig, directory: str | Path, source: str = "config") -> PreparedRun:
    """Load the data, build the model, objective and trainer; raises before anything is written."""
    torch.manual_seed(config.train.seed)
    data = None if config.objective_kind() == "reverse-kl" else load_data(config.data)
    model = build_model(config, data, source)
    features = data.train[0].numel() if data is not None else TARGETS[config.objective.target].features
    if config.objective_kind() == "adversarial" and (data is None or len(data.event_shape) != 1):
        raise ConfigError(f"{source}: [objective] kind = 'adversarial' trains on vector data")
    try:
        trainer = Trainer(
            model,
            build_objective(config, features),
            config.train,
            data=None if data is None else data.train,
            validation_data=data.test if data is not None and config.train.eval_every else None,
            directory=directory,
            metadata=_run_metadata(config, data),
        )
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{source}: {error}") from error
    return PreparedRun(config, data, model, trainer)


def train_run(prepared: PreparedRun, resume: bool = False) -> Run:
    """Train a prepared run into its folder (checkpoint, metrics.csv); returns the trained run."""
    prepared.trainer.fit(resume=resume)
    standardizer = prepared.data.standardizer if prepared.data is not None else None
    return Run(prepared.config, prepared.model.eval(), standardizer, Path(prepared.trainer.directory))


def _run_metadata(config: RunConfig, data: RunData | None) -> dict:
    standardizer = data.standardizer if data is not None else None
    return {
        "run": asdict(config),
        "standardizer": None
        if standardizer is None
        else {"mean": standardizer.mean.tolist(), "std": standardizer.std.tolist()},
    }


def load_run(directory: str | Path) -> Run:
    """Rebuild a trained run from its folder: the model (from its registry config), run config and standardisation."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    metadata = manifest.get("metadata")
    if not isinstance(metadata, dict) or not isinstance(metadata.get("run"), dict):
        raise CheckpointError(f"{directory} was not written by `flowforge train` (no run config inside)")
    unknown = sorted(set(metadata["run"]) - {"model", "data", "objective", "train"})
    if unknown:
        raise CheckpointError(
            f"{directory / 'checkpoint.json'}: metadata.run has unknown table(s) {', '.join(unknown)}; "
            "expected model, data, objective, train"
        )
    try:
        run = dict(metadata["run"])
        if isinstance(run.get("train"), dict) and run["train"].get("precision") == "fp16":
            # Only read here, never trained: a run trained in fp16 on a GPU loads on any machine.
            run["train"] = {**run["train"], "precision": "fp32"}
        config = RunConfig(
            **{
                name: build_dataclass(cls, run.get(name, {}), f"{directory}: run config [{name}]")
                for name, cls in (
                    ("model", ModelConfig),
                    ("data", DataConfig),
                    ("objective", ObjectiveConfig),
                    ("train", TrainerConfig),
                )
            }
        )
        stats = metadata.get("standardizer")
        standardizer = None if stats is None else Standardizer(torch.tensor(stats["mean"]), torch.tensor(stats["std"]))
    except (ConfigError, KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{directory}: the run config inside does not load ({error}); retrain the run") from error
    model = load_model(directory).eval()
    return Run(config, model, standardizer, directory)


# ---------------------------------------------------------------- sampling and densities
@torch.no_grad()
def draw_samples(run: Run, n: int, steps: int = 10, chunk: int = 16_384, progress: bool | None = False) -> Tensor:
    """``n`` samples in the data's own units, drawn ``chunk`` at a time (with a progress bar when asked)."""
    model = run.model
    parts = []
    with progress_bar(n, "sample", progress) as bar:
        for start in range(0, n, chunk):
            count = min(chunk, n - start)
            if isinstance(model, FlowMatcher):
                few_step = isinstance(model, ShortcutMatcher | MeanFlowMatcher | ConsistencyMatcher)
                method = "euler" if few_step else "midpoint"
                parts.append(model.sample(count, steps=steps, method=method))
            else:
                parts.append(model.sample(count))
            bar.update(count)
    x = torch.cat(parts).float()
    return run.standardizer.inverse(x) if run.standardizer is not None else x


def has_density(model: nn.Module) -> bool:
    """Whether the model evaluates a log-density (a consistency model maps noise to data without one)."""
    return hasattr(model, "log_prob") and not isinstance(model, ConsistencyMatcher)


def log_prob_in_data_units(run: Run, x: Tensor) -> Tensor:
    """Log-density of points in the data's own units (the standardisation's Jacobian included)."""
    parameter = next(run.model.parameters())
    z = run.standardizer.transform(x) if run.standardizer is not None else x
    log_prob = run.model.log_prob(z.to(parameter.dtype))
    if run.standardizer is not None:
        log_prob = log_prob - run.standardizer.std.log().sum()
    return log_prob


def held_out_data(run: Run) -> Tensor | None:
    """The run's own test split in the data's units (``None`` for reverse KL)."""
    if run.reverse_kl:
        return None
    return load_data(run.config.data).test_units


def is_image_run(run: Run) -> bool:
    """Whether the run models pixel counts (digits), drawn as image grids."""
    return run.config.data.name in COUNT_DATASETS


def evaluate_run(run: Run, data: Tensor | None, samples: int = 2000, seed: int = 0) -> dict[str, float]:
    """Metrics of a trained run (:mod:`flowforge.eval.report`): NLL and bits/dim on ``data`` (data
    units), and MMD, energy distance and sliced W2 between samples and ``data``; the KL to the
    target for reverse-KL runs."""
    if run.reverse_kl:
        objective = ReverseKL(run.config.objective.target, run.config.objective.samples)
        return {"kl": objective.kl(run.model, 20_000)}
    if data is None:
        raise DataError("evaluating a run needs held-out data")
    test = data[:samples]
    torch.manual_seed(seed)
    metrics = {}
    if has_density(run.model):
        with torch.no_grad():
            log_probs = torch.cat([log_prob_in_data_units(run, rows) for rows in test.split(1024)])
        metrics = likelihood_metrics(log_probs, test[0].numel())
    metrics.update(sample_metrics(draw_samples(run, test.shape[0]), test, seed))
    return metrics


@torch.no_grad()
def plot_run(run: Run, path: str | Path, data: Tensor | None, samples: int = 2000) -> Path:
    """A trained run at a glance (:mod:`flowforge.eval.plots`): image grids for digits; otherwise the
    data (or the reverse-KL target), the model's density on a grid (2-D), samples and training curve."""
    torch.manual_seed(0)
    curve = training_curve(run.directory)
    title = f"{run.config.model.kind} ({run.config.objective_kind()})"
    if is_image_run(run):
        drawn = draw_samples(run, 36)
        return plot_image_run(path, f"{title} on {run.config.data.name}", data, drawn, DIGIT_LEVELS, curve)
    drawn = draw_samples(run, samples).cpu()
    reference = drawn if data is None else data.detach().cpu().float()
    bounds = plot_bounds(reference)
    density = target_density = None
    if reference.shape[1] == 2:
        xs, ys, points = grid_points(bounds)
        if has_density(run.model):
            density = (xs, ys, log_prob_in_data_units(run, points).exp().reshape(len(ys), len(xs)).cpu())
        if run.reverse_kl:
            log_density = target(run.config.objective.target)(points)
            target_density = (xs, ys, log_density.exp().reshape(len(ys), len(xs)))
    return plot_points_run(path, title, reference, drawn, curve, density, target_density, bounds)


def write_samples(samples: Tensor, path: str | Path) -> Path:
    """Write samples as .npy or .csv (atomically: a failure leaves no half-written file).

    Images are written one flattened image per row.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".csv"):
        raise DataError(f"{path}: write samples to a .npy or .csv file")
    if path.is_dir():
        raise DataError(f"{path} is a folder; give a .npy or .csv file name")
    array = samples.detach().cpu().numpy().astype(np.float64)
    if suffix == ".npy":
        import io

        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        data = buffer.getvalue()
    else:
        rows = array.reshape(array.shape[0], -1)
        data = ("\n".join(",".join(repr(float(v)) for v in row) for row in rows) + "\n").encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)
    return path


def training_curve(directory: Path) -> tuple[list[float], list[float]]:
    """``(steps, losses)`` from a run's ``metrics.csv`` (empty when there is none)."""
    path = Path(directory) / "metrics.csv"
    steps, losses = [], []
    if path.is_file():
        with path.open(newline="") as handle:
            for row in csv.DictReader(handle):
                if row.get("loss"):
                    steps.append(float(row["step"]))
                    losses.append(float(row["loss"]))
    return steps, losses


__all__ = [
    "MATCHING_MODELS",
    "OBJECTIVES",
    "STEP_INPUT_MODELS",
    "DataConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "PreparedRun",
    "Run",
    "RunConfig",
    "build_model",
    "draw_samples",
    "evaluate_run",
    "has_density",
    "held_out_data",
    "is_image_run",
    "load_config",
    "load_run",
    "log_prob_in_data_units",
    "model_kinds",
    "plot_run",
    "prepare_run",
    "train_run",
    "training_curve",
    "write_samples",
]
