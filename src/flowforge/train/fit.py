"""Maximum-likelihood training of a flow on an in-memory tensor.

Minimises the negative log-likelihood :math:`-\\frac1B\\sum_i \\log p_\\theta(x_i \\mid c_i)`
over random minibatches with Adam, a cosine learning-rate decay and gradient-norm clipping.
"""

from __future__ import annotations

import math
import os
import sys

import torch
from torch import Tensor
from tqdm.auto import tqdm

from flowforge.flows.base import Flow
from flowforge.validation import check_batched


def progress_enabled(progress: bool | None) -> bool:
    """``None`` means: show bars on an interactive terminal, never under CI."""
    if progress is not None:
        return progress
    return sys.stderr.isatty() and not os.environ.get("CI")


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
        batch_size: minibatch size (points drawn with replacement across steps).
        lr: peak Adam learning rate, decayed to zero along a cosine.
        max_grad_norm: clip the global gradient norm to this value (``None`` disables).
        seed: seeds the minibatch order.
        progress: show a progress bar (``None``: only on a terminal and outside CI).

    Raises:
        FloatingPointError: the loss became NaN or inf (the step and the learning rate are named).
    """
    check_batched("data", data, flow.event_shape, finite=True)
    if context is not None:
        check_batched("context", context, tuple(context.shape[1:]), batch=data.shape[0], batch_of="data", finite=True)
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be positive, got steps={steps}, batch_size={batch_size}")
    parameter = next(flow.parameters(), None)
    if parameter is None:
        raise ValueError("flow has no parameters to train")
    data = data.to(parameter.device, parameter.dtype)
    context = None if context is None else context.to(parameter.device, parameter.dtype)
    optimizer = torch.optim.Adam(flow.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    flow.train()
    bar = tqdm(range(steps), desc="train", disable=not progress_enabled(progress), leave=False)
    for step in bar:
        index = torch.randint(0, data.shape[0], (batch_size,), generator=generator).to(data.device)
        loss = -flow.log_prob(data[index], None if context is None else context[index]).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step} (lr={schedule.get_last_lr()[0]:.2e})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(flow.parameters(), max_grad_norm)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(nll=f"{losses[-1]:.3f}")
    flow.eval()
    return losses
