"""Training: one loop with pluggable objectives, schedules, EMA, mixed precision and resumable checkpoints."""

from flowforge.train.fit import fit_maximum_likelihood
from flowforge.train.trainer import (
    AdversarialML,
    ExponentialMovingAverage,
    FlowMatchingObjective,
    MaximumLikelihood,
    Objective,
    PolicyObjective,
    ReverseKL,
    Trainer,
    TrainerConfig,
    TrainingState,
    distributed_world,
    init_distributed_from_environment,
    learning_rate_factor,
)

__all__ = [
    "AdversarialML",
    "ExponentialMovingAverage",
    "FlowMatchingObjective",
    "MaximumLikelihood",
    "Objective",
    "PolicyObjective",
    "ReverseKL",
    "Trainer",
    "TrainerConfig",
    "TrainingState",
    "distributed_world",
    "fit_maximum_likelihood",
    "init_distributed_from_environment",
    "learning_rate_factor",
]
