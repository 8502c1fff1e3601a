"""int8 weight codes: symmetric round-to-nearest per channel, or codes precomputed by GPTQ where they were
fitted to exactly this weight (`WeightCodes`, checked by fingerprint)."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from quantpipe.errors import BuildError
from quantpipe.int8 import INT8_MAX
from quantpipe.quantize.options import QuantizeOptions

__all__ = ["WeightCodes", "codes_for", "int8_weight", "quantize_weight", "weight_fingerprint"]




@dataclasses.dataclass(frozen=True, eq=False)
class WeightCodes:
    """GPTQ-rounded int8 codes of one weight, valid only for the exact float values they were computed from."""

    weight: str
    node: str
    axis: int | None
    q: np.ndarray
    """int8 codes, the weight's shape."""
    scale: np.ndarray
    """float32 scales (per channel along `axis`, or a scalar)."""
    fingerprint: str
    """`weight_fingerprint` of the float weight; a different value (smoothing, upgrade) means: do not use."""


def weight_fingerprint(w: np.ndarray) -> str:
    a = np.ascontiguousarray(w, dtype=np.float32)
    return hashlib.sha256(a.tobytes() + str(a.shape).encode()).hexdigest()[:24]


def conv_patches(x: np.ndarray, node: Any, wshape: tuple[int, ...]) -> np.ndarray | None:
    """A Conv's input unfolded as the kernel sees it: [groups, positions, C/g * prod(kernel)], in the order of
    `w.reshape(O, -1)`. None for what this cannot unfold (an auto_pad / shape it does not know)."""




def codes_for(codes: Mapping[str, WeightCodes] | None, name: str, w: np.ndarray,
              axis: int | None) -> WeightCodes | None:
    """The GPTQ codes of weight `name` if they were computed for exactly this value and axis."""
    if not codes:
        return None
    c = codes.get(name)
    if c is None or c.axis != axis or c.q.shape != w.shape or c.fingerprint != weight_fingerprint(w):
        return None
    return c


def quantize_weight(w: np.ndarray, axis: int | None, override: Any | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 in [-127, 127] (TensorRT's weight range); returns (int8 values, float32 scale)."""
    if axis is None:
        amax = np.asarray(np.max(np.abs(w)) if w.size else 0.0, dtype=np.float64)
    else:
        other = tuple(i for i in range(w.ndim) if i != axis)
        amax = np.max(np.abs(w), axis=other).astype(np.float64)
    if override is not None:
        ov = np.asarray(override, dtype=np.float64)
        if ov.size != amax.size:
            raise BuildError(
                f"weight amax override has {ov.size} value(s) but the weight needs {amax.size} "
                f"({'per channel on axis ' + str(axis) if axis is not None else 'per tensor'}). Give one value "
                f"per output channel, or a single float with per_channel=False."
            )
        amax = ov.reshape(amax.shape)
    # An all-zero channel quantizes to zeros whatever its scale; 1.0 keeps the scale positive (TensorRT needs it).
    # So does a channel whose scale is not a normal float32: subnormal weights (PP-OCRv3 det ships dead channels at
    # 2e-40, found probing) gave scales of exactly 0 and 0/0 codes; they are zeros at any precision that matters.
    step = amax / INT8_MAX
    scale = np.where(step >= np.finfo(np.float32).tiny, step, 1.0).astype(np.float32)
    bshape = [1] * w.ndim
    if axis is not None:
        bshape[axis] = -1
    q = np.clip(np.rint(w.astype(np.float64) / scale.reshape(bshape)), -INT8_MAX, INT8_MAX).astype(np.int8)
    return q, scale


def int8_weight(src: str, w: np.ndarray, axis: int | None, opts: QuantizeOptions) -> tuple[np.ndarray, np.ndarray, bool]:
    """(int8 codes, scale, from GPTQ?) for weight `src`: GPTQ's codes where computed for this very value."""
    override = (opts.weight_amax_override or {}).get(src)
    if override is None and opts.weight_rounding == "gptq":
        c = codes_for(opts.weight_codes, src, w, axis)
        if c is not None:
            return c.q, c.scale, True
    q, scale = quantize_weight(w, axis, override)
    return q, scale, False
