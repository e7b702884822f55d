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
        ("x,y\n1,2\n3\n", r"bad\.csv, row 3: expected 2 columns \(as many as the header names\), got 1"),
        ("1,2\n3\n", r"bad\.csv, row 2: expected 2 columns, got 1"),
        ("a,b,c\n1,2\n3,4\n", r"bad\.csv, row 2: expected 3 columns \(as many as the header names\), got 2"),
        (",\n1,2\n3,4\n", r"bad\.csv, row 1, column 1: '' is not a number"),
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


# ---------------------------------------------------------------- bad input: BOM, damaged binaries, non-finite values


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"], ids=["plain", "bom"])
@pytest.mark.parametrize("header", [b"", b"a,b\r\n"], ids=["no-header", "header"])
def test_a_byte_order_mark_never_costs_the_first_row(tmp_path: Path, bom: bytes, header: bytes) -> None:
    (tmp_path / "excel.csv").write_bytes(bom + header + b"1,2\r\n3,4\r\n")
    torch.testing.assert_close(load_table(tmp_path / "excel.csv"), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))


def test_a_first_row_mixing_names_and_numbers_is_not_dropped_as_a_header(tmp_path: Path) -> None:
    (tmp_path / "typo.csv").write_text("1o,2\n3,4\n")  # a typo in the first number, not a header
    with pytest.raises(DataError, match=r"typo\.csv, row 1, column 1: '1o' is not a number \(a header row"):
        load_table(tmp_path / "typo.csv")


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


DAMAGED_FILES = [
    ("cut.npz", _npz_bytes(data=np.ones((50, 2)))[:700], r"cut\.npz: not a readable \.npz file \(BadZipFile"),
    ("text.npz", b"1,2\n3,4\n", r"text\.npz: not a readable \.npz file \(it does not start like a zip archive"),
    ("empty.npz", b"", r"empty\.npz: not a readable \.npz file \(the file is empty\)"),
    ("text.npy", b"1,2\n3,4\n", r"text\.npy: not a readable \.npy file \(it does not start like a NumPy array"),
    ("zip.npy", _npz_bytes(data=np.ones((2, 2))), r"zip\.npy: not a readable \.npy file"),
    ("cut.parquet", b"PAR1\x15\x04\x15", r"cut\.parquet: not a readable Parquet file"),
]


@pytest.mark.parametrize(("name", "content", "message"), DAMAGED_FILES, ids=[case[0] for case in DAMAGED_FILES])
def test_damaged_binary_files_raise_data_errors(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_table(tmp_path / name)


def test_a_truncated_npy_file_is_a_data_error(tmp_path: Path) -> None:
    np.save(tmp_path / "full.npy", np.ones((50, 2)))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "full.npy").read_bytes()[:-8])
    with pytest.raises(DataError, match=r"cut\.npy: not a readable \.npy file \(ValueError: Failed to read all data"):
        load_table(tmp_path / "cut.npy")


