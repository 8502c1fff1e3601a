"""Collecting histograms through ONNX Runtime on tiny graphs built here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantpipe.artifacts import TensorInfo
from quantpipe.calibration import collect_histograms, compute_all, write_trt_cache
from quantpipe.calibration.collect import plan_tensors
from quantpipe.calibration.histogram import StreamingHistogram
from quantpipe.data import open_dataset
from quantpipe.errors import CalibrationError

RNG = np.random.default_rng(3)
INPUT = (TensorInfo("x", "float32", ("N", 2, 5, 5)),)


def tiny_model() -> onnx.ModelProto:
    """x -> Conv -> Relu -> Add(Constant value_floats) -> Mul(Constant tensor) -> ReduceMean -> Flatten -> Gemm,
    plus an int64 Shape output that must not be calibrated."""
    w = numpy_helper.from_array(RNG.standard_normal((3, 2, 3, 3)).astype(np.float32), "W")
    b = numpy_helper.from_array(RNG.standard_normal(3).astype(np.float32), "B")
    wg = numpy_helper.from_array(RNG.standard_normal((3, 4)).astype(np.float32), "Wg")
    bg = numpy_helper.from_array(np.array([0.5, -1.0, 2.0, 0.0], np.float32), "Bg")
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Constant", [], ["shift"], value_floats=[0.1, -0.2, 0.3, -0.4, 0.5]),
        helper.make_node("Add", ["r", "shift"], ["a"]),
        helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.array([-1.5], np.float32))),
        helper.make_node("Mul", ["a", "k"], ["m"]),
        helper.make_node("ReduceMean", ["m"], ["p"], axes=[2, 3]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "Wg", "Bg"], ["y"]),
        helper.make_node("Shape", ["x"], ["s"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("s", TensorProto.INT64, [4])],
        [w, b, wg, bg],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.onnx"
    onnx.save(tiny_model(), p)
    return p


@pytest.fixture
def data_path(tmp_path: Path) -> Path:
    p = tmp_path / "calib.npz"
    np.savez(p, x=(RNG.standard_normal((40, 2, 5, 5)) * np.linspace(0.1, 3, 40)[:, None, None, None]).astype(np.float32))
    return p


def test_plan_finds_inputs_activations_and_weights_including_constants(model_path: Path) -> None:
    plan = plan_tensors(onnx.load(model_path))
    assert plan.inputs == ("x",)
    assert set(plan.activations) == {"c", "r", "a", "m", "p", "f", "y"}  # not the int64 's'
    assert set(plan.weights) == {"W", "B", "Wg", "Bg", "shift", "k"}
    assert plan.relu_from == {"r": "c"}


def test_relu_output_derived_from_its_input_equals_a_direct_pass(model_path: Path, data_path: Path) -> None:
    ds = open_dataset(data_path, INPUT)
    both = collect_histograms(model_path, ds, batch_size=8)  # r derived from c's signed histogram
    alone = collect_histograms(model_path, ds, batch_size=8, tensors=["r"])  # r fetched and binned itself
    assert alone.histograms["r"] == both.histograms["r"]
    assert both.histograms["r"].num_values == both.histograms["c"].num_values


def test_histograms_match_the_model_and_weights(model_path: Path, data_path: Path) -> None:
    ds = open_dataset(data_path, INPUT)
    stats = collect_histograms(model_path, ds, batch_size=8)
    assert stats.kinds["x"] == "input" and stats.kinds["r"] == "activation" and stats.kinds["k"] == "weight"
    assert stats.kinds["shift"] == "weight" and "s" not in stats.histograms
    # One 1-sample run sizes the runs under the memory budget; then 8 samples per run fit: 1 + 7, 8, 8, 8, 8.
    assert stats.num_samples == 40 and stats.num_batches == 6
    x = np.load(data_path)["x"]
    y = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]
    assert stats.histograms["y"].absmax == float(np.abs(y).max())
    assert stats.histograms["x"].absmax == float(np.abs(x).max())
    assert stats.histograms["y"].num_values == y.size
    assert stats.histograms["k"].absmax == 1.5 and stats.histograms["k"].num_values == 1
    assert stats.histograms["shift"].absmax == pytest.approx(0.5) and stats.histograms["shift"].num_values == 5
    w = numpy_helper.to_array(onnx.load(model_path).graph.initializer[0])
    assert stats.histograms["W"].absmax == float(np.abs(w).max())
    relu = stats.histograms["r"].binned()
    assert relu.counts[0] > 0  # ReLU zeros


def test_bit_identical_across_batch_sizes(model_path: Path, data_path: Path, tmp_path: Path) -> None:
    ds = open_dataset(data_path, INPUT)
    runs = {bs: collect_histograms(model_path, ds, batch_size=bs) for bs in (1, 8, 32)}
    caches = {}
    for bs, stats in runs.items():
        assert stats.histograms == runs[1].histograms  # StreamingHistogram equality is bit-exact
        amax = compute_all(stats, ["entropy", "minmax", "percentile", "mse"])
        assert amax == compute_all(runs[1], ["entropy", "minmax", "percentile", "mse"])
        caches[bs] = write_trt_cache(tmp_path / f"{bs}.cache", amax["entropy"], method="entropy").read_bytes()
    assert caches[1] == caches[8] == caches[32]


def test_memory_budget_splits_runs_without_changing_results(model_path: Path, data_path: Path) -> None:
    ds = open_dataset(data_path, INPUT)
    whole = collect_histograms(model_path, ds, batch_size=40, max_run_bytes=None)
    seen: list[int] = []
    split = collect_histograms(model_path, ds, batch_size=40, max_run_bytes=3000,
                               on_batch=lambda done, total: seen.append(done))
    assert whole.num_batches == 1 and split.num_batches > 4  # ~700 bytes of activations per sample
    assert seen[0] == 1 and seen[-1] == 40 and seen == sorted(seen)
    assert split.histograms == whole.histograms


def test_external_data_model(tmp_path: Path, data_path: Path) -> None:
    folder = tmp_path / "ext"
    folder.mkdir()
    model = tiny_model()
    embedded = tmp_path / "embedded.onnx"
    onnx.save(model, embedded)
    onnx.save(model, folder / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.weights", size_threshold=0)
    assert (folder / "m.weights").is_file()
    assert onnx.load(folder / "m.onnx", load_external_data=False).graph.initializer[0].data_location == 1
    ds = open_dataset(data_path, INPUT)
    assert collect_histograms(folder / "m.onnx", ds, batch_size=16).histograms == \
        collect_histograms(embedded, ds, batch_size=16).histograms


def test_progress_callback_and_tensor_selection(model_path: Path, data_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    stats = collect_histograms(model_path, open_dataset(data_path, INPUT), batch_size=16, tensors=["r", "W"],
                               on_batch=lambda done, total: seen.append((done, total)), max_run_bytes=None)
    assert seen == [(16, 40), (32, 40), (40, 40)]
    assert set(stats.histograms) == {"r", "W"}
    with pytest.raises(CalibrationError, match="nope"):
        collect_histograms(model_path, open_dataset(data_path, INPUT), tensors=["nope"])


def test_nan_produced_by_the_model_names_the_tensor(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Sqrt", ["x"], ["root"]), helper.make_node("Relu", ["root"], ["out"])], "nan",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3])],
    )
    path = tmp_path / "nan.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    data = tmp_path / "d.npz"
    np.savez(data, x=np.array([[1.0, 4.0, 9.0], [1.0, -1.0, 2.0]], np.float32))
    ds = open_dataset(data, (TensorInfo("x", "float32", ("N", 3)),))
    with pytest.raises(CalibrationError, match="'root'.*starting at sample 1"):
        collect_histograms(path, ds, batch_size=1)


def test_folder_of_samples_with_different_shapes(tmp_path: Path) -> None:
    """Dynamic spatial size: samples that cannot be stacked run one at a time, same histograms."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("ReduceMax", ["r"], ["y"], axes=[2, 3], keepdims=0)],
        "dyn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
    )
    path = tmp_path / "dyn.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    folder = tmp_path / "samples"
    folder.mkdir()
    arrays = [RNG.standard_normal((1, 1, 3 + i % 3, 4)).astype(np.float32) for i in range(7)]
    for i, a in enumerate(arrays):
        np.savez(folder / f"{i:03d}.npz", x=a)
    ds = open_dataset(folder, (TensorInfo("x", "float32", ("N", 1, "H", "W")),))
    stats = collect_histograms(path, ds, batch_size=4)
    expected = StreamingHistogram()
    for a in arrays:
        expected.update(np.maximum(a, 0))
    assert stats.histograms["r"] == expected
