"""The errors a user of flowforge can cause, in one family.

Every error that bad input, a bad file or a bad setting can cause is a :class:`FlowforgeError`
(or a plain ``ValueError``/``TypeError`` for a bad argument in Python code). Its message names
what was wrong (the argument, file, table or key), the value, and what is allowed. The command
line turns any of them into one line on stderr and exit code 2, in one place (:mod:`flowforge.cli`).

Each subclass also derives from the built-in exception its callers caught before this family
existed (``ValueError`` for configs and data, ``RuntimeError`` for checkpoints and solvers), so
``except ValueError`` keeps working.

>>> issubclass(ConfigError, FlowforgeError) and issubclass(ConfigError, ValueError)
True
"""

from __future__ import annotations

import re


class FlowforgeError(Exception):
    """Base class of every error flowforge raises for bad input, files or settings."""


class ConfigError(FlowforgeError, ValueError):
    """A run or policy config that cannot be used; the message names the file, table, key and value."""


class DataError(FlowforgeError, ValueError):
    """A data file or data set that cannot be used; the message names the file (row, column, member)."""


class CheckpointError(FlowforgeError, RuntimeError):
    """A checkpoint that is missing, truncated, tampered with, foreign, or does not fit the model."""


class ODESolverError(FlowforgeError, RuntimeError):
    """An ODE solve that cannot finish (step size underflow, too many steps, non-finite state)."""


class NumericalError(FlowforgeError, ValueError):
    """NaN or inf from a model and the input or settings given (diverged weights, an overflowing
    temperature): what it would have produced is refused, never handed on."""


class RebuildError(FlowforgeError, TypeError):
    """A model that cannot be saved so that it rebuilds: an argument is of a type with no registered name."""


#: torch's refusal of a tensor whose byte count does not fit in 64 bits (a size near 2**63).
_SIZE_OVERFLOW = "Storage size calculation overflowed"


def is_out_of_memory(error: BaseException) -> bool:
    """An allocation the machine cannot make (torch raises ``RuntimeError`` on the CPU,
    ``torch.OutOfMemoryError`` on a GPU, itself a ``RuntimeError``), or one too large to count: a
    size in the user's config or options, not a bug."""
    message = str(error)
    return (
        isinstance(error, MemoryError)
        or type(error).__name__ == "OutOfMemoryError"
        or "can't allocate memory" in message
        or _SIZE_OVERFLOW in message
    )


def memory_asked(error: BaseException) -> str:
    """What an out-of-memory error asked for, as a parenthesis for a message ('' when it does not say).

    >>> memory_asked(RuntimeError("can't allocate memory: you tried to allocate 2147483648 bytes."))
    ' (2.0 GiB asked for one tensor)'
    """
    if _SIZE_OVERFLOW in str(error):
        return " (a tensor of more than 2**63 bytes asked for)"
    asked = re.search(r"allocate (\d+) bytes", str(error))
    return f" ({int(asked.group(1)) / 2**30:,.1f} GiB asked for one tensor)" if asked else ""


__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "FlowforgeError",
    "NumericalError",
    "ODESolverError",
    "RebuildError",
    "is_out_of_memory",
    "memory_asked",
]