def test_npz_member_problems_name_the_file_and_the_member(tmp_path: Path) -> None:
    np.savez(tmp_path / "objects.npz", data=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(DataError, match=r"objects\.npz, member 'data': .*Python objects, which are never unpickled"):
        load_table(tmp_path / "objects.npz")
    np.savez(tmp_path / "strings.npz", table=np.array([["1", "2"]]))
    with pytest.raises(DataError, match=r"strings\.npz, member 'table': holds <U1 values, not real numbers"):
        load_table(tmp_path / "strings.npz")
    np.savez(tmp_path / "cube.npz", data=np.zeros((2, 2, 2)))
    with pytest.raises(DataError, match=r"cube\.npz, member 'data': expected a 2-D table"):
        load_table(tmp_path / "cube.npz")
    np.savez(tmp_path / "nan.npz", data=np.array([[1.0, 2.0], [3.0, np.nan]]))
    with pytest.raises(DataError, match=r"nan\.npz, member 'data', row 2, column 2: nan \(NaN/inf is not allowed\)"):
        load_table(tmp_path / "nan.npz")
    import zipfile

    with zipfile.ZipFile(tmp_path / "notes.npz", "w") as archive:
        archive.writestr("notes.txt", "not an array")
    with pytest.raises(DataError, match=r"notes\.npz, member 'notes\.txt': not a \.npy array"):
        load_table(tmp_path / "notes.npz")


def test_an_npz_with_several_members_and_no_data_names_them_once(tmp_path: Path) -> None:
    np.savez(tmp_path / "two.npz", a=np.zeros((2, 2)), b=np.zeros((2, 2)))
    with pytest.raises(DataError) as caught:
        load_table(tmp_path / "two.npz")
    message = str(caught.value)
    assert (
        message == f"{tmp_path / 'two.npz'}: holds arrays ['a', 'b'] and none named 'data'; name the one to use 'data'"
    )
    np.savez(tmp_path / "none.npz")
    with pytest.raises(DataError, match=r"none\.npz: holds no arrays"):
        load_table(tmp_path / "none.npz")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        # the row is the line an editor shows: blank lines and the header count
        ("a,b\n1,2\n\n3,4\n5,nan\n", r"row 5, column 2: nan \(NaN/inf is not allowed\)"),
        ("\ufeffnan,2\n3,4\n", r"row 1, column 1: nan \(NaN/inf is not allowed\)"),  # not taken for a header
        ("1,2\n-Infinity,4\n", r"row 2, column 1: -Infinity \(NaN/inf is not allowed\)"),
        ("1,2\n3,1e999\n", r"row 2, column 2: 1e999 overflows to inf \(NaN/inf is not allowed\)"),
        ("1,2\n3,4\n1e39,5\n", r"row 3, column 1: 1e\+39 does not fit in float32"),  # finite in float64 only
    ],
)
def test_non_finite_csv_values_name_the_line_and_column(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "points.csv").write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=r"points\.csv, " + message):
        load_table(tmp_path / "points.csv")


def test_non_finite_binary_values_name_the_row_and_column(tmp_path: Path) -> None:
    np.save(tmp_path / "big.npy", np.array([[1.0, 2.0], [3.0, -1e300]]))
    with pytest.raises(DataError, match=r"big\.npy, row 2, column 2: -1e\+300 does not fit in float32"):
        load_table(tmp_path / "big.npy")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"a": [1.0, 2.0, 3.0], "b": [4, None, 6]}), tmp_path / "gap.parquet")
    with pytest.raises(DataError, match=r"gap\.parquet, row 2, column 2 \('b'\): a missing value \(null"):
        load_table(tmp_path / "gap.parquet")


def test_training_data_with_a_non_finite_value_is_refused_where_it_is_loaded(tmp_path: Path) -> None:
    from flowforge.runs import DataConfig, load_data

    rows = "\n".join(f"{i},{i % 7}" for i in range(100))
    (tmp_path / "train.csv").write_text("x,y\n" + rows + "\n\n1,3e38\n1,4e38\n")  # 4e38 is inf in float32
    with pytest.raises(DataError, match=r"train\.csv, row 104, column 2: 4e\+38 does not fit in float32"):
        load_data(DataConfig(path=str(tmp_path / "train.csv")))


def test_standardizer_round_trip() -> None:
    data = torch.randn(100, 3) * torch.tensor([1.0, 5.0, 0.1]) + 4
    standardizer = Standardizer.fit(data)
    z = standardizer.transform(data)
    torch.testing.assert_close(z.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(standardizer.inverse(z), data)


def test_standardizer_and_bits_per_dim_refuse_what_would_give_nan() -> None:
    with pytest.raises(ValueError, match=r"std must be > 0 in every column, got \[1.0, 0.0\]"):
        Standardizer(torch.zeros(2), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="mean holds NaN or inf"):
        Standardizer(torch.tensor([float("nan"), 0.0]), torch.ones(2))
    with pytest.raises(ValueError, match="mean and std must have one entry per column each, got 2 and 3"):
        Standardizer(torch.zeros(2), torch.ones(3))
    standardizer = Standardizer.fit(torch.tensor([[1.0, 2.0]]))  # one row: no spread, scale 1
    assert standardizer.std.tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="data has 3 columns; this standardizer was fitted on 2"):
        standardizer.transform(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="data contains NaN or inf"):
        Standardizer.fit(torch.tensor([[float("nan"), 0.0]]))
    with pytest.raises(ValueError, match="data has 0 rows"):
        Standardizer.fit(torch.zeros(0, 2))
    with pytest.raises(ValueError, match="nll_nats must be a finite number, got nan"):
        digits_bits_per_dim(float("nan"))
    with pytest.raises(ValueError, match="dims must be a positive int, got 0"):
        digits_bits_per_dim(1.0, dims=0)


