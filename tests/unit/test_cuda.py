"""DeviceBatcher and the allocators, on a host-memory stand-in device and a fake CUDA runtime module."""

from __future__ import annotations

import ctypes
import enum
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from quantpipe.artifacts import TensorInfo
from quantpipe.cuda import (
    CudaRuntimeAllocator,
    DeviceBatcher,
    HostAllocator,
    cuda_check,
    cuda_runtime,
    make_allocator,
)
from quantpipe.data import open_dataset
from quantpipe.errors import CalibrationError, MissingDependencyError


class _Batch:
    def __init__(self, feeds: dict[str, np.ndarray]) -> None:
        self.feeds = feeds


class ListSource:
    """Yields the given per-batch feeds (ignores batch_size: the test decides the shapes)."""

    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self._batches = batches
        self.calls = 0

    def batches(self, batch_size: int) -> Iterator[_Batch]:
        self.calls += 1
        for feeds in self._batches:
            yield _Batch(feeds)


def _two_input_batches(n: int, batch: int = 4, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {
            "image": rng.standard_normal((batch, 3, 5, 5)).astype(np.float32),
            "mask": rng.integers(0, 100, size=(batch, 7)).astype(np.int64),
        }
        for _ in range(n)
    ]


def test_pointers_follow_requested_order_and_hold_each_inputs_data() -> None:
    data = _two_input_batches(1)
    alloc = HostAllocator()
    with DeviceBatcher(ListSource(data), 4, allocator=alloc) as batcher:
        ptrs = batcher.next_batch(["mask", "image"])
        assert ptrs is not None and len(ptrs) == 2
        assert ptrs == [batcher.pointer("mask"), batcher.pointer("image")]
        assert ptrs[0] != ptrs[1]
        np.testing.assert_array_equal(batcher.read_back("mask"), data[0]["mask"])
        np.testing.assert_array_equal(batcher.read_back("image"), data[0]["image"])
        # the bytes behind each returned pointer are that input's, not the other's
        raw = ctypes.string_at(ptrs[1], data[0]["image"].nbytes)
        assert raw == data[0]["image"].tobytes()


def test_every_batch_is_copied_then_none_when_exhausted() -> None:
    data = _two_input_batches(3, seed=1)
    alloc = HostAllocator()
    with DeviceBatcher(ListSource(data), 4, allocator=alloc) as batcher:
        seen_ptrs = set()
        for expected in data:
            ptrs = batcher.next_batch(["image", "mask"])
            assert ptrs is not None
            seen_ptrs.add(tuple(ptrs))
            np.testing.assert_array_equal(batcher.read_back("image"), expected["image"])
            np.testing.assert_array_equal(batcher.read_back("mask"), expected["mask"])
        assert batcher.next_batch(["image", "mask"]) is None
        assert batcher.next_batch(["image", "mask"]) is None
        assert batcher.num_batches == 3
        assert len(seen_ptrs) == 1  # buffers are reused, not reallocated per batch
        assert alloc.num_allocs == 2


def test_smaller_trailing_batch_and_other_shapes_are_skipped_not_fed() -> None:
    full = _two_input_batches(2, batch=4, seed=2)
    partial = _two_input_batches(1, batch=3, seed=3)[0]
    other = {"image": np.ones((4, 3, 6, 6), np.float32), "mask": np.ones((4, 7), np.int64)}
    source = ListSource([full[0], other, full[1], partial])
    with DeviceBatcher(source, 4, allocator=HostAllocator(), shapes={"image": (4, 3, 5, 5)}) as batcher:
        fed = []
        while batcher.next_batch(["image"]) is not None:
            fed.append(batcher.read_back("image"))
        assert len(fed) == 2
        np.testing.assert_array_equal(fed[1], full[1]["image"])
        assert batcher.skipped_partial == 1
        assert batcher.skipped_shape == 1


