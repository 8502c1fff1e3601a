"""Streaming histograms of |x|: fixed memory, growing range, exact merges, the same bits whatever the batching.

Design: why it is deterministic. A histogram keeps `fine_bins` int64 counts (65536: 32 per output bin)
over a range `R = 2**e` that is always a power of two strictly above every |x| seen so far. A value's
fine bin is `floor(|x| * (fine_bins / R))`; `fine_bins / R` is a power of two, so the product is exact
in float32 and the truncating cast is an exact floor. When a value reaches R, the range doubles (as
often as needed) and bin pairs are summed: `floor(floor(y) / 2) == floor(y / 2)`, so the counts are
exactly those a histogram started at the larger range would hold. The final range is the smallest
power of two above the overall max |x|, and every count is a function of the data alone: the same data
in any batching, order or sharding (`merge`) gives bit-identical counts.

How it meets TensorRT's semantics: `binned()`. TensorRT's entropy calibrator works on 2048 equal bins
of |x| over [0, absmax]. An exact histogram over exactly [0, absmax] cannot be streamed in bounded memory
(absmax, hence every bin edge, is known only at the end), and an approximate one is not good enough:
the KL search is discontinuous, and spreading fine bins fractionally over [0, absmax] edges moved the
entropy threshold by up to 264 bins (of 2048) on 200k Laplace samples, against an exact histogram of the
same data. So `binned()` returns an EXACT histogram instead, on the closest grid the fine bins allow:
2048 bins of width `q * fine_width`, with q = ceil(absmax / (2048 * fine_width)) whole fine bins each.
That is precisely `np.histogram(|x|, 2048, range=(0, 2048 * q * fine_width))`. Because the data fills
between half and all of the fine bins, q is between 16 and 32, and the bins are between 1 and
(q + 1) / q <= 17/16 times TensorRT's absmax / 2048: the last bin holding data is bin 1920..2047, and
thresholds are multiples of a bin width at most 6.25% wider than TensorRT's. Methods never return more
than absmax.

The hot path is vectorised: per chunk of a tensor, abs, max, multiply, cast to uint16 and one
`bincount`, on numpy (CPU) or CuPy (GPU) arrays alike; NaN and Inf are rejected (ValueError).
`SignedHistogram` bins a tensor's positive and negative sides apart in the same single pass, which gives
the exact histogram of a Relu of it for free.
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from quantpipe.calibration import gpu_bins
from quantpipe.config import CalibrationConfig

__all__ = ["StreamingHistogram", "SignedHistogram", "BinnedHistogram", "DEFAULT_NUM_BINS", "DEFAULT_OVERSAMPLE",
           "InfiniteValues", "device_extremes"]

DEFAULT_NUM_BINS: int = CalibrationConfig.model_fields["num_bins"].default
"""TensorRT's histogram size (2048 bins); pipeline.yaml's calibration.num_bins default."""
DEFAULT_OVERSAMPLE = 32
"""Fine bins per output bin at the full range (16..32 once the grid is fitted to absmax)."""

_CHUNK = 1 << 18
"""Elements per step of the CPU hot path: large enough to amortise bincount's per-call output array,
small enough that the scratch arrays stay near the core's cache."""

_F32_MAX_EXP = 127
_F32_MIN_EXP = -126
GPU_KERNEL = True
"""CuPy arrays are binned by `gpu_bins`' fused kernel, the counts kept on the device; False: by CuPy's array
functions and `bincount`, the counts copied to the host each update (the same counts; benchmarks/gpu_bins.py
times the two)."""
_TINY = 2.0**-100
"""Below this absmax the GPU path bins in float64 (subnormal float32 may be flushed to zero there);
above it, a flushed subnormal would have landed in bin 0 anyway (|x| * 2**p < 2**-10)."""


@dataclass(frozen=True)
class BinnedHistogram:
    """`counts[i]` values of |x| fell in [i * bin_width, (i + 1) * bin_width) (the last bin is closed)."""

    counts: np.ndarray
    bin_width: float
    absmax: float
    """Largest |x|; no method returns more."""
    num_values: int

    @property
    def num_bins(self) -> int:
        return int(self.counts.size)

    @property
    def edges(self) -> np.ndarray:
        return np.arange(self.counts.size + 1, dtype=np.float64) * self.bin_width

    @property
    def used_bins(self) -> int:
        """Bins up to and including the last non-empty one (the one holding absmax)."""
        nz = np.flatnonzero(self.counts)
        return int(nz[-1]) + 1 if nz.size else 0


