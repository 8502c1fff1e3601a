"""Calibration methods against independent implementations written here from their descriptions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from quantpipe.calibration.histogram import BinnedHistogram, StreamingHistogram
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


def _reference_entropy(counts: np.ndarray, bin_width: float, absmax: float) -> float:
    """TensorRT's IInt8EntropyCalibrator2 rule (GTC 2017 "8-bit Inference with TensorRT"), one candidate at a
    time: P = first i bins with the outliers folded into bin i-1; Q = those bins merged into 128 levels
    (bin j goes to the level whose slice of linspace(0, i, 129) holds j) and spread back over the
    non-empty bins; smallest KL(P||Q) wins (the last one on ties); the threshold is bin i-1's right
    edge. Bin 0 takes bin 1's count; candidates stop at the last non-empty bin."""
    used = int(np.flatnonzero(counts)[-1]) + 1
    bins = counts[:used].astype(np.float64)
    bins[0] = bins[1]
    best, best_i = math.inf, used
    for i in range(min(128, used), used + 1):
        p = bins[:i].copy()
        p[i - 1] += bins[i:].sum()
        level = np.digitize(np.arange(i), np.linspace(0, i, 129)) - 1
        nonempty = bins[:i] > 0
        level_sum = np.bincount(level, weights=bins[:i], minlength=128)
        level_nonempty = np.bincount(level, weights=nonempty, minlength=128)
        q = np.where(nonempty, level_sum[level] / np.maximum(level_nonempty[level], 1), 0.0)
        if q.sum() == 0:
            continue
        p, q = p / p.sum(), q / q.sum()
        if np.any((p > 0) & (q == 0)):
            kl = math.inf
        else:
            m = p > 0
            kl = float(np.sum(p[m] * np.log(p[m] / q[m])))
        if kl <= best:
            best, best_i = kl, i
    return min(best_i * bin_width, absmax)


def _trt_grid(x: np.ndarray) -> BinnedHistogram:
    """2048 bins over [0, absmax] exactly (TensorRT's own grid)."""
    a = float(np.abs(x).max())
    counts, _ = np.histogram(np.abs(x.astype(np.float64)), bins=2048, range=(0.0, a))
    return BinnedHistogram(counts, a / 2048, a, x.size)


def _quantpipe_grid(x: np.ndarray) -> BinnedHistogram:
    """The grid the streaming histogram uses (histogram.py docstring), computed here from scratch."""
    a = float(np.abs(x).max())
    fine_width = 2.0 ** math.frexp(a)[1] / 65536
    q = math.ceil(a / (2048 * fine_width))
    counts, _ = np.histogram(np.abs(x.astype(np.float64)), bins=2048, range=(0.0, 2048 * q * fine_width))
    return BinnedHistogram(counts, q * fine_width, a, x.size)


DISTRIBUTIONS = {
    "gaussian": lambda: RNG.standard_normal(N),
    "laplace": lambda: RNG.laplace(size=N),
    "heavy_tailed_outliers": lambda: np.concatenate([RNG.standard_t(4, size=N), RNG.standard_normal(15) * 60]),
    "relu_clipped": lambda: np.maximum(RNG.standard_normal(N) + 0.3, 0.0),
    "sparse": lambda: np.where(RNG.random(N) < 0.03, RNG.standard_normal(N) * 3, 0.0),
    "constant": lambda: np.full(N // 10, -2.5),
}


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_entropy_matches_independent_implementation(name: str) -> None:
    x = DISTRIBUTIONS[name]().astype(np.float32)
    h = StreamingHistogram()
    for part in np.array_split(x, 5):
        h.update(part)
    grid = _quantpipe_grid(x)
    expected = _reference_entropy(grid.counts, grid.bin_width, grid.absmax)
    assert abs(entropy_amax(h) - expected) <= grid.bin_width  # production: streaming histogram -> KL search
    # The KL search alone, on TensorRT's exact [0, absmax] grid.
    trt = _trt_grid(x)
    assert abs(entropy_amax(trt) - _reference_entropy(trt.counts, trt.bin_width, trt.absmax)) <= trt.bin_width


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
