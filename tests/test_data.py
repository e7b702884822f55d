"""Data: scikit-learn sets, dequantized digits, user files with row-precise errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from flowforge.data.tabular import (
    DataError,
    Standardizer,
    dequantize_digits,
    digits_bits_per_dim,
    load_table,
    sklearn_dataset,
)


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("iris", (150, 4)),
        ("wine", (178, 13)),
        ("breast_cancer", (569, 30)),
        ("diabetes", (442, 10)),
        ("digits", (1797, 64)),
    ],
)
def test_sklearn_sets_load_offline(name: str, shape: tuple[int, int]) -> None:
    data = sklearn_dataset(name)
    assert data.shape == shape and data.dtype == torch.float32 and torch.isfinite(data).all()


def test_dequantized_digits_cover_their_bins_and_bits_per_dim() -> None:
    pixels = sklearn_dataset("digits")
    y = dequantize_digits(pixels, generator=torch.Generator().manual_seed(0))
    assert y.min() >= 0 and y.max() < 1
    assert torch.equal(torch.floor(y * 17), pixels)
    # A uniform density on [0, 1)^64 has NLL 0: every one of the 17 levels equally likely, log2(17) bits.
    assert digits_bits_per_dim(0.0) == pytest.approx(math.log2(17))
    with pytest.raises(DataError, match="integers"):
        dequantize_digits(pixels + 0.5)


def test_tables_round_trip_through_every_format(tmp_path: Path) -> None:
    table = np.arange(12, dtype=np.float64).reshape(4, 3) / 7
    np.savetxt(tmp_path / "plain.csv", table, delimiter=",")
    lines = [",".join(repr(float(v)) for v in row) for row in table]
    (tmp_path / "header.csv").write_text("a,b,c\n" + "\n".join(lines) + "\n")
    np.save(tmp_path / "table.npy", table)
    np.savez(tmp_path / "table.npz", data=table, other=np.zeros(2))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"a": table[:, 0], "b": table[:, 1], "c": table[:, 2].astype(np.float32)}), tmp_path / "t.parquet"
    )
    for name in ("plain.csv", "header.csv", "table.npy", "table.npz", "t.parquet"):
        loaded = load_table(tmp_path / name, columns=3)
        torch.testing.assert_close(loaded, torch.as_tensor(table, dtype=torch.float32), msg=name)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("x,y\n1,2\n3\n", r"bad\.csv, row 3: expected 2 columns, got 1"),
        ("1,2\n3,abc\n", r"bad\.csv, row 2, column 2: 'abc' is not a number"),
        ("x,y\n1,2\n3,nan\n", r"bad\.csv, row 3, column 2: nan \(NaN/inf is not allowed\)"),
        ("x,y\n", r"bad\.csv: the table has no rows"),
    ],
)
def test_malformed_csv_files_name_the_row(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "bad.csv").write_text(content)
    with pytest.raises(DataError, match=message):
        load_table(tmp_path / "bad.csv")


def test_other_bad_files_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_table(tmp_path / "missing.csv")
    (tmp_path / "data.txt").write_text("1,2\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_table(tmp_path / "data.txt")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"not a readable \.npy file"):
        load_table(tmp_path / "objects.npy")  # never unpickled
    (tmp_path / "broken.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(DataError, match=r"not a readable \.npy file"):
        load_table(tmp_path / "broken.npy")
    np.savez(tmp_path / "two.npz", a=np.zeros((2, 2)), b=np.zeros((2, 2)))
    with pytest.raises(DataError, match="name the one to use 'data'"):
        load_table(tmp_path / "two.npz")
    np.save(tmp_path / "wide.npy", np.zeros((3, 5)))
    with pytest.raises(DataError, match="expected 2 columns, got 5"):
        load_table(tmp_path / "wide.npy", columns=2)
    np.save(tmp_path / "inf.npy", np.array([[1.0, 2.0], [np.inf, 0.0]]))
    with pytest.raises(DataError, match=r"inf\.npy, row 2, column 1"):
        load_table(tmp_path / "inf.npy")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_table(tmp_path / "broken.parquet")


def test_standardizer_round_trip() -> None:
    data = torch.randn(100, 3) * torch.tensor([1.0, 5.0, 0.1]) + 4
    standardizer = Standardizer.fit(data)
    z = standardizer.transform(data)
    torch.testing.assert_close(z.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(standardizer.inverse(z), data)
