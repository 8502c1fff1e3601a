"""Streaming histograms: exact, batch-independent, mergeable, and equal to np.histogram on their grid."""

from __future__ import annotations

import math

import numpy as np
import pytest

from quantpipe.calibration.histogram import InfiniteValues, SignedHistogram, StreamingHistogram

RNG = np.random.default_rng(1234)


def _fed(parts: list[np.ndarray], **kw: int) -> StreamingHistogram:
    h = StreamingHistogram(**kw)
    for p in parts:
        h.update(p)
    return h


def _grid_histogram(x: np.ndarray, num_bins: int = 2048, fine: int = 65536) -> tuple[np.ndarray, float]:
    """The documented grid, computed independently: 2048 bins of q fine bins over a power-of-two range."""
    a = float(np.abs(x).max())
    _, e = math.frexp(a)
    fine_width = 2.0**e / fine
    q = math.ceil(a / (num_bins * fine_width))
    counts, _ = np.histogram(np.abs(x.astype(np.float64)), bins=num_bins, range=(0.0, num_bins * q * fine_width))
    return counts, q * fine_width


def _growing_data(n: int) -> np.ndarray:
    # Magnitudes rise over the stream, so the range doubles many times while data arrives.
    scale = np.geomspace(1e-3, 50.0, n).astype(np.float32)
    return (RNG.standard_normal(n).astype(np.float32) * scale).astype(np.float32)


@pytest.mark.parametrize("sizes", [(1,), (8,), (32,), (7, 1, 300, 5000)])
def test_same_data_any_batching_gives_identical_histograms(sizes: tuple[int, ...]) -> None:
    x = _growing_data(20000).reshape(-1, 4)  # 5000 "samples" of 4 values
    reference = _fed([x])
    parts, i, k = [], 0, 0
    while i < len(x):
        step = sizes[k % len(sizes)]
        parts.append(x[i:i + step])
        i += step
        k += 1
    h = _fed(parts)
    assert h == reference
    assert h.range_exp == reference.range_exp and np.array_equal(h.counts, reference.counts)
    assert np.array_equal(h.binned().counts, reference.binned().counts)


def test_merge_equals_one_histogram_of_concatenated_data() -> None:
    a = RNG.laplace(size=30000).astype(np.float32)
    b = (RNG.standard_normal(20000) * 40).astype(np.float32)  # larger range: a must be re-binned
    merged = _fed([a]).merge(_fed([b]))
    assert merged == _fed([np.concatenate([a, b])])
    assert _fed([b]).merge(_fed([a])) == merged
    assert merged.merge(StreamingHistogram()) == merged


def test_binned_is_np_histogram_on_the_documented_grid() -> None:
    for x in (RNG.standard_normal(50000), RNG.laplace(size=50000), np.maximum(RNG.standard_normal(5000), 0) * 7,
              RNG.standard_t(2, size=50000), _growing_data(30000)):
        x = x.astype(np.float32)
        h = _fed(np.array_split(x, 9))
        expected, width = _grid_histogram(x)
        b = h.binned()
        assert np.array_equal(b.counts, expected)
        assert b.bin_width == width
        # Bins are at most 17/16 of TensorRT's absmax / 2048; the data ends in bin 1920..2047.
        assert b.absmax / 2048 <= b.bin_width <= b.absmax / 2048 * 17 / 16
        assert 1920 <= b.used_bins <= 2048


