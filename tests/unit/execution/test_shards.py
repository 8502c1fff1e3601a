"""Shard logic: whole batches, in order, every sample once; Dataset.batch_bounds and subset agree with batches()."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from quantpipe.artifacts import TensorInfo
from quantpipe.data import open_dataset
from quantpipe.execution import shard_bounds


def _batches(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, n)) for s in range(0, n, size)]


@given(n=st.integers(1, 500), size=st.integers(1, 64), shards=st.integers(1, 20))
def test_shards_cover_every_sample_once_in_whole_batches(n, size, shards):
    batches = _batches(n, size)
    bounds = shard_bounds(batches, shards)
    assert len(bounds) == min(shards, len(batches))
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    for (_, hi), (lo, _) in zip(bounds, bounds[1:], strict=False):
        assert hi == lo  # contiguous, in order
    starts, stops = {b[0] for b in batches}, {b[1] for b in batches}
    for lo, hi in bounds:
        assert lo < hi and lo in starts and hi in stops  # whole batches, none empty


@given(n_batches=st.integers(1, 200), shards=st.integers(1, 16))
def test_shards_of_equal_batches_differ_by_at_most_one_batch(n_batches, shards):
    bounds = shard_bounds(_batches(n_batches * 8, 8), shards)
    sizes = [(hi - lo) // 8 for lo, hi in bounds]
    assert max(sizes) - min(sizes) <= 1, sizes


def test_uneven_batches_are_split_near_the_middle():
    # A folder of samples of two shapes: batches of 32, 3, 32, 32 samples.
    batches = [(0, 32), (32, 35), (35, 67), (67, 99)]
    assert shard_bounds(batches, 2) == [(0, 35), (35, 99)]
    assert shard_bounds(batches, 1) == [(0, 99)]
    assert shard_bounds([], 4) == []


def _info(name: str, shape: list) -> TensorInfo:
    return TensorInfo(name=name, dtype="float32", shape=tuple(shape))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), size=st.integers(1, 9), lo_frac=st.floats(0, 1), hi_frac=st.floats(0, 1))
def test_subset_of_a_stacked_npz_is_those_rows(tmp_path_factory, n, size, lo_frac, hi_frac):
    d = tmp_path_factory.mktemp("npz")
    x = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    np.savez(d / "d.npz", x=x, label=np.arange(n))
    ds = open_dataset(d / "d.npz", [_info("x", [-1, 3])], labels_key="label", role="evaluation")
    assert ds.batch_bounds(size) == [(b.start, b.start + b.size) for b in ds.batches(size)]
    lo = min(int(lo_frac * n), n - 1)
    hi = max(lo + 1, int(hi_frac * n))
    sub = ds.subset(lo, hi)
    assert sub.num_samples == hi - lo
    np.testing.assert_array_equal(np.concatenate([b.feeds["x"] for b in sub.batches(size)]), x[lo:hi])
    np.testing.assert_array_equal(sub.labels, np.arange(n)[lo:hi])


def test_subset_of_a_lazily_read_npz_reads_only_its_rows(tmp_path):
    x = np.random.default_rng(0).normal(size=(300, 1024)).astype(np.float32)  # > 1 MiB: read by rows
    np.savez(tmp_path / "big.npz", x=x)
    ds = open_dataset(tmp_path / "big.npz", [_info("x", [-1, 1024])])
    assert ds.streamed_inputs == ("x",)
    sub = ds.subset(100, 250)
    np.testing.assert_array_equal(np.concatenate([b.feeds["x"] for b in sub.batches(64)]), x[100:250])


def test_folder_batch_bounds_follow_shape_changes(tmp_path):
    rng = np.random.default_rng(1)
    widths = [4, 4, 4, 6, 6, 4, 4, 4, 4, 4]
    for i, w in enumerate(widths):
        np.savez(tmp_path / f"s{i:02d}.npz", x=rng.normal(size=(1, 2, w)).astype(np.float32))
    ds = open_dataset(tmp_path, [_info("x", [-1, 2, "w"])])
    bounds = ds.batch_bounds(4)
    assert bounds == [(b.start, b.start + b.size) for b in ds.batches(4)] == [(0, 3), (3, 5), (5, 9), (9, 10)]
    # A shard that starts on a batch start is batched as the whole set is there.
    for lo, hi in shard_bounds(bounds, 2):
        sub = ds.subset(lo, hi)
        assert [(b.start + lo, b.start + lo + b.size) for b in sub.batches(4)] == [b for b in bounds if lo <= b[0] < hi]
