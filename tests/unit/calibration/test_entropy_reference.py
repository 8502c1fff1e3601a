"""The entropy threshold against an independent implementation of the published search.

The reference below is written from the published description, one candidate at a time, and shares no code
with quantpipe.calibration.methods (which works on prefix sums, all candidates at once).

Source: Szymon Migacz, "8-bit Inference with TensorRT", GTC 2017, the calibration pseudo-code:

    for i in range(128, num_bins + 1):                 # every candidate, empty tail bins included
        P = bins[0 .. i-1];  P[i-1] += sum(bins[i ..])  # outliers folded into the last kept bin
        Q = bins[0 .. i-1] quantized into 128 levels, expanded back to i bins, empty bins kept empty
        divergence[i] = KL(P / sum(P) || Q / sum(Q))
    threshold = edge of the bin where the divergence is smallest

with the conventions NVIDIA's own reimplementation of the same calibrator (pytorch-quantization /
Model Optimizer `HistogramCalibrator`, method "entropy") uses where the talk leaves a choice:
- bin 0 takes bin 1's count first (the exact zeros of a ReLU would otherwise dominate P);
- bin j of the first i goes to level floor(128 j / i); a level's count is shared equally by its
  non-empty bins (non-empty in the histogram, before the outliers are folded in);
- KL is infinite when P has mass where Q has none (the last kept bin is empty but outliers fold into it);
- the threshold is the right edge of bin i-1, i * bin_width, capped at absmax;
- on equal divergence the largest i wins.

Thresholds are compared bit for bit (`==` on the float): both sides return min(i * bin_width, absmax) for
an integer i, so any difference is a different candidate.
"""

from __future__ import annotations

import math

import numpy as np

from quantpipe.calibration.histogram import BinnedHistogram, StreamingHistogram
from quantpipe.calibration.methods import entropy_amax

LEVELS = 128
FIRST = 128
TIE = 1e-12
"""Two divergences within TIE * max(1, |min|) of each other are equal (float64 rounding of the sums)."""


def published_entropy(
    counts: np.ndarray, bin_width: float, absmax: float, *, levels: int = LEVELS, first: int = FIRST
) -> tuple[float, int | None]:
    """(threshold, winning i) of the published KL search; i is None when no candidate has a finite KL."""
    h = np.asarray(counts, dtype=np.float64).copy()
    n = h.size
    if absmax <= 0.0 or n < 2 or not h[1:].any():
        return max(absmax, 0.0), None
    h[0] = h[1]
    kls: dict[int, float] = {}
    for i in range(min(first, n), n + 1):
        kept = h[:i]
        p = kept.copy()
        p[i - 1] += h[i:].sum()
        level = np.arange(i) * levels // i
        level_count = np.bincount(level, weights=kept, minlength=levels)
        level_kept = np.bincount(level, weights=kept > 0, minlength=levels)
        q = np.where(kept > 0, level_count[level] / np.maximum(level_kept[level], 1.0), 0.0)
        if p.sum() <= 0 or q.sum() <= 0 or np.any((p > 0) & (q <= 0)):
            continue  # no distribution, or P has mass where Q has none: KL infinite
        p, q = p / p.sum(), q / q.sum()
        m = p > 0
        kls[i] = float(np.sum(p[m] * np.log(p[m] / q[m])))
    if not kls:
        return float(absmax), None
    low = min(kls.values())
    i = max(k for k, v in kls.items() if v <= low + TIE * max(1.0, abs(low)))
    return float(min(i * bin_width, absmax)), i


def _quantpipe_grid_width(absmax: float, num_bins: int = 2048) -> float:
    """The bin width the streaming histogram fits to absmax (histogram.py's docstring), from scratch."""
    fine_width = 2.0 ** math.frexp(absmax)[1] / (num_bins * 32)
    return math.ceil(absmax / (num_bins * fine_width)) * fine_width


# ---------------------------------------------------------------------------------------- hand-checked


