"""Maximum-likelihood training of a flow on an in-memory tensor, in one call.

Minimises the negative log-likelihood :math:`-\\frac1B\\sum_i \\log p_\\theta(x_i \\mid c_i)`
over random minibatches with Adam, a cosine learning-rate decay and gradient-norm clipping: the
:class:`~flowforge.train.Trainer` loop with the :class:`~flowforge.train.MaximumLikelihood` objective.
"""

from __future__ import annotations

from torch import Tensor

from flowforge.flows.base import Flow
from flowforge.train.loop import Trainer, TrainerConfig
from flowforge.train.objectives import MaximumLikelihood
from flowforge.validation import check_batched


def fit_maximum_likelihood(
    flow: Flow,
    data: Tensor,
    context: Tensor | None = None,
    *,
    steps: int = 2000,
    batch_size: int = 256,
    lr: float = 1e-3,
    max_grad_norm: float | None = 10.0,
    seed: int = 0,
    progress: bool | None = None,
) -> list[float]:
    """Train ``flow`` in place by maximum likelihood; return the loss (mean NLL) of each step.

    Arguments:
        flow: the flow to train.
        data: training points, shape (N, *event).
        context: optional context per point, shape (N, c).
        steps: number of optimizer steps.
        batch_size: minibatch size (each epoch is a fresh shuffle of the points, cut into batches).
        lr: peak Adam learning rate, decayed to zero along a cosine.
        max_grad_norm: clip the global gradient norm to this value (``None`` disables).
        seed: seeds the minibatch order.
        progress: show a progress bar (``None``: only on a terminal and outside CI; see
            :func:`flowforge.utils.progress.progress_enabled`).

    Raises:
        ConfigError: a setting out of range (the key, the value and what is allowed are named).
        FloatingPointError: the loss became NaN or inf (the step and the learning rate are named).
    """
    check_batched("data", data, flow.event_shape, finite=True)
    if context is not None:
        check_batched("context", context, tuple(context.shape[1:]), batch=data.shape[0], batch_of="data", finite=True)
    config = TrainerConfig(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        max_grad_norm=max_grad_norm,
        seed=seed,
        log_every=1,
        progress=progress,
    )
    state = Trainer(flow, MaximumLikelihood(), config, data=data, context=context).fit()
    return [row["loss"] for row in state.history if "loss" in row]
