r"""Learning-rate schedules: the multiplier of the peak learning rate at each optimizer step.

With :math:`W` warm-up steps, :math:`T` steps in all and :math:`p = (s - W) / (T - W)` the
progress after the warm-up, the factor at step :math:`s` (counted from 0) is

.. math::
    f(s) = \frac{s + 1}{W} \quad (s < W), \qquad
    f(s) = \begin{cases}
        1 & \text{constant} \\
        \tfrac12\big(1 + \cos(\pi p)\big) & \text{cosine} \\
        \text{one-cycle} & \text{a cosine rise over } p < 0.3 \text{ from } 0.04 \text{ to } 1,
            \text{ then a cosine fall towards } 10^{-3}
    \end{cases}

(one-cycle has its own rise, so a :class:`~flowforge.train.TrainerConfig` refuses a warm-up with it).
The falls end at :math:`s = T`, one past the last step (as PyTorch's and Hugging Face's cosine
schedules do): the last step runs at :math:`\tfrac12(1 - \cos(\pi/(T - W)))` of the peak with
cosine (0.0245 for 10 steps, 2.5e-6 for 1,000), not at 0, so every step trains.

``torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_factor(config))`` applies it.

>>> from flowforge.train import TrainerConfig
>>> factor = learning_rate_factor(TrainerConfig(steps=110, warmup_steps=10, schedule="cosine"))
>>> [round(factor(s), 4) for s in (0, 9, 60, 109)]
[0.1, 1.0, 0.5, 0.0002]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

#: the schedules :func:`learning_rate_factor` knows (``TrainerConfig.schedule``).
SCHEDULES = ("constant", "cosine", "one-cycle")


class ScheduleSettings(Protocol):
    """What a schedule reads from a :class:`~flowforge.train.TrainerConfig` (any object with these will do)."""

    steps: int
    warmup_steps: int
    schedule: str


def learning_rate_factor(config: ScheduleSettings) -> Callable[[int], float]:
    """The multiplier of the peak learning rate at each step (warm-up, then the schedule)."""
    warmup, steps = config.warmup_steps, config.steps
    if config.schedule not in SCHEDULES:
        raise ValueError(f"schedule = {config.schedule!r}: expected one of {', '.join(SCHEDULES)}")
    if not 0 <= warmup < steps:
        raise ValueError(f"warmup_steps = {warmup}: expected an integer in [0, steps) (steps = {steps})")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(steps - warmup, 1)
        if config.schedule == "constant":
            return 1.0
        if config.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        # one-cycle: rise over the first 30 % to the peak, then cosine down to 1/1000 of it.
        if progress < 0.3:
            return 0.04 + 0.96 * 0.5 * (1 - math.cos(math.pi * progress / 0.3))
        return 1e-3 + (1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * (progress - 0.3) / 0.7))

    return factor


__all__ = ["SCHEDULES", "ScheduleSettings", "learning_rate_factor"]
