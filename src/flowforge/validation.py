"""Input checks shared by the public surface of flowforge, and the one input rule they apply.

**The input rule** (every :class:`~flowforge.flows.Flow`, :class:`~flowforge.flows.CNF`,
:class:`~flowforge.matching.FlowMatcher` and :class:`~flowforge.matching.ShortcutMatcher` method
that takes tensors or sampler settings follows it; their docstrings point here):

1. **Floating-point dtypes are cast where they enter.** A floating-point tensor argument (``x``,
   ``x1``, ``x0``, ``t``, ``context``) of another dtype than the model's (float64 into a float32
   model, float32 into a float64 one) is cast once, on entry, to the model's dtype, and the result
   comes back in the model's dtype: a float64 batch into a float32 model gives exactly the numbers
   of the same batch cast to float32 by hand. The model's dtype is that of its parameters
   (:func:`model_dtype`); change it with ``model.double()`` / ``model.float()``. Casting (not
   refusing) is the rule because data arrive as float64 from NumPy and pandas, and the model, not
   the caller, decides the precision it computes in (a policy casts its observations the same way).
2. **Integer and bool tensors are refused** with a ``TypeError`` naming the argument and its dtype
   (cast them yourself if they really are real numbers), except where integers are the data:
   :meth:`Dequantized.log_prob <flowforge.flows.Dequantized.log_prob>` takes integer counts
   (int64, uint8, ...).
3. **Shapes and values are checked on entry**, once per call and never inside a solver loop:
   ``(batch, *event)`` shapes, matching batch sizes, no NaN or inf, times ``t`` in [0, 1].
4. **Empty batches**: a density of 0 rows is an empty ``(0,)`` tensor; a training loss of 0 rows is
   refused (``ValueError``: "x1 has 0 rows"), since the mean of nothing is NaN.
5. **Settings are checked where they enter**: counts (``n``, ``steps``) are positive ints, ``method``
   and ``trace`` are known names, ``atol``/``rtol`` finite and > 0, ``guidance_scale`` finite,
   ``noise_scale`` finite and >= 0. Constructors check theirs at construction. Every message names
   the argument, the value given and what is allowed; bad arguments raise ``ValueError`` or
   ``TypeError``.

Shape and dtype checks are cheap and always on. The value scans (no NaN or inf in ``x``,
``context`` ..., ``t`` in [0, 1]) reduce over the whole tensor and, on a GPU, wait for it; they can
be switched off for speed once a pipeline is trusted:

>>> import flowforge
>>> with flowforge.validation.checks(finite=False):
...     pass  # calls in here skip the NaN/inf and range scans
>>> flowforge.validation.finite_checks_enabled()
True
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from itertools import chain
from numbers import Integral, Real

import torch
from torch import Tensor, nn

_finite_checks = True


def finite_checks_enabled() -> bool:
    """Whether inputs are scanned for NaN and inf (and times for [0, 1])."""
    return _finite_checks


def set_finite_checks(enabled: bool) -> None:
    """Turn the value scans of inputs (NaN/inf, times in [0, 1]) on or off for the whole process."""
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


def all_finite(value: Tensor) -> bool:
    """Whether every entry of a floating-point tensor is finite: one sum when they are (a NaN or
    inf makes the sum NaN or inf), an exact scan when the sum is not (it may only have overflowed)."""
    if not value.is_floating_point() or value.numel() == 0:
        return not value.is_complex() or bool(torch.isfinite(value).all())
    if math.isfinite(float(value.detach().sum())):
        return True
    return bool(torch.isfinite(value).all())


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
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Check that ``value`` is a tensor of shape ``(batch, *event_shape)``; return it, cast to ``dtype``.

    Arguments:
        name: the argument's name, used in the error message.
        value: the value to check.
        event_shape: the expected shape after the batch dimension.
        batch: the expected batch size, or ``None`` for any.
        batch_of: which argument fixes the batch size (for the message).
        finite: also reject NaN and inf (when the process-wide switch allows).
        dtype: the model's dtype: a floating-point ``value`` of another dtype is cast to it
            (the input rule of the module docstring); ``None`` returns ``value`` as it is.

    Raises:
        TypeError: ``value`` is not a tensor, or not a floating-point one.
        ValueError: wrong number of dimensions, wrong event shape, wrong batch size,
            or non-finite entries.
    """
    event_shape = tuple(int(s) for s in event_shape)
    if not isinstance(value, Tensor):
        expected = describe_shape(("batch", *event_shape))
        raise TypeError(f"{name} must be a torch.Tensor of shape {expected}, got {type(value).__name__}")
    if value.dim() != 1 + len(event_shape) or tuple(value.shape[1:]) != event_shape:
        expected = describe_shape(("batch", *event_shape))
        raise ValueError(f"{name} must have shape {expected}, got {describe_shape(tuple(value.shape))}")
    if batch is not None and value.shape[0] != batch:
        raise ValueError(
            f"{name} must have shape {describe_shape((batch, *event_shape))}: its batch size must equal "
            f"that of {batch_of} ({batch}), got {value.shape[0]}"
        )
    check_floating(name, value)
    cast = value if dtype is None else value.to(dtype)
    if finite and _finite_checks and not all_finite(cast):  # after the cast: 1e300 in float64 is inf in float32
        bad = int((~torch.isfinite(cast)).flatten(1).any(1).nonzero()[0, 0])
        beyond = f", values beyond the range of {cast.dtype}" if all_finite(value) else ""
        raise ValueError(f"{name} contains NaN or inf (first at batch index {bad}{beyond}); expected finite values")
    return cast


