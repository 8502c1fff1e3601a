"""The runner that evaluates a TensorRT engine: by tensor name, on one CUDA stream, timed with CUDA events."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from quantpipe.backends.base import Runner, Timings
from quantpipe.backends.tensorrt.build import dims_tuple, make_logger
from quantpipe.backends.tensorrt.metadata import check_engine_metadata, current_gpu, read_engine_metadata
from quantpipe.backends.tensorrt.version import require_tensorrt, trt
from quantpipe.cuda import CudaRuntimeAllocator, CudaStream, DeviceBuffer
from quantpipe.errors import EvaluationError, QuantpipeError
from quantpipe.fsutil import sha256_file

__all__ = ["TensorRTRunner"]


class TensorRTRunner(Runner):
    """Runs a TensorRT engine by tensor name (set_tensor_address / execute_async_v3) on one CUDA stream.

    `__enter__` refuses an engine whose metadata names another TensorRT version or GPU (or, with
    `source_sha256`, another source model), then deserializes it. Latency is timed with CUDA events
    after warm-up, host->device copies, compute and device->host copies apart.
    """

    def __init__(
        self,
        engine_path: str | Path,
        name: str | None = None,
        *,
        source_sha256: str | None = None,
        device: int = 0,
    ) -> None:
        self.engine_path = Path(engine_path)
        self.name = name or self.engine_path.stem
        self.device = "cuda"
        self.device_index = device
        self.source_sha256 = source_sha256
        self._rt: Any = None
        self._alloc: CudaRuntimeAllocator | None = None
        self._logger: Any = None
        self._runtime: trt.Runtime | None = None
        self._engine: trt.ICudaEngine | None = None
        self._context: trt.IExecutionContext | None = None
        self._stream: CudaStream | None = None
        self._inputs: list[str] = []
        self._outputs: list[str] = []
        self._buffers: dict[str, DeviceBuffer] = {}

    # -- lifecycle ----------------------------------------------------------------------------------

    def __enter__(self) -> TensorRTRunner:
        api = require_tensorrt()
        meta = read_engine_metadata(self.engine_path)
        gpu = current_gpu(self.device_index)
        check_engine_metadata(
            meta, engine_path=self.engine_path, tensorrt_version=api.version, gpu=gpu,
            source_sha256=self.source_sha256, engine_sha256=sha256_file(self.engine_path),
        )
        try:
            self._open()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _open(self) -> None:
        self._alloc = CudaRuntimeAllocator(self.device_index)
        rt = self._rt = self._alloc.runtime
        self._logger = make_logger()
        self._runtime = trt.Runtime(self._logger)
        engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if engine is None:
            raise EvaluationError(
                f"TensorRT could not deserialize {self.engine_path}: " + ("; ".join(self._logger.errors[-3:]) or "no detail")
            )
        self._engine = engine
        self._context = engine.create_execution_context()
        self._stream = CudaStream(rt, num_events=4)
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            (self._inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else self._outputs).append(name)

    def __exit__(self, *exc: object) -> None:
        if self._stream is not None:
            with contextlib.suppress(QuantpipeError):
                self._stream.close()  # synchronizes first: no copy may still target the buffers freed below
            self._stream = None
        # Release in dependency order: the context uses the engine, the engine the runtime; then the buffers.
        self._context = None
        self._engine = None
        self._runtime = None
        if self._alloc is not None:
            for buf in self._buffers.values():
                with contextlib.suppress(QuantpipeError):
                    self._alloc.free(buf.ptr)
        self._buffers = {}
        self._rt = None

    # -- Runner -------------------------------------------------------------------------------------

    @property
    def input_names(self) -> list[str]:
        return list(self._inputs)

    @property
    def output_names(self) -> list[str]:
        return list(self._outputs)

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        hosts_in, hosts_out = self._prepare(feeds)
        self._copy_in(hosts_in)
        self._execute()
        self._copy_out(hosts_out)
        self._sync()
        return hosts_out

    def measure(self, feeds: Mapping[str, np.ndarray], warmup: int, iterations: int) -> Timings:
        if iterations < 1:
            raise EvaluationError(f"latency needs at least one timed iteration, got {iterations}")
        self._need_rt()
        stream = self._stream
        assert stream is not None
        hosts_in, hosts_out = self._prepare(feeds)
        for _ in range(max(warmup, 1)):  # at least one: the first run pays lazy initialisation
            self._copy_in(hosts_in)
            self._execute()
            self._copy_out(hosts_out)
        stream.synchronize()
        total, h2d, compute, d2h = (np.empty(iterations) for _ in range(4))
        for i in range(iterations):
            stream.record(0)
            self._copy_in(hosts_in)
            stream.record(1)
            self._execute()
            stream.record(2)
            self._copy_out(hosts_out)
            stream.record(3)
            stream.wait_event(3)
            h2d[i], compute[i], d2h[i] = stream.elapsed_ms(0, 1), stream.elapsed_ms(1, 2), stream.elapsed_ms(2, 3)
            total[i] = stream.elapsed_ms(0, 3)
        return Timings(total=total, timer="cuda_events", compute=compute, h2d=h2d, d2h=d2h)

    # -- internals ----------------------------------------------------------------------------------

    def _need_rt(self) -> Any:
        if self._rt is None or self._context is None or self._engine is None:
            raise EvaluationError(f"TensorRT runner {self.name} is not open; use it as a context manager")
        return self._rt

    def _prepare(self, feeds: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Set input shapes, size device buffers, bind addresses; return the host arrays to copy."""
        self._need_rt()
        engine, context = self._engine, self._context
        assert engine is not None and context is not None
        missing = [n for n in self._inputs if n not in feeds]
        if missing:
            raise EvaluationError(f"TensorRT engine {self.name} needs inputs {missing} (given: {sorted(feeds)})")
        hosts_in: dict[str, np.ndarray] = {}
        for name in self._inputs:
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            arr = np.ascontiguousarray(feeds[name], dtype=dtype)
            # trt.Dims, not a tuple: 8.6's set_input_shape takes only Dims (10.x added tuple and list overloads).
            if not context.set_input_shape(name, trt.Dims(list(arr.shape))):
                raise EvaluationError(
                    f"TensorRT engine {self.name} rejects input '{name}' of shape {list(arr.shape)}: outside the engine's "
                    f"optimization profile (engine shape {list(dims_tuple(engine.get_tensor_shape(name)))})"
                )
            self._bind(name, arr.nbytes)
            hosts_in[name] = arr
        hosts_out: dict[str, np.ndarray] = {}
        for name in self._outputs:
            shape = dims_tuple(context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise EvaluationError(f"output '{name}' of engine {self.name} has a data-dependent shape {list(shape)}, which the runner does not support")
            arr = np.empty(shape, dtype=np.dtype(trt.nptype(engine.get_tensor_dtype(name))))
            self._bind(name, arr.nbytes)
            hosts_out[name] = arr
        return hosts_in, hosts_out

    def _bind(self, name: str, nbytes: int) -> None:
        assert self._alloc is not None and self._context is not None
        buf = self._buffers.get(name)
        if buf is None or buf.nbytes < nbytes:
            if buf is not None:
                self._alloc.free(buf.ptr)
                del self._buffers[name]
            buf = DeviceBuffer(self._alloc.alloc(nbytes), max(nbytes, 1))
            self._buffers[name] = buf
        if not self._context.set_tensor_address(name, buf.ptr):
            raise EvaluationError(f"TensorRT refused the device address for tensor '{name}' of engine {self.name}")

    def _copy_in(self, hosts: Mapping[str, np.ndarray]) -> None:
        assert self._stream is not None
        for name, arr in hosts.items():
            self._stream.h2d(self._buffers[name].ptr, arr)

    def _execute(self) -> None:
        assert self._context is not None and self._stream is not None
        if not self._context.execute_async_v3(self._stream.handle):
            raise EvaluationError(f"TensorRT execute_async_v3 failed for engine {self.name}: " + "; ".join(self._logger.errors[-3:]))

    def _copy_out(self, hosts: Mapping[str, np.ndarray]) -> None:
        assert self._stream is not None
        for name, arr in hosts.items():
            self._stream.d2h(arr, self._buffers[name].ptr)

    def _sync(self) -> None:
        assert self._stream is not None
        self._stream.synchronize()
