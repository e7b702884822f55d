"""Training: one loop with pluggable objectives, schedules, EMA, mixed precision and resumable checkpoints.

The parts, one concern each: :mod:`~flowforge.train.objectives` (what is minimised),
:mod:`~flowforge.train.schedules` (the learning rate), :mod:`~flowforge.train.state` (EMA, random
states, the resumable checkpoint), :mod:`~flowforge.train.distributed` (``torchrun``,
DistributedDataParallel and the data loader), :mod:`~flowforge.train.loop` (``TrainerConfig`` and
``Trainer``), :mod:`~flowforge.train.fit` (maximum likelihood in one call).
"""

from flowforge.train.distributed import distributed_world, init_distributed_from_environment
from flowforge.train.fit import fit_maximum_likelihood
from flowforge.train.loop import Trainer, TrainerConfig, TrainingInterrupted
from flowforge.train.objectives import (
    AdversarialML,
    FlowMatchingObjective,
    MaximumLikelihood,
    NegativeELBO,
    Objective,
    PolicyDistillation,
    PolicyObjective,
    ReverseKL,
)
from flowforge.train.schedules import learning_rate_factor
from flowforge.train.state import ExponentialMovingAverage, TrainingState

__all__ = [
    "AdversarialML",
    "ExponentialMovingAverage",
    "FlowMatchingObjective",
    "MaximumLikelihood",
    "NegativeELBO",
    "Objective",
    "PolicyDistillation",
    "PolicyObjective",
    "ReverseKL",
    "Trainer",
    "TrainerConfig",
    "TrainingInterrupted",
    "TrainingState",
    "distributed_world",
    "fit_maximum_likelihood",
    "init_distributed_from_environment",
    "learning_rate_factor",
]
