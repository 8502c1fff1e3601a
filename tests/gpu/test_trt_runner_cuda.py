"""The TensorRT runner's CUDA plumbing (stream, events, asynchronous copies) for real, without TensorRT."""

from __future__ import annotations

from typing import Any

import numpy as np

from quantpipe.cuda import CudaRuntimeAllocator, CudaStream


def test_stream_copies_round_trip_and_events_time_them(cuda_rt: Any) -> None:
    alloc = CudaRuntimeAllocator()
    stream = CudaStream(cuda_rt, num_events=4)
    host = np.random.default_rng(0).standard_normal(16 << 20).astype(np.float32)  # 64 MiB
    back = np.full_like(host, np.nan)
    ptr = alloc.alloc(host.nbytes)
    try:
        assert isinstance(stream.handle, int) and stream.handle != 0  # what execute_async_v3 takes
        stream.record(0)
        stream.h2d(ptr, host)
        stream.record(1)
        stream.d2h(back, ptr)
        stream.record(2)
        stream.wait_event(2)
        np.testing.assert_array_equal(back, host)
        h2d, d2h, total = stream.elapsed_ms(0, 1), stream.elapsed_ms(1, 2), stream.elapsed_ms(0, 2)
        assert h2d > 0 and d2h > 0 and abs(total - (h2d + d2h)) < 0.05 * total + 0.01
        assert host.nbytes / (h2d * 1e-3) > 1e9  # more than 1 GB/s: the events time the copy, not a no-op
    finally:
        stream.close()
        alloc.free(ptr)
    stream.close()  # idempotent
    assert stream.stream is None
