"""Runs: what the command line builds, trains, loads, samples, evaluates and plots.

* :mod:`flowforge.runs.data`: a run's data split, in the model's units and the data's own;
* :mod:`flowforge.runs.density`: density-model runs (``flowforge train/sample/eval/plot``);
* :mod:`flowforge.runs.policy`: policy runs (``flowforge policy train/eval``), imported on its own
  because it needs the ``robot`` extra's packages only when used.
"""

from flowforge.runs.data import DataConfig, RunData, load_data
from flowforge.runs.density import (
    MATCHING_MODELS,
    OBJECTIVES,
    ModelConfig,
    ObjectiveConfig,
    PreparedRun,
    Run,
    RunConfig,
    build_model,
    draw_samples,
    evaluate_run,
    held_out_data,
    load_config,
    load_run,
    model_kinds,
    plot_run,
    prepare_run,
    train_run,
    write_samples,
)

__all__ = [
    "MATCHING_MODELS",
    "OBJECTIVES",
    "DataConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "PreparedRun",
    "Run",
    "RunConfig",
    "RunData",
    "build_model",
    "draw_samples",
    "evaluate_run",
    "held_out_data",
    "load_config",
    "load_data",
    "load_run",
    "model_kinds",
    "plot_run",
    "prepare_run",
    "train_run",
    "write_samples",
]