class InfiniteValues(ValueError):
    """The tensor holds +-Inf and no NaN: an additive attention mask written with -inf, not a range to calibrate
    (the caller leaves the tensor without a histogram; NaN stays a plain ValueError)."""


def _non_finite(hi: float, lo: float) -> ValueError:
    """The error for extremes that are not both finite: NaN where either is NaN (max and min propagate it), else
    InfiniteValues."""
    if math.isnan(hi) or math.isnan(lo):
        return ValueError("NaN value")
    return InfiniteValues("Inf value")


def _is_cupy(x: Any) -> bool:
    """A CuPy array (checked without importing CuPy)."""
    return not isinstance(x, np.ndarray) and type(x).__module__.split(".")[0] == "cupy"


def device_extremes(arrays: Sequence[Any]) -> list[tuple[float, float] | None]:
    """Each CuPy array's (max, min) in float32, all read back from the device in one copy: a batch's tensors then
    cost one synchronisation, not one each (`update(x, extremes)`). None for a numpy or an empty array. A float16
    or float64 array's extremes cast to float32 are those of its float32 cast (rounding keeps the order)."""
    at = [k for k, a in enumerate(arrays) if _is_cupy(a) and a.size]
    out: list[tuple[float, float] | None] = [None] * len(arrays)
    if at:
        cp = sys.modules["cupy"]
        both = cp.stack([cp.stack([arrays[k].max(), arrays[k].min()]).astype(cp.float32) for k in at]).get()
        for k, (hi, lo) in zip(at, both.tolist(), strict=True):
            out[k] = (float(hi), float(lo))
    return out


def _flat_f32(x: Any) -> np.ndarray:
    """`x` as a flat float32 numpy array: float16/bfloat16 widen exactly; float64 rounds once per element,
    whatever the batching."""
    arr = np.asarray(x)
    return (arr if arr.dtype == np.float32 else arr.astype(np.float32)).reshape(-1)


class _Scratch(threading.local):
    """Per-thread scratch buffers for the CPU hot path (histograms may be updated from worker threads)."""

    def __init__(self) -> None:
        self.f32 = np.empty(_CHUNK, dtype=np.float32)
        self.u16 = np.empty(_CHUNK, dtype=np.uint16)
        self.u32 = np.empty(_CHUNK, dtype=np.uint32)
        self.i32 = np.empty(_CHUNK, dtype=np.int32)
        self.f32b = np.empty(_CHUNK, dtype=np.float32)


_scratch = _Scratch()


def _abs_from_bits(flat: Any, xp: Any) -> Any:
    """|x| of float32 values as exact float64, decoded from the bit patterns (no float32 arithmetic)."""
    bits = flat.view(xp.uint32) & xp.uint32(0x7FFFFFFF)
    exp = (bits >> xp.uint32(23)).astype(xp.int32)
    man = (bits & xp.uint32(0x7FFFFF)).astype(xp.float64)
    normal = exp > 0
    return xp.ldexp(xp.where(normal, man + 8388608.0, man), xp.where(normal, exp - 150, -149))


