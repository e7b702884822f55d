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

**Flow matching on pixel counts** (``[data] name = "digits-images"`` or ``"digits"`` with a model of
``MATCHING_MODELS``): the model works in :math:`[-1, 1)` on uniformly dequantized counts, drawn
afresh for every batch by the run's objective (:class:`DequantizedFlowMatching`; the scaling is
documented once, in :mod:`flowforge.runs.data`), and every sample leaving the run is converted
back to counts. Images get a :class:`~flowforge.nn.UNetVelocity` by default. With
``[data] conditional = true`` each image's class is its context (one-hot), ``context_dropout``
trains the null context for classifier-free guidance, ``draw_samples`` takes the class of each
sample, and ``plot`` draws one row per class.

**Evaluating image samples.** ``evaluate_run`` on such a run (:func:`image_sample_metrics`) draws
one sample per training image (with its class, for a conditional run) and reports the Fréchet
distance between a digits classifier's features (:mod:`flowforge.eval.image_quality`) of the
samples and of the held-out images (``frechet_distance``), the same for the training images
themselves (``frechet_distance_floor``: what real digits reach at these sample sizes), the share
of samples the classifier labels with their class (``conditional_accuracy``) and its own accuracy
on the held-out images (``classifier_accuracy``). The classifier is trained once per data split
(``train_digits_classifier`` with its defaults, seed 0: deterministic for a machine and thread
count, 10-20 s on one core) and cached as a flowforge checkpoint in
``<cache>/digits-classifier-test<test_fraction>-seed<seed>/``, where ``<cache>`` is
``$FLOWFORGE_CACHE``, else ``$XDG_CACHE_HOME/flowforge``, else ``~/.cache/flowforge``
(:func:`classifier_cache`, :func:`digits_classifier`), so every run on that split is scored by
the same classifier. No NLL is reported for these runs: the ODE's log-density needs an adaptive
solve with a divergence per image (10-20 s per 100 test images on one core with a Hutchinson
estimate at tolerance 1e-4, 64 times that with the exact trace), too slow for every
``flowforge eval``; ``FlowMatcher.log_prob`` of :func:`~flowforge.runs.data.counts_to_model_units`
of the images gives it (the bound on the discrete NLL is in :mod:`flowforge.runs.data`).
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import hashlib
import inspect
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from flowforge import registry
from flowforge.checkpoint import load_model, read_manifest, write_atomic
from flowforge.config import (
    apply_overrides,
    build_config,
    build_dataclass,
    check_choice,
    check_integer,
    check_range,
    plain_numbers,
    read_document,
)
from flowforge.data import DIGIT_LEVELS, TARGETS, TOY_DATASETS, Standardizer, target
from flowforge.errors import CheckpointError, ConfigError, DataError, NumericalError, is_out_of_memory, memory_asked
from flowforge.eval.image_quality import (
    DigitsClassifier,
    conditional_accuracy,
    frechet_classifier_distance,
    load_classifier,
    save_classifier,
    train_digits_classifier,
)
from flowforge.eval.plots import (
    grid_points,
    plot_bounds,
    plot_class_grid,
    plot_image_run,
    plot_line_run,
    plot_points_run,
)
from flowforge.eval.report import likelihood_metrics, sample_metrics
from flowforge.flows import Dequantized
from flowforge.matching import ConsistencyMatcher, FlowMatcher, MeanFlowMatcher, ShortcutMatcher
from flowforge.runs.data import (
    COUNT_DATASETS,
    LABELLED_DATASETS,
    TOY_TEST_POINTS,
    DataConfig,
    RunData,
    counts_to_model_units,
    dataset_event_shape,
    load_data,
    model_units_to_counts,
    one_hot,
    standardizes,
)
from flowforge.train import (
    AdversarialML,
    FlowMatchingObjective,
    MaximumLikelihood,
    NegativeELBO,
    ReverseKL,
    Trainer,
    TrainerConfig,
)
from flowforge.utils.progress import progress_bar