def test_an_empty_tail_bin_wins_by_hand() -> None:
    # 5 bins of width 0.5, the last one empty (absmax 1.75 lies in bin 3); 2 levels, candidates i = 2..5.
    # bins = [3, 3, 4, 2, 0] (bin 0 already equals bin 1), 12 values.
    # i=2: P = [3, 9]/12, Q = [3, 3]/6 (levels {0}, {1})                KL = 1/4 ln(1/2) + 3/4 ln(3/2) = 0.1308
    # i=3: P = [3, 3, 6]/12, Q = [3, 3, 4]/10 (levels {0, 1}, {2})      KL = 1/2 ln(10/12) + 1/2 ln(5/4) = 0.0204
    # i=4: P = [3, 3, 4, 2]/12, Q = [3, 3, 3, 3]/12 ({0, 1}, {2, 3})    KL = 1/3 ln(4/3) + 1/6 ln(2/3) = 0.0283
    # i=5: P = [3, 3, 4, 2, 0]/12; levels {0, 1, 2}, {3, 4}: Q = [10/3, 10/3, 10/3, 2, 0]/12
    #                                                                    KL = 1/2 ln(9/10) + 1/3 ln(6/5) = 0.0081
    # The empty tail candidate i=5 wins: threshold min(5 * 0.5, absmax) = 1.75. A search that stops at the
    # last non-empty bin (i <= 4) picks i=3, 1.5.
    kl = {
        2: 0.25 * math.log(1 / 2) + 0.75 * math.log(3 / 2),
        3: 0.5 * math.log(10 / 12) + 0.5 * math.log(5 / 4),
        4: math.log(4 / 3) / 3 + math.log(2 / 3) / 6,
        5: 0.5 * math.log(9 / 10) + math.log(6 / 5) / 3,
    }
    assert min(kl, key=kl.__getitem__) == 5 and min((2, 3, 4), key=kl.__getitem__) == 3
    counts = np.array([3, 3, 4, 2, 0])
    assert published_entropy(counts, 0.5, 1.75, levels=2, first=2) == (1.75, 5)
    hist = BinnedHistogram(counts, 0.5, 1.75, 12)
    assert entropy_amax(hist, quant_bins=2, start_bin=2) == 1.75


def test_an_empty_last_kept_bin_with_outliers_is_never_chosen_by_hand() -> None:
    # bins = [2, 2, 0, 5], 2 levels: i=3 keeps bin 2 (empty) and folds the 5 outliers into it, where Q is 0:
    # KL infinite. i=2: P = [2, 7]/9, Q = [2, 2]/4: KL = 2/9 ln(4/9) + 7/9 ln(14/9) = 0.1634;
    # i=4: Q = [2, 2, 0, 5]/9 = P: KL 0, so the full range wins.
    counts = np.array([2, 2, 0, 5])
    assert published_entropy(counts, 1.0, 3.5, levels=2, first=2) == (3.5, 4)
    assert entropy_amax(BinnedHistogram(counts, 1.0, 3.5, 9), quant_bins=2, start_bin=2) == 3.5
    # With an empty tail bin, i=5 (levels {0, 1, 2}, {3, 4}: Q = [2, 2, 0, 5, 0]) equals P as well: a tie at
    # KL 0, which the largest i wins.
    tail = np.array([2, 2, 0, 5, 0])
    assert published_entropy(tail, 1.0, 3.5, levels=2, first=2) == (3.5, 5)
    assert entropy_amax(BinnedHistogram(tail, 1.0, 3.5, 9), quant_bins=2, start_bin=2) == 3.5


# ----------------------------------------------------------------------------------------- generated sweep

