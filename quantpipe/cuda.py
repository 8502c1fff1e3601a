"""CUDA device memory, streams and the calibration batcher, through cuda-python or pycuda; no tensorrt here.

Polygraphy keeps CUDA memory and streams in `polygraphy/cuda/`, apart from its TensorRT backend; so does
quantpipe: `quantpipe.backends.tensorrt` uses this module and this module never imports tensorrt.

Calibration batches in device memory, for TensorRT's implicit-quantization calibrators (TensorRT <= 10):
TensorRT's `IInt8EntropyCalibrator2` / `IInt8MinMaxCalibrator` pull calibration data by calling
`get_batch(names)` and expect one device pointer per requested input, in the order of `names`. That
work (batching the calibration Dataset, keeping one device buffer per input, copying each batch in,
freeing everything at a known point) lives here in `DeviceBatcher`, a plain class with no tensorrt
import; `quantpipe.backends.tensorrt.calibrator` defines the TensorRT subclasses that delegate to it.

Device memory goes through a small allocator interface (`DeviceAllocator`): cuda-python's runtime API
by default, pycuda where it is installed and chosen, and `HostAllocator`, a stand-in "device" in host
memory that lets the batching be tested on machines without a GPU. `CudaStream` is the TensorRT runner's
stream, events and asynchronous copies (cuda-python's runtime API).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from types import ModuleType
from typing import Any, Literal, Protocol

import numpy as np

from quantpipe.data import sample_count
from quantpipe.deps import optional, require
from quantpipe.errors import CalibrationError, MissingDependencyError

__all__ = [
    "AllocatorKind",
    "BatchSource",
    "CudaRuntimeAllocator",
    "CudaStream",
    "DeviceAllocator",
    "DeviceBatcher",
    "DeviceBuffer",
    "HostAllocator",
    "PycudaAllocator",
    "cuda_runtime",
    "cuda_check",
    "make_allocator",
]

log = logging.getLogger(__name__)

AllocatorKind = Literal["auto", "cuda-python", "pycuda", "host"]


class _Batch(Protocol):
    @property
    def feeds(self) -> Mapping[str, np.ndarray]: ...


class BatchSource(Protocol):
    """What the batcher reads: `quantpipe.data.Dataset` (or anything with the same `batches`)."""

    def batches(self, batch_size: int) -> Iterator[Any]: ...


class DeviceAllocator(Protocol):
    """Device memory as plain integer pointers (what TensorRT's calibrator interface passes around)."""

    name: str

    def alloc(self, nbytes: int) -> int:
        """Allocate `nbytes` of device memory and return its address."""
        ...

    def free(self, ptr: int) -> None:
        """Free memory returned by `alloc`."""
        ...

    def copy_to_device(self, ptr: int, host: np.ndarray) -> None:
        """Copy a C-contiguous host array to `ptr`."""
        ...

    def copy_to_host(self, host: np.ndarray, ptr: int) -> None:
        """Fill a C-contiguous, writeable host array from `ptr`."""
        ...

    def synchronize(self) -> None:
        """Wait until every copy issued so far has landed in device memory."""
        ...


# --------------------------------------------------------------------------------------------------
# cuda-python (runtime API)
# --------------------------------------------------------------------------------------------------


def cuda_runtime() -> ModuleType:
    """cuda-python's CUDA runtime module, whichever layout the installed version has.

    cuda-python >= 12.6 ships it as `cuda.bindings.runtime`; older releases as `cuda.cudart` (13.x
    removed that alias). Raises MissingDependencyError with the pip command when neither imports.
    """
    mod = optional("cuda.bindings.runtime")
    if mod is not None:
        return mod
    return require(
        "cuda.cudart",
        purpose="device memory for TensorRT (cuda-python's CUDA runtime: cuda.bindings.runtime, or cuda.cudart before 12.6)",
    )


def cuda_check(rt: ModuleType, result: Any, what: str) -> Any:
    """Unpack a cuda-python `(error, *values)` tuple; raise CalibrationError unless the call succeeded.

    Returns None, the single value, or a tuple of values.
    """
    err: Any = result[0] if isinstance(result, tuple) else result  # a few calls return only the error code
    values: tuple[Any, ...] = tuple(result[1:]) if isinstance(result, tuple) else ()
    code = int(err.value if hasattr(err, "value") else err)
    if code != 0:
        try:
            name = rt.cudaGetErrorName(err)[1]
            name = name.decode() if isinstance(name, bytes) else str(name)
        except Exception:  # the error name is a nicety; never mask the real failure
            name = "?"
        raise CalibrationError(
            f"CUDA call {what} failed with error {code} ({name}). Check that a GPU is visible "
            f"(nvidia-smi) and that the driver supports the installed CUDA runtime."
        )
    if not values:
        return None
    return values[0] if len(values) == 1 else values


class CudaRuntimeAllocator:
    """Device memory through cuda-python's runtime API (cudaMalloc / cudaMemcpy / cudaFree)."""

    name = "cuda-python"

    def __init__(self, device: int | None = None) -> None:
        self._rt = cuda_runtime()
        if device is not None:
            cuda_check(self._rt, self._rt.cudaSetDevice(device), f"cudaSetDevice({device})")

    @property
    def runtime(self) -> ModuleType:
        return self._rt

    def alloc(self, nbytes: int) -> int:
        # cudaMalloc(0) may hand back a null pointer, which TensorRT would reject: keep at least one byte.
        return int(cuda_check(self._rt, self._rt.cudaMalloc(max(int(nbytes), 1)), f"cudaMalloc({nbytes})"))

    def free(self, ptr: int) -> None:
        cuda_check(self._rt, self._rt.cudaFree(ptr), "cudaFree")

    def copy_to_device(self, ptr: int, host: np.ndarray) -> None:
        host = _contiguous(host)
        kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        cuda_check(self._rt, self._rt.cudaMemcpy(ptr, host.ctypes.data, host.nbytes, kind), "cudaMemcpy host->device")

    def copy_to_host(self, host: np.ndarray, ptr: int) -> None:
        _check_writeable(host)
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        cuda_check(self._rt, self._rt.cudaMemcpy(host.ctypes.data, ptr, host.nbytes, kind), "cudaMemcpy device->host")

    def synchronize(self) -> None:
        # A host->device cudaMemcpy from pageable memory may return before the DMA has finished; TensorRT
        # then reads the buffer on its own stream, so wait for the device here.
        cuda_check(self._rt, self._rt.cudaDeviceSynchronize(), "cudaDeviceSynchronize")

    def mem_info(self) -> tuple[int, int]:
        """(free, total) bytes of device memory, from cudaMemGetInfo."""
        free, total = cuda_check(self._rt, self._rt.cudaMemGetInfo(), "cudaMemGetInfo")
        return int(free), int(total)


class CudaStream:
    """One CUDA stream with events, asynchronous copies and elapsed times (cuda-python's runtime API).

    The TensorRT runner's plumbing, kept apart so it can be checked on a GPU without TensorRT.
    """

    def __init__(self, rt: Any, num_events: int = 4) -> None:
        self.rt = rt
        self.stream = cuda_check(rt, rt.cudaStreamCreate(), "cudaStreamCreate")
        self.events = [cuda_check(rt, rt.cudaEventCreate(), "cudaEventCreate") for _ in range(num_events)]

    @property
    def handle(self) -> int:
        """The stream as the integer execute_async_v3 takes."""
        return int(self.stream)

    def h2d(self, ptr: int, host: np.ndarray) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        cuda_check(self.rt, self.rt.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes, kind, self.stream),
                   "cudaMemcpyAsync host->device")

    def d2h(self, host: np.ndarray, ptr: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        cuda_check(self.rt, self.rt.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes, kind, self.stream),
                   "cudaMemcpyAsync device->host")

    def record(self, i: int) -> None:
        cuda_check(self.rt, self.rt.cudaEventRecord(self.events[i], self.stream), "cudaEventRecord")

    def wait_event(self, i: int) -> None:
        cuda_check(self.rt, self.rt.cudaEventSynchronize(self.events[i]), "cudaEventSynchronize")

    def elapsed_ms(self, i: int, j: int) -> float:
        return float(cuda_check(self.rt, self.rt.cudaEventElapsedTime(self.events[i], self.events[j]), "cudaEventElapsedTime"))

    def synchronize(self) -> None:
        cuda_check(self.rt, self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def close(self) -> None:
        """Destroy the events and the stream (after a final synchronize). Idempotent."""
        if self.stream is None:
            return
        try:
            self.synchronize()
        finally:
            for ev in self.events:
                self.rt.cudaEventDestroy(ev)
            self.rt.cudaStreamDestroy(self.stream)
            self.events, self.stream = [], None


# --------------------------------------------------------------------------------------------------
# pycuda
# --------------------------------------------------------------------------------------------------


class PycudaAllocator:
    """Device memory through pycuda (only where pycuda is installed and asked for).

    Importing `pycuda.autoinit` makes a context on device 0 current, as TensorRT's older samples do.
    """

    name = "pycuda"

    def __init__(self) -> None:
        self._drv = require("pycuda.driver", purpose="device memory through pycuda")
        require("pycuda.autoinit", purpose="a CUDA context through pycuda")
        self._allocations: dict[int, Any] = {}

    def alloc(self, nbytes: int) -> int:
        allocation = self._drv.mem_alloc(max(int(nbytes), 1))
        ptr = int(allocation)
        self._allocations[ptr] = allocation  # pycuda frees on garbage collection: keep it alive until free()
        return ptr

    def free(self, ptr: int) -> None:
        self._allocations.pop(ptr).free()

    def copy_to_device(self, ptr: int, host: np.ndarray) -> None:
        self._drv.memcpy_htod(ptr, _contiguous(host))

    def copy_to_host(self, host: np.ndarray, ptr: int) -> None:
        _check_writeable(host)
        self._drv.memcpy_dtoh(host, ptr)

    def synchronize(self) -> None:
        self._drv.Context.synchronize()


# --------------------------------------------------------------------------------------------------
# host stand-in
# --------------------------------------------------------------------------------------------------


class HostAllocator:
    """A stand-in "device" that lives in host memory; pointers are addresses of numpy buffers.

    For tests and for checking the batching on machines without a GPU. It refuses a double free or a
    copy past the end of a buffer, and counts what is still allocated.
    """

    name = "host"

    def __init__(self) -> None:
        self._buffers: dict[int, np.ndarray] = {}
        self.num_allocs = 0
        self.num_frees = 0

    def alloc(self, nbytes: int) -> int:
        buf = np.zeros(max(int(nbytes), 1), dtype=np.uint8)
        ptr = int(buf.ctypes.data)
        self._buffers[ptr] = buf
        self.num_allocs += 1
        return ptr

    def free(self, ptr: int) -> None:
        if ptr not in self._buffers:
            raise ValueError(f"HostAllocator: free of unknown pointer {ptr:#x} (double free?)")
        del self._buffers[ptr]
        self.num_frees += 1

    def copy_to_device(self, ptr: int, host: np.ndarray) -> None:
        src = _contiguous(host).reshape(-1).view(np.uint8)
        self._buffer(ptr, src.nbytes)[: src.nbytes] = src

    def copy_to_host(self, host: np.ndarray, ptr: int) -> None:
        _check_writeable(host)
        host.reshape(-1).view(np.uint8)[:] = self._buffer(ptr, host.nbytes)[: host.nbytes]

    def synchronize(self) -> None:
        return None

    @property
    def live_bytes(self) -> int:
        """Bytes allocated and not yet freed."""
        return sum(b.nbytes for b in self._buffers.values())

    @property
    def live_pointers(self) -> list[int]:
        return list(self._buffers)

    def _buffer(self, ptr: int, nbytes: int) -> np.ndarray:
        buf = self._buffers.get(ptr)
        if buf is None:
            raise ValueError(f"HostAllocator: unknown pointer {ptr:#x} (freed, or not from this allocator)")
        if nbytes > buf.nbytes:
            raise ValueError(f"HostAllocator: copy of {nbytes} bytes into a {buf.nbytes}-byte buffer")
        return buf


def make_allocator(kind: AllocatorKind = "auto", *, device: int | None = None) -> DeviceAllocator:
    """The allocator for `kind`; `auto` is cuda-python, else pycuda, else MissingDependencyError."""
    if kind == "host":
        return HostAllocator()
    if kind == "cuda-python":
        return CudaRuntimeAllocator(device)
    if kind == "pycuda":
        return PycudaAllocator()
    if kind != "auto":
        raise ValueError(f"unknown allocator kind {kind!r}; expected one of auto, cuda-python, pycuda, host")
    try:
        return CudaRuntimeAllocator(device)
    except MissingDependencyError as no_cuda_python:
        if optional("pycuda.driver") is None:
            raise no_cuda_python
        log.info("cuda-python is not installed; using pycuda for calibration device memory")
        return PycudaAllocator()


def _contiguous(host: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(host)


def _check_writeable(host: np.ndarray) -> None:
    if not (host.flags.c_contiguous and host.flags.writeable):
        raise ValueError("copy_to_host needs a C-contiguous, writeable destination array")


# --------------------------------------------------------------------------------------------------
# the batcher
# --------------------------------------------------------------------------------------------------


class DeviceBuffer:
    """One device allocation: its address and size; the batcher also notes the shape and dtype it holds."""

    __slots__ = ("ptr", "nbytes", "shape", "dtype")

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.ptr = ptr
        self.nbytes = nbytes
        self.shape: tuple[int, ...] = ()
        self.dtype = np.dtype(np.float32)


class DeviceBatcher:
    """Feeds a calibration Dataset to the device one batch at a time.

    One device buffer per input, allocated on first use and grown only when a batch needs more room;
    `next_batch(names)` copies the next batch in and returns the buffers' addresses in the order of
    `names`, or None when the data is exhausted. Memory is freed by `close()` (or leaving the `with`
    block), never left to garbage collection.

    TensorRT calibrates an explicit-batch network with every batch at one shape (the calibration
    profile's `opt` shape, or the static input shape), so by default a trailing batch smaller than
    `batch_size` is skipped, and with `shapes` given, so is any batch of another shape; both are
    counted and logged, never silently fed.
    """

    def __init__(
        self,
        source: BatchSource,
        batch_size: int,
        *,
        allocator: DeviceAllocator,
        input_names: Sequence[str] | None = None,
        shapes: Mapping[str, Sequence[int]] | None = None,
        max_batches: int | None = None,
        drop_last: bool = True,
    ) -> None:
        if batch_size < 1:
            raise CalibrationError(f"calibration batch size must be at least 1, got {batch_size}")
        if max_batches is not None and max_batches < 1:
            raise CalibrationError(f"max_batches must be at least 1 when given, got {max_batches}")
        self._source = source
        self._batch_size = int(batch_size)
        self._allocator = allocator
        self._input_names = list(input_names) if input_names is not None else None
        self._shapes = {k: tuple(int(d) for d in v) for k, v in (shapes or {}).items()}
        self._max_batches = max_batches
        self._drop_last = drop_last
        self._buffers: dict[str, DeviceBuffer] = {}
        self._iter: Iterator[Any] | None = None
        self._closed = False
        self._exhausted_logged = False
        self.num_batches = 0
        """Batches handed out since the last reset."""
        self.skipped_partial = 0
        self.skipped_shape = 0

    # -- what TensorRT's calibrator needs -----------------------------------------------------------

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def allocator(self) -> DeviceAllocator:
        return self._allocator

    def next_batch(self, names: Sequence[str]) -> list[int] | None:
        """Copy the next batch to the device; its pointers in the order of `names`, or None when done."""
        if self._closed:
            raise CalibrationError("the calibration batcher was closed; its device memory is freed")
        if self._max_batches is not None and self.num_batches >= self._max_batches:
            self._log_exhausted()
            return None
        if self._iter is None:
            self._iter = iter(self._source.batches(self._batch_size))
        for batch in self._iter:
            feeds: Mapping[str, np.ndarray] = batch.feeds
            if not self._usable(feeds):
                continue
            ptrs = [self._upload(name, feeds, names) for name in names]
            self._allocator.synchronize()
            self.num_batches += 1
            return ptrs
        self._log_exhausted()
        return None

    def read_back(self, name: str) -> np.ndarray:
        """The last batch of input `name` as it sits in device memory (copied back to the host)."""
        buf = self._buffers.get(name)
        if buf is None or self._closed:
            raise CalibrationError(f"no device buffer for input '{name}' (no batch was fed, or the batcher is closed)")
        out = np.empty(buf.shape, dtype=buf.dtype)
        self._allocator.copy_to_host(out, buf.ptr)
        return out

    def pointer(self, name: str) -> int:
        """Device address of input `name`'s buffer."""
        buf = self._buffers.get(name)
        if buf is None:
            raise CalibrationError(f"no device buffer for input '{name}'")
        return buf.ptr

    @property
    def allocated_bytes(self) -> int:
        """Device bytes this batcher holds now."""
        return sum(b.nbytes for b in self._buffers.values())

    def reset(self) -> None:
        """Start again from the first batch (device buffers are kept)."""
        self._iter = None
        self.num_batches = 0
        self.skipped_partial = 0
        self.skipped_shape = 0
        self._exhausted_logged = False

    def close(self) -> None:
        """Free every device buffer. Idempotent; every free is attempted even if one fails."""
        if self._closed:
            return
        self._closed = True
        self._iter = None
        buffers, self._buffers = self._buffers, {}
        first_error: Exception | None = None
        for buf in buffers.values():
            try:
                self._allocator.free(buf.ptr)
            except Exception as err:  # keep freeing the others, then report the first failure
                first_error = first_error or err
        if first_error is not None:
            raise CalibrationError(f"freeing calibration device memory failed: {first_error}") from first_error

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> DeviceBatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------------

    def _usable(self, feeds: Mapping[str, np.ndarray]) -> bool:
        if self._drop_last and sample_count(feeds) != self._batch_size:
            self.skipped_partial += 1
            return False
        for name, want in self._shapes.items():
            arr = feeds.get(name)
            if arr is not None and tuple(arr.shape) != want:
                self.skipped_shape += 1
                return False
        return True

    def _upload(self, name: str, feeds: Mapping[str, np.ndarray], names: Sequence[str]) -> int:
        arr = feeds.get(name)
        if arr is None:
            raise CalibrationError(
                f"TensorRT asked for calibration input '{name}' (inputs requested: {list(names)}) but the "
                f"calibration data holds only {sorted(feeds)}. Name each array after the model input it feeds."
            )
        arr = np.ascontiguousarray(arr)
        buf = self._buffers.get(name)
        if buf is None or buf.nbytes < arr.nbytes:
            if buf is not None:
                self._allocator.free(buf.ptr)
                del self._buffers[name]
            buf = DeviceBuffer(self._allocator.alloc(arr.nbytes), max(arr.nbytes, 1))
            self._buffers[name] = buf
        self._allocator.copy_to_device(buf.ptr, arr)
        buf.shape = tuple(arr.shape)
        buf.dtype = arr.dtype
        return buf.ptr

    def _log_exhausted(self) -> None:
        if self._exhausted_logged:
            return
        self._exhausted_logged = True
        if self.skipped_partial or self.skipped_shape:
            log.info(
                "calibration fed %d batch(es) of %d; skipped %d smaller trailing batch(es) and %d batch(es) of "
                "another shape (TensorRT calibrates at one shape per input)",
                self.num_batches, self._batch_size, self.skipped_partial, self.skipped_shape,
            )
        if self.num_batches == 0:
            log.warning(
                "calibration fed no batch: the data holds fewer than %d samples of the expected shape", self._batch_size
            )
