"""Merge logic: histograms of shards add up to the histogram of all the data, bit for bit, whatever the cut."""

from __future__ import annotations

import functools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from quantpipe.calibration.collect import PartialStats, Timing
from quantpipe.calibration.histogram import SignedHistogram, StreamingHistogram

# Finite float32 values over many magnitudes (ranges grow while shards are merged), zeros and signs included.
values = hnp.arrays(np.float32, st.integers(1, 400),
                    elements=st.floats(-1e6, 1e6, width=32, allow_nan=False, allow_infinity=False))


def _cuts(n: int, fracs: list[float]) -> list[int]:
    return sorted({0, n, *(int(f * n) for f in fracs)})


def _whole_and_merged(cls, x, fracs):
    """`cls`'s histogram of all of `x`, and the merge of its histograms of the shards `fracs` cuts `x` into."""
    whole = cls(256)
    whole.update(x)
    parts = []
    cuts = _cuts(x.size, fracs)
    for lo, hi in zip(cuts, cuts[1:], strict=False):
        h = cls(256)
        h.update(x[lo:hi])
        parts.append(h)
    return whole, functools.reduce(cls.merge, parts)


@settings(max_examples=60, deadline=None)
@given(x=values, fracs=st.lists(st.floats(0, 1), max_size=5), scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e20]))
def test_streaming_histogram_of_shards_equals_one_pass(x, fracs, scale):
    x = (x * np.float32(scale)).astype(np.float32)
    whole, merged = _whole_and_merged(StreamingHistogram, x, fracs)
    assert merged == whole
    assert merged.binned().counts.tolist() == whole.binned().counts.tolist()


@settings(max_examples=60, deadline=None)
@given(x=values, fracs=st.lists(st.floats(0, 1), max_size=5))
def test_signed_histogram_of_shards_equals_one_pass(x, fracs):
    whole, merged = _whole_and_merged(SignedHistogram, x, fracs)
    assert merged == whole
    assert merged.relu() == whole.relu() and merged.absolute() == whole.absolute()


def test_an_empty_shard_changes_nothing():
    x = np.linspace(-3, 5, 1000, dtype=np.float32)
    h = StreamingHistogram(128)
    h.update(x)
    assert h.merge(StreamingHistogram(128)) == h == StreamingHistogram(128).merge(h)


def _partial(hist: StreamingHistogram, n: int) -> PartialStats:
    return PartialStats({"t": "activation"}, {}, {"t": hist}, n, 1, Timing(inference=1.0))


def test_partial_stats_merge_adds_samples_and_refuses_other_tensor_sets():
    a, b = StreamingHistogram(128), StreamingHistogram(128)
    a.update(np.ones(10, np.float32))
    b.update(np.full(5, 7.0, np.float32))
    merged = _partial(a, 10).merge(_partial(b, 5))
    assert merged.num_samples == 15 and merged.num_batches == 2 and merged.timing.inference == 2.0
    assert merged.hists["t"] == a.merge(b)
    other = PartialStats({"u": "activation"}, {}, {"u": b}, 5, 1, Timing())
    try:
        _partial(a, 10).merge(other)
    except ValueError as err:
        assert "different" in str(err)
    else:
        raise AssertionError("merging shards of different tensor sets must fail")


@settings(max_examples=40, deadline=None)
@given(x=values, scale=st.sampled_from([1e-30, 1.0, 1e20]))
def test_histograms_travel_between_processes_unchanged(x, scale):
    """A shard's histograms are pickled compactly (trimmed counts, small integer types) and come back equal."""
    import pickle

    x = (x * np.float32(scale)).astype(np.float32)
    h, s = StreamingHistogram(256), SignedHistogram(256)
    h.update(x)
    s.update(x)
    back = pickle.loads(pickle.dumps(h))
    assert back == h and back.counts.dtype == np.int64 and back.counts.size == h.fine_bins
    assert pickle.loads(pickle.dumps(s)) == s
    assert pickle.loads(pickle.dumps(StreamingHistogram(256))) == StreamingHistogram(256)