def test_buffer_grows_when_a_batch_needs_more_room() -> None:
    small = {"x": np.arange(8, dtype=np.float32).reshape(2, 4)}
    big = {"x": np.arange(32, dtype=np.float32).reshape(2, 16)}
    alloc = HostAllocator()
    with DeviceBatcher(ListSource([small, big, small]), 2, allocator=alloc) as batcher:
        for expected in (small, big, small):
            assert batcher.next_batch(["x"]) is not None
            np.testing.assert_array_equal(batcher.read_back("x"), expected["x"])
        assert alloc.num_allocs == 2 and alloc.num_frees == 1
        assert batcher.allocated_bytes == big["x"].nbytes
    assert alloc.live_bytes == 0


def test_close_frees_everything_once_and_is_idempotent() -> None:
    alloc = HostAllocator()
    batcher = DeviceBatcher(ListSource(_two_input_batches(2)), 4, allocator=alloc)
    batcher.next_batch(["image", "mask"])
    assert alloc.live_bytes > 0
    batcher.close()
    assert alloc.live_bytes == 0 and alloc.num_frees == alloc.num_allocs == 2
    batcher.close()  # a second close frees nothing twice
    assert alloc.num_frees == 2
    with pytest.raises(CalibrationError, match="closed"):
        batcher.next_batch(["image"])


def test_context_manager_frees_on_error() -> None:
    alloc = HostAllocator()
    with pytest.raises(RuntimeError), DeviceBatcher(ListSource(_two_input_batches(1)), 4, allocator=alloc) as batcher:
        batcher.next_batch(["image", "mask"])
        raise RuntimeError("boom")
    assert alloc.live_bytes == 0


def test_missing_input_names_what_is_there() -> None:
    with (
        DeviceBatcher(ListSource(_two_input_batches(1)), 4, allocator=HostAllocator()) as batcher,
        pytest.raises(CalibrationError, match=r"'tokens'.*\['image', 'mask'\]"),
    ):
        batcher.next_batch(["image", "tokens"])


def test_max_batches_and_reset() -> None:
    data = _two_input_batches(3, seed=4)
    source = ListSource(data)
    with DeviceBatcher(source, 4, allocator=HostAllocator(), max_batches=2) as batcher:
        assert batcher.next_batch(["image"]) is not None
        assert batcher.next_batch(["image"]) is not None
        assert batcher.next_batch(["image"]) is None
        batcher.reset()
        assert batcher.next_batch(["image"]) is not None
        np.testing.assert_array_equal(batcher.read_back("image"), data[0]["image"])
        assert source.calls == 2


def test_invalid_arguments() -> None:
    with pytest.raises(CalibrationError, match="at least 1"):
        DeviceBatcher(ListSource([]), 0, allocator=HostAllocator())
    with pytest.raises(CalibrationError, match="max_batches"):
        DeviceBatcher(ListSource([]), 1, allocator=HostAllocator(), max_batches=0)


