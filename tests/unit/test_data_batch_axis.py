"""Inputs batched on another axis than 0 (an RNN state [layers, N, hidden]): read, batched and handed out in the
model's layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from quantpipe.artifacts import TensorInfo
from quantpipe.data import Feeds, check_disjoint, open_dataset, sample_count, sample_rows
from quantpipe.errors import ConfigError, DataError

INPUTS = (TensorInfo("x", "float32", ("N", 3)), TensorInfo("state", "float32", (2, "N", 4)))
AXES = {"state": 1}


def _stacked(tmp_path: Path, n: int = 5) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 3)).astype(np.float32)
    state = rng.standard_normal((2, n, 4)).astype(np.float32)
    path = tmp_path / "d.npz"
    np.savez(path, x=x, state=state)
    return path, x, state


def test_a_stacked_state_is_batched_on_its_axis_and_handed_out_in_the_model_layout(tmp_path: Path) -> None:
    path, x, state = _stacked(tmp_path)
    ds = open_dataset(path, INPUTS, batch_axes=AXES)
    assert ds.num_samples == 5
    batches = list(ds.batches(2))
    assert [b.size for b in batches] == [2, 2, 1] and [b.start for b in batches] == [0, 2, 4]
    for b in batches:
        lo, hi = b.start, b.start + b.size
        np.testing.assert_array_equal(b.feeds["x"], x[lo:hi])
        np.testing.assert_array_equal(b.feeds["state"], state[:, lo:hi])
        assert b.feeds["state"].flags.c_contiguous
    row = batches[0].feeds.rows(1, 2)
    assert row.size == 1
    np.testing.assert_array_equal(row["state"], state[:, 1:2])
    sub = list(ds.subset(1, 4).batches(8))
    assert len(sub) == 1 and sub[0].size == 3
    np.testing.assert_array_equal(sub[0].feeds["state"], state[:, 1:4])
    assert check_disjoint(ds, ds.subset(3, 5)) == 2
    head = list(open_dataset(path, INPUTS, batch_axes=AXES, max_samples=3).batches(8))[0]
    np.testing.assert_array_equal(head.feeds["state"], state[:, :3])


def test_counting_and_cutting_work_on_feeds_and_plain_mappings() -> None:
    s = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    feeds = Feeds({"state": s, "x": np.zeros((3, 1), np.float32)}, {"state": 1, "x": 0})
    assert sample_count(feeds) == 3 and feeds.axes == {"state": 1}
    cut = sample_rows(feeds, 0, 2)
    assert sample_count(cut) == 2
    np.testing.assert_array_equal(cut["state"], s[:, :2])
    assert sample_count({"x": np.zeros((7, 2))}) == 7
    assert sample_rows({"x": np.zeros((7, 2))}, 0, 3)["x"].shape == (3, 2)


def test_per_sample_files_hold_the_model_layout_with_or_without_the_batch_axis(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    folder = tmp_path / "samples"
    folder.mkdir()
    states = []
    for i in range(3):
        st = rng.standard_normal((2, 4)).astype(np.float32)
        states.append(st)
        # the model's layout with a batch of one, or without the batch axis
        np.savez(folder / f"{i}.npz", x=rng.standard_normal(3).astype(np.float32),
                 state=st[:, None, :] if i % 2 else st)
    (b,) = open_dataset(folder, INPUTS, batch_axes=AXES).batches(8)
    assert b.feeds["state"].shape == (2, 3, 4)
    np.testing.assert_array_equal(b.feeds["state"], np.stack(states, axis=1))


def test_a_fixed_batch_is_read_on_the_batch_axis(tmp_path: Path) -> None:
    path, _, _ = _stacked(tmp_path, n=4)
    inputs = (TensorInfo("x", "float32", (1, 3)), TensorInfo("state", "float32", (2, 1, 4)))
    ds = open_dataset(path, inputs, batch_axes=AXES)
    assert ds.max_batch == 1
    assert [b.size for b in ds.batches(32)] == [1, 1, 1, 1]


def test_a_batch_axis_the_input_lacks_is_refused(tmp_path: Path) -> None:
    path, _, _ = _stacked(tmp_path)
    with pytest.raises(ConfigError, match=r"model input 'state' .* batch axis 3, which it does not have") as e:
        open_dataset(path, INPUTS, batch_axes={"state": 3})
    assert e.value.exit_code == 2


def test_a_state_read_on_axis_0_is_refused_with_the_sample_counts(tmp_path: Path) -> None:
    # Without the axis the state's 2 layers read as 2 samples against x's 5: refused, not fed wrong.
    path, _, _ = _stacked(tmp_path)
    with pytest.raises(DataError, match="different numbers of samples"):
        open_dataset(path, INPUTS)


def test_a_npy_file_feeds_a_model_of_one_input_and_is_refused_for_two(tmp_path: Path) -> None:
    x = np.random.default_rng(2).standard_normal((5, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "x.npz", x=x)
    one = (TensorInfo("x", "float32", ("N", 3)),)
    (a,) = open_dataset(tmp_path / "x.npy", one).batches(8)
    (b,) = open_dataset(tmp_path / "x.npz", one).batches(8)
    np.testing.assert_array_equal(a.feeds["x"], b.feeds["x"])
    with pytest.raises(DataError, match=r"\.npy file, which holds one unnamed array, but the model has 2 inputs") as e:
        open_dataset(tmp_path / "x.npy", INPUTS)
    assert e.value.exit_code == 2


def test_data_stored_samples_first_for_a_time_major_input_is_refused_in_the_shapes_the_user_wrote(tmp_path) -> None:
    # A GRU's x [T=10, N, F=8] with data saved batch-first [20, 10, 8] (found probing): the refusal named neither
    # shape ("[10, 20, 8] but ... expects [N, 10, 8]"), both batch-first views of its own.
    inputs = (TensorInfo("x", "float32", (10, "N", 8)),)
    np.savez(tmp_path / "d.npz", x=np.zeros((20, 10, 8), np.float32))
    with pytest.raises(DataError, match=r"array 'x' has shape \[20, 10, 8\]; model input 'x' is \[10, N, 8\] with its "
                                        r"samples on axis 1 .* axis 0 must be 10, not 20\. .*np\.moveaxis\(arr, 0, 1\)"):
        open_dataset(tmp_path / "d.npz", inputs, batch_axes={"x": 1})
    np.savez(tmp_path / "e.npz", x=np.zeros((10, 20, 9), np.float32))  # wrong features: no moveaxis advice
    with pytest.raises(DataError, match=r"axis 2 must be 8, not 9\. Store the array in the model's layout"):
        open_dataset(tmp_path / "e.npz", inputs, batch_axes={"x": 1})
    np.savez(tmp_path / "f.npz", x=np.zeros((10, 20, 8), np.float32))  # the model's layout: 20 samples
    assert open_dataset(tmp_path / "f.npz", inputs, batch_axes={"x": 1}).num_samples == 20