def test_a_toy_sets_seed_is_checked() -> None:
    from flowforge.data import toy_dataset

    assert torch.equal(toy_dataset("moons", 5, seed=3), toy_dataset("moons", 5, seed=3))
    for seed in (-1, 1.5, 2**32):
        with pytest.raises(ValueError, match=r"seed must be an int in 0\.\.4294967295"):
            toy_dataset("moons", 5, seed=seed)


def test_a_standardizer_refuses_data_that_is_not_a_table_of_floats() -> None:
    standardizer = Standardizer.fit(torch.zeros(3, 2))
    with pytest.raises(TypeError, match=r"data must be a floating-point tensor \(rows, columns\), got list"):
        Standardizer.fit([[1.0]])
    with pytest.raises(TypeError, match=r"got torch\.int64"):
        standardizer.transform(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"data must be 2-D \(rows, columns\), got shape \(3,\)"):
        standardizer.inverse(torch.zeros(3))


def test_a_csv_row_of_empty_cells_is_refused_and_columns_is_checked(tmp_path: Path) -> None:
    table = tmp_path / "missing.csv"
    table.write_text("a,b\n1,2\n,\n\n3,4\n")  # line 3 lost both numbers; line 4 is blank
    with pytest.raises(DataError, match=r"row 3, column 1: '' is not a number"):
        load_table(table)
    table.write_text("a,b\n1,2\n\n3,4\n")
    assert load_table(table).shape == (2, 2)
    for columns in (0, -1, 2.0, "2"):
        with pytest.raises(ValueError, match="columns must be a positive int"):
            load_table(table, columns=columns)


def test_generators_refuse_settings_that_would_give_nan_or_fail_inside_torch() -> None:
    from flowforge.data import toy
    from flowforge.data.tabular import digits_images

    refusals = [
        (lambda: toy.two_moons(4, noise=float("nan")), "noise must be a finite number >= 0, got nan"),
        (lambda: toy.rings(4, noise=float("inf")), "noise must be a finite number >= 0, got inf"),
        (lambda: toy.eight_gaussians(4, std=-1.0), "std must be a finite number >= 0, got -1.0"),
        (lambda: toy.two_moons(4, seed=-1), r"seed must be an int in 0\.\.4294967295, got -1"),
        (lambda: toy.pinwheel(4, arms=0), "arms must be a positive int, got 0"),
        (lambda: digits_images("test", 0.2, seed=2**70), r"seed must be an int in 0\.\.4294967295"),
        (lambda: digits_images("test", "0.2"), "test_fraction must be a finite number"),
        (lambda: dequantize_digits(torch.zeros(0, 64)), r"pixels must be a non-empty tensor .* got \(0, 64\)"),
    ]
    for call, message in refusals:
        with pytest.raises((ValueError, TypeError), match=message):
            call()


def test_dequantized_digits_name_the_bad_pixel() -> None:
    from flowforge.data.tabular import dequantize_digits

    with pytest.raises(DataError, match=r"integers in 0\.\.16, got 17 at index \(1,\)"):
        dequantize_digits(torch.tensor([3.0, 17.0]))
    with pytest.raises(DataError, match=r"got nan at index \(0,\)"):
        dequantize_digits(torch.tensor([float("nan"), 1.0]))
    with pytest.raises(DataError, match=r"got dtype torch\.bool"):
        dequantize_digits(torch.tensor([True, False]))