def test_with_a_real_dataset(tmp_path: Path) -> None:
    x = np.random.default_rng(5).standard_normal((10, 1, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", input=x)
    ds = open_dataset(tmp_path / "calib.npz", [TensorInfo("input", "float32", (None, 1, 4, 4))])
    with DeviceBatcher(ds, 4, allocator=HostAllocator()) as batcher:
        got = []
        while batcher.next_batch(["input"]) is not None:
            got.append(batcher.read_back("input"))
    # 10 samples at batch 4: two full batches; the last 2 samples cannot be fed at TensorRT's fixed shape
    assert [g.shape for g in got] == [(4, 1, 4, 4), (4, 1, 4, 4)]
    np.testing.assert_array_equal(np.concatenate(got), x[:8])
    assert batcher.skipped_partial == 1


def test_host_allocator_refuses_double_free_and_overflow() -> None:
    alloc = HostAllocator()
    ptr = alloc.alloc(16)
    with pytest.raises(ValueError, match="16-byte"):
        alloc.copy_to_device(ptr, np.zeros(5, np.float32))
    alloc.free(ptr)
    with pytest.raises(ValueError, match="double free"):
        alloc.free(ptr)


# --------------------------------------------------------------------------------------------------
# cuda-python paths against a fake runtime module (host memory, same call shapes as cuda-python)
# --------------------------------------------------------------------------------------------------


class _Err(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorMemoryAllocation = 2


class _Kind(enum.IntEnum):
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2


def _fake_runtime(name: str, *, fail_malloc: bool = False) -> types.ModuleType:
    mod = types.ModuleType(name)
    buffers: dict[int, ctypes.Array[ctypes.c_char]] = {}
    mod.cudaError_t = _Err  # type: ignore[attr-defined]
    mod.cudaMemcpyKind = _Kind  # type: ignore[attr-defined]
    mod.calls = []  # type: ignore[attr-defined]

    def cudaMalloc(n: int) -> tuple[_Err, int]:
        mod.calls.append(("malloc", n))  # type: ignore[attr-defined]
        if fail_malloc:
            return (_Err.cudaErrorMemoryAllocation, 0)
        buf = ctypes.create_string_buffer(n)
        buffers[ctypes.addressof(buf)] = buf
        return (_Err.cudaSuccess, ctypes.addressof(buf))

    def cudaFree(ptr: int) -> tuple[_Err]:
        mod.calls.append(("free", ptr))  # type: ignore[attr-defined]
        del buffers[ptr]
        return (_Err.cudaSuccess,)

    def cudaMemcpy(dst: int, src: int, n: int, kind: _Kind) -> tuple[_Err]:
        mod.calls.append(("memcpy", kind))  # type: ignore[attr-defined]
        ctypes.memmove(dst, src, n)
        return (_Err.cudaSuccess,)

    mod.cudaMalloc = cudaMalloc  # type: ignore[attr-defined]
    mod.cudaFree = cudaFree  # type: ignore[attr-defined]
    mod.cudaMemcpy = cudaMemcpy  # type: ignore[attr-defined]
    mod.cudaDeviceSynchronize = lambda: (_Err.cudaSuccess,)  # type: ignore[attr-defined]
    mod.cudaGetErrorName = lambda err: (_Err.cudaSuccess, b"cudaErrorMemoryAllocation")  # type: ignore[attr-defined]
    mod.live = buffers  # type: ignore[attr-defined]
    return mod


def test_cuda_runtime_prefers_cuda_bindings(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _fake_runtime("cuda.bindings.runtime")
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", fake)
    assert cuda_runtime() is fake


def test_cuda_runtime_falls_back_to_old_cudart(monkeypatch: pytest.MonkeyPatch) -> None:
    old = _fake_runtime("cuda.cudart")
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", None)  # None in sys.modules: import fails
    monkeypatch.setitem(sys.modules, "cuda.cudart", old)
    assert cuda_runtime() is old


def test_missing_cuda_python_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart", "pycuda", "pycuda.driver"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MissingDependencyError, match="pip install"):
        make_allocator("auto")
    assert isinstance(make_allocator("host"), HostAllocator)


def test_batcher_over_cuda_runtime_allocator_round_trips(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _fake_runtime("cuda.bindings.runtime")
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", fake)
    alloc = make_allocator("auto")
    assert isinstance(alloc, CudaRuntimeAllocator)
    data = _two_input_batches(2, seed=6)
    with DeviceBatcher(ListSource(data), 4, allocator=alloc) as batcher:
        for expected in data:
            ptrs = batcher.next_batch(["mask", "image"])
            assert ptrs is not None
            np.testing.assert_array_equal(batcher.read_back("mask"), expected["mask"])
            np.testing.assert_array_equal(batcher.read_back("image"), expected["image"])
    assert fake.live == {}  # every cudaMalloc was matched by a cudaFree
    kinds = [c[1] for c in fake.calls if c[0] == "memcpy"]
    assert _Kind.cudaMemcpyHostToDevice in kinds and _Kind.cudaMemcpyDeviceToHost in kinds


def test_cuda_errors_become_calibration_errors_with_the_name(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _fake_runtime("cuda.bindings.runtime", fail_malloc=True)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", fake)
    alloc = CudaRuntimeAllocator()
    with pytest.raises(CalibrationError, match=r"cudaMalloc\(64\).*error 2 \(cudaErrorMemoryAllocation\)"):
        alloc.alloc(64)
    assert cuda_check(fake, (_Err.cudaSuccess, 7), "x") == 7
    assert cuda_check(fake, (_Err.cudaSuccess, 1, 2), "x") == (1, 2)
    assert cuda_check(fake, (_Err.cudaSuccess,), "x") is None
