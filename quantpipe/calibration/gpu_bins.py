"""Binning on the GPU: one fused CUDA kernel per tensor for the histograms' CuPy path, counts kept on the device.

`StreamingHistogram.update` and `SignedHistogram.update` given a CuPy array used to run CuPy's array functions
(abs, multiply, cast, `bincount` into a fresh 65536-bin array) and copy that array to the host after every tensor
of every batch: a device-to-host copy and a synchronisation per update, and `bincount`'s atomic adds queue up on
the few bins that hold most values (a post-ReLU tensor's zeros). Here one kernel computes each element's fine bin
with the same float32 arithmetic (`|x|` times a power of two, truncated: the same bits, see histogram.py) and adds it
to counts that stay on the device until a histogram's counts are read; the lanes of a warp that hit the same bin
add once (`__match_any_sync`), so a bin that holds half the values costs one atomic add per warp, not per value.
The per-update maximum (to grow the power-of-two range before binning) is still read back: one small copy.
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["abs_bins", "signed_bins"]

_SOURCE = r"""
// Fine bin of |x|: (unsigned)(fabsf(x) * scale), scale a power of two (exact in float32; the cast truncates).
// Every lane of a warp runs the same iterations (the loop tests the warp's first index), so the match covers
// the whole warp; lanes past n carry a key no bin has.
extern "C" __global__ void qp_abs_bins(const float* __restrict__ x, const long long n, const float scale,
                                       unsigned long long* __restrict__ counts) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    const int lane = threadIdx.x & 31;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i - lane < n; i += stride) {
        const bool valid = i < n;
        const unsigned int key = valid ? (unsigned int)(fabsf(x[i]) * scale) : 0xFFFFFFFFu;
        const unsigned int peers = __match_any_sync(0xFFFFFFFFu, key);
        if (valid && __ffs(peers) - 1 == lane) atomicAdd(&counts[key], (unsigned long long)__popc(peers));
    }
}

// Both sides of x at once, into counts[0 .. 2 * fine): relu(x) in the first half, relu(-x) in the second. An
// element goes to the side of its sign bit (-0.0 to the negative side, as a zero) with that side's scale, and
// adds a zero to the other side, as binning relu(x) and relu(-x) apart does.
extern "C" __global__ void qp_signed_bins(const float* __restrict__ x, const long long n, const float pscale,
                                          const float nscale, const unsigned int fine,
                                          unsigned long long* __restrict__ counts) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    const int lane = threadIdx.x & 31;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i - lane < n; i += stride) {
        const bool valid = i < n;
        unsigned int key = 0xFFFFFFFFu, zero = 0xFFFFFFFFu;
        if (valid) {
            const float v = x[i];
            const bool negative = (__float_as_uint(v) >> 31) != 0u;
            key = (negative ? fine : 0u) + (unsigned int)(fabsf(v) * (negative ? nscale : pscale));
            zero = negative ? 0u : fine;
        }
        unsigned int peers = __match_any_sync(0xFFFFFFFFu, key);
        if (valid && __ffs(peers) - 1 == lane) atomicAdd(&counts[key], (unsigned long long)__popc(peers));
        peers = __match_any_sync(0xFFFFFFFFu, zero);
        if (valid && __ffs(peers) - 1 == lane) atomicAdd(&counts[zero], (unsigned long long)__popc(peers));
    }
}
"""

_THREADS = 256
_MAX_BLOCKS = 4096


@functools.cache
def _kernels(cp: Any, device: int) -> tuple[Any, Any]:
    """The two kernels, compiled once per process and device (CuPy caches the binary on disk as well)."""
    module = cp.RawModule(code=_SOURCE, options=("-std=c++14",))
    return module.get_function("qp_abs_bins"), module.get_function("qp_signed_bins")


def _launch(cp: Any, n: int) -> tuple[tuple[int], tuple[int]]:
    blocks = max(1, min(_MAX_BLOCKS, -(-n // _THREADS)))
    return (blocks,), (_THREADS,)


def abs_bins(cp: Any, flat: Any, scale: float, counts: Any) -> None:
    """Add the fine bins floor(|x| * scale) of the float32 CuPy array `flat` to `counts` (uint64, on the device)."""
    n = int(flat.size)
    if n == 0:
        return
    k, _ = _kernels(cp, int(cp.cuda.runtime.getDevice()))
    grid, block = _launch(cp, n)
    k(grid, block, (cp.ascontiguousarray(flat), cp.int64(n), cp.float32(scale), counts))


def signed_bins(cp: Any, flat: Any, pscale: float, nscale: float, fine: int, counts: Any) -> None:
    """Add relu(x)'s fine bins to counts[:fine] and relu(-x)'s to counts[fine:] (uint64, on the device), each side
    with its own power-of-two scale."""
    n = int(flat.size)
    if n == 0:
        return
    _, k = _kernels(cp, int(cp.cuda.runtime.getDevice()))
    grid, block = _launch(cp, n)
    k(grid, block, (cp.ascontiguousarray(flat), cp.int64(n), cp.float32(pscale), cp.float32(nscale),
                    cp.uint32(fine), counts))