def test_range_is_a_power_of_two_strictly_above_absmax() -> None:
    h = _fed([np.array([0.5, -4.0, 3.0], dtype=np.float32)])  # 4.0 is itself a power of two
    assert h.absmax == 4.0 and h.range == 8.0
    assert h.counts.sum() == 3 and h.counts[h.fine_bins // 2] == 1  # 4.0 sits at the middle of [0, 8)
    assert h.binned().counts[-1] == 1  # absmax in the last used bin (the closed right edge)


def test_all_zero_and_constant_tensors() -> None:
    z = _fed([np.zeros((3, 5), np.float32), np.zeros(7, np.float32)])
    assert z.range_exp is None and z.absmax == 0.0 and z.num_values == 22 and z.counts[0] == 22
    bz = z.binned()
    assert bz.absmax == 0.0 and bz.counts[0] == 22 and bz.counts.sum() == 22
    c = _fed([np.full(100, -0.75, np.float32)])
    bc = c.binned()
    assert c.absmax == 0.75 and bc.counts.sum() == 100 and bc.counts[bc.used_bins - 1] == 100


def test_nan_and_inf_are_rejected_apart() -> None:
    """Inf alone is InfiniteValues (the collector leaves that tensor out: a -inf mask); NaN, alone or beside an Inf,
    a plain ValueError (calibration stops)."""
    for cls in (StreamingHistogram, SignedHistogram):
        for bad in (np.inf, -np.inf):
            with pytest.raises(InfiniteValues, match="Inf value"):
                cls().update(np.array([1.0, bad, -2.0], np.float32))
        for values in ([1.0, np.nan], [np.inf, np.nan, 1.0], [np.nan, -np.inf]):
            with pytest.raises(ValueError, match="NaN value") as err:
                cls().update(np.array(values, np.float32))
            assert not isinstance(err.value, InfiniteValues)


def test_subnormal_and_huge_values_are_binned_exactly() -> None:
    tiny = np.array([1e-40, -3e-41, 0.0, 7e-42], dtype=np.float32)  # subnormal float32
    h = _fed([tiny[:2], tiny[2:]])
    expected, _ = _grid_histogram(tiny)
    assert np.array_equal(h.binned().counts, expected) and h == _fed([tiny])
    huge = np.array([3e38, -1e38, 1.0], dtype=np.float32)
    hh = _fed([huge])
    assert hh.absmax == float(np.float32(3e38)) and hh.range_exp == 128


def test_other_float_dtypes_and_memory_stays_fixed() -> None:
    x = RNG.standard_normal(10000)
    h64 = _fed([x])  # float64 is rounded to float32 once per value
    assert h64 == _fed([x.astype(np.float32)])
    h16 = _fed([x.astype(np.float16)])
    assert h16.num_values == 10000
    h = StreamingHistogram()
    size = h.counts.nbytes
    for _ in range(20):
        h.update(RNG.standard_normal(50000).astype(np.float32))
    assert h.counts.nbytes == size == 65536 * 8 and h.num_values == 1_000_000


def test_percentile_is_within_a_fine_bin_of_numpy() -> None:
    x = RNG.laplace(size=200000).astype(np.float32)
    h = _fed([x])
    for q in (50.0, 99.0, 99.99):
        assert abs(h.percentile(q) - np.percentile(np.abs(x), q)) <= 2 * h.fine_width
    assert h.percentile(100.0) == h.absmax


def test_state_round_trip() -> None:
    h = _fed([_growing_data(5000)])
    back = StreamingHistogram.from_state(h.num_bins, h.counts, h.range_exp, h.absmax, h.num_values)
    assert back == h and back.counts is not h.counts


@pytest.mark.parametrize("shift", [0.0, 3.0, -3.0, 40.0])  # equal and unequal ranges on each side
def test_signed_histogram_gives_exact_abs_and_relu_histograms(shift: float) -> None:
    x = (RNG.standard_normal(30000) * 2 + shift).astype(np.float32)
    x[::7] = 0.0
    parts = np.array_split(x, 11)
    signed = SignedHistogram()
    for p in parts:
        signed.update(p)
    assert signed.absolute() == _fed(parts)
    assert signed.relu() == _fed([np.maximum(p, 0) for p in parts])
    one_sided = SignedHistogram()
    one_sided.update(-np.abs(x))
    assert one_sided.relu() == _fed([np.zeros_like(x)]) and one_sided.absolute() == _fed([x * 0 - np.abs(x)])


def test_array_module_generic_path_matches_the_cpu_path() -> None:
    """The CuPy path's arithmetic, run here with numpy as the array module (the GPU run is tests/gpu's)."""
    for x in (_growing_data(40000), (RNG.standard_normal(500) * 1e-39).astype(np.float32), np.zeros(9, np.float32)):
        generic = StreamingHistogram()
        for part in np.array_split(x, 3):
            generic._update_generic(part, np)
        assert generic == _fed([x])


class _OnDevice:
    """What the histogram needs of counts the GPU kernel left on the device (a CuPy array): `get()`."""

    def __init__(self, counts: np.ndarray) -> None:
        self.counts = counts

    def get(self) -> np.ndarray:
        return self.counts


def test_counts_left_on_the_device_join_when_read_copied_grown_or_pickled() -> None:
    import pickle

    data = np.array([0.25, 0.5, 1.5, 3.0], dtype=np.float32)
    fresh = StreamingHistogram()
    fresh.update(data)
    extra = np.zeros(fresh.fine_bins, dtype=np.uint64)
    extra[[0, 7, 4095]] = [3, 5, 1]
    want = fresh.counts + extra.astype(np.int64)
    for read in ("counts", "copy", "pickle", "grow"):
        h = StreamingHistogram()
        h.update(data)
        h._device_counts = _OnDevice(extra.copy())
        if read == "counts":
            got = h.counts
        elif read == "copy":
            got = h.copy().counts
        elif read == "pickle":
            got = pickle.loads(pickle.dumps(h)).counts
        else:  # a larger value: the pending counts join at the old range before the bins are merged
            ref = StreamingHistogram.from_state(h.num_bins, want, h.range_exp, h.absmax, h.num_values)
            h.update(np.array([100.0], dtype=np.float32))
            ref.update(np.array([100.0], dtype=np.float32))
            assert h == ref
            continue
        assert np.array_equal(got, want), read
        assert h.counts.sum() == want.sum()  # read once: not added twice