def check_floating(name: str, value: Tensor) -> None:
    """Refuse an integer, bool or complex tensor with a ``TypeError`` naming the argument."""
    if not value.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor, got dtype {value.dtype}; integer and bool tensors are "
            f"refused (cast with {name}.float() if they hold real numbers)"
        )


def model_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a model computes in: that of its first floating-point parameter or buffer
    (``torch.get_default_dtype()`` for a model with neither)."""
    for tensor in chain(module.parameters(), module.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.get_default_dtype()


def check_times(name: str, value: object, batch: int, batch_of: str, dtype: torch.dtype | None = None) -> Tensor:
    """Check training or query times: a floating-point tensor of shape ``(batch,)`` with values in
    [0, 1] (the scan obeys the process-wide switch); return it cast to ``dtype``."""
    check_batched(name, value, (), batch=batch, batch_of=batch_of)
    check_unit_times(name, value)
    return value if dtype is None else value.to(dtype)


def check_unit_times(name: str, value: Tensor) -> None:
    """Refuse times outside [0, 1] in a tensor of any shape (the scan obeys the process-wide switch)."""
    if _finite_checks and value.numel() and not bool(((value >= 0) & (value <= 1)).all()):
        bad = tuple(int(i) for i in (~((value >= 0) & (value <= 1))).nonzero()[0])
        at = bad[0] if len(bad) == 1 else bad
        raise ValueError(
            f"{name} must hold times in [0, 1] (t=0 noise, t=1 data), got {float(value[bad]):.6g} at index {at}"
        )


#: The most sampler steps a command or config may ask for (a step is one network evaluation or more).
MAX_SAMPLER_STEPS = 1000
#: The hottest sampling temperature (``noise_scale``) a policy takes: 1 samples the learned law, 0 its
#: mode; far above 1 a chunk is the noise, and past this the network's numbers overflow.
MAX_NOISE_SCALE = 100.0
#: The deepest stack of flow layers (or policy transformer layers) a model may be built with.
MAX_LAYERS = 1000
#: The largest minibatch (a larger one overflows the data sampler's index type before any memory check).
MAX_BATCH_SIZE = 2**24
#: The longest action chunk a policy may predict.
MAX_HORIZON = 1000
#: The most samples one command draws.
MAX_SAMPLES = 10**7
#: The most chunks a policy's executor samples to keep one (``candidates``).
MAX_CANDIDATES = 256
#: The widest policy transformer (its attention and MLP matrices are width x 4 width).
MAX_WIDTH = 2**14
#: The most DataLoader worker processes a run starts.
MAX_WORKERS = 256


def check_autograd_available(what: str) -> None:
    """Refuse ``what``, which differentiates the model inside itself, under ``torch.inference_mode``:
    there autograd cannot be switched back on (``torch.no_grad`` leaves that possible)."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{what} differentiates the model inside itself and cannot run under torch.inference_mode(); "
            "use torch.no_grad() instead"
        )


def is_count(value: object, low: int = 1, high: int | None = None) -> bool:
    """Whether ``value`` is an integer (Python or NumPy, bools excluded) in ``[low, high]``."""
    return (
        not isinstance(value, bool) and isinstance(value, Integral) and value >= low and (high is None or value <= high)
    )


