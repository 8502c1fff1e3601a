"""Calibration on the GPU: CuPy histograms and the CUDA execution provider give the CPU's exact histograms."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantpipe.artifacts import TensorInfo
from quantpipe.calibration import collect_histograms, compute_amax
from quantpipe.calibration.histogram import InfiniteValues, SignedHistogram, StreamingHistogram, device_extremes
from quantpipe.data import open_dataset

pytestmark = pytest.mark.gpu
RNG = np.random.default_rng(17)


@pytest.fixture(scope="module")
def cupy() -> Any:
    """CuPy with a usable device, else skip saying why."""
    try:
        import cupy as cp

        cp.cuda.runtime.getDeviceCount()
        cp.zeros(1).sum()
    except Exception as err:  # not installed, no driver, no device
        pytest.skip(f"needs CuPy and an NVIDIA GPU: {type(err).__name__}: {err}")
    return cp


@pytest.mark.parametrize("kernel", [True, False], ids=["fused-kernel", "cupy-functions"])
@pytest.mark.parametrize("kind", ["gaussian", "relu_zeros", "subnormal", "shifted", "growing", "negative", "float16",
                                  "signed_zeros"])
def test_cupy_histograms_are_bit_identical_to_numpy(cupy: Any, kind: str, kernel: bool,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from quantpipe.calibration import histogram

    monkeypatch.setattr(histogram, "GPU_KERNEL", kernel)
    x = {
        "gaussian": lambda: RNG.standard_normal(2_000_000) * 3,
        "relu_zeros": lambda: np.maximum(RNG.standard_normal(1_000_000), 0),
        "subnormal": lambda: RNG.standard_normal(100_000) * 1e-39,
        "shifted": lambda: RNG.standard_normal(500_000) * 2 + 5,
        # the range grows part after part (bins merged on the host between device updates)
        "growing": lambda: np.concatenate([RNG.standard_normal(300_000) * 10.0 ** k for k in range(-3, 4)]),
        "negative": lambda: -np.abs(RNG.standard_normal(700_000)),
        "float16": lambda: RNG.standard_normal(600_000) * 7,
        "signed_zeros": lambda: np.where(RNG.random(900_000) < 0.5, -0.0, RNG.standard_normal(900_000)),
    }[kind]()
    x = x.astype(np.float16 if kind == "float16" else np.float32)
    parts = np.array_split(x, 7)
    cpu, gpu, scpu, sgpu = StreamingHistogram(), StreamingHistogram(), SignedHistogram(), SignedHistogram()
    gpu_read, sgpu_read = StreamingHistogram(), SignedHistogram()  # the ranges read back by device_extremes
    for p in parts:
        cpu.update(p)
        gpu.update(cupy.asarray(p))
        scpu.update(p)
        sgpu.update(cupy.asarray(p))
        (ext,) = device_extremes([cupy.asarray(p)])
        gpu_read.update(cupy.asarray(p), ext)
        sgpu_read.update(cupy.asarray(p), ext)
    assert gpu == cpu == gpu_read
    assert sgpu.absolute() == scpu.absolute() == cpu and sgpu.relu() == scpu.relu()
    assert sgpu_read.absolute() == cpu and sgpu_read.relu() == scpu.relu()
    for method in ("entropy", "minmax", "percentile", "mse"):
        assert compute_amax(gpu, method) == compute_amax(cpu, method)
    # Counts read, then more data: the device counts start again from zero.
    more = cupy.asarray(parts[0])
    gpu.update(more)
    cpu.update(parts[0])
    assert gpu == cpu


def test_cupy_nan_is_refused_and_inf_told_apart(cupy: Any) -> None:
    for values, error in (([1.0, np.nan, -2.0], "NaN value"), ([1.0, np.inf, -2.0], "Inf value"),
                          ([1.0, -np.inf, -2.0], "Inf value"), ([np.inf, np.nan, -np.inf], "NaN value")):
        bad = cupy.asarray(np.array(values, dtype=np.float32))
        (ext,) = device_extremes([bad])
        for h in (StreamingHistogram(), SignedHistogram()):
            for given in (None, ext):
                with pytest.raises(ValueError, match=error) as err:
                    h.update(bad, given)
                assert isinstance(err.value, InfiniteValues) == (error == "Inf value")


def test_device_extremes_read_every_range_in_one_copy(cupy: Any) -> None:
    arrays = [cupy.asarray(np.array([3.0, -7.5, 1.0], np.float32)), np.ones(3, np.float32),
              cupy.asarray(np.zeros(0, np.float32)), cupy.asarray(np.array([-0.5, 2.25], np.float16))]
    assert device_extremes(arrays) == [(3.0, -7.5), None, None, (2.25, -0.5)]


def test_cuda_execution_provider_gives_the_cpu_histograms(ort_cuda: None, tmp_path: Path) -> None:
    w = numpy_helper.from_array(RNG.standard_normal((4, 2, 3, 3)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], [w],
    )
    model = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), model)
    np.savez(tmp_path / "d.npz", x=RNG.standard_normal((32, 2, 8, 8)).astype(np.float32))
    ds = open_dataset(tmp_path / "d.npz", (TensorInfo("x", "float32", ("N", 2, 8, 8)),))
    cpu = collect_histograms(model, ds, batch_size=8)
    cuda = collect_histograms(model, ds, batch_size=8, providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
    assert set(cuda.histograms) == set(cpu.histograms)
    # Convolution on the GPU may round differently from the CPU: compare what the device cannot change
    # exactly (inputs, weights) and the rest within a bin.
    assert cuda.histograms["x"] == cpu.histograms["x"] and cuda.histograms["W"] == cpu.histograms["W"]
    for name in ("c", "y"):
        a, b = cuda.histograms[name].binned(), cpu.histograms[name].binned()
        assert a.num_values == b.num_values and abs(a.absmax - b.absmax) <= 1e-4 * b.absmax