class StreamingHistogram:
    """Histogram of |x| with a fixed number of bins and a power-of-two range that grows as data arrives.

    Args:
        num_bins: bins of the TensorRT-style histogram `binned()` returns.
        oversample: fine bins per output bin; `num_bins * oversample` is rounded up to a power of two.
    """

    __slots__ = ("num_bins", "fine_bins", "_counts", "_device_counts", "range_exp", "absmax", "num_values")

    def __init__(self, num_bins: int = DEFAULT_NUM_BINS, *, oversample: int = DEFAULT_OVERSAMPLE) -> None:
        if num_bins < 1 or oversample < 2:
            raise ValueError(f"num_bins must be >= 1 and oversample >= 2, got {num_bins} and {oversample}")
        self.num_bins = int(num_bins)
        self.fine_bins = 1 << max(1, math.ceil(math.log2(num_bins * oversample)))
        self._counts = np.zeros(self.fine_bins, dtype=np.int64)
        self._device_counts: Any = None
        """Counts added on the GPU since they were last read (CuPy uint64; `gpu_bins`), at the current range."""
        self.range_exp: int | None = None
        """The range is 2**range_exp (None until a non-zero value arrives; zeros are bin 0 at any range)."""
        self.absmax = 0.0
        self.num_values = 0

    # ------------------------------------------------------------------------------------------ state

    @property
    def counts(self) -> np.ndarray:
        """The fine bins' counts (int64, on the host: counts the GPU added are copied over first)."""
        if self._device_counts is not None:
            pending, self._device_counts = self._device_counts, None
            self._counts += pending.get().astype(np.int64)
        return self._counts

    @counts.setter
    def counts(self, value: np.ndarray) -> None:
        self._device_counts = None  # the value read them in, or replaces them
        self._counts = value

    @property
    def range(self) -> float:
        """Upper end of the fine bins (0 before any non-zero value)."""
        return 0.0 if self.range_exp is None else math.ldexp(1.0, self.range_exp)

    @property
    def fine_width(self) -> float:
        return self.range / self.fine_bins

    @property
    def _fine_bits(self) -> int:
        return self.fine_bins.bit_length() - 1

    def copy(self) -> StreamingHistogram:
        out = StreamingHistogram.__new__(StreamingHistogram)
        out.num_bins, out.fine_bins = self.num_bins, self.fine_bins
        out.counts = self.counts.copy()  # the setter leaves no device counts pending
        out.range_exp, out.absmax, out.num_values = self.range_exp, self.absmax, self.num_values
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StreamingHistogram):
            return NotImplemented
        return (self.num_bins, self.fine_bins, self.range_exp, self.absmax, self.num_values) == (
            other.num_bins, other.fine_bins, other.range_exp, other.absmax, other.num_values
        ) and bool(np.array_equal(self.counts, other.counts))

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return (f"StreamingHistogram(num_bins={self.num_bins}, fine_bins={self.fine_bins}, absmax={self.absmax!r}, "
                f"range=2**{self.range_exp}, num_values={self.num_values})")

    def _grow_to(self, exp: int) -> None:
        """Raise the range to 2**exp, summing groups of 2**shift fine bins (exact for integer counts)."""
        if self.range_exp is None:
            self.range_exp = exp
            return
        shift = exp - self.range_exp
        if shift <= 0:
            return
        merged = np.zeros_like(self.counts)
        if shift >= self._fine_bits:
            merged[0] = self.counts.sum()
        else:
            merged[: self.fine_bins >> shift] = self.counts.reshape(-1, 1 << shift).sum(axis=1)
        self.counts = merged
        self.range_exp = exp

    def _hold(self, m: float) -> int:
        """Grow the range so that R > m (strictly: |x| == R would index past the last bin); return the
        exponent p with fine index = floor(|x| * 2**p)."""
        _, e = math.frexp(m)  # m = f * 2**e with 0.5 <= f < 1, so m < 2**e
        if self.range_exp is None or e > self.range_exp:
            self._grow_to(e)
        return self._fine_bits - (self.range_exp if self.range_exp is not None else e)

    # ----------------------------------------------------------------------------------------- update

    def update(self, x: Any, extremes: tuple[float, float] | None = None) -> None:
        """Add every element of `x` (numpy array, or CuPy array on the GPU path). `extremes`: a CuPy array's
        (max, min) as `device_extremes` read them, so that this update reads nothing back from the device.

        Raises:
            ValueError: `x` holds NaN (the caller names the tensor); InfiniteValues (a ValueError): Inf and no NaN.
        """
        if _is_cupy(x):
            self._update_generic(x, sys.modules["cupy"], extremes)
            return
        flat = _flat_f32(x)
        if flat.size == 0:
            return
        scratch = _scratch
        for start in range(0, flat.size, _CHUNK):
            chunk = flat[start:start + _CHUNK]
            k = chunk.size
            buf = scratch.f32[:k]
            np.abs(chunk, out=buf)
            m = float(buf.max())
            if not math.isfinite(m):
                raise _non_finite(m, m)
            if m > self.absmax:
                self.absmax = m
            if m == 0.0:
                self.counts[0] += k
                continue
            idx = self._fine_index(buf, self._hold(m), scratch)
            self.counts += np.bincount(idx, minlength=self.fine_bins)
        self.num_values += flat.size

    def _fine_index(self, buf: np.ndarray, pexp: int, scratch: _Scratch) -> np.ndarray:
        """floor(|x| * 2**pexp) for the |x| in `buf` (overwritten)."""
        k = buf.size
        out = scratch.u16[:k] if self.fine_bins <= 1 << 16 else scratch.u32[:k]
        if _F32_MIN_EXP <= pexp <= _F32_MAX_EXP:
            # A power-of-two factor: the product is exact (an underflow only touches values < 1, which
            # floor to 0 either way) and below fine_bins, so the truncating cast is an exact floor.
            np.multiply(buf, np.float32(math.ldexp(1.0, pexp)), out=buf)
            np.copyto(out, buf, casting="unsafe")
        else:
            # Subnormal-scale data: 2**pexp is no float32, but float64 holds the same exact products.
            np.copyto(out, np.ldexp(buf.astype(np.float64), pexp), casting="unsafe")
        return out

    def _update_generic(self, x: Any, xp: Any, extremes: tuple[float, float] | None = None) -> None:
        """The same arithmetic with any array module that has numpy's API (CuPy), whole tensor at once."""
        flat = x.reshape(-1)
        n = int(flat.size)
        if n == 0:
            return
        mag = xp.abs(flat if flat.dtype == xp.float32 else flat.astype(xp.float32))
        if extremes is not None:  # max |x| of the same float32 values, without a read-back here
            hi, lo = extremes
            if not (math.isfinite(hi) and math.isfinite(lo)):
                raise _non_finite(hi, lo)
            m = max(hi, -lo)
        else:
            m = float(mag.max())
            if not math.isfinite(m):
                raise _non_finite(m, m)
        if m < _TINY:
            # GPU kernels may flush float32 subnormals to zero (in arithmetic and in casts): at this scale
            # decode |x| from its bits into float64, where the values are normal and the products exact.
            mag = _abs_from_bits(flat if flat.dtype == xp.float32 else flat.astype(xp.float32), xp)
            m = float(mag.max())
        if m > self.absmax:
            self.absmax = m
        if m == 0.0:
            self.counts[0] += n
        else:
            pexp = self._hold(m)
            # (`xp is ...` last: mypy narrows xp to the module lookup's `ModuleType | None` after it)
            if (GPU_KERNEL and mag.dtype == xp.float32 and xp is sys.modules.get("cupy")
                    and _F32_MIN_EXP <= pexp <= _F32_MAX_EXP):
                # One fused kernel, the counts left on the device (gpu_bins): the same bins as below.
                gpu_bins.abs_bins(xp, mag, math.ldexp(1.0, pexp), self._pending(xp))
            elif mag.dtype == xp.float32 and _F32_MIN_EXP <= pexp <= _F32_MAX_EXP:
                idx = (mag * xp.float32(math.ldexp(1.0, pexp))).astype(xp.int32)
                self._add_bincount(xp.bincount(idx, minlength=self.fine_bins))
            else:
                idx = xp.ldexp(mag.astype(xp.float64), pexp).astype(xp.int32)
                self._add_bincount(xp.bincount(idx, minlength=self.fine_bins))
        self.num_values += n

    def _pending(self, cp: Any) -> Any:
        """The device counts to add to (zeros after each read of `counts`)."""
        if self._device_counts is None:
            self._device_counts = cp.zeros(self.fine_bins, dtype=cp.uint64)
        return self._device_counts

    def _add_bincount(self, counts: Any) -> None:
        self.counts += np.asarray(counts.get() if hasattr(counts, "get") else counts, dtype=np.int64)

    # ------------------------------------------------------------------------------------------ merge

    def merge(self, other: StreamingHistogram) -> StreamingHistogram:
        """A new histogram of both inputs' data (shards, GPUs): equal to one fed all of the data."""
        if (self.num_bins, self.fine_bins) != (other.num_bins, other.fine_bins):
            raise ValueError(f"cannot merge histograms of {self.num_bins}/{self.fine_bins} and "
                             f"{other.num_bins}/{other.fine_bins} bins")
        a, b = self.copy(), other.copy()
        exps = [e for e in (a.range_exp, b.range_exp) if e is not None]
        if exps:
            a._grow_to(max(exps))
            b._grow_to(max(exps))
        a.counts += b.counts
        a.absmax = max(a.absmax, b.absmax)
        a.num_values += b.num_values
        return a

    # ------------------------------------------------------------------------------------------ views

    def binned(self) -> BinnedHistogram:
        """The exact TensorRT-style histogram: `num_bins` bins of q whole fine bins each, q the fewest
        that cover absmax (see the module docstring)."""
        nb = self.num_bins
        if self.num_values == 0 or self.absmax == 0.0 or self.range_exp is None:
            out = np.zeros(nb, dtype=np.int64)
            out[0] = self.num_values
            return BinnedHistogram(out, 0.0, 0.0, self.num_values)
        scaled = math.ldexp(self.absmax, self._fine_bits - self.range_exp)  # absmax / fine_width, exact
        q = max(1, math.ceil(scaled / nb))
        top = min(int(scaled), self.fine_bins - 1)  # the fine bin holding absmax: none above it is used
        starts = np.arange(0, top + 1, q)[:nb]  # the last output bin takes whatever lies beyond nb * q
        out = np.zeros(nb, dtype=np.int64)
        out[: starts.size] = np.add.reduceat(self.counts[: top + 1], starts)
        return BinnedHistogram(out, q * self.fine_width, self.absmax, self.num_values)

    def percentile(self, q: float) -> float:
        """The |x| below which `q` percent of the values lie (linear inside a fine bin; at most absmax)."""
        if self.num_values == 0 or self.absmax == 0.0 or self.range_exp is None:
            return 0.0
        if q >= 100.0:
            return self.absmax
        target = self.num_values * max(q, 0.0) / 100.0
        cum = np.cumsum(self.counts)
        k = min(int(np.searchsorted(cum, target, side="left")), self.fine_bins - 1)
        w = self.fine_width
        before = float(cum[k - 1]) if k > 0 else 0.0
        left = k * w
        right = min(left + w, self.absmax)
        c = float(self.counts[k])
        value = left + max(right - left, 0.0) * ((target - before) / c if c > 0 else 1.0)
        return float(min(max(value, 0.0), self.absmax))

    def summary(self, percentiles: tuple[float, ...] = (50.0, 90.0, 99.0, 99.9, 99.99)) -> dict[str, Any]:
        """Small JSON-able description for the calibration sidecar."""
        binned = self.binned()
        return {
            "absmax": self.absmax,
            "num_values": self.num_values,
            "zero_bin_fraction": float(self.counts[0]) / self.num_values if self.num_values else 0.0,
            "num_bins": self.num_bins,
            "bin_width": binned.bin_width,
            "nonzero_bins": int(np.count_nonzero(binned.counts)),
            "percentiles": {f"{p:g}": self.percentile(p) for p in percentiles},
        }

    # ---------------------------------------------------------------------------------- (de)serialise

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle compactly (a shard's histograms travel between processes): the counts up to the last non-zero
        one, in the smallest unsigned type that holds them; unpickled to exactly the same histogram."""
        nz = np.flatnonzero(self.counts)
        used = self.counts[: int(nz[-1]) + 1] if nz.size else self.counts[:0]
        top = int(used.max()) if used.size else 0
        dtype = next(t for t in (np.uint8, np.uint16, np.uint32, np.uint64) if top <= np.iinfo(t).max)
        return (_unpickle, (self.num_bins, self.fine_bins, used.astype(dtype), self.range_exp, self.absmax,
                            self.num_values))

    @classmethod
    def from_state(
        cls, num_bins: int, counts: np.ndarray, range_exp: int | None, absmax: float, num_values: int
    ) -> StreamingHistogram:
        """Rebuild a histogram from its saved state (see histfile.save_histograms)."""
        counts = np.asarray(counts, dtype=np.int64).reshape(-1)
        if counts.size < 2 or counts.size & (counts.size - 1):
            raise ValueError(f"a histogram needs a power-of-two number of fine bins, got {counts.size}")
        h = cls.__new__(cls)
        h.num_bins, h.fine_bins = int(num_bins), int(counts.size)
        h.counts = counts.copy()
        h.range_exp = None if range_exp is None else int(range_exp)
        h.absmax, h.num_values = float(absmax), int(num_values)
        return h


def _unpickle(num_bins: int, fine_bins: int, used: np.ndarray, range_exp: int | None, absmax: float,
              num_values: int) -> StreamingHistogram:
    counts = np.zeros(fine_bins, dtype=np.int64)
    counts[: used.size] = used
    return StreamingHistogram.from_state(num_bins, counts, range_exp, absmax, num_values)


class SignedHistogram:
    """Histograms of relu(x) and relu(-x) fed in one pass: |x| and relu(x) histograms both follow exactly.

    For a tensor that feeds a Relu, the Relu's output needs no pass of its own: `relu()` is bit-identical
    to a StreamingHistogram fed relu(x), and `absolute()` to one fed x. Each side keeps its own
    power-of-two range, so each is exact (each element adds one value to both sides, one of them 0; the
    |x| histogram is their merge less those n extra zeros, which always sit in bin 0).
    """

    __slots__ = ("pos", "neg")

    def __init__(self, num_bins: int = DEFAULT_NUM_BINS, *, oversample: int = DEFAULT_OVERSAMPLE) -> None:
        self.pos = StreamingHistogram(num_bins, oversample=oversample)
        self.neg = StreamingHistogram(num_bins, oversample=oversample)
        if self.pos.fine_bins > 1 << 16:
            raise ValueError("SignedHistogram supports at most 65536 fine bins")

    def relu(self) -> StreamingHistogram:
        """The histogram of relu(x) (equal to StreamingHistogram fed relu(x))."""
        return self.pos.copy()

    def absolute(self) -> StreamingHistogram:
        """The histogram of |x| (equal to StreamingHistogram fed x)."""
        merged = self.pos.merge(self.neg)
        merged.counts[0] -= self.pos.num_values
        merged.num_values = self.pos.num_values
        return merged

    def merge(self, other: SignedHistogram) -> SignedHistogram:
        """A new signed histogram of both inputs' data (shards): each side merges exactly."""
        out = SignedHistogram.__new__(SignedHistogram)
        out.pos, out.neg = self.pos.merge(other.pos), self.neg.merge(other.neg)
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SignedHistogram):
            return NotImplemented
        return self.pos == other.pos and self.neg == other.neg

    __hash__ = None  # type: ignore[assignment]  # mutable

    def _fused(self, cp: Any, flat: Any, extremes: tuple[float, float] | None = None) -> bool:
        """Both sides of the float32 CuPy array `flat` in one kernel (`gpu_bins.signed_bins`), the counts left on the
        device, where every non-zero side is normal-scale; False (nothing done) for the plain path. `extremes`:
        `flat`'s (max, min) when the caller read them already (`device_extremes`)."""
        hi, lo = extremes if extremes is not None else (float(v) for v in cp.stack([flat.max(), flat.min()]).get())
        if not (math.isfinite(hi) and math.isfinite(lo)):
            raise _non_finite(hi, lo)
        tops = (max(hi, 0.0), max(-lo, 0.0))
        if any(0.0 < t < _TINY for t in tops):
            return False  # subnormal scale: the plain path decodes the bits in float64
        scales = []
        for side, top in zip((self.pos, self.neg), tops, strict=True):
            if top == 0.0:
                scales.append(1.0)  # every value of this side is a zero (bin 0 at any scale)
                continue
            pexp = side._hold(top)
            if not _F32_MIN_EXP <= pexp <= _F32_MAX_EXP:
                return False
            scales.append(math.ldexp(1.0, pexp))
        n, fine = int(flat.size), self.pos.fine_bins
        both = cp.zeros(2 * fine, dtype=cp.uint64)
        gpu_bins.signed_bins(cp, flat, scales[0], scales[1], fine, both)
        for side, top, counts in ((self.pos, tops[0], both[:fine]), (self.neg, tops[1], both[fine:])):
            side._pending(cp)[...] += counts
            side.absmax = max(side.absmax, top)
            side.num_values += n
        return True

    def update(self, x: Any, extremes: tuple[float, float] | None = None) -> None:
        """Add every element of `x` (numpy; CuPy in one fused kernel, `gpu_bins`). ValueError on NaN,
        InfiniteValues on Inf.
        `extremes`: as `StreamingHistogram.update` takes them."""
        if _is_cupy(x):
            xp = sys.modules["cupy"]
            flat = (x if x.dtype == xp.float32 else x.astype(xp.float32)).reshape(-1)
            if GPU_KERNEL and flat.size and self._fused(xp, flat, extremes):
                return
            # Split the sides on the bits (GPU arithmetic may flush subnormals), then bin each side.
            bits = flat.view(xp.uint32)
            negative = (bits >> xp.uint32(31)).astype(xp.bool_)
            zero = xp.uint32(0)
            self.pos.update(xp.where(negative, zero, bits).view(xp.float32))
            self.neg.update(xp.where(negative, bits & xp.uint32(0x7FFFFFFF), zero).view(xp.float32))
            return
        flat = _flat_f32(x)
        if flat.size == 0:
            return
        scratch = _scratch
        pos, neg, fine = self.pos, self.neg, self.pos.fine_bins
        for start in range(0, flat.size, _CHUNK):
            chunk = flat[start:start + _CHUNK]
            k = chunk.size
            hi, lo = float(chunk.max()), float(chunk.min())
            if not (math.isfinite(hi) and math.isfinite(lo)):
                raise _non_finite(hi, lo)
            if lo >= 0.0 or hi <= 0.0:
                # One-signed chunk: one side takes |x| (the plain path), the other k zeros.
                side, other = (pos, neg) if lo >= 0.0 else (neg, pos)
                side.update(chunk)
                other.counts[0] += k
                other.num_values += k
                continue
            pos.absmax, neg.absmax = max(pos.absmax, hi), max(neg.absmax, -lo)
            pp, pn = pos._hold(hi), neg._hold(-lo)
            if not (_F32_MIN_EXP <= pp <= _F32_MAX_EXP and _F32_MIN_EXP <= pn <= _F32_MAX_EXP):
                pos.update(np.maximum(chunk, 0))  # subnormal-scale data: the plain (exact) path, twice
                neg.update(np.maximum(-chunk, 0))
                continue
            idx = scratch.i32[:k]
            buf = scratch.f32[:k]
            if pp == pn:
                # trunc(x * 2**p) is +floor(|x| 2**p) above zero and -floor(|x| 2**p) below: one cast.
                np.multiply(chunk, np.float32(math.ldexp(1.0, pp)), out=buf)
                np.copyto(idx, buf, casting="unsafe")
            else:
                # Each side needs its own power of two. With s_n < s_p, x * s_p is the larger product for
                # x > 0 and x * s_n the larger (less negative) for x < 0: one maximum picks the right
                # one for every element (minimum when s_n > s_p). The product picked is exact; the other may
                # overflow to +-Inf (the other side's far larger range), which the maximum / minimum drops.
                second = scratch.f32b[:k]
                with np.errstate(over="ignore"):
                    np.multiply(chunk, np.float32(math.ldexp(1.0, pp)), out=buf)
                    np.multiply(chunk, np.float32(math.ldexp(1.0, pn)), out=second)
                (np.maximum if pn < pp else np.minimum)(buf, second, out=buf)
                np.copyto(idx, buf, casting="unsafe")
            np.add(idx, fine, out=idx)
            bc = np.bincount(idx, minlength=2 * fine)
            above, below = bc[fine + 1:], bc[1:fine]  # floor >= 1 on each side
            pos.counts[1:] += above
            neg.counts[1:] += below[::-1]
            pos.counts[0] += bc[fine] + int(below.sum())
            neg.counts[0] += bc[fine] + int(above.sum())
            pos.num_values += k
            neg.num_values += k
