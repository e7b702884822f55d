"""Runs described by a config file: what the ``flowforge`` command line trains, samples, evaluates and plots.

A run config is a TOML file with four tables, each checked against a dataclass (an unknown key,
a wrong type or a bad value is reported with the table and key):

.. code-block:: toml

    [model]
    kind = "realnvp"              # flowforge list shows every kind
    options = { transforms = 8, hidden = [64, 64] }

    [data]
    name = "moons"                # a built-in 2-D set or a scikit-learn set; or path = "points.csv"

    [objective]
    kind = "maximum-likelihood"   # or "flow-matching", "reverse-kl" (with target = "banana")

    [train]                       # flowforge.train.TrainerConfig
    steps = 2000

Everything a run needs later (the config, the data's standardisation statistics) is stored in
its checkpoint, so ``sample``, ``eval`` and ``plot`` need only the checkpoint directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import numpy as np
import torch
from torch import Tensor, nn

from flowforge.checkpoint import CheckpointError, load_state_dict_checked, load_tensors, read_manifest, write_atomic
from flowforge.data import (
    SKLEARN_DATASETS,
    TARGETS,
    TOY_DATASETS,
    DataError,
    Standardizer,
    dequantize_digits,
    digits_bits_per_dim,
    load_table,
    sklearn_dataset,
    toy_dataset,
)
from flowforge.eval.plots import save_figure
from flowforge.flows import CNF, IAF, MAF, NICE, NSF, RealNVP, ResidualFlow
from flowforge.matching import ExactOTCoupling, FlowMatcher, IndependentCoupling, ShortcutMatcher
from flowforge.nn import VelocityMLP
from flowforge.train import (
    AdversarialML,
    FlowMatchingObjective,
    MaximumLikelihood,
    ReverseKL,
    Trainer,
    TrainerConfig,
)

FLOW_MODELS = {
    "realnvp": RealNVP,
    "nice": NICE,
    "maf": MAF,
    "iaf": IAF,
    "nsf": NSF,
    "cnf": CNF,
    "residual": ResidualFlow,
}
MATCHING_MODELS = ("flow-matching", "shortcut")
MODEL_KINDS = (*FLOW_MODELS, *MATCHING_MODELS)
OBJECTIVES = ("maximum-likelihood", "flow-matching", "reverse-kl", "adversarial")


class ConfigError(ValueError):
    """A run config that cannot be used; the message names the file, table and key."""


@dataclass
class ModelConfig:
    """``kind``: one of :data:`MODEL_KINDS`; ``options``: keyword arguments of the recipe (flows) or of
    the velocity network and matcher (``hidden``, ``time_embedding``, ``coupling = "ot" | "independent"``)."""

    kind: str = "realnvp"
    options: dict = field(default_factory=dict)


@dataclass
class DataConfig:
    """``name``: a built-in 2-D set or a scikit-learn set; or ``path``: a CSV/NPY/NPZ/Parquet file.
    ``size``: points drawn from a 2-D set; ``test_fraction``: held out from a file or scikit-learn
    set; ``standardize``: scale columns to zero mean and unit variance (statistics kept in the checkpoint)."""

    name: str | None = None
    path: str | None = None
    size: int = 20_000
    test_fraction: float = 0.2
    standardize: bool | None = None  # None: yes for tabular data, no for 2-D sets and digits
    seed: int = 0


@dataclass
class ObjectiveConfig:
    """``kind``: ``maximum-likelihood``, ``flow-matching``, ``reverse-kl`` or ``adversarial`` (Flow-GAN)
    (``None``: the model's natural one). ``target`` and ``samples``: for reverse KL; ``ml_weight`` and
    ``adversarial_weight``: for Flow-GAN."""

    kind: str | None = None
    target: str = "banana"
    samples: int = 256
    ml_weight: float = 1.0
    adversarial_weight: float = 1.0


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainerConfig = field(default_factory=TrainerConfig)

    def objective_kind(self) -> str:
        if self.objective.kind is not None:
            return self.objective.kind
        return "flow-matching" if self.model.kind in MATCHING_MODELS else "maximum-likelihood"


# ---------------------------------------------------------------- parsing
def _check_value(where: str, expected: Any, value: Any) -> Any:
    """Check ``value`` against a (simple) annotation; ints are accepted where floats are expected."""
    text = str(expected)
    optional = "None" in text
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where} must not be empty")
    kinds = []
    for name, kind in (("bool", bool), ("int", int), ("float", float), ("str", str), ("dict", dict)):
        if name in text.replace("None", ""):
            kinds.append(kind)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if bool not in kinds and isinstance(value, bool):
        raise ConfigError(f"{where} must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
    if not isinstance(value, tuple(kinds)):
        names = " or ".join(k.__name__ for k in kinds)
        raise ConfigError(f"{where} must be {names}, got {type(value).__name__} {value!r}")
    return value


def _build_section(section: str, cls: type, values: dict, source: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: [{section}] must be a table")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    checked = {}
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known: {', '.join(names)}"
            raise ConfigError(f"{source}: [{section}] has no setting {key!r}{hint}")
        checked[key] = _check_value(f"{source}: [{section}] {key}", hints[key], value)
    try:
        return cls(**checked)
    except ValueError as error:
        raise ConfigError(f"{source}: [{section}]: {error}") from error


def read_config_document(text: str, source: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """The TOML document of a config with ``table.key=value`` overrides applied (values in TOML
    syntax, a bare word as a string; ``table.key.inner=value`` sets one entry of an inline table)."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{source}: not valid TOML ({error})") from error
    for override in overrides or []:
        if "=" not in override or "." not in override.split("=", 1)[0]:
            raise ConfigError(f"override {override!r} must look like table.key=value, e.g. train.steps=100")
        path, raw = override.split("=", 1)
        section, key = path.strip().split(".", 1)
        try:
            value = tomllib.loads(f"value = {raw.strip()}")["value"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()  # a bare word is a string
        target = document.setdefault(section, {})
        if "." in key:  # model.options.hidden=[32]
            outer, inner = key.split(".", 1)
            target.setdefault(outer, {})[inner] = value
        else:
            target[key] = value
    return document


def parse_config(text: str, source: str = "config", overrides: list[str] | None = None) -> RunConfig:
    """Parse a TOML run config (plus ``table.key=value`` overrides, values in TOML syntax) and check it."""
    document = read_config_document(text, source, overrides)
    sections = {"model": ModelConfig, "data": DataConfig, "objective": ObjectiveConfig, "train": TrainerConfig}
    unknown = set(document) - set(sections)
    if unknown:
        raise ConfigError(f"{source}: unknown table(s) {', '.join(sorted(unknown))}; known: {', '.join(sections)}")
    config = RunConfig(
        **{name: _build_section(name, cls, document.get(name, {}), source) for name, cls in sections.items()}
    )
    _check_semantics(config, source)
    return config


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    return parse_config(path.read_text(), str(path), overrides)


def _check_semantics(config: RunConfig, source: str) -> None:
    if config.model.kind not in MODEL_KINDS:
        raise ConfigError(f"{source}: [model] kind {config.model.kind!r} is not one of {', '.join(MODEL_KINDS)}")
    objective = config.objective_kind()
    if objective not in OBJECTIVES:
        raise ConfigError(f"{source}: [objective] kind {objective!r} is not one of {', '.join(OBJECTIVES)}")
    if objective == "flow-matching" and config.model.kind not in MATCHING_MODELS:
        raise ConfigError(f"{source}: the flow-matching objective needs [model] kind 'flow-matching' or 'shortcut'")
    if objective != "flow-matching" and config.model.kind in MATCHING_MODELS:
        raise ConfigError(f"{source}: a {config.model.kind} model trains with the flow-matching objective")
    if objective == "reverse-kl" and config.objective.target not in TARGETS:
        raise ConfigError(f"{source}: [objective] target must be one of {', '.join(TARGETS)}")
    if objective != "reverse-kl":
        data = config.data
        if (data.name is None) == (data.path is None):
            raise ConfigError(f"{source}: [data] needs exactly one of name (a built-in set) or path (a file)")
        known = (*TOY_DATASETS, *SKLEARN_DATASETS)
        if data.name is not None and data.name not in known:
            raise ConfigError(f"{source}: [data] name {data.name!r} is not a built-in set ({', '.join(known)})")
        if not 0 < data.test_fraction < 1:
            raise ConfigError(f"{source}: [data] test_fraction must be in (0, 1)")


# ---------------------------------------------------------------- data
@dataclass
class RunData:
    train: Tensor | None
    test: Tensor | None
    standardizer: Standardizer | None
    dequantized_digits: bool = False


def load_data(config: RunConfig) -> RunData:
    """Train and test points (standardized when asked) for a run; none for reverse KL."""
    if config.objective_kind() == "reverse-kl":
        return RunData(None, None, None)
    data = config.data
    if data.name in TOY_DATASETS:
        train, test = (
            toy_dataset(data.name, data.size, seed=data.seed),
            toy_dataset(data.name, 5000, seed=data.seed + 1),
        )
        standardize = bool(data.standardize)
        digits = False
    else:
        table = sklearn_dataset(data.name) if data.name is not None else load_table(data.path)
        digits = data.name == "digits"
        generator = torch.Generator().manual_seed(data.seed)
        if digits:
            table = dequantize_digits(table, generator)
        order = torch.randperm(table.shape[0], generator=generator)
        n_test = max(1, round(data.test_fraction * table.shape[0]))
        if table.shape[0] - n_test < 2:
            raise DataError(f"{data.path or data.name}: {table.shape[0]} rows leave too few to train on")
        test, train = table[order[:n_test]], table[order[n_test:]]
        standardize = (not digits) if data.standardize is None else data.standardize
    standardizer = Standardizer.fit(train) if standardize else None
    if standardizer is not None:
        train, test = standardizer.transform(train), standardizer.transform(test)
    return RunData(train, test, standardizer, digits)


# ---------------------------------------------------------------- models
def build_model(config: RunConfig, features: int) -> nn.Module:
    """The model a run trains, from its config and the data's dimension."""
    options = dict(config.model.options)
    kind = config.model.kind
    try:
        if kind in FLOW_MODELS:
            return FLOW_MODELS[kind](features, **options)
        hidden = tuple(options.pop("hidden", (256, 256, 256)))
        time_embedding = options.pop("time_embedding", 32)
        coupling_name = options.pop("coupling", "ot")
        if coupling_name not in ("ot", "independent"):
            raise ConfigError(f"[model] options.coupling must be 'ot' or 'independent', got {coupling_name!r}")
        coupling = ExactOTCoupling() if coupling_name == "ot" else IndependentCoupling()
        velocity = VelocityMLP(features, hidden=hidden, time_embedding=time_embedding, step_input=kind == "shortcut")
        matcher = ShortcutMatcher if kind == "shortcut" else FlowMatcher
        return matcher(velocity, coupling=coupling, **options)
    except TypeError as error:
        raise ConfigError(f"[model] options do not fit a {kind} model: {error}") from error


def model_features(config: RunConfig, data: RunData) -> int:
    if data.train is not None:
        return data.train.shape[1]
    return TARGETS[config.objective.target].features


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


# ---------------------------------------------------------------- run, load, evaluate
def train_run(config: RunConfig, directory: str | Path, resume: bool = False) -> tuple[nn.Module, RunData]:
    """Train the run in ``directory`` (checkpoint, metrics.csv); returns the trained model and its data."""
    directory = Path(directory)
    torch.manual_seed(config.train.seed)
    data = load_data(config)
    model = build_model(config, model_features(config, data))
    trainer = Trainer(
        model,
        build_objective(config, model_features(config, data)),
        config.train,
        data=data.train,
        validation_data=data.test if config.train.eval_every else None,
        directory=directory,
        metadata=run_metadata(config, data),
    )
    trainer.fit(resume=resume)
    return model, data


def run_metadata(config: RunConfig, data: RunData) -> dict:
    standardizer = data.standardizer
    return {
        "run": asdict(config),
        "features": model_features(config, data),
        "standardizer": None
        if standardizer is None
        else {"mean": standardizer.mean.tolist(), "std": standardizer.std.tolist()},
        "dequantized_digits": data.dequantized_digits,
    }


@dataclass
class LoadedRun:
    config: RunConfig
    model: nn.Module
    standardizer: Standardizer | None
    dequantized_digits: bool
    directory: Path


def load_run(directory: str | Path) -> LoadedRun:
    """Rebuild a trained run from its checkpoint directory (config, weights, standardisation)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    metadata = manifest.get("metadata", {})
    if "run" not in metadata:
        raise CheckpointError(f"{directory} was not written by `flowforge train` (no run config inside)")
    run = metadata["run"]
    config = RunConfig(
        model=ModelConfig(**run["model"]),
        data=DataConfig(**run["data"]),
        objective=ObjectiveConfig(**run["objective"]),
        train=TrainerConfig(**run["train"]),
    )
    stats = metadata.get("standardizer")
    standardizer = None if stats is None else Standardizer(torch.tensor(stats["mean"]), torch.tensor(stats["std"]))
    features = metadata.get("features")
    if features is None:
        raise CheckpointError(f"{directory}: the checkpoint does not record the data dimension")
    model = build_model(config, int(features))
    dtype = getattr(torch, manifest.get("dtype", "float32"))
    model = model.to(dtype)
    load_state_dict_checked(model, load_tensors(directory, "model", manifest), directory)
    model.eval()
    return LoadedRun(config, model, standardizer, bool(metadata.get("dequantized_digits")), directory)


@torch.no_grad()
def draw_samples(run: LoadedRun, n: int, steps: int = 10, chunk: int = 16_384, progress: bool | None = False) -> Tensor:
    """``n`` samples in the data's own units, drawn ``chunk`` at a time (with a progress bar when asked)."""
    from tqdm.auto import tqdm

    from flowforge.train.fit import progress_enabled

    model = run.model
    parts = []
    with tqdm(total=n, desc="sample", disable=not progress_enabled(progress), leave=False) as bar:
        for start in range(0, n, chunk):
            count = min(chunk, n - start)
            if isinstance(model, FlowMatcher):
                method = "euler" if isinstance(model, ShortcutMatcher) else "midpoint"
                parts.append(model.sample(count, steps=steps, method=method))
            else:
                parts.append(model.sample(count))
            bar.update(count)
    x = torch.cat(parts).float()
    return run.standardizer.inverse(x) if run.standardizer is not None else x


def log_prob_in_data_units(run: LoadedRun, x: Tensor) -> Tensor:
    """Log-density of points given in the data's own units (the standardisation's Jacobian included)."""
    parameter = next(run.model.parameters())
    z = run.standardizer.transform(x) if run.standardizer is not None else x
    log_prob = run.model.log_prob(z.to(parameter.dtype))
    if run.standardizer is not None:
        log_prob = log_prob - run.standardizer.std.log().sum()
    return log_prob


def evaluate_run(run: LoadedRun, data: Tensor | None, samples: int = 2000) -> dict[str, float]:
    """Metrics of a trained run: NLL and bits/dim on ``data`` (data units), MMD, energy distance and
    sliced W2 between samples and ``data``; KL to the target for reverse-KL runs."""
    from flowforge.eval import energy_distance, mmd, sliced_wasserstein

    metrics: dict[str, float] = {}
    if run.config.objective_kind() == "reverse-kl":
        objective = ReverseKL(run.config.objective.target, run.config.objective.samples)
        metrics["kl"] = objective.kl(run.model, 20_000)
        return metrics
    if data is None:
        raise DataError("evaluation needs data")
    test = data[:samples]
    with torch.no_grad():
        nll = float(-torch.cat([log_prob_in_data_units(run, chunk) for chunk in test.split(1024)]).double().mean())
    metrics["nll"] = nll
    dims = test.shape[1]
    metrics["bits_per_dim"] = digits_bits_per_dim(nll, dims) if run.dequantized_digits else nll / (dims * math.log(2))
    generated = draw_samples(run, test.shape[0])
    metrics["mmd"] = mmd(generated, test)
    metrics["energy_distance"] = energy_distance(generated, test)
    metrics["sliced_w2"] = sliced_wasserstein(generated, test, generator=torch.Generator().manual_seed(0))
    return metrics


def write_samples(samples: Tensor, path: str | Path) -> Path:
    """Write samples as .npy or .csv (atomically: a failure leaves no half-written file)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".csv"):
        raise DataError(f"{path}: write samples to a .npy or .csv file")
    path.parent.mkdir(parents=True, exist_ok=True)
    array = samples.detach().cpu().numpy().astype(np.float64)
    if suffix == ".npy":
        import io

        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        data = buffer.getvalue()
    else:
        data = ("\n".join(",".join(repr(float(v)) for v in row) for row in array) + "\n").encode()
    write_atomic(path, data)
    return path


def _training_curve(directory: Path) -> tuple[list[float], list[float]]:
    import csv

    path = Path(directory) / "metrics.csv"
    steps, losses = [], []
    if path.is_file():
        for row in csv.DictReader(path.open()):
            if row.get("loss"):
                steps.append(float(row["step"]))
                losses.append(float(row["loss"]))
    return steps, losses


def _image_grid(images: Tensor, rows: int = 6) -> np.ndarray:
    """``rows**2`` flattened 8x8 images tiled into one array with 1-pixel gaps."""
    tiles = images[: rows * rows].reshape(-1, 8, 8).clamp(0, 1).numpy()
    grid = np.zeros((rows * 9 + 1, rows * 9 + 1))  # white gaps under gray_r
    for k, tile in enumerate(tiles):
        r, c = divmod(k, rows)
        grid[1 + 9 * r : 9 + 9 * r, 1 + 9 * c : 9 + 9 * c] = tile
    return grid


@torch.no_grad()
def _plot_digits(run: LoadedRun, path: str | Path, data: Tensor | None) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    if data is not None:
        axes[0].imshow(_image_grid(data.cpu()), cmap="gray_r", vmin=0, vmax=1)
    axes[0].set_title("held-out digits")
    axes[1].imshow(_image_grid(draw_samples(run, 36).cpu()), cmap="gray_r", vmin=0, vmax=1)
    axes[1].set_title("model samples")
    for ax in axes[:2]:
        ax.set_axis_off()
    steps, losses = _training_curve(run.directory)
    axes[2].plot(np.asarray(steps), np.asarray(losses), lw=0.8)
    axes[2].set_title("training loss")
    axes[2].set_xlabel("step")
    fig.suptitle(f"{run.config.model.kind} on dequantized digits")
    return save_figure(fig, path)


@torch.no_grad()
def plot_run(run: LoadedRun, path: str | Path, data: Tensor | None, samples: int = 2000) -> Path:
    """A trained run at a glance (a run from :func:`load_run`).

    Panels: the data (or, for reverse KL, the target density), the model's density on a grid
    (2-D only; flows by ``log_prob``, flow-matching models by their ODE likelihood), the model's
    samples, and the training loss from ``metrics.csv``. For more than two dimensions, the first
    two coordinates of data and samples; for digits, grids of 8x8 images.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    torch.manual_seed(0)
    if run.dequantized_digits:
        return _plot_digits(run, path, data)
    drawn_tensor = draw_samples(run, samples).cpu()
    drawn = drawn_tensor.numpy()
    reverse_kl = run.config.objective_kind() == "reverse-kl"
    reference = drawn_tensor if data is None else data.detach().cpu().float()
    two_d = reference.shape[1] == 2
    low, high = reference[:, :2].min(0).values, reference[:, :2].max(0).values
    pad = 0.15 * (high - low)
    bounds = (float(low[0] - pad[0]), float(high[0] + pad[0]), float(low[1] - pad[1]), float(high[1] + pad[1]))
    steps, losses = _training_curve(run.directory)
    fig = Figure(figsize=(16, 4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 4)
    if two_d:
        resolution = 100
        xs = torch.linspace(bounds[0], bounds[1], resolution)
        ys = torch.linspace(bounds[2], bounds[3], resolution)
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)
        if reverse_kl:
            from flowforge.data import target

            target_density = target(run.config.objective.target)(grid).exp().reshape(resolution, resolution)
            axes[0].pcolormesh(xs.numpy(), ys.numpy(), target_density.numpy(), shading="auto", cmap="viridis")
            axes[0].set_title(f"target: {run.config.objective.target}")
        density = log_prob_in_data_units(run, grid).exp().reshape(resolution, resolution).cpu()
        axes[1].pcolormesh(xs.numpy(), ys.numpy(), density.numpy(), shading="auto", cmap="viridis")
        axes[1].set_title("model density")
    else:
        axes[1].text(0.5, 0.5, f"{reference.shape[1]}-D data:\nfirst two coordinates shown", ha="center")
        axes[1].set_axis_off()
    if not reverse_kl:
        shown = reference[torch.randperm(reference.shape[0])[:samples]].numpy()
        axes[0].scatter(shown[:, 0], shown[:, 1], s=2, alpha=0.5, color="tab:blue")
        axes[0].set_title("held-out data")
    axes[2].scatter(drawn[:, 0], drawn[:, 1], s=2, alpha=0.5, color="tab:orange")
    axes[2].set_title("model samples")
    for ax in (axes[0], axes[2]) if not two_d else axes[:3]:
        ax.set_xlim(bounds[0], bounds[1])
        ax.set_ylim(bounds[2], bounds[3])
    axes[3].plot(np.asarray(steps), np.asarray(losses), lw=0.8)
    axes[3].set_title("training loss")
    axes[3].set_xlabel("step")
    fig.suptitle(f"{run.config.model.kind} ({run.config.objective_kind()})")
    return save_figure(fig, path)


__all__ = [
    "MODEL_KINDS",
    "OBJECTIVES",
    "ConfigError",
    "DataConfig",
    "LoadedRun",
    "ModelConfig",
    "ObjectiveConfig",
    "RunConfig",
    "build_model",
    "draw_samples",
    "evaluate_run",
    "load_config",
    "load_data",
    "load_run",
    "parse_config",
    "plot_run",
    "train_run",
    "write_samples",
]
