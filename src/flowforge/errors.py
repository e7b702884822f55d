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


__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "FlowforgeError",
    "NumericalError",
    "ODESolverError",
    "RebuildError",
]