OBJECTIVES = ("maximum-likelihood", "flow-matching", "reverse-kl", "adversarial", "negative-elbo")
#: Models that train by flow matching (the others by a likelihood or reverse KL).
MATCHING_MODELS = ("flow-matching", "shortcut", "meanflow", "consistency")
#: matching models whose network reads a step size (the shortcut step, the MeanFlow span).
STEP_INPUT_MODELS = ("shortcut", "meanflow")
#: Velocity networks over (C, H, W) images (the others take vectors); the first is the default for images.
IMAGE_VELOCITIES = ("unet",)
#: Defaults of the vector velocity networks a run builds (an image network keeps its own).
VECTOR_VELOCITY_DEFAULTS = {"hidden": (256, 256, 256), "time_embedding": 32}
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
            e.g. ``"tanh"``). Flow-matching models take the velocity network's arguments and the
            matcher's (``coupling``, ``path``, ``time_sampler`` by registered name; ``coupling =
            "ot"`` is ``"exact-ot"``; ``context_dropout`` for classifier-free guidance). The network:
            ``velocity = "velocity-mlp"`` (the default for vectors: ``hidden``, ``time_embedding``,
            ...) or ``"residual-velocity-mlp"``; ``"unet"`` (the default for images:
            ``channels``, ``channel_multipliers``, ``blocks``, ``attention``, ``heads``, ``groups``,
            ``time_embedding``, ``dropout``; :class:`~flowforge.nn.UNetVelocity`). Its context size
            comes from ``[data] conditional`` and its step input from the kind.
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
    ``samples`` for reverse KL; ``ml_weight`` and ``adversarial_weight`` for Flow-GAN;
    ``kl_warmup_steps`` for a VAE's negative ELBO (:class:`~flowforge.train.objectives.NegativeELBO`)."""

    kind: str | None = None
    target: str = "banana"
    samples: int = 256
    ml_weight: float = 1.0
    adversarial_weight: float = 1.0
    kl_warmup_steps: int = 0

    def __post_init__(self) -> None:
        plain_numbers(self)
        if self.kind is not None:
            check_choice("kind", self.kind, OBJECTIVES)
        check_choice("target", self.target, TARGETS)
        check_integer("samples", self.samples)
        check_range("ml_weight", self.ml_weight, low=0)
        check_range("adversarial_weight", self.adversarial_weight, low=0)
        if self.ml_weight == 0 and self.adversarial_weight == 0:
            raise ConfigError("ml_weight = 0 and adversarial_weight = 0: at least one must be > 0")
        check_integer("kl_warmup_steps", self.kl_warmup_steps, low=0, note=" (0: no warm-up)")


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
        if objective == "negative-elbo" and self.objective.kl_warmup_steps > self.train.steps:
            raise ConfigError(
                f"[objective] kl_warmup_steps = {self.objective.kl_warmup_steps} is longer than [train] steps = "
                f"{self.train.steps}: the run would end before its loss is the ELBO; shorten the warm-up"
            )
        if (objective == "negative-elbo") != (kind == "vae"):
            raise ConfigError(
                f"[model] kind = {kind!r} with [objective] kind = {objective!r}: a vae trains with 'negative-elbo', "
                "and only a vae does"
            )
        if objective != "reverse-kl" and self.data.name is None and self.data.path is None:
            raise ConfigError("[data] needs name (a built-in set: flowforge list) or path (a data file)")
        if self.data.conditional and kind not in MATCHING_MODELS:
            raise ConfigError(
                f"[data] conditional = true trains a class-conditional flow-matching model "
                f"({', '.join(MATCHING_MODELS)}); [model] kind = {kind!r} takes no class context"
            )

    def objective_kind(self) -> str:
        if self.objective.kind is not None:
            return self.objective.kind
        if self.model.kind == "vae":
            return "negative-elbo"
        return "flow-matching" if self.model.kind in MATCHING_MODELS else "maximum-likelihood"


#: The ``[objective]`` keys each objective reads (besides ``kind``).
OBJECTIVE_KEYS = {
    "maximum-likelihood": (),
    "flow-matching": (),
    "negative-elbo": ("kl_warmup_steps",),
    "reverse-kl": ("target", "samples"),
    "adversarial": ("ml_weight", "adversarial_weight"),
}


#: The [data] keys that name where the data comes from; a config gives one of them.
DATA_SOURCES = ("name", "path")


def _drop_replaced_source(document: dict[str, Any], overrides: list[str] | None) -> None:
    """An override of ``data.name`` or ``data.path`` replaces the file's other one: ``--set
    data.path=...`` on a config of a built-in set trains on the file (both in overrides stays an error)."""
    paths = {o.split("=", 1)[0].strip() for o in overrides or [] if isinstance(o, str) and "=" in o}
    given = [key for key in DATA_SOURCES if f"data.{key}" in paths]
    data = document.get("data")
    if len(given) == 1 and isinstance(data, dict):
        for key in DATA_SOURCES:
            if key != given[0]:
                data.pop(key, None)


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read and check a run config file (plus ``table.key=value`` overrides). Settings the run
    would not read are refused too: ``[objective]`` keys of another objective, a ``[data]`` table
    for reverse KL (which trains on its target's density)."""
    document = read_document(path)
    _drop_replaced_source(document, overrides)
    document = apply_overrides(document, overrides)
    config = build_config(RunConfig, document, str(path))
    kind = config.objective_kind()
    unused = sorted(set(document.get("objective", {})) - {"kind", *OBJECTIVE_KEYS[kind]})
    if unused:
        used = ", ".join(OBJECTIVE_KEYS[kind]) or "none besides kind"
        raise ConfigError(
            f"{path}: [objective] {', '.join(unused)}: not read by the {kind!r} objective (its keys: {used})"
        )
    if kind == "reverse-kl" and document.get("data"):
        raise ConfigError(
            f"{path}: [data] {', '.join(document['data'])}: a reverse-KL run trains on its target's density "
            f"({config.objective.target!r}), not on data; remove the [data] table"
        )
    _refuse_unread_sizes(config, document, str(path))
    if config.data.path is not None:  # kept as an absolute path: eval, plot and resume find it from anywhere
        absolute = str(Path(config.data.path).resolve())
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, path=absolute))
    return config


