r"""Tabular data: scikit-learn's bundled sets, 8x8 digits for density estimation, and user files.

* :func:`sklearn_dataset`: ``iris``, ``wine``, ``breast_cancer``, ``diabetes`` (features only) and
  ``digits``, all shipped inside scikit-learn (no download).
* :func:`dequantize_digits`: the 64 pixel counts (integers 0..16) become continuous values
  :math:`y = (x + u)/17 \in [0, 1)` with :math:`u \sim U(0, 1)^{64}`. A density :math:`p(y)`
  gives a lower bound on the discrete log-likelihood,
  :math:`\log P(x) \ge \mathbb E_u[\log p(y)] - 64 \log 17`, reported in bits per dimension by
  :func:`digits_bits_per_dim`.
* :func:`load_table`: CSV, NPY, NPZ and Parquet files of numbers, one row per point. Every
  malformed file, wrong column count, non-number or NaN/inf gets a :class:`DataError` naming the
  file, the row (1-based, as an editor shows it) and the column.
* :class:`Standardizer`: per-column mean and standard deviation of the training data; as a
  flow layer (:class:`flowforge.transforms.Standardize`) it travels inside the model's weights.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flowforge.config import MAX_SEED
from flowforge.errors import DataError
from flowforge.validation import check_batched, check_count, check_real

SKLEARN_DATASETS = ("iris", "wine", "breast_cancer", "diabetes", "digits")
DIGIT_LEVELS = 17  # pixel counts 0..16


def sklearn_dataset(name: str) -> Tensor:
    """The feature matrix of a data set bundled with scikit-learn, as float32 (N, D).

    >>> sklearn_dataset("iris").shape
    torch.Size([150, 4])
    """
    if name not in SKLEARN_DATASETS:
        raise DataError(f"unknown scikit-learn data set {name!r}; choose one of {', '.join(SKLEARN_DATASETS)}")
    import sklearn.datasets

    loader = getattr(sklearn.datasets, f"load_{name}")
    return torch.as_tensor(np.asarray(loader().data, dtype=np.float32))


def dequantize_digits(pixels: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Uniformly dequantized digits in [0, 1): ``(pixels + U(0, 1)) / 17``."""
    if not isinstance(pixels, Tensor) or pixels.numel() == 0:
        shape = tuple(pixels.shape) if isinstance(pixels, Tensor) else type(pixels).__name__
        raise DataError(f"pixels must be a non-empty tensor of digit pixel counts, got {shape}")
    if pixels.dtype == torch.bool or pixels.is_complex():
        raise DataError(f"pixels must hold digit pixel counts (numbers), got dtype {pixels.dtype}")
    outside = (pixels < 0) | (pixels > DIGIT_LEVELS - 1) | (pixels != pixels.round())
    if bool(outside.any()):
        index = tuple(int(i) for i in outside.nonzero()[0])
        raise DataError(
            f"digit pixels must be integers in 0..{DIGIT_LEVELS - 1}, got {float(pixels[index]):g} at index {index}"
        )
    where = generator.device if generator is not None else pixels.device
    noise = torch.rand(pixels.shape, generator=generator, dtype=torch.float32, device=where).to(pixels.device)
    return (pixels.float() + noise) / DIGIT_LEVELS


