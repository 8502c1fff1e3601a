"""The calibrator's device path for real: batch -> device memory -> read back -> compare; pointer order; memory freed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from quantpipe.artifacts import TensorInfo
from quantpipe.cuda import CudaRuntimeAllocator, DeviceBatcher, cuda_check, make_allocator
from quantpipe.data import open_dataset


class _Batch:
    def __init__(self, feeds: dict[str, np.ndarray]) -> None:
        self.feeds = feeds


class _Source:
    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self._batches = batches

    def batches(self, batch_size: int) -> Any:
        return (_Batch(b) for b in self._batches)


def _is_device_pointer(rt: Any, ptr: int) -> bool:
    attrs = cuda_check(rt, rt.cudaPointerGetAttributes(ptr), "cudaPointerGetAttributes")
    return int(attrs.type) == int(rt.cudaMemoryType.cudaMemoryTypeDevice)


def test_digits_batches_round_trip_through_device_memory(cuda_rt: Any, digits: dict[str, Path]) -> None:
    ds = open_dataset(digits["calib"], [TensorInfo("input", "float32", ("batch", 1, 32, 32))])
    host = np.load(digits["calib"])["input"]
    alloc = make_allocator("auto")
    assert isinstance(alloc, CudaRuntimeAllocator)
    with DeviceBatcher(ds, 32, allocator=alloc) as batcher:
        n = 0
        while (ptrs := batcher.next_batch(["input"])) is not None:
            assert _is_device_pointer(cuda_rt, ptrs[0])
            np.testing.assert_array_equal(batcher.read_back("input"), host[n * 32:(n + 1) * 32])
            n += 1
    assert n == len(host) // 32 and batcher.skipped_partial == (1 if len(host) % 32 else 0)


def test_pointer_order_follows_names_on_the_device(cuda_rt: Any) -> None:
    rng = np.random.default_rng(0)
    batch = {
        "a": rng.standard_normal((8, 3, 16, 16)).astype(np.float32),
        "b": rng.integers(-1000, 1000, size=(8, 5)).astype(np.int64),
        "c": rng.standard_normal((8, 7)).astype(np.float16),
    }
    with DeviceBatcher(_Source([batch]), 8, allocator=CudaRuntimeAllocator()) as batcher:
        ptrs = batcher.next_batch(["c", "a", "b"])
        assert ptrs is not None and len(set(ptrs)) == 3
        for name, ptr in zip(["c", "a", "b"], ptrs, strict=True):
            out = np.empty_like(batch[name])
            batcher.allocator.copy_to_host(out, ptr)  # read through the returned pointer itself
            np.testing.assert_array_equal(out, batch[name])


def test_device_memory_is_freed_on_close(cuda_rt: Any) -> None:
    alloc = CudaRuntimeAllocator()
    cuda_check(cuda_rt, cuda_rt.cudaFree(0), "cudaFree(0)")  # create the context before the baseline
    nbytes = 64 * 3 * 224 * 224 * 4  # one EfficientNet-size batch: 38.5 MB per input
    batch = {"x": np.ones((64, 3, 224, 224), np.float32), "y": np.full((64, 3, 224, 224), 2.0, np.float32)}
    free_before, _ = alloc.mem_info()
    batcher = DeviceBatcher(_Source([batch, batch]), 64, allocator=alloc)
    assert batcher.next_batch(["x", "y"]) is not None
    assert batcher.next_batch(["x", "y"]) is not None
    free_during, _ = alloc.mem_info()
    assert free_before - free_during >= 2 * nbytes * 0.95  # both inputs resident, buffers reused (not 4x)
    assert free_before - free_during < 3 * nbytes
    np.testing.assert_array_equal(batcher.read_back("y"), batch["y"])
    batcher.close()
    free_after, _ = alloc.mem_info()
    assert abs(free_after - free_before) <= 4 << 20  # back to the baseline (allocator granularity aside)
    assert batcher.closed


def test_pycuda_allocator_when_installed(cuda_rt: Any) -> None:
    pytest.importorskip("pycuda.driver", reason="pycuda is not installed (it is optional; cuda-python is the default)")
    batch = {"x": np.arange(24, dtype=np.float32).reshape(4, 6)}
    with DeviceBatcher(_Source([batch]), 4, allocator=make_allocator("pycuda")) as batcher:
        assert batcher.next_batch(["x"]) is not None
        np.testing.assert_array_equal(batcher.read_back("x"), batch["x"])