def _refuse_unread_sizes(config: RunConfig, document: dict[str, Any], source: str) -> None:
    """Refuse the sizes a run would not read: a 2-D set's test fraction (it is tested on
    ``TOY_TEST_POINTS`` fresh points), a table's size (it has its own rows), a reverse-KL batch (it
    draws ``[objective] samples``)."""
    given = document.get("data", {})
    data = config.data
    if data.name in TOY_DATASETS and "test_fraction" in given:
        raise ConfigError(
            f"{source}: [data] test_fraction = {data.test_fraction!r}: a 2-D set ({data.name}) is tested on "
            f"{TOY_TEST_POINTS} points drawn apart from its training points; remove it"
        )
    if data.name not in TOY_DATASETS and "size" in given:
        where = f"the data file {data.path}" if data.path is not None else f"the built-in set {data.name!r}"
        raise ConfigError(
            f"{source}: [data] size = {data.size!r}: only a 2-D set is drawn at a size; {where} has its own rows "
            "(test_fraction splits them); remove it"
        )
    if config.objective_kind() == "reverse-kl" and "batch_size" in document.get("train", {}):
        raise ConfigError(
            f"{source}: [train] batch_size = {config.train.batch_size!r}: a reverse-KL run draws "
            f"[objective] samples = {config.objective.samples} points a step, not batches of data; remove it"
        )


# ---------------------------------------------------------------- models
def _refuse_unknown_options(kind: str, options: dict[str, Any], signature: inspect.Signature) -> None:
    """Name an option the model's constructor does not take, with the nearest known one (a
    constructor that takes any keyword is left to refuse what it does not know)."""
    arguments = list(signature.parameters.values())[2:]  # after self and the shape or features
    if any(argument.kind is inspect.Parameter.VAR_KEYWORD for argument in arguments):
        return
    known = [argument.name for argument in arguments if argument.kind is not inspect.Parameter.VAR_POSITIONAL]
    for key in options:
        if key not in known:
            near = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(
                f"[model] options.{key}: a {kind} model takes no such option{hint}; known: {', '.join(known)}"
            )


def _registered_option(options: dict[str, Any], key: str, category: str, aliases: dict[str, str] | None = None) -> None:
    """Replace a registered name in ``options[key]`` by the class or an instance of it."""
    if key not in options:
        return
    if not isinstance(options[key], str):
        raise ConfigError(
            f"[model] options.{key} = {options[key]!r}: expected a name (a string), one of "
            f"{', '.join(registry.names(category))}"
        )
    name = (aliases or {}).get(options[key], options[key])
    try:
        cls = registry.lookup(category, name)
    except ValueError as error:
        raise ConfigError(f"[model] options.{key}: {error}") from error
    options[key] = cls if category == "activation" else cls()


def _accepted(cls: type, options: dict[str, Any]) -> dict[str, Any]:
    parameters = inspect.signature(cls.__init__).parameters
    return {k: options.pop(k) for k in list(options) if k in parameters}


def dequantizes(kind: str, levels: int | None) -> bool:
    """Whether a run wraps its model in :class:`~flowforge.flows.Dequantized`: on integer data
    (``levels`` values per entry), but not a flow-matching model (it dequantizes per batch in its
    objective) or a VAE (it models the counts itself)."""
    return levels is not None and kind not in MATCHING_MODELS and kind != "vae"


