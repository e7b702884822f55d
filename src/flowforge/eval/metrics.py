"""Sample-quality and likelihood metrics."""

from __future__ import annotations

import torch
from torch import Tensor

from flowforge.flows.base import Flow


@torch.no_grad()
def negative_log_likelihood(flow: Flow, data: Tensor, context: Tensor | None = None, batch_size: int = 8192) -> float:
    """Mean negative log-likelihood of ``data`` under ``flow``, in nats per point.

    Evaluated in chunks of ``batch_size`` so that large test sets fit in memory.
    """
    parameter = next(flow.parameters(), None)
    device, dtype = (parameter.device, parameter.dtype) if parameter is not None else (data.device, data.dtype)
    total = 0.0
    for start in range(0, data.shape[0], batch_size):
        chunk = data[start : start + batch_size].to(device, dtype)
        ctx = None if context is None else context[start : start + batch_size].to(device, dtype)
        total += float(flow.log_prob(chunk, ctx).double().sum())
    return -total / data.shape[0]