def check_count(name: str, value: object, *, low: int = 1, high: int | None = None) -> int:
    """Check a count (``n``, ``steps``, a size): an integer in ``[low, high]`` (default: positive),
    bools excluded; ``ValueError`` naming it otherwise. Returns it as a Python int."""
    if not is_count(value, low, high):
        allowed = (
            f"an int in {low}..{high}" if high is not None else "a positive int" if low == 1 else f"an int >= {low}"
        )
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return int(value)


def check_activation(name: str, value: object) -> type[nn.Module]:
    """An activation argument: a ``torch.nn.Module`` class built without arguments (``nn.ReLU``, not
    ``nn.ReLU()``, ``"relu"`` or ``torch.relu``); a ``TypeError`` naming it otherwise."""
    if not (isinstance(value, type) and issubclass(value, nn.Module)):
        raise TypeError(f"{name} must be a torch.nn.Module class such as torch.nn.ReLU, got {value!r}")
    try:
        value()
    except TypeError as error:
        raise TypeError(f"{name} = {value.__name__}: the class must build without arguments ({error})") from error
    return value


def check_bool(name: str, value: object) -> bool:
    """Refuse anything but a real ``bool`` (``"no"`` is truthy, ``1`` is not a flag) with a ``TypeError``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {value!r} ({type(value).__name__})")
    return value


def check_permutation(name: str, value: object, size: int | None = None) -> Tensor:
    """An arrangement of ``0..n-1`` (``n`` = ``size`` when given) as a new 1-D long tensor: integers
    only (floats and bools are refused, not truncated), each once."""
    try:
        values = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{name} must be a 1-D arrangement of the ints 0..n-1, got {value!r}") from error
    integral = not values.is_floating_point() and not values.is_complex() and values.dtype != torch.bool
    n = values.numel() if size is None else size
    if (
        not integral
        or values.dim() != 1
        or values.numel() != n
        or n == 0
        or not torch.equal(values.long().sort().values, torch.arange(n))
    ):
        shown = value if isinstance(value, list | tuple) or not values.dim() else values.tolist()
        allowed = f"0..{n - 1}" if n else "0..n-1"
        raise ValueError(f"{name} must be a 1-D arrangement of the ints {allowed}, each once, got {shown!r}")
    return values.long().clone()


def check_widths(name: str, widths: object) -> tuple[int, ...]:
    """Layer widths: a sequence (may be empty) of positive ints, as a tuple (floats are refused, not truncated)."""
    if isinstance(widths, str | bytes) or not isinstance(widths, Sequence) or not all(is_count(w) for w in widths):
        raise ValueError(f"{name} must be a sequence of positive ints (layer widths, may be empty), got {widths!r}")
    return tuple(int(w) for w in widths)


def check_sample_count(n: object) -> int:
    """Check the number of samples requested from a flow or distribution."""
    return check_count("n", n)


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    """Check that ``value`` is one of the names ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(map(repr, choices))}")
    return value


def check_real(
    name: str,
    value: object,
    *,
    positive: bool = False,
    non_negative: bool = False,
    optional: bool = False,
) -> float | None:
    """Check a finite real number (a Python or NumPy number, or a one-element tensor), optionally
    > 0 or >= 0; ``None`` passes when ``optional``. Returns it as a float."""
    if value is None and optional:
        return None
    if isinstance(value, Tensor) and value.numel() == 1 and not value.dtype.is_complex and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real):
        allowed = "a finite number" + (" or None" if optional else "")
        raise TypeError(f"{name} must be {allowed}, got {value!r} ({type(value).__name__})")
    number = float(value)
    if not math.isfinite(number) or (positive and number <= 0) or (non_negative and number < 0):
        allowed = "a finite number" + (" > 0" if positive else " >= 0" if non_negative else "")
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return number


def check_noise_scale(value: object, *, positive: bool = False) -> float:
    """A policy's sampling temperature: a finite number in [0, :data:`MAX_NOISE_SCALE`] (> 0 with
    ``positive``: a likelihood divides by it). Returns it as a float."""
    number = check_real("noise_scale", value, positive=positive, non_negative=not positive)
    if number > MAX_NOISE_SCALE:
        raise ValueError(
            f"noise_scale must be at most {MAX_NOISE_SCALE:g} (a temperature: 1 samples the learned law, 0 its "
            f"mode), got {value!r}"
        )
    return number


def check_dropout(name: str, value: object) -> float:
    """A dropout probability: a finite number in [0, 1). Returns it as a float."""
    number = check_real(name, value)
    if not 0.0 <= number < 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1), got {value!r}")
    return number