def build_model(config: RunConfig, data: RunData | None, source: str = "config") -> nn.Module:
    """The model a run trains, from its config and the data's shape (dequantized for integer data)."""
    kind = config.model.kind
    options = dict(config.model.options)
    event_shape = data.event_shape if data is not None else (TARGETS[config.objective.target].features,)
    if config.model.dequantization != "uniform" and not (data is not None and dequantizes(kind, data.levels)):
        reads = (
            "a flow matcher dequantizes each batch uniformly"
            if kind in MATCHING_MODELS
            else ("a vae models the counts itself" if kind == "vae" else "the data are not integer counts")
        )
        raise ConfigError(
            f"{source}: [model] dequantization = {config.model.dequantization!r}: {reads}, so nothing is "
            "dequantized; leave it out"
        )
    cls = registry.lookup("model", kind)
    if kind not in MATCHING_MODELS and "context" in options:  # a matcher names it in its own refusal
        raise ConfigError(
            f"{source}: [model] options.context = {options['context']!r}: a {kind} run trains on its data alone "
            "(only flow-matching models take a condition, from [data] conditional); remove it"
        )
    if kind == "vae" and data is not None:
        levels = options.get("levels", inspect.signature(cls.__init__).parameters["levels"].default)
        if data.levels is None or data.levels != levels:
            has = "real numbers" if data.levels is None else f"integers 0..{data.levels - 1}"
            raise ConfigError(
                f"{source}: [model] kind = 'vae' models integer counts 0..{levels - 1} (options.levels = {levels}); "
                f"the data hold {has} (use [data] name = 'digits', or set options.levels to the data's)"
            )
    try:
        _registered_option(options, "activation", "activation")
        if kind in MATCHING_MODELS:
            return _build_matcher(config, cls, options, event_shape, data.context_features if data is not None else 0)
        parameters = list(inspect.signature(cls.__init__).parameters)
        _refuse_unknown_options(kind, options, inspect.signature(cls.__init__))
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
        if data is not None and dequantizes(kind, data.levels):
            model = Dequantized(model, data.levels, variational=config.model.dequantization == "variational")
        return model
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from error
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{source}: [model] options do not build a {kind} model: {error}") from error
    except (MemoryError, RuntimeError) as error:
        if not is_out_of_memory(error):
            raise
        shown = ", ".join(f"{key} = {value!r}" for key, value in config.model.options.items()) or "the defaults"
        raise ConfigError(
            f"{source}: [model] options ({shown}) build a {kind} model too large for this machine's "
            f"memory{memory_asked(error)}; lower its widths or layers"
        ) from error


def _build_matcher(
    config: RunConfig, cls: type, options: dict[str, Any], event_shape: tuple[int, ...], context: int
) -> nn.Module:
    """A matcher of ``cls`` around its velocity network: a U-Net for images, an MLP for vectors."""
    kind = config.model.kind
    image = len(event_shape) == 3
    velocity_name = options.pop("velocity", IMAGE_VELOCITIES[0] if image else "velocity-mlp")
    try:
        velocity_cls = registry.lookup("velocity", velocity_name)
    except ValueError as error:
        raise ConfigError(f"[model] options.velocity: {error}") from error
    if image != (velocity_name in IMAGE_VELOCITIES):
        expected = (
            f"images {event_shape} take velocity = {' or '.join(map(repr, IMAGE_VELOCITIES))}"
            if image
            else f"vectors {event_shape} take velocity = 'velocity-mlp' or 'residual-velocity-mlp'"
        )
        raise ConfigError(f"[model] options.velocity = {velocity_name!r}: {expected}")
    for key in ("features", "context", "step_input"):
        if key in options:
            source = {
                "features": "the data's shape",
                "context": "[data] conditional",
                "step_input": f"the kind ({', '.join(STEP_INPUT_MODELS)} read a step)",
            }[key]
            raise ConfigError(f"[model] options.{key}: set by the run from {source}; remove it")
    _registered_option(options, "coupling", "coupling", {"ot": "exact-ot"})
    _registered_option(options, "path", "path")
    _registered_option(options, "time_sampler", "time")
    options.setdefault("coupling", registry.lookup("coupling", "exact-ot")())
    defaults = {} if image else _accepted(velocity_cls, dict(VECTOR_VELOCITY_DEFAULTS))
    velocity_options = {**defaults, **_accepted(velocity_cls, options)}
    velocity = velocity_cls(
        event_shape if image else event_shape[0],
        context=context,
        step_input=kind in STEP_INPUT_MODELS,
        **velocity_options,
    )
    if kind == "consistency":
        options.setdefault("total_steps", config.train.steps)  # the curriculum spans the run
    return cls(velocity, **options)


class DequantizedFlowMatching(FlowMatchingObjective):
    """Flow matching on pixel counts: every batch (training and validation) is dequantized afresh into
    the model's units, :func:`~flowforge.runs.data.counts_to_model_units`, before the matcher's loss."""

    def __init__(self, levels: int) -> None:
        self.levels = int(levels)

    def loss(self, model: nn.Module, batch) -> Tensor:
        x, context = batch
        return model.loss(counts_to_model_units(x, self.levels), context)


