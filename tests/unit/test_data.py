"""Data sources: stacked .npz and per-sample folders, validated against the model's inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from quantpipe.artifacts import TensorInfo
from quantpipe.data import check_disjoint, open_dataset
from quantpipe.errors import DataError

IMG = (TensorInfo("input", "float32", ("batch", 1, 4, 4)),)
TEXT = (TensorInfo("ids", "int64", ("batch", "seq")), TensorInfo("mask", "int64", ("batch", "seq")))


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def test_stacked_batches_and_labels(tmp_path: Path) -> None:
    x = np.arange(10 * 16, dtype=np.float32).reshape(10, 1, 4, 4)
    p = _npz(tmp_path / "d.npz", input=x, label=np.arange(10))
    ds = open_dataset(p, IMG, labels_key="label", role="evaluation")
    assert ds.num_samples == 10
    batches = list(ds.batches(4))
    assert [b.size for b in batches] == [4, 4, 2]
    assert np.array_equal(np.concatenate([b.feeds["input"] for b in batches]), x)
    assert np.array_equal(np.concatenate([b.labels for b in batches]), np.arange(10))


def test_max_samples_limits_and_changes_fingerprint(tmp_path: Path) -> None:
    p = _npz(tmp_path / "d.npz", input=np.zeros((10, 1, 4, 4), np.float32))
    a = open_dataset(p, IMG)
    b = open_dataset(p, IMG, max_samples=3)
    assert b.num_samples == 3 and a.fingerprint != b.fingerprint


def test_float64_is_cast_int_to_float_refused(tmp_path: Path) -> None:
    ok = open_dataset(_npz(tmp_path / "a.npz", input=np.zeros((2, 1, 4, 4))), IMG)
    assert next(ok.batches(2)).feeds["input"].dtype == np.float32
    with pytest.raises(DataError, match="dtype int64 .* is float32") as e:
        open_dataset(_npz(tmp_path / "b.npz", input=np.zeros((2, 1, 4, 4), np.int64)), IMG)
    # raw pixels: the advice is the model's own preprocessing, not a bare cast to 0-255 floats (found probing: a
    # text recognizer calibrated on such floats read 0 of 160 lines, and nothing said so)
    assert "apply the preprocessing the model was trained with" in str(e.value)


@pytest.mark.parametrize(
    ("arrays", "pattern"),
    [
        ({"img": np.zeros((2, 1, 4, 4), np.float32)}, r"no array named 'input'.*arrays present: \['img'\]"),
        ({"input": np.zeros((2, 1, 5, 4), np.float32)}, r"axis 2 must be 4"),
        ({"input": np.zeros((2, 4, 4), np.float32)}, r"rank 4"),
        ({"input": np.zeros((0, 1, 4, 4), np.float32)}, r"holds no samples"),
        ({"input": np.full((2, 1, 4, 4), np.nan, np.float32)}, r"32 NaN or Inf"),
    ],
)
def test_bad_data(tmp_path: Path, arrays: dict, pattern: str) -> None:
    with pytest.raises(DataError, match=pattern) as e:
        open_dataset(_npz(tmp_path / "d.npz", **arrays), IMG)
    assert e.value.exit_code == 2


def test_missing_labels_and_file(tmp_path: Path) -> None:
    p = _npz(tmp_path / "d.npz", input=np.zeros((2, 1, 4, 4), np.float32))
    with pytest.raises(DataError, match="no labels array 'label'"):
        open_dataset(p, IMG, labels_key="label")
    with pytest.raises(DataError, match="does not exist"):
        open_dataset(tmp_path / "nope.npz", IMG)
    (tmp_path / "bad.npz").write_text("not a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        open_dataset(tmp_path / "bad.npz", IMG)


def test_folder_of_ragged_samples_batches_same_shapes_in_order(tmp_path: Path) -> None:
    folder = tmp_path / "samples"
    folder.mkdir()
    lengths = [5, 5, 7, 7, 7, 5]
    for i, n in enumerate(lengths):
        ids = np.full((1, n), i, np.int64)
        _npz(folder / f"s{i:02d}.npz", ids=ids, mask=np.ones((1, n), np.int64), label=np.array([i]))
    ds = open_dataset(folder, TEXT, labels_key="label")
    assert ds.num_samples == 6 and ds.is_folder
    batches = list(ds.batches(2))
    assert [b.feeds["ids"].shape for b in batches] == [(2, 5), (2, 7), (1, 7), (1, 5)]
    assert [int(b.feeds["ids"][0, 0]) for b in batches] == [0, 2, 4, 5]  # order kept
    assert np.array_equal(ds.labels, np.arange(6))


def test_folder_sample_without_batch_axis(tmp_path: Path) -> None:
    folder = tmp_path / "s"
    folder.mkdir()
    _npz(folder / "a.npz", input=np.ones((1, 4, 4), np.float32))
    ds = open_dataset(folder, IMG)
    assert next(ds.batches(8)).feeds["input"].shape == (1, 1, 4, 4)


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "e").mkdir()
    with pytest.raises(DataError, match="holds no .npz files"):
        open_dataset(tmp_path / "e", IMG)


def test_overlap_detection(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 1, 4, 4)).astype(np.float32)
    a = open_dataset(_npz(tmp_path / "a.npz", input=x[:4]), IMG)
    b = open_dataset(_npz(tmp_path / "b.npz", input=x[2:]), IMG)
    assert check_disjoint(a, b) == 2


# --------------------------------------------------------------------------- labels are data (issue 14)

def _labelled(tmp_path: Path, labels: np.ndarray, n: int = 6) -> Path:
    return _npz(tmp_path / "d.npz", input=np.zeros((n, 1, 4, 4), np.float32), label=labels)


@pytest.mark.parametrize(
    ("labels", "pattern"),
    [
        (np.arange(6) + 0.5, r"labels array 'label' holds 6 invalid label\(s\) \(e\.g\. 0\.5, 1\.5, 2\.5, 3\.5, 4\.5\); "
                             r"labels are float64 and these are not whole numbers\. .*astype\(np\.int64\)"),
        (np.array([0, 1, np.nan, 3, 4, np.inf]), r"holds 2 invalid label\(s\) \(e\.g\. inf, nan\)"),
        (np.array([0, -1, 2, -1, 4, 5]), r"holds 2 invalid label\(s\) \(e\.g\. -1\); class indices cannot be negative"),
        (np.array([1e300] * 6), r"not whole numbers"),  # integral but not exactly representable as an index
        (np.array(["a"] * 6), r"dtype <U1, but labels are integer class indices"),
        (np.arange(5), r"holds 5 labels for 6 samples"),
        (np.arange(7), r"holds 7 labels for 6 samples"),  # was truncated silently
        (np.eye(6, 3), r"shape \[6, 3\].*labels\.argmax\(axis=1\)"),
        (np.int64(3), r"shape \[\].*one value per sample"),  # was an IndexError
    ],
)
def test_bad_labels_are_data_errors(tmp_path: Path, labels: np.ndarray, pattern: str) -> None:
    with pytest.raises(DataError, match=pattern):
        open_dataset(_labelled(tmp_path, labels), IMG, labels_key="label", role="evaluation")


def test_integral_float_and_bool_labels_are_converted_with_a_note(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="quantpipe.labels")
    ds = open_dataset(_labelled(tmp_path, np.arange(6, dtype=np.float32)), IMG, labels_key="label")
    assert ds.labels is not None and ds.labels.dtype == np.int64 and list(ds.labels) == list(range(6))
    assert "converted to int64" in caplog.text
    ds = open_dataset(_labelled(tmp_path, np.array([True, False] * 3)), IMG, labels_key="label")
    assert ds.labels is not None and list(ds.labels) == [1, 0] * 3


def test_labels_column_shape_n_by_1_is_accepted(tmp_path: Path) -> None:
    ds = open_dataset(_labelled(tmp_path, np.arange(6).reshape(6, 1)), IMG, labels_key="label")
    assert ds.labels is not None and list(ds.labels) == list(range(6))


def test_label_range_is_checked_against_the_class_count(tmp_path: Path) -> None:
    ds = open_dataset(_labelled(tmp_path, np.array([0, 57, 9, 10, 57, 3])), IMG, labels_key="label", role="evaluation")
    ds.check_label_range(60, "logits")
    with pytest.raises(DataError, match=r"'label' holds 3 invalid label\(s\) \(e\.g\. 10, 57\); class indices must be "
                                        r"in \[0, 10\): output 'logits' has 10 classes\. .*0\.\.9"):
        ds.check_label_range(10, "logits")


def test_folder_needs_exactly_one_label_per_file(tmp_path: Path) -> None:
    folder = tmp_path / "f"
    folder.mkdir()
    for i in range(3):
        np.savez(folder / f"{i}.npz", input=np.zeros((1, 4, 4), np.float32), label=np.arange(i))  # 0, 1, 2 values
    with pytest.raises(DataError, match=r"0\.npz: labels array 'label' holds 0 values"):
        open_dataset(folder, IMG, labels_key="label")  # was: fewer labels than samples, silently


def test_folder_labels_are_validated(tmp_path: Path) -> None:
    folder = tmp_path / "f"
    folder.mkdir()
    for i in range(3):
        np.savez(folder / f"{i}.npz", input=np.zeros((1, 4, 4), np.float32), label=np.array([i + 0.5]))
    with pytest.raises(DataError, match=r"data folder .*'label' holds 3 invalid label\(s\)"):
        open_dataset(folder, IMG, labels_key="label")


# --------------------------------------------------------------------------- found by the property tests

def test_damaged_compressed_npz_is_a_data_error(tmp_path: Path) -> None:
    p = tmp_path / "d.npz"
    np.savez_compressed(p, input=np.zeros((2, 1, 4, 4), np.float32), label=np.arange(2))
    data = bytearray(p.read_bytes())
    # The first local header's extra-field length: the deflate stream is read from the wrong offset, and
    # zipfile raises zlib.error, which was uncaught.
    data[28] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(DataError, match="is not a readable .npz archive"):
        open_dataset(p, IMG, labels_key="label")


def test_zip_with_unknown_flags_is_a_data_error(tmp_path: Path) -> None:
    p = tmp_path / "d.npz"
    np.savez(p, input=np.zeros((2, 1, 4, 4), np.float32))
    data = bytearray(p.read_bytes())
    data[6] |= 0x20  # local header flag bit 5 ("compressed patched data"): NotImplementedError, was uncaught
    data[data.rindex(b"PK\x01\x02") + 8] |= 0x20
    p.write_bytes(bytes(data))
    with pytest.raises(DataError, match="is not a readable .npz archive"):
        open_dataset(p, IMG)


def test_scalar_input_with_max_samples_is_a_data_error(tmp_path: Path) -> None:
    p = _npz(tmp_path / "d.npz", input=np.float32(0))  # was an IndexError from arr[:max_samples]
    with pytest.raises(DataError, match="rank 4"):
        open_dataset(p, IMG, max_samples=1)


FIXED1 = (TensorInfo("x", "float32", (1, 8)), TensorInfo("h", "float32", (1, 1, 4)))


def test_a_fixed_batch_of_one_runs_one_sample_at_a_time(tmp_path: Path) -> None:
    # A model exported with batch 1 (or an RNN state [1, 1, H]) takes one sample per run, whatever was asked.
    p = _npz(tmp_path / "d.npz", x=np.arange(5 * 8, dtype=np.float32).reshape(5, 8), h=np.zeros((5, 1, 4), np.float32))
    ds = open_dataset(p, FIXED1)
    assert ds.max_batch == 1 and ds.per_run(32) == 1
    assert [b.size for b in ds.batches(32)] == [1] * 5
    assert ds.batch_bounds(32) == [(i, i + 1) for i in range(5)]
    assert open_dataset(p, (TensorInfo("x", "float32", ("n", 8)),)).max_batch is None


def test_a_fixed_batch_of_four_runs_fours_and_refuses_a_short_last_run(tmp_path: Path) -> None:
    fixed4 = (TensorInfo("x", "float32", (4, 8)),)
    ds = open_dataset(_npz(tmp_path / "a.npz", x=np.zeros((8, 8), np.float32)), fixed4)
    assert [b.size for b in ds.batches(32)] == [4, 4] and [b.size for b in ds.batches(2)] == [2] * 4
    with pytest.raises(DataError, match=r"takes exactly 4 per run .*\(max_samples: 8\)"):
        open_dataset(_npz(tmp_path / "b.npz", x=np.zeros((10, 8), np.float32)), fixed4)


def test_a_scalar_model_input_is_refused_with_the_way_out(tmp_path: Path) -> None:
    inputs = (TensorInfo("x", "float32", ("n", 8)), TensorInfo("sr", "int64", ()))
    for sr in (np.full(4, 16000, np.int64), np.array(16000, np.int64)):  # stacked, or one 0-d value
        p = _npz(tmp_path / "d.npz", x=np.zeros((4, 8), np.float32), sr=sr)
        with pytest.raises(DataError, match=r"'sr' is a scalar \(rank 0\).*quantpipe prepare MODEL OUT --fix sr=VALUE"):
            open_dataset(p, inputs)


def test_normalised_floats_for_a_uint8_input_are_not_told_to_be_cast(tmp_path: Path) -> None:
    # A model that normalises its uint8 pixels inside the graph (found probing): the old advice, astype(np.uint8),
    # turned 0.0-1.0 data into 0 and 1 and quantize then passed.
    np.savez(tmp_path / "d.npz", input=np.random.default_rng(0).uniform(0, 1, (3, 1, 4, 4)).astype(np.float32))
    with pytest.raises(DataError, match=r"is uint8\. The model takes raw integers .* store the data as it was before "
                                        r"your normalisation") as e:
        open_dataset(tmp_path / "d.npz", (TensorInfo("input", "uint8", ("batch", 1, 4, 4)),))
    assert "would turn 0.0-1.0 values into 0 and 1" in str(e.value)


@pytest.mark.parametrize("lazy", [False, True])
def test_integers_that_do_not_fit_a_narrower_input_are_refused_not_wrapped(tmp_path: Path, lazy: bool) -> None:
    # uint8 200 cast to an int8 input became -56, silently; int64 ids that fit an int32 input stay accepted.
    rows = 40_000 if lazy else 4  # >= 1 MiB stored uncompressed: read by rows (NpyMember), checked in chunks
    ids = np.zeros((rows, 8), np.int64)
    ids[-1, -1] = 2**31 + 5
    np.savez(tmp_path / "big.npz", ids=ids)
    info = (TensorInfo("ids", "int32", ("batch", 8)),)
    with pytest.raises(DataError, match=r"dtype int64 with values 0\.\.2147483653, but model input 'ids' is int32 "
                                        r"\(-2147483648\.\.2147483647\): casting would wrap"):
        open_dataset(tmp_path / "big.npz", info)
    ids[-1, -1] = 2**31 - 1
    np.savez(tmp_path / "fits.npz", ids=ids)
    ds = open_dataset(tmp_path / "fits.npz", info)
    last = list(ds.batches(rows))[-1].feeds["ids"]
    assert last.dtype == np.int32 and int(last[-1, -1]) == 2**31 - 1
    pixels = np.full((3, 1, 4, 4), 200, np.uint8)
    np.savez(tmp_path / "px.npz", input=pixels)
    with pytest.raises(DataError, match=r"dtype uint8 with values 200\.\.200, but model input 'input' is int8"):
        open_dataset(tmp_path / "px.npz", (TensorInfo("input", "int8", ("batch", 1, 4, 4)),))