def digits_images(split: str = "train", test_fraction: float = 0.2, seed: int = 0) -> tuple[Tensor, Tensor]:
    """scikit-learn's 1,797 8x8 digits as images: pixel counts ``(N, 1, 8, 8)`` (float32, integers
    0..16) and class labels ``(N,)`` (int64), from a fixed random split.

    The split is a seeded permutation, stratified by nothing: with the defaults, 1,438 training
    and 359 test images. The same ``seed`` and ``test_fraction`` always give the same split.

    >>> pixels, labels = digits_images("test")
    >>> pixels.shape, labels.shape, int(pixels.max())
    (torch.Size([359, 1, 8, 8]), torch.Size([359]), 16)
    """
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    if not 0.0 < check_real("test_fraction", test_fraction) < 1.0:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    check_count("seed", seed, low=0, high=MAX_SEED)
    import sklearn.datasets

    bunch = sklearn.datasets.load_digits()
    pixels = torch.as_tensor(np.asarray(bunch.data, dtype=np.float32)).reshape(-1, 1, 8, 8)
    labels = torch.as_tensor(np.asarray(bunch.target, dtype=np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    test_size = round(test_fraction * len(labels))
    if min(test_size, len(labels) - test_size) < 2:  # the sample metrics compare >= 2 images
        raise DataError(
            f"test_fraction = {test_fraction} holds out {test_size} of the {len(labels)} digits; the test and "
            "training splits need at least 2 images each"
        )
    chosen = order[:test_size] if split == "test" else order[test_size:]
    return pixels[chosen], labels[chosen]


def digits_bits_per_dim(nll_nats: float, dims: int = 64) -> float:
    r"""Bits per dimension of the discrete digits from the mean NLL (nats) of their dequantized version
    in [0, 1): :math:`(\mathrm{NLL} + D \log 17) / (D \log 2)`."""
    dims = check_count("dims", dims)
    return (check_real("nll_nats", nll_nats) + dims * math.log(DIGIT_LEVELS)) / (dims * math.log(2))


def load_table(path: str | Path, columns: int | None = None) -> Tensor:
    """Read a numeric table (N, D) from a CSV, NPY, NPZ or Parquet file, checking every row.

    Arguments:
        path: the file; its suffix picks the reader (``.csv``, ``.npy``, ``.npz``, ``.parquet``).
        columns: the expected number of columns (None: whatever the first row has).

    CSV files are read as UTF-8 (a leading byte-order mark is allowed) and may start with one
    header row of names (a row in which no cell is a number); everything else must be numbers.
    An NPZ file must hold a single array or one named ``data``; arrays of Python objects are never
    unpickled. NaN, inf and values too large for float32 are refused. Rows are counted 1-based as
    an editor shows them (for CSV: the line, counting the header and blank lines). Raises
    :class:`DataError` naming the file (and the NPZ member), the row and the column.
    """
    path = Path(path)
    if columns is not None:
        check_count("columns", columns)
    if not path.is_file():
        raise DataError(f"{path}: {'a folder, not a file' if path.is_dir() else 'no such file'}")
    suffix = path.suffix.lower()
    readers = {".csv": _read_csv, ".npy": _read_npy, ".npz": _read_npz, ".parquet": _read_parquet}
    if suffix not in readers:
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'}; use .csv, .npy, .npz or .parquet")
    array, where, rows = readers[suffix](path)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2:
        raise DataError(f"{where}: expected a 2-D table (rows x columns), got an array of shape {array.shape}")
    if array.shape[0] == 0:
        raise DataError(f"{where}: the table has no rows")
    if array.shape[1] == 0:
        raise DataError(f"{where}: the table has no columns")
    if columns is not None and array.shape[1] != columns:
        raise DataError(f"{where}: expected {columns} columns, got {array.shape[1]}")
    if rows is None:
        rows = np.arange(1, array.shape[0] + 1)
    bad = ~np.isfinite(array)
    if bad.any():
        row, column = map(int, np.argwhere(bad)[0])
        raise DataError(f"{where}, row {rows[row]}, column {column + 1}: {array[row, column]} (NaN/inf is not allowed)")
    with np.errstate(over="ignore"):
        single = np.ascontiguousarray(array, dtype=np.float32)
    overflow = ~np.isfinite(single)
    if overflow.any():
        row, column = map(int, np.argwhere(overflow)[0])
        raise DataError(
            f"{where}, row {rows[row]}, column {column + 1}: {array[row, column]:g} does not fit in float32 "
            f"(magnitude at most {float(np.finfo(np.float32).max):.4g})"
        )
    return torch.as_tensor(single)


_Read = tuple[np.ndarray, str, "np.ndarray | None"]  # values, where (file or file + member), 1-based row numbers


def _read_csv(path: Path) -> _Read:
    records: list[tuple[int, list[str]]] = []
    try:
        # utf-8-sig drops a leading byte-order mark, which would otherwise glue itself to the first
        # cell, make a numeric first row look like a header, and lose it silently.
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            line = 1
            for row in reader:
                records.append((line, row))  # the line the record starts on (quoted cells may span lines)
                line = reader.line_num + 1
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not a readable CSV file ({error}); save it as UTF-8 text") from error
    except csv.Error as error:
        raise DataError(f"{path}: not a readable CSV file ({error})") from error
    except OSError as error:
        raise DataError(f"{path}: cannot read the file ({error})") from error
    # Blank lines only: a record of empty cells ("," or ",,") is a row whose numbers are missing.
    records = [(line, row) for line, row in records if len(row) > 1 or (row and row[0].strip())]
    width, named = None, ""
    first = records[0][1] if records else []
    # a header names its columns: no cell a number, at least one not blank (a row of blanks is missing numbers)
    if first and not any(_is_number(cell.strip()) for cell in first) and any(cell.strip() for cell in first):
        width, named = len(first), " (as many as the header names)"
        records = records[1:]
    values = []
    for line, row in records:
        if width is None:
            width = len(row)
        elif len(row) != width:
            raise DataError(f"{path}, row {line}: expected {width} columns{named}, got {len(row)}")
        parsed = []
        for column, cell in enumerate(row, start=1):
            text = cell.strip()
            try:
                value = float(text)
            except ValueError:
                # A kept first row holds a number, so a name in it is a header mixing names and numbers.
                hint = " (a header row must hold only names)" if line == records[0][0] else ""
                raise DataError(f"{path}, row {line}, column {column}: {text!r} is not a number{hint}") from None
            if not math.isfinite(value):
                spelled = "nan" in text.lower() or "inf" in text.lower()
                what = text if spelled else f"{text} overflows to {value}"
                raise DataError(f"{path}, row {line}, column {column}: {what} (NaN/inf is not allowed)")
            parsed.append(value)
        values.append(parsed)
    lines = np.asarray([line for line, _ in records], dtype=np.int64)
    return np.asarray(values, dtype=np.float64).reshape(len(values), width or 0), str(path), lines


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_signature(path: Path, signatures: tuple[bytes, ...], kind: str, what: str) -> None:
    """Refuse a file whose first bytes are not one of ``signatures`` before any reader guesses at it."""
    try:
        with path.open("rb") as handle:
            head = handle.read(max(map(len, signatures)))
    except OSError as error:
        raise DataError(f"{path}: cannot read the file ({error})") from error
    if not head:
        raise DataError(f"{path}: not a readable {kind} file (the file is empty)")
    if not head.startswith(signatures):
        raise DataError(f"{path}: not a readable {kind} file (it does not start like {what})")


def _read_npy(path: Path) -> _Read:
    _check_signature(path, (b"\x93NUMPY",), ".npy", "a NumPy array file")
    try:
        with path.open("rb") as handle:
            array = np.lib.format.read_array(handle, allow_pickle=False)
    except Exception as error:  # numpy raises ValueError, EOFError, tokenize and memory errors for damaged files
        raise DataError(f"{path}: not a readable .npy file ({_describe(error)})") from error
    return _numeric(str(path), array), str(path), None


def _read_npz(path: Path) -> _Read:
    _check_signature(path, (b"PK\x03\x04", b"PK\x05\x06"), ".npz", "a zip archive of .npy arrays")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as error:  # zipfile.BadZipFile, zlib.error, EOFError, OSError, ... for damaged archives
        raise DataError(f"{path}: not a readable .npz file ({_describe(error)})") from error
    with archive:
        names = list(archive.keys())
        if "data" in names:
            name = "data"
        elif len(names) == 1:
            name = names[0]
        elif not names:
            raise DataError(f"{path}: holds no arrays; store the table as its only array or name it 'data'")
        else:
            raise DataError(f"{path}: holds arrays {names} and none named 'data'; name the one to use 'data'")
        where = f"{path}, member {name!r}"
        try:
            array = archive[name]
        except Exception as error:  # a damaged member: BadZipFile (CRC), zlib.error, ValueError, EOFError, ...
            raise DataError(f"{where}: not a readable array ({_describe(error)})") from error
    if not isinstance(array, np.ndarray):  # a member that is not a .npy file comes back as raw bytes
        raise DataError(f"{where}: not a .npy array; an .npz file holds arrays saved by numpy.savez")
    return _numeric(where, array), where, None


def _describe(error: Exception) -> str:
    if isinstance(error, ValueError) and "allow_pickle" in str(error):
        return "it holds Python objects, which are never unpickled; save a numeric array"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _read_parquet(path: Path) -> _Read:
    try:
        import pyarrow.parquet as parquet
    except ImportError as error:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install 'flowforge[parquet]')") from error
    try:
        table = parquet.read_table(path)
    except Exception as error:  # pyarrow raises its own exception types for damaged files
        raise DataError(f"{path}: not a readable Parquet file ({error})") from error
    import pyarrow.types as types

    for index, field in enumerate(table.schema, start=1):
        if not (types.is_integer(field.type) or types.is_floating(field.type)):
            raise DataError(f"{path}, column {index} ({field.name!r}): type {field.type} is not numeric")
    missing = [
        (int(np.flatnonzero(table.column(i).is_null().to_numpy(zero_copy_only=False))[0]), i)
        for i in range(table.num_columns)
        if table.column(i).null_count
    ]
    if missing:
        row, column = min(missing)
        raise DataError(
            f"{path}, row {row + 1}, column {column + 1} ({table.schema[column].name!r}): "
            "a missing value (null is not allowed)"
        )
    columns = [table.column(i).to_numpy(zero_copy_only=False).astype(np.float64) for i in range(table.num_columns)]
    return (np.stack(columns, axis=1) if columns else np.zeros((0, 0))), str(path), None


def _numeric(where: str, array: np.ndarray) -> np.ndarray:
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise DataError(f"{where}: holds {array.dtype} values, not real numbers")
    with np.errstate(over="ignore"):
        return array.astype(np.float64)


class Standardizer:
    """Per-column mean and standard deviation (columns with zero spread keep scale 1).

    >>> import torch
    >>> s = Standardizer.fit(torch.tensor([[1.0, 5.0], [3.0, 5.0], [5.0, 5.0]]))  # column means 3, 5; stds 2, 0
    >>> s.transform(torch.tensor([[5.0, 5.0]])).tolist()
    [[1.0, 0.0]]
    """

    def __init__(self, mean: Tensor, std: Tensor) -> None:
        for name, value in (("mean", mean), ("std", std)):
            if not isinstance(value, Tensor) or not value.is_floating_point() or value.dim() != 1:
                raise TypeError(f"{name} must be a 1-D floating-point tensor (one entry per column), got {value!r}")
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"{name} holds NaN or inf: {value.tolist()}")
        if mean.shape != std.shape:
            raise ValueError(f"mean and std must have one entry per column each, got {len(mean)} and {len(std)}")
        if not bool((std > 0).all()):
            raise ValueError(f"std must be > 0 in every column, got {std.tolist()}")
        self.mean, self.std = mean, std

    @classmethod
    def fit(cls, data: Tensor) -> Standardizer:
        """The statistics of ``data`` (rows, columns): finite floats, at least one row."""
        data = cls._checked(data)
        check_batched("data", data, data.shape[1:], finite=True)
        if len(data) == 0:
            raise ValueError("data has 0 rows: a standardizer is fitted on at least one")
        std = data.std(0) if len(data) > 1 else torch.zeros(data.shape[1], dtype=data.dtype)
        return cls(data.mean(0), torch.where(std > 0, std, torch.ones_like(std)))

    def transform(self, data: Tensor) -> Tensor:
        return (self._checked(data, len(self.mean)) - self.mean) / self.std

    def inverse(self, data: Tensor) -> Tensor:
        return self._checked(data, len(self.mean)) * self.std + self.mean

    @staticmethod
    def _checked(data: object, columns: int | None = None) -> Tensor:
        """``data`` as (rows, columns) floats, with ``columns`` columns when given."""
        if not isinstance(data, Tensor) or not data.is_floating_point():
            kind = data.dtype if isinstance(data, Tensor) else type(data).__name__
            raise TypeError(f"data must be a floating-point tensor (rows, columns), got {kind}")
        if data.dim() != 2:
            raise ValueError(f"data must be 2-D (rows, columns), got shape {tuple(data.shape)}")
        if columns is not None and data.shape[1] != columns:
            raise ValueError(f"data has {data.shape[1]} columns; this standardizer was fitted on {columns}")
        return data


__all__ = [
    "DIGIT_LEVELS",
    "SKLEARN_DATASETS",
    "DataError",
    "Standardizer",
    "dequantize_digits",
    "digits_bits_per_dim",
    "load_table",
    "sklearn_dataset",
]
