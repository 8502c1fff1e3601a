"""TensorRT's int8 grid, the one every quantpipe scale is on: symmetric, zero point 0, codes in
[-INT8_MAX, INT8_MAX] (TensorRT never uses -128), scale = amax / INT8_MAX."""

from __future__ import annotations

__all__ = ["INT8_MAX"]

#: The largest int8 code TensorRT uses; a tensor with range amax has scale amax / INT8_MAX.
INT8_MAX = 127
