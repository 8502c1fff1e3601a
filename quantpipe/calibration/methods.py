"""Calibration methods: a histogram of |x| in, the clipping threshold `amax` out (scale = amax / 127).

Every method works on the exact TensorRT-style histogram (`StreamingHistogram.binned()`: 2048 equal
bins whose width is within 1/16 of TensorRT's absmax / 2048, see histogram.py), or on any
BinnedHistogram (e.g. np.histogram over [0, absmax] exactly), except `percentile`, which reads the finer
internal histogram when it has one. No method returns more than absmax. A tensor whose values
are all zero gets amax 0 from every method; the cache writer turns that into a tiny positive scale
(see cache.MIN_AMAX), because TensorRT needs a positive one.
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from quantpipe.calibration.histogram import BinnedHistogram, StreamingHistogram
from quantpipe.config import CalibrationConfig
from quantpipe.errors import ConfigError
from quantpipe.int8 import INT8_MAX

__all__ = [
    "METHODS",
    "BASE_METHODS",
    "DEFAULT_PERCENTILE",
    "entropy_amax",
    "minmax_amax",
    "percentile_amax",
    "mse_amax",
    "quantization_mse",
    "best_amax",
    "compute_amax",
    "compute_all",
    "check_method",
]

BASE_METHODS: tuple[str, ...] = ("entropy", "minmax", "percentile", "mse")
METHODS: tuple[str, ...] = BASE_METHODS + ("best",)
"""Valid method names; `best` picks, per tensor, the base method with the lowest quantization MSE."""

DEFAULT_PERCENTILE: float = CalibrationConfig.model_fields["percentile"].default
ENTROPY_QUANT_BINS = 128
ENTROPY_START_BIN = 128
_TIE_RTOL = 1e-12


def check_method(method: str) -> str:
    """Return `method` if it is a known method name, else raise ConfigError naming the valid ones."""
    if method not in METHODS:
        raise ConfigError(f"unknown calibration method {method!r}; valid methods are {', '.join(METHODS)}.")
    return method


def _binned(hist: StreamingHistogram | BinnedHistogram) -> BinnedHistogram:
    return hist if isinstance(hist, BinnedHistogram) else hist.binned()


def _xlogx(x: np.ndarray) -> np.ndarray:
    out = np.zeros_like(x, dtype=np.float64)
    pos = x > 0
    out[pos] = x[pos] * np.log(x[pos])
    return out


# --------------------------------------------------------------------------------------------- entropy


def entropy_amax(
    hist: StreamingHistogram | BinnedHistogram,
    *,
    quant_bins: int = ENTROPY_QUANT_BINS,
    start_bin: int = ENTROPY_START_BIN,
) -> float:
    """TensorRT's IInt8EntropyCalibrator2 threshold: the one minimising KL(P || Q).

    Source: Szymon Migacz, "8-bit Inference with TensorRT", GTC 2017 (the calibration pseudo-code); where
    the talk leaves a choice, NVIDIA's reimplementation of the same calibrator (pytorch-quantization and
    Model Optimizer, `HistogramCalibrator` method "entropy").

    On the histogram of |x| (2048 bins whose grid covers absmax, the last ones possibly empty), with bin
    0's count replaced by bin 1's (so the exact zeros a ReLU produces do not dominate P), for every
    candidate i from `start_bin` (128) to the number of bins, empty tail bins included:

    - P, the reference: bins 0..i-1, with the count of every bin >= i (the clipped outliers) added to
      bin i-1;
    - Q, the candidate: bins 0..i-1 merged into `quant_bins` (128) levels (bin j in level floor(128 j / i)),
      each level's count spread evenly over its non-empty bins (empty bins stay empty);
    - KL(P || Q) over the normalised P and Q (infinite when P has mass where Q has none, i.e. when bin
      i-1 is empty but outliers were folded into it).

    The smallest divergence wins (on equal ones, within 1e-12, the largest i, like the reference code);
    amax is the right edge of bin i-1, i * bin_width, capped at absmax. Candidates run past the data into
    the empty tail bins, as published: TensorRT grows its histogram range by powers of two, so its final
    histogram ends in empty bins. A longer P regroups the bins into wider levels, so those KLs differ from
    the last non-empty bin's; when one wins, amax is absmax. The result thus depends on the grid's empty
    tail (0 to 128 bins here, histogram.py): it equals TensorRT's only as far as the histograms are equal.
    tests/unit/calibration/test_entropy_reference.py checks it against an independent implementation.

    The KL curve can have near-equal minima far apart (sparse tails): the smallest change to the
    histogram (other data, another device's rounding) can move the threshold by many bins. That is a
    property of the method, which is why the histogram itself is exact and batch-independent here.
    """
    b = _binned(hist)
    if b.absmax <= 0.0 or b.used_bins < 2:
        return float(max(b.absmax, 0.0))
    counts = b.counts.astype(np.float64)
    counts[0] = counts[1]
    cand = np.arange(min(start_bin, counts.size), counts.size + 1, dtype=np.int64)
    kl = _entropy_divergences(counts, cand, quant_bins, _group_edges(int(cand[0]), int(cand[-1]), quant_bins))
    if not np.isfinite(kl).any():
        return float(b.absmax)
    best = float(np.min(kl))
    ties = np.nonzero(kl <= best + _TIE_RTOL * max(1.0, abs(best)))[0]
    i = int(cand[ties[-1]])
    return float(min(i * b.bin_width, b.absmax))


@functools.lru_cache(maxsize=8)
def _group_edges(first: int, last: int, quant_bins: int) -> np.ndarray:
    """Bin where group g of candidate i starts, [i - first, g] = ceil(g * i / quant_bins), for the candidates
    first..last: the same for every histogram of a calibration (computed once, read-only).

    Exact in float64 (small integers and a power-of-two divisor), and faster than integer floor division.
    """
    cand = np.arange(first, last + 1, dtype=np.float64)
    groups = np.arange(quant_bins + 1, dtype=np.float64)
    edges = np.ceil(np.multiply.outer(cand, groups) / quant_bins).astype(np.intp)
    edges.flags.writeable = False
    return edges


def _entropy_divergences(counts: np.ndarray, cand: np.ndarray, quant_bins: int, edges: np.ndarray) -> np.ndarray:
    """KL(P || Q) of `entropy_amax` for every candidate i in `cand` (inf where undefined).

    Vectorised over all candidates at once: with prefix sums C (counts), N (non-empty bins) and
    H (count * log count), every level's sum S_g and non-empty count n_g is a difference of prefix sums,
    and KL = [sum P log P - sum_g S_g log(S_g / n_g) - outliers * log Q_{i-1}] / T - log T + log C_i,
    where T is the total count. 5-10 ms for 2048 bins on 2 cores (a loop over candidates: 0.1 s).
    """
    total = float(counts.sum())
    cum = np.concatenate(([0.0], np.cumsum(counts)))
    nonzero = np.concatenate(([0.0], np.cumsum(counts > 0, dtype=np.float64)))  # small integers: exact
    plogp_prefix = np.concatenate(([0.0], np.cumsum(_xlogx(counts))))

    # edges[k, g]: where group g of candidate cand[k] starts (`_group_edges`). The counts are >= 0, so a group
    # has a non-empty bin exactly when its sum is > 0, and an empty group's sum is exactly 0.
    at = cum[edges]
    group_sum = np.subtract(at[:, 1:], at[:, :-1])
    at = nonzero[edges]
    group_nz = np.subtract(at[:, 1:], at[:, :-1])
    del at
    valid = group_nz > 0
    safe_sum = np.where(valid, group_sum, 1.0)
    np.maximum(group_nz, 1.0, out=group_nz)  # empty groups: 1 (a count, else >= 1)
    q_last = safe_sum[:, -1] / group_nz[:, -1]
    # S_g log(S_g / n_g), and 0 * log(1 / 1) = 0 for an empty group.
    cross = np.divide(safe_sum, group_nz, out=safe_sum)
    with np.errstate(divide="ignore", invalid="ignore"):
        np.log(cross, out=cross)
    cross = np.multiply(group_sum, cross, out=cross).sum(axis=1)

    outliers = total - cum[cand]
    outliers[outliers < 0] = 0.0
    last = counts[cand - 1]
    p_last = last + outliers
    plogp = plogp_prefix[cand - 1] + _xlogx(p_last)
    # Bin i-1 always falls in the last group (ceil(127 i / 128) <= i - 1 for i >= 128).
    q_last = np.where(last > 0, q_last, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogq = cross + np.where(outliers > 0, outliers * np.log(np.where(q_last > 0, q_last, 1.0)), 0.0)
        z = cum[cand]
        kl = (plogp - plogq) / total - math.log(total) + np.log(np.where(z > 0, z, 1.0))
    kl[(outliers > 0) & (last <= 0)] = np.inf
    kl[z <= 0] = np.inf
    return kl


# ------------------------------------------------------------------------------------ minmax, percentile


def minmax_amax(hist: StreamingHistogram | BinnedHistogram) -> float:
    """TensorRT's IInt8MinMaxCalibrator: the largest |x| seen (no clipping)."""
    return float(hist.absmax)


def percentile_amax(hist: StreamingHistogram | BinnedHistogram, percentile: float = DEFAULT_PERCENTILE) -> float:
    """The |x| below which `percentile` percent of the values lie (pytorch-quantization's `percentile`).

    Read from the fine internal histogram (interpolated inside a bin), so it is 8-16x more precise
    than the 2048-bin edge the reference code returns.
    """
    if not 0.0 < percentile <= 100.0:
        raise ConfigError(f"percentile must be in (0, 100], got {percentile}.")
    if isinstance(hist, StreamingHistogram):
        return hist.percentile(percentile)
    counts = hist.counts
    total = float(counts.sum())
    if total <= 0 or hist.absmax <= 0:
        return 0.0
    cum = np.cumsum(counts)
    k = int(np.searchsorted(cum, total * percentile / 100.0, side="left"))
    return float(min((k + 1) * hist.bin_width, hist.absmax))


# ------------------------------------------------------------------------------------------------- mse


def _zero_bin_error(width: np.ndarray | float, step: np.ndarray | float) -> np.ndarray:
    """Mean squared rounding error of values spread uniformly over [0, width) with quantization step `step`.

    Uses G(u) = round(u) / 12 + (u - round(u))**3 / 3, the integral of the squared rounding error
    (in steps) from 0 to u.
    """
    u = np.asarray(width, dtype=np.float64) / np.asarray(step, dtype=np.float64)
    r = np.floor(u + 0.5)
    g = r / 12.0 + (u - r) ** 3 / 3.0
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(u > 0, np.asarray(step, dtype=np.float64) ** 2 * g / np.where(u > 0, u, 1.0), 0.0)


def quantization_mse(hist: StreamingHistogram | BinnedHistogram, amax: float) -> float:
    """Expected squared error per value of symmetric int8 quantization (127 levels) clipped at `amax`.

    Values are taken as spread uniformly inside their histogram bin (the bin holding absmax ends at
    absmax). Inside [0, amax] the rounding error is step**2 / 12 per value (step = amax / 127; exact for
    values spread over whole steps), except in bin 0, where a ReLU's exact zeros live, which gets its
    exact error. Above amax the clipping error (|x| - amax)**2 is integrated exactly over each bin.
    """
    b = _binned(hist)
    n = b.used_bins
    if n == 0 or b.absmax <= 0:
        return 0.0
    counts = b.counts[:n].astype(np.float64)
    total = float(counts.sum())
    edges = np.minimum(b.edges[: n + 1], b.absmax)
    lo, hi = edges[:-1], edges[1:]
    if amax <= 0:
        return float((counts * (lo * lo + lo * hi + hi * hi) / 3.0).sum() / total)  # everything clipped to 0
    step = amax / INT8_MAX
    width = hi - lo
    with np.errstate(divide="ignore", invalid="ignore"):
        inside = np.where(width > 0, np.clip((np.minimum(hi, amax) - lo) / np.where(width > 0, width, 1.0), 0, 1), 1.0)
        a = np.maximum(lo, amax) - amax
        c = np.maximum(hi, amax) - amax
        err_out = np.where(c > a, (c**3 - a**3) / (3.0 * (c - a)), 0.0)
    err_in = np.full(n, step * step / 12.0)
    err_in[0] = float(_zero_bin_error(min(float(hi[0]), amax), step))
    err = counts * (inside * err_in + (1.0 - inside) * err_out)
    return float(err.sum() / total)


def mse_amax(hist: StreamingHistogram | BinnedHistogram, *, start_bin: int = ENTROPY_START_BIN) -> float:
    """The bin edge (from bin `start_bin`, like the reference code) minimising `quantization_mse`.

    Source: pytorch-quantization / Model Optimizer `HistogramCalibrator` method "mse" (which evaluates
    the error at bin centres); here the same objective as `quantization_mse`, for every candidate
    edge at once through prefix sums: clipping error sum_{k>=i} c_k w^2 ((k-i)^2 + (k-i) + 1/3).
    """
    b = _binned(hist)
    n = b.used_bins
    if b.absmax <= 0 or n < 1:
        return 0.0
    counts = b.counts[:n].astype(np.float64)
    total = float(counts.sum())
    w = b.bin_width
    first = min(start_bin, n)
    cand = np.arange(first, n + 1, dtype=np.float64)
    t = cand * w
    step = t / INT8_MAX
    k = np.arange(n, dtype=np.float64)
    suffix = lambda v: np.concatenate((np.cumsum(v[::-1])[::-1], [0.0]))  # noqa: E731  sum over k >= i
    s0, s1, s2 = suffix(counts), suffix(counts * k), suffix(counts * k * k)
    idx = cand.astype(np.int64)
    clip = w * w * (s2[idx] - (2 * cand - 1) * s1[idx] + (cand * cand - cand + 1.0 / 3.0) * s0[idx])
    clip = np.maximum(clip, 0.0)
    below = total - s0[idx]
    zero_err = _zero_bin_error(np.full(cand.size, w), step)
    inside = counts[0] * zero_err + (below - counts[0]) * step * step / 12.0
    mse = (inside + clip) / total
    i = int(idx[int(np.argmin(mse))])
    return float(min(i * w, b.absmax))


# ------------------------------------------------------------------------------------------------ best


def best_amax(
    hist: StreamingHistogram | BinnedHistogram,
    *,
    percentile: float = DEFAULT_PERCENTILE,
    candidates: Mapping[str, float] | None = None,
) -> tuple[float, str]:
    """The base method whose amax gives the lowest `quantization_mse` on this tensor: (amax, method).

    `candidates` (method -> amax) reuses amax already computed; missing base methods are computed.
    Ties go to the earlier method in BASE_METHODS.
    """
    b = _binned(hist)
    options = dict(candidates or {})
    for m in BASE_METHODS:
        if m not in options:
            options[m] = compute_amax(hist, m, percentile=percentile)
    scored = [(quantization_mse(b, options[m]), BASE_METHODS.index(m), m) for m in BASE_METHODS]
    _, _, chosen = min(scored)
    return float(options[chosen]), chosen


# --------------------------------------------------------------------------------------------- dispatch


def compute_amax(
    hist: StreamingHistogram | BinnedHistogram, method: str, *, percentile: float = DEFAULT_PERCENTILE
) -> float:
    """amax of one tensor's histogram with a named method (ConfigError for an unknown name)."""
    check_method(method)
    if method == "entropy":
        return entropy_amax(hist)
    if method == "minmax":
        return minmax_amax(hist)
    if method == "percentile":
        return percentile_amax(hist, percentile)
    if method == "mse":
        return mse_amax(hist)
    return best_amax(hist, percentile=percentile)[0]


SEARCH_THREADS = 4
"""The most threads `compute_all` searches tensors on (fewer where fewer cores are usable)."""


def compute_all(
    stats: Any,
    methods: Iterable[str],
    *,
    percentile: float = DEFAULT_PERCENTILE,
    kinds: Iterable[str] | None = None,
    known: Mapping[str, Mapping[str, float]] | None = None,
) -> dict[str, dict[str, float]]:
    """method -> tensor -> amax for every histogram of `stats` (CollectedStats or name -> histogram).

    `kinds` restricts to tensors of those kinds (needs CollectedStats). `best` reuses the other
    methods' results where they are also requested. `known`: method -> tensor -> amax this function already gave
    for some of the histograms (the weights', searched during the data pass): taken, not searched again; the
    result lists the tensors in `stats`' order either way.
    """
    methods = [check_method(m) for m in methods]
    hists: Mapping[str, StreamingHistogram] = getattr(stats, "histograms", stats)
    if kinds is not None:
        wanted = set(kinds)
        hists = {n: h for n, h in hists.items() if stats.kinds[n] in wanted}
    out: dict[str, dict[str, float]] = {m: {} for m in methods}
    done = {n for n in hists if known and all(n in known.get(m, {}) for m in methods)}
    names = [n for n in hists if n not in done]
    # Equal binned histograms (a Reshape's and its input's, collect.py) give equal results: searched once.
    memo: dict[tuple[Any, ...], float] = {}
    # Tensors are independent and numpy releases the GIL in the search's array work: a few threads
    # (each tensor's result is the same whatever thread computes it).
    threads = min(_cores(), SEARCH_THREADS, len(names))
    if threads > 1:
        with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
            results = list(pool.map(lambda n: _tensor_amax(hists[n], methods, percentile, memo), names))
    else:
        results = [_tensor_amax(hists[n], methods, percentile, memo) for n in names]
    found = dict(zip(names, results, strict=True))
    for name in hists:
        for m in methods:
            out[m][name] = known[m][name] if name in done else found[name][m]  # type: ignore[index]
    return out


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _tensor_amax(hist: StreamingHistogram, methods: list[str], percentile: float,
                 memo: dict[tuple[Any, ...], float]) -> dict[str, float]:
    """method -> amax of one tensor (`best` reuses the other methods' results). `memo`: binned results by
    histogram, shared by the tensors of one call (a race only computes the same value twice)."""
    binned = hist.binned()
    key = (binned.counts.tobytes(), binned.bin_width, binned.absmax, binned.num_values)

    def amax(m: str) -> float:
        if m == "percentile":
            return percentile_amax(hist, percentile)
        entry = (m, *key)
        if entry not in memo:
            memo[entry] = compute_amax_binned(binned, m)
        return memo[entry]

    done = {m: amax(m) for m in methods if m != "best"}
    if "best" in methods:
        done.update({m: amax(m) for m in BASE_METHODS if m not in done})
        done["best"] = best_amax(binned, candidates=done)[0]
    return done


def compute_amax_binned(binned: BinnedHistogram, method: str) -> float:
    """entropy / minmax / mse on an already binned histogram (percentile needs the streaming one)."""
    if method == "entropy":
        return entropy_amax(binned)
    if method == "minmax":
        return minmax_amax(binned)
    if method == "mse":
        return mse_amax(binned)
    raise ConfigError(f"method {method!r} needs the streaming histogram, not a binned one.")