SAMPLES = {
    "gaussian": lambda r, n: r.standard_normal(n),
    "laplace": lambda r, n: r.laplace(size=n),
    "uniform": lambda r, n: r.uniform(-1.0, 1.0, n),
    "bimodal": lambda r, n: np.concatenate([r.normal(-2.0, 0.3, n // 2), r.normal(1.0, 0.6, n - n // 2)]),
    "outliers": lambda r, n: np.concatenate([r.standard_t(4, n), r.standard_normal(int(r.integers(1, 20))) * 40]),
    "relu_zero_spike": lambda r, n: np.maximum(r.standard_normal(n) + r.uniform(-1.5, 0.5), 0.0),
    "relu6": lambda r, n: np.clip(r.normal(2.0, 3.0, n), 0.0, 6.0),
    "sparse": lambda r, n: np.where(r.random(n) < 0.05, r.laplace(size=n), 0.0),
    "lognormal": lambda r, n: r.lognormal(0.0, 1.0, n),
}


def _sampled(seed: int, name: str, num_bins: int) -> BinnedHistogram:
    """The production path: float32 samples through the streaming histogram (2048 bins is TensorRT's)."""
    r = np.random.default_rng(seed)
    x = SAMPLES[name](r, int(r.integers(300, 40000))).astype(np.float32)
    h = StreamingHistogram(num_bins)
    for part in np.array_split(x, 3):
        h.update(part)
    b = h.binned()
    assert b.bin_width == _quantpipe_grid_width(float(np.abs(x).max()), num_bins)  # the grid the docstring describes
    return b


def _synthetic(seed: int) -> BinnedHistogram:
    """Counts drawn directly: a shape (decay, flat, two bumps, isolated outliers after gaps, a ReLU spike)
    ending far below num_bins or close to it, with Poisson noise."""
    r = np.random.default_rng(seed)
    n = int(r.choice([256, 512, 2048], p=[0.5, 0.45, 0.05]))
    used = int(r.integers(2, n + 1)) if r.random() < 0.6 else int(r.integers(n - n // 16, n + 1))
    j = np.arange(used, dtype=np.float64)
    shape = r.integers(0, 4)
    lam = [np.exp(-j / r.uniform(1, used)), np.ones(used), np.exp(-(((j - used / 3) / (used / 8 + 1)) ** 2))
           + np.exp(-(((j - used * 0.8) / (used / 10 + 1)) ** 2)), 1.0 / (1.0 + j)][shape]
    counts = np.zeros(n, dtype=np.int64)
    counts[:used] = r.poisson(lam * r.choice([5.0, 100.0, 10000.0]))
    if r.random() < 0.3:  # isolated outliers
        counts[r.integers(0, used, size=int(r.integers(1, 6)))] += r.integers(1, 4)
    if r.random() < 0.3:  # a ReLU's exact zeros
        counts[0] += int(counts.sum() * r.uniform(1, 50)) + 1
    counts[used - 1] = max(counts[used - 1], 1)
    width = float(r.uniform(1e-4, 10.0))
    absmax = (used - 1 + float(r.uniform(0.0, 1.0))) * width
    return BinnedHistogram(counts, width, absmax, int(counts.sum()))


def _sweep() -> list[tuple[str, BinnedHistogram]]:
    # The reference is O(num_bins**2) per histogram (about 0.08 s at 2048 bins): most cases use fewer bins.
    out = [(f"{name}-{s}", _sampled(1000 * k + s, name, 2048 if s < 2 else 512))
           for k, name in enumerate(SAMPLES) for s in range(6)]
    out += [(f"synthetic-{s}", _synthetic(s)) for s in range(300)]
    return out


def test_identical_to_the_published_search_on_generated_histograms() -> None:
    cases = _sweep()
    differ = []
    tail_wins = 0
    for name, b in cases:
        expected, i = published_entropy(b.counts, b.bin_width, b.absmax)
        got = entropy_amax(b)
        if got != expected:
            differ.append(f"{name}: quantpipe {got!r}, published {expected!r} (i={i})")
        tail_wins += i is not None and i > b.used_bins
    assert not differ, f"{len(differ)} of {len(cases)} differ:\n" + "\n".join(differ[:20])
    assert tail_wins >= 10  # the sweep exercises the empty tail candidates