def build_objective(config: RunConfig, features: int, data: RunData | None = None):
    kind = config.objective_kind()
    if kind == "flow-matching" and data is not None and data.levels is not None:
        return DequantizedFlowMatching(data.levels)
    if kind == "adversarial":
        return AdversarialML(
            features, ml_weight=config.objective.ml_weight, adversarial_weight=config.objective.adversarial_weight
        )
    if kind == "maximum-likelihood":
        return MaximumLikelihood()
    if kind == "negative-elbo":
        return NegativeELBO(kl_warmup_steps=config.objective.kl_warmup_steps)
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
        validate = data is not None and bool(config.train.eval_every)
        trainer = Trainer(
            model,
            build_objective(config, features, data),
            config.train,
            data=None if data is None else data.train,
            context=None if data is None else data.train_context,
            validation_data=data.test if validate else None,
            validation_context=data.test_context if validate else None,
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
    metadata = {
        "run": asdict(config),
        "standardizer": None
        if standardizer is None
        else {"mean": standardizer.mean.tolist(), "std": standardizer.std.tolist()},
    }
    if config.data.path is not None and data is not None:  # a file can change after training; a built-in set cannot
        metadata["data_file_sha256"] = _file_digest(Path(config.data.path))
    return metadata


def _file_digest(path: Path) -> str:
    """The SHA-256 of a data file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
        statistics = None if stats is None else (torch.tensor(stats["mean"]), torch.tensor(stats["std"]))
    except (ConfigError, KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{directory}: the run config inside does not load ({error}); retrain the run") from error
    model = load_model(directory).eval()
    _check_model_fits_run(model, config, directory)
    if (statistics is not None) != standardizes(config.data):
        raise CheckpointError(
            f"{directory / 'checkpoint.json'}: metadata.standardizer is "
            f"{'missing' if statistics is None else 'present'}, but the run config's data "
            f"{'is' if standardizes(config.data) else 'is not'} standardised; retrain the run"
        )
    standardizer = None
    if statistics is not None:
        standardizer = _checked_standardizer(*statistics, tuple(model.event_shape), directory)
    return Run(config, model, standardizer, directory)


def _check_model_fits_run(model: nn.Module, config: RunConfig, directory: Path) -> None:
    """The saved model is the one the saved run config describes: its kind, its wrapping for pixel
    counts, the shape of the data's points and the context of a conditional run."""
    where = f"{directory / 'checkpoint.json'}: the run config inside"
    flow = model.flow if isinstance(model, Dequantized) else model
    described = registry.name_of(flow)
    saved_kind = described[1] if described is not None else type(flow).__name__
    if saved_kind != config.model.kind:
        raise CheckpointError(f"{where} names a {config.model.kind} model; the saved model is a {saved_kind}")
    dequantized = dequantizes(config.model.kind, COUNT_DATASETS.get(config.data.name))
    if isinstance(model, Dequantized) != dequantized:
        raise CheckpointError(
            f"{where} {'models' if dequantized else 'does not model'} pixel counts, but the saved model "
            f"{'is not' if dequantized else 'is'} dequantized"
        )
    expected_shape = dataset_event_shape(config.data)
    if expected_shape is not None and tuple(model.event_shape) != expected_shape:
        raise CheckpointError(
            f"{where} names the data {config.data.name!r}, points of shape {list(expected_shape)}; "
            f"the saved model's are {list(model.event_shape)}"
        )
    expected_context = LABELLED_DATASETS[config.data.name] if config.data.conditional else 0
    context = getattr(flow, "context_features", None) or 0
    if context != expected_context:
        raise CheckpointError(
            f"{where} {'is conditional' if expected_context else 'is unconditional'} "
            f"(a context of {expected_context}); the saved model takes a context of {context}"
        )


def _checked_standardizer(mean: Tensor, std: Tensor, event_shape: tuple[int, ...], directory: Path) -> Standardizer:
    """A checkpoint's standardisation: one finite mean and positive, finite scale per feature."""
    where = f"{directory / 'checkpoint.json'}: metadata.standardizer"
    if tuple(mean.shape) != event_shape or tuple(std.shape) != event_shape:
        raise CheckpointError(
            f"{where} has mean {list(mean.shape)} and std {list(std.shape)}; the model's points are {list(event_shape)}"
        )
    try:
        return Standardizer(mean, std)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{where}: {error}") from error


# ---------------------------------------------------------------- sampling and densities
def run_levels(run: Run) -> int | None:
    """The number of values of each entry of a run on pixel counts (17 for digits), else ``None``."""
    return COUNT_DATASETS.get(run.config.data.name)


def run_classes(run: Run) -> int:
    """The number of classes a conditional run samples (its context size); 0 for an unconditional run."""
    return LABELLED_DATASETS[run.config.data.name] if run.config.data.conditional else 0


def matches_counts(run: Run) -> bool:
    """Whether the run is a flow-matching model on pixel counts (its samples are converted back to counts)."""
    return isinstance(run.model, FlowMatcher) and run_levels(run) is not None


def balanced_labels(n: int, classes: int) -> Tensor:
    """The classes in turn, ``(n,)`` int64: sample ``i`` of a conditional run is of class ``i mod classes``.

    >>> balanced_labels(5, 3)
    tensor([0, 1, 2, 0, 1])
    """
    return torch.arange(n) % classes


def _checked_labels(labels: Tensor | int, n: int, classes: int) -> Tensor:
    if isinstance(labels, int) and not isinstance(labels, bool):
        labels = torch.full((n,), labels, dtype=torch.long)
    if not isinstance(labels, Tensor) or labels.shape != (n,) or labels.is_floating_point() or labels.is_complex():
        shown = tuple(labels.shape) if isinstance(labels, Tensor) else repr(labels)
        raise DataError(f"labels: expected {n} class numbers (an integer tensor of shape ({n},)), got {shown}")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise DataError(f"labels: expected classes 0..{classes - 1}, got {int(labels.min())}..{int(labels.max())}")
    return labels.long()


@torch.no_grad()
def draw_samples(
    run: Run,
    n: int,
    steps: int = 10,
    chunk: int = 16_384,
    progress: bool | None = False,
    labels: Tensor | int | None = None,
) -> Tensor:
    """``n`` samples in the data's own units (pixel counts for a run on them), drawn ``chunk`` at a time
    (with a progress bar when asked).

    ``steps``: solver steps of a flow-matching model (midpoint for flow matching, Euler with the
    matching step input for shortcut and MeanFlow models, multistep sampling for a consistency
    model). ``labels``: for a conditional run, the class of each sample, ``(n,)`` integers or one
    class for all; by default the classes in turn (:func:`balanced_labels`). An unconditional run
    refuses labels.
    """
    model = run.model
    classes = run_classes(run)
    if classes:
        labels = balanced_labels(n, classes) if labels is None else _checked_labels(labels, n, classes)
    elif labels is not None:
        raise DataError("labels: this run is not class-conditional ([data] conditional = false); draw without labels")
    parts = []
    with progress_bar(n, "sample", progress) as bar:
        for start in range(0, n, chunk):
            count = min(chunk, n - start)
            if isinstance(model, FlowMatcher):
                few_step = isinstance(model, ShortcutMatcher | MeanFlowMatcher | ConsistencyMatcher)
                method = "euler" if few_step else "midpoint"
                if classes:
                    context = one_hot(labels[start : start + count], classes)
                    parts.append(model.sample(1, context, steps=steps, method=method)[0])
                else:
                    parts.append(model.sample(count, steps=steps, method=method))
            else:
                parts.append(model.sample(count))
            bar.update(count)
    x = torch.cat(parts).float()
    finite = torch.isfinite(x.flatten(1)).all(1)
    if not bool(finite.all()):
        raise NumericalError(
            f"{int((~finite).sum())} of the model's {n} samples hold NaN or inf: the model diverged or its "
            "sampler is unstable; nothing is written"
        )
    if matches_counts(run):
        return model_units_to_counts(x, run_levels(run))
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
    data = run.config.data
    # Checked like a user's file: a hand-edited config may name a set of another shape.
    source = (
        f"the run's held-out split ([data] {'name = ' + repr(data.name) if data.name else 'path = ' + repr(data.path)})"
    )
    trained_on = read_manifest(run.directory).get("metadata", {}).get("data_file_sha256")
    if data.path is not None and trained_on is not None and Path(data.path).is_file():
        now = _file_digest(Path(data.path))
        if now != trained_on:
            raise DataError(
                f"{data.path}: the data file changed since the run trained on it (SHA-256 {trained_on[:12]}... then, "
                f"{now[:12]}... now): its held-out split would be other points; restore the file or give points "
                "with --data"
            )
    return checked_points(run, load_data(data).test_units, source)


def checked_points(run: Run, x: Tensor, source: str) -> Tensor:
    """Points from ``source`` (a file or data set a user named) checked against what the run models:
    ``(N, *event_shape)``, or flat rows of as many numbers for an image run (reshaped), and integer
    counts in range for a run on pixel counts. Raises :class:`DataError` naming ``source``, the
    shape or value found and what is expected."""
    if run.reverse_kl:
        raise DataError(f"{source}: a reverse-KL run is scored against its target density, not data")
    expected = tuple(run.model.event_shape)
    size = math.prod(expected)
    if x.ndim == 2 and len(expected) > 1 and x.shape[1] == size:
        x = x.reshape(len(x), *expected)
    if tuple(x.shape[1:]) != expected:
        found = "x".join(str(d) for d in x.shape[1:]) or "scalars"
        wanted = "x".join(str(d) for d in expected)
        raise DataError(f"{source}: points of shape {found}; this run models points of shape {wanted}")
    if len(x) < 2:  # the sample metrics compare sets of at least 2 points
        raise DataError(f"{source}: {len(x)} point{'s' * (len(x) != 1)}; evaluation needs at least 2")
    levels = run_levels(run)
    if levels is not None:
        outside = (x != x.round()) | (x < 0) | (x > levels - 1)
        if bool(outside.any()):
            bad = float(x[outside][0])
            raise DataError(f"{source}: holds {bad:g}; this run models pixel counts, integers in 0..{levels - 1}")
    return x


# ---------------------------------------------------------------- the digits classifier
#: Environment variable naming the folder where flowforge caches what it trains for evaluation.
CACHE_VARIABLE = "FLOWFORGE_CACHE"


def classifier_cache() -> Path:
    """Where evaluation caches its digits classifiers: ``$FLOWFORGE_CACHE``, else
    ``$XDG_CACHE_HOME/flowforge``, else ``~/.cache/flowforge``."""
    if os.environ.get(CACHE_VARIABLE):
        return Path(os.environ[CACHE_VARIABLE])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "flowforge"


def _check_cache_folder(folder: Path) -> None:
    """Refuse, before a classifier is trained for it, a cache folder that cannot be made or written."""
    for parent in (folder, *folder.parents):
        if parent.exists():  # the nearest folder that exists: the rest is made under it
            if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
                problem = "is a file" if not parent.is_dir() else "cannot be written"
                raise ConfigError(
                    f"the classifier cache {folder}: {parent} {problem}; set ${CACHE_VARIABLE} to a folder "
                    "flowforge may write"
                )
            return


def digits_classifier(data: DataConfig, cache: str | Path | None = None) -> tuple[DigitsClassifier, float]:
    """The digits classifier of ``data``'s split and its accuracy on the split's test images.

    Trained by :func:`~flowforge.eval.image_quality.train_digits_classifier` (its defaults, seed 0) on
    the split's training images the first time, then loaded from
    ``<cache>/digits-classifier-test<test_fraction>-seed<seed>/`` (``cache``: default
    :func:`classifier_cache`); a damaged cached copy is trained and written again.
    """
    folder = Path(cache if cache is not None else classifier_cache())
    folder = folder / f"digits-classifier-test{data.test_fraction:g}-seed{data.seed}"
    if (folder / "checkpoint.json").is_file():
        try:
            classifier = load_classifier(folder)
            return classifier, float(read_manifest(folder)["metadata"]["test_accuracy"])
        except (CheckpointError, KeyError, TypeError, ValueError):
            pass  # trained again below
    _check_cache_folder(folder)
    trained = train_digits_classifier(test_fraction=data.test_fraction, split_seed=data.seed)
    save_classifier(trained.classifier, folder, trained.metadata())
    return trained.classifier, trained.test_accuracy


def image_sample_metrics(run: Run, test: Tensor, samples: int = 2000, steps: int = 10) -> dict[str, float]:
    """Sample quality of a run on digit pixel counts, scored by the split's digits classifier
    (:func:`digits_classifier`).

    The model draws one sample per image of the run's training split (the first ``samples`` of
    them), with that image's class for a conditional run, so that those training images are the
    reference at the same sample sizes and class counts:

    * ``frechet_distance``: between the classifier's features of the samples and of ``test``
      (pixel counts, images or flattened);
    * ``frechet_distance_floor``: the same for the training images in place of the samples (what
      real digits reach at these sample sizes: the distance of finite samples is biased up, so a
      model near the floor is as close as this test can tell);
    * ``conditional_accuracy`` (conditional runs): the share of samples labelled with their class;
    * ``classifier_accuracy``: the classifier's accuracy on the split's test images.
    """
    shape = (1, 8, 8)
    if test.dim() < 2 or test[0].numel() != 64:
        raise DataError(f"image metrics compare 8x8 digit images; the held-out data has shape {tuple(test.shape)}")
    split = load_data(run.config.data)
    train = split.train_units[:samples].float().reshape(-1, *shape)
    labels = None if split.train_context is None else split.train_context[:samples].argmax(1)
    drawn = draw_samples(run, train.shape[0], steps, labels=labels)
    classifier, accuracy = digits_classifier(run.config.data)
    drawn, reference = drawn.reshape(-1, *shape), test.float().reshape(-1, *shape)
    metrics = {
        "frechet_distance": frechet_classifier_distance(classifier, drawn, reference),
        "frechet_distance_floor": frechet_classifier_distance(classifier, train, reference),
    }
    if labels is not None:
        metrics["conditional_accuracy"] = conditional_accuracy(classifier, drawn, labels)
    metrics["classifier_accuracy"] = accuracy
    return metrics


def is_image_run(run: Run) -> bool:
    """Whether the run models pixel counts (digits), drawn as image grids."""
    return run.config.data.name in COUNT_DATASETS


def evaluate_run(
    run: Run,
    data: Tensor | None,
    samples: int = 2000,
    seed: int = 0,
    steps: int = 10,
) -> dict[str, float]:
    """Metrics of a trained run (:mod:`flowforge.eval.report`): NLL and bits/dim on ``data`` (data
    units), and MMD, energy distance and sliced W2 between samples and ``data``; the KL to the
    target for reverse-KL runs; for a flow-matching model on pixel counts, the classifier's metrics
    of :func:`image_sample_metrics` instead. ``samples`` caps the held-out points (and the
    samples); ``steps``: the sampler's steps (flow-matching models)."""
    torch.manual_seed(seed)  # every metric drawn from samples repeats with the same seed
    if run.reverse_kl:
        objective = ReverseKL(run.config.objective.target, run.config.objective.samples)
        return {"kl": objective.kl(run.model, 20_000)}
    if data is None:
        raise DataError("evaluating a run needs held-out data")
    test = data[:samples]
    if matches_counts(run):
        return image_sample_metrics(run, test, samples, steps)
    metrics = {}
    if has_density(run.model):
        with torch.no_grad():
            log_probs = torch.cat([log_prob_in_data_units(run, rows) for rows in test.split(1024)])
        metrics = likelihood_metrics(log_probs, test[0].numel())
    metrics.update(sample_metrics(draw_samples(run, test.shape[0], steps), test, seed))
    return metrics


@torch.no_grad()
def plot_run(run: Run, path: str | Path, data: Tensor | None, samples: int = 2000) -> Path:
    """A trained run at a glance (:mod:`flowforge.eval.plots`): image grids for digits; otherwise the
    data (or the reverse-KL target), the model's density on a grid (2-D), samples and training curve."""
    torch.manual_seed(0)
    curve = training_curve(run.directory)
    title = f"{run.config.model.kind} ({run.config.objective_kind()})"
    if is_image_run(run):
        classes = run_classes(run)
        if classes:  # one row per class
            labels = torch.arange(classes).repeat(10)
            drawn = draw_samples(run, labels.shape[0], labels=labels)
            return plot_class_grid(
                drawn.reshape(-1, 1, 8, 8),
                labels,
                path,
                columns=10,
                value_range=(0, DIGIT_LEVELS - 1),
                title=f"{run.config.model.kind}: a row per class",
            )
        drawn = draw_samples(run, 36)
        return plot_image_run(path, f"{title} on {run.config.data.name}", data, drawn, DIGIT_LEVELS, curve)
    drawn = draw_samples(run, samples).cpu()
    reference = drawn if data is None else data.detach().cpu().float()
    if reference.shape[1] == 1:
        line = None
        if has_density(run.model):
            low, high, _, _ = plot_bounds(reference.repeat(1, 2))
            xs = torch.linspace(low, high, 400)
            line = (xs, log_prob_in_data_units(run, xs[:, None]).exp().cpu())
        return plot_line_run(path, title, reference, drawn, curve, line)
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
            for line, row in enumerate(csv.DictReader(handle), start=2):
                if row.get("loss"):
                    try:
                        steps.append(float(row["step"]))
                        losses.append(float(row["loss"]))
                    except (TypeError, ValueError) as error:
                        raise DataError(
                            f"{path}, line {line}: step {row.get('step')!r} and loss {row['loss']!r} are not numbers "
                            "(the file was edited or truncated; delete it to plot without a training curve)"
                        ) from error
    return steps, losses


__all__ = [
    "CACHE_VARIABLE",
    "IMAGE_VELOCITIES",
    "MATCHING_MODELS",
    "OBJECTIVES",
    "STEP_INPUT_MODELS",
    "DataConfig",
    "DequantizedFlowMatching",
    "ModelConfig",
    "ObjectiveConfig",
    "PreparedRun",
    "Run",
    "RunConfig",
    "balanced_labels",
    "build_model",
    "classifier_cache",
    "digits_classifier",
    "draw_samples",
    "evaluate_run",
    "has_density",
    "held_out_data",
    "image_sample_metrics",
    "is_image_run",
    "load_config",
    "load_run",
    "log_prob_in_data_units",
    "matches_counts",
    "model_kinds",
    "plot_run",
    "prepare_run",
    "run_classes",
    "run_levels",
    "train_run",
    "training_curve",
    "write_samples",
]
