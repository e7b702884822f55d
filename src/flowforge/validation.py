"""Input checks shared by the public surface of flowforge.

Shape checks are cheap and always on. The finiteness check (no NaN or inf in ``x`` or
``context``) reduces over the whole tensor and, on a GPU, waits for it; it runs at the
:class:`~flowforge.flows.Flow` level only and can be switched off for speed once a pipeline
is trusted:

>>> import flowforge
>>> with flowforge.validation.checks(finite=False):
...     pass  # calls in here skip the NaN/inf scan
>>> flowforge.validation.finite_checks_enabled()
True
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

_finite_checks = True


def finite_checks_enabled() -> bool:
    """Whether :class:`~flowforge.flows.Flow` scans its inputs for NaN and inf."""
    return _finite_checks


def set_finite_checks(enabled: bool) -> None:
    """Turn the NaN/inf scan of flow inputs on or off for the whole process."""
    global _finite_checks
    _finite_checks = bool(enabled)


@contextmanager
def checks(*, finite: bool) -> Iterator[None]:
    """Context manager that sets the NaN/inf scan for a block and restores it after."""
    previous = _finite_checks
    set_finite_checks(finite)
    try:
        yield
    finally:
        set_finite_checks(previous)


def describe_shape(shape: Sequence[int | str]) -> str:
    """Format a shape such as ``("batch", 3)`` as ``(batch, 3)``."""
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def check_batched(
    name: str,
    value: object,
    event_shape: Sequence[int],
    *,
    batch: int | None = None,
    batch_of: str = "x",
    finite: bool = False,
) -> Tensor:
    """Check that ``value`` is a tensor of shape ``(batch, *event_shape)``.

    Arguments:
        name: the argument's name, used in the error message.
        value: the value to check.
        event_shape: the expected shape after the batch dimension.
        batch: the expected batch size, or ``None`` for any.
        batch_of: which argument fixes the batch size (for the message).
        finite: also reject NaN and inf (when the process-wide switch allows).

    Raises:
        TypeError: ``value`` is not a tensor.
        ValueError: wrong number of dimensions, wrong event shape, wrong batch size,
            or non-finite entries.
    """
    event_shape = tuple(int(s) for s in event_shape)
    expected = describe_shape(("batch", *event_shape))
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {expected}, got {type(value).__name__}")
    if value.dim() != 1 + len(event_shape) or tuple(value.shape[1:]) != event_shape:
        raise ValueError(f"{name} must have shape {expected}, got {describe_shape(tuple(value.shape))}")
    if batch is not None and value.shape[0] != batch:
        raise ValueError(
            f"{name} must have shape {describe_shape((batch, *event_shape))}: its batch size must equal "
            f"that of {batch_of} ({batch}), got {value.shape[0]}"
        )
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if finite and _finite_checks and not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).flatten(1).any(1).nonzero()[0, 0])
        raise ValueError(f"{name} contains NaN or inf (first at batch index {bad}); expected finite values")
    return value


def check_sample_count(n: object) -> int:
    """Check the number of samples requested from a flow or distribution."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    return n
