"""Calibration methods against independent implementations written here from their descriptions (entropy:
test_entropy_reference.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from quantpipe.calibration.histogram import StreamingHistogram
from quantpipe.calibration.methods import (
    BASE_METHODS,
    METHODS,
    best_amax,
    compute_all,
    compute_amax,
    entropy_amax,
    mse_amax,
    quantization_mse,
)
from quantpipe.errors import ConfigError

RNG = np.random.default_rng(7)
N = 60000


# The entropy search against an independent implementation of the published algorithm:
# test_entropy_reference.py.


def test_all_zero_tensor_gives_zero_for_every_method() -> None:
    h = StreamingHistogram()
    h.update(np.zeros(1000, np.float32))
    for method in METHODS:
        assert compute_amax(h, method) == 0.0


def test_constant_tensor_does_not_divide_by_zero() -> None:
    h = StreamingHistogram()
    h.update(np.full(500, 3.0, np.float32))
    for method in METHODS:
        amax = compute_amax(h, method)
        assert math.isfinite(amax) and 0.0 < amax <= 3.0
    assert compute_amax(h, "entropy") == 3.0 and compute_amax(h, "minmax") == 3.0


def test_entropy_clips_outliers_that_minmax_keeps() -> None:
    # A dense heavy tail with a few far outliers: entropy clips deep into the tail.
    x = np.concatenate([RNG.laplace(size=100000), [40.0, -55.0, 70.0]]).astype(np.float32)
    h = StreamingHistogram()
    h.update(x)
    entropy, minmax = compute_amax(h, "entropy"), compute_amax(h, "minmax")
    assert minmax == 70.0 and entropy < minmax / 2
    assert compute_amax(h, "percentile", percentile=99.9) < minmax
    # Isolated outliers after an empty gap: KL is infinite wherever the last kept bin is empty (TensorRT's
    # rule), so entropy can only stop at an outlier, but still below the largest one.
    y = np.concatenate([RNG.standard_normal(100000), [80.0, -95.0, 120.0]]).astype(np.float32)
    g = StreamingHistogram()
    g.update(y)
    assert compute_amax(g, "entropy") < compute_amax(g, "minmax") == 120.0


def test_percentile_method() -> None:
    x = RNG.laplace(size=100000).astype(np.float32)
    h = StreamingHistogram()
    h.update(x)
    for p in (99.0, 99.99):
        assert abs(compute_amax(h, "percentile", percentile=p) - np.percentile(np.abs(x), p)) <= 2 * h.fine_width
    with pytest.raises(ConfigError):
        compute_amax(h, "percentile", percentile=0.0)


def test_quantization_mse_against_simulated_quantization() -> None:
    x = RNG.standard_normal(200000).astype(np.float32)
    h = StreamingHistogram()
    h.update(x)
    for amax in (1.5, 3.0, float(np.abs(x).max())):
        step = amax / 127
        simulated = float(np.mean((np.clip(np.round(np.abs(x) / step), 0, 127) * step - np.abs(x)) ** 2))
        assert quantization_mse(h, amax) == pytest.approx(simulated, rel=0.03)


def test_mse_is_the_best_candidate_edge_of_its_objective() -> None:
    x = np.concatenate([RNG.laplace(size=50000), RNG.standard_normal(30) * 30]).astype(np.float32)
    h = StreamingHistogram()
    h.update(x)
    b = h.binned()
    brute = min((quantization_mse(b, min(i * b.bin_width, b.absmax)), i) for i in range(128, b.used_bins + 1))
    chosen = mse_amax(h)
    assert quantization_mse(b, chosen) == pytest.approx(brute[0], rel=1e-6)


def test_best_picks_the_lowest_mse_method() -> None:
    x = np.concatenate([RNG.standard_normal(80000), [60.0]]).astype(np.float32)
    h = StreamingHistogram()
    h.update(x)
    amax, method = best_amax(h)
    scores = {m: quantization_mse(h, compute_amax(h, m)) for m in BASE_METHODS}
    assert method in BASE_METHODS and scores[method] == min(scores.values())
    assert amax == compute_amax(h, method) == compute_amax(h, "best")


def test_unknown_method_is_an_error_naming_the_valid_ones() -> None:
    h = StreamingHistogram()
    h.update(np.ones(4, np.float32))
    with pytest.raises(ConfigError, match="entropy, minmax, percentile, mse, best"):
        compute_amax(h, "kl")
    with pytest.raises(ConfigError):
        compute_all({"t": h}, ["entropy", "max"])


def test_compute_all_tables() -> None:
    hists = {}
    for name, scale in (("a", 1.0), ("b", 5.0)):
        hists[name] = StreamingHistogram()
        hists[name].update((RNG.standard_normal(5000) * scale).astype(np.float32))
    out = compute_all(hists, ["entropy", "minmax", "best"])
    assert set(out) == {"entropy", "minmax", "best"} and set(out["entropy"]) == {"a", "b"}
    assert out["minmax"]["b"] == hists["b"].absmax
    assert out["entropy"]["a"] == entropy_amax(hists["a"])
