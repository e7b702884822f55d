"""Runs: what the command line builds, trains, loads, samples, evaluates and plots.

* :mod:`flowforge.runs.data`: a run's data split, in the model's units and the data's own;
* :mod:`flowforge.runs.density`: density-model runs (``flowforge train/sample/eval/plot``);
* :mod:`flowforge.runs.policy`: policy runs (``flowforge policy train/eval``), imported on its own
  because it needs the ``robot`` extra's packages only when used.
"""

from flowforge.runs.data import DataConfig, RunData, counts_to_model_units, load_data, model_units_to_counts
from flowforge.runs.density import (
    MATCHING_MODELS,
    OBJECTIVES,
    STEP_INPUT_MODELS,
    DequantizedFlowMatching,
    ModelConfig,
    ObjectiveConfig,
    PreparedRun,
    Run,
    RunConfig,
    balanced_labels,
    build_model,
    checked_points,
    classifier_cache,
    digits_classifier,
    draw_samples,
    evaluate_run,
    held_out_data,
    image_sample_metrics,
    load_config,
    load_run,
    model_kinds,
    plot_run,
    prepare_run,
    run_classes,
    run_levels,
    train_run,
    write_samples,
)

__all__ = [
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
    "RunData",
    "balanced_labels",
    "build_model",
    "checked_points",
    "classifier_cache",
    "counts_to_model_units",
    "digits_classifier",
    "draw_samples",
    "evaluate_run",
    "held_out_data",
    "image_sample_metrics",
    "load_config",
    "load_data",
    "load_run",
    "model_kinds",
    "model_units_to_counts",
    "plot_run",
    "prepare_run",
    "run_classes",
    "run_levels",
    "train_run",
    "write_samples",
]
