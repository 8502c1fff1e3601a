"""Large uncompressed arrays of a stacked .npz are read batch by batch, with the same checks and results."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from quantpipe.artifacts import TensorInfo
from quantpipe.data import open_dataset
from quantpipe.errors import DataError

INFO = (TensorInfo("input", "float32", ("N", 3, 32, 32)),)
RNG = np.random.default_rng(5)


def test_large_uncompressed_array_is_read_by_batch(tmp_path: Path) -> None:
    x = RNG.standard_normal((100, 3, 32, 32)).astype(np.float32)  # 1.2 MB: above the lazy threshold
    np.savez(tmp_path / "d.npz", input=x, label=np.arange(100))
    ds = open_dataset(tmp_path / "d.npz", INFO, labels_key="label")
    assert ds.streamed_inputs == ("input",)  # not loaded whole
    batches = list(ds.batches(32))
    assert [b.size for b in batches] == [32, 32, 32, 4]
    assert np.array_equal(np.concatenate([b.feeds["input"] for b in batches]), x)
    assert np.array_equal(np.concatenate([b.labels for b in batches]), np.arange(100))
    head = open_dataset(tmp_path / "d.npz", INFO, max_samples=10)
    assert head.num_samples == 10 and np.array_equal(next(head.batches(64)).feeds["input"], x[:10])


def test_lazy_array_is_cast_and_checked_like_a_loaded_one(tmp_path: Path) -> None:
    x = RNG.standard_normal((60, 3, 32, 32))  # float64: 1.5 MB
    np.savez(tmp_path / "f64.npz", input=x)
    batch = next(open_dataset(tmp_path / "f64.npz", INFO).batches(8)).feeds["input"]
    assert batch.dtype == np.float32 and np.array_equal(batch, x[:8].astype(np.float32))
    x[7, 0, 0, :5] = np.nan
    np.savez(tmp_path / "nan.npz", input=x)
    with pytest.raises(DataError, match="5 NaN or Inf"):
        open_dataset(tmp_path / "nan.npz", INFO)
    np.savez(tmp_path / "shape.npz", input=np.zeros((60, 3, 32, 31), np.float32))
    with pytest.raises(DataError, match=r"shape \[60, 3, 32, 31\].*axis 3 must be 32"):
        open_dataset(tmp_path / "shape.npz", INFO)


def test_compressed_arrays_are_loaded_whole(tmp_path: Path) -> None:
    x = RNG.standard_normal((100, 3, 32, 32)).astype(np.float32)
    np.savez_compressed(tmp_path / "c.npz", input=x)
    ds = open_dataset(tmp_path / "c.npz", INFO)
    assert ds.streamed_inputs == ()  # loaded whole
    assert np.array_equal(next(ds.batches(100)).feeds["input"], x)
