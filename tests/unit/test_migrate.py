"""Migration from TensorRT <= 10: legacy calibration caches -> the Q/DQ model, with exactly the cache's scales.

The fixtures are written the way TensorRT 5-10 write a cache (IInt8Calibrator::writeCalibrationCache; checked
against NVIDIA/TensorRT samples/sampleINT8/README.md, Polygraphy's calibrator, which saves TensorRT's bytes as
they are, TAO's exporter, and trtexec caches in public repositories): a `TRT-<NV_TENSORRT_VERSION>-<calibrator>`
header, then `name: <hex>` per tensor of TensorRT's network, the hex being the float32 scale's bits printed
without leading zeros (`0` for a zero scale), TensorRT's own `(Unnamed Layer* N) [...]_output` tensors included.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantpipe.calibration import calibrate_to_cache, read_trt_cache
from quantpipe.calibration.cache import sidecar_path
from quantpipe.cli import main
from quantpipe.data import open_dataset
from quantpipe.errors import EXIT_BAD_INPUT, EXIT_OK, DataError, StaleArtifactError
from quantpipe.migrate import exact_scale_options, migrate_cache, read_legacy_cache, tensors_to_quantize
from quantpipe.model import load_model_spec
from quantpipe.quantize import QuantizeOptions, write_qdq_model

RNG = np.random.default_rng(17)
EVERY_TENSOR = ["input", "conv1", "relu1", "conv2", "relu2", "pool", "flat", "logits"]
QUANTIZED = ["input", "relu1", "flat"]  # what quantpipe's placement puts Q/DQ on (Conv, Conv, Gemm inputs)


def _cnn(path: Path) -> Path:
    """input[N,3,8,8] -> Conv -> Relu -> Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> logits[N,5]."""
    inits = [numpy_helper.from_array(RNG.standard_normal(s).astype(np.float32) * 0.3, n) for n, s in
             (("w1", (4, 3, 3, 3)), ("b1", (4,)), ("w2", (6, 4, 3, 3)), ("b2", (6,)), ("w3", (5, 6)), ("b3", (5,)))]
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["conv1"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv1"], ["relu1"], name="r1"),
        helper.make_node("Conv", ["relu1", "w2", "b2"], ["conv2"], name="c2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv2"], ["relu2"], name="r2"),
        helper.make_node("GlobalAveragePool", ["relu2"], ["pool"], name="gap"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "w3", "b3"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.fixture
def cnn(tmp_path: Path) -> Path:
    return _cnn(tmp_path / "cnn.onnx")


@pytest.fixture
def cnn_data(tmp_path: Path) -> Path:
    path = tmp_path / "calib.npz"
    np.savez(path, input=RNG.standard_normal((16, 3, 8, 8)).astype(np.float32))
    return path


def trt_hex(scale: float) -> str:
    """How TensorRT prints a scale: the float32's bits in lowercase hex, no leading zeros."""
    return format(struct.unpack(">I", struct.pack(">f", scale))[0], "x")


def awkward_scales(names: list[str]) -> dict[str, float]:
    """float32 scales whose mantissas use every bit (a float64 detour would show)."""
    return {n: float(np.float32(RNG.uniform(0.001, 0.2))) for n in names}


def write_legacy_cache(path: Path, header: str, scales: dict[str, float], *, newline: str = "\n",
                       extra_lines: tuple[str, ...] = ()) -> Path:
    lines = [header, *(f"{n}: {trt_hex(s)}" for n, s in scales.items()), *extra_lines]
    path.write_bytes((newline.join(lines) + newline).encode())
    return path


def activation_scales(path: Path) -> dict[str, np.float32]:
    """Quantized tensor -> the scale of its QuantizeLinear, as stored (float32)."""
    m = onnx.load(path)
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    return {n.input[0]: inits[n.input[1]][()] for n in m.graph.node if n.op_type == "QuantizeLinear"}


def test_the_tensors_to_quantize_are_the_placements(cnn: Path) -> None:
    assert tensors_to_quantize(onnx.load(cnn)) == QUANTIZED


@pytest.mark.parametrize(("header", "version", "algorithm", "method"), [
    ("TRT-8601-EntropyCalibration2", "8.6.1", "EntropyCalibration2", "entropy"),  # TensorRT 8.6.1
    ("TRT-8510-EntropyCalibration2", "8.5.10", "EntropyCalibration2", "entropy"),
    ("TRT-100300-MinMaxCalibration", "10.3.0", "MinMaxCalibration", "minmax"),  # TensorRT 10.3
    ("TRT-101300-EntropyCalibration2", "10.13.0", "EntropyCalibration2", "entropy"),
    ("TRT-7103-EntropyCalibration2", "7.1.3", "EntropyCalibration2", "entropy"),  # JetPack 4 era
    ("TRT-7000-EntropyCalibration", "7.0.0", "EntropyCalibration", "entropy"),
    ("TRT-5105-LegacyCalibration", "5.1.5", "LegacyCalibration", "percentile"),
])
def test_every_header_family_reads_with_its_version_and_calibrator(tmp_path: Path, cnn: Path, header: str,
                                                                   version: str, algorithm: str, method: str) -> None:
    scales = awkward_scales(EVERY_TENSOR)
    match = read_legacy_cache(write_legacy_cache(tmp_path / "c.cache", header, scales), cnn)
    assert (match.cache.header, match.cache.trt_version, match.cache.algorithm, match.method) == (header, version, algorithm, method)
    assert dict(match.scales) == {t: scales[t] for t in QUANTIZED}
    assert match.missing == () and match.unknown == ()
    assert set(match.unused) == set(EVERY_TENSOR) - set(QUANTIZED)


def test_the_qdq_scales_are_the_cache_float32_bit_for_bit(tmp_path: Path, cnn: Path) -> None:
    scales = awkward_scales(EVERY_TENSOR)
    cache = write_legacy_cache(tmp_path / "trt86.cache", "TRT-8601-EntropyCalibration2", scales)
    out = tmp_path / "q.onnx"
    rep, migration = migrate_cache(cnn, cache, out)
    written = activation_scales(out)
    assert set(written) == set(QUANTIZED)
    for t in QUANTIZED:
        assert written[t].dtype == np.float32
        assert written[t].tobytes() == np.float32(scales[t]).tobytes(), t
    assert migration.calibrated == () and migration.left_float == ()
    assert {n.name for n in rep.quantized_nodes} == {"c1", "c2", "fc"}
    # Weights come from the model (per output channel), never from the cache.
    m = onnx.load(out)
    assert sum(n.op_type == "DequantizeLinear" and n.input[0].endswith("_int8") for n in m.graph.node) == 3
    assert any("shift_nonnegative" in d for d in migration.disabled)


def test_crlf_and_a_byte_order_mark_read_the_same(tmp_path: Path, cnn: Path) -> None:
    scales = awkward_scales(EVERY_TENSOR)
    plain = read_legacy_cache(write_legacy_cache(tmp_path / "a.cache", "TRT-8601-EntropyCalibration2", scales), cnn)
    windows = tmp_path / "b.cache"
    write_legacy_cache(windows, "TRT-8601-EntropyCalibration2", scales, newline="\r\n")
    windows.write_bytes(b"\xef\xbb\xbf" + windows.read_bytes())
    assert read_legacy_cache(windows, cnn).scales == plain.scales


def test_missing_tensors_without_data_stay_float_and_are_named(tmp_path: Path, cnn: Path) -> None:
    scales = awkward_scales([t for t in EVERY_TENSOR if t != "relu1"])
    cache = write_legacy_cache(tmp_path / "c.cache", "TRT-100300-MinMaxCalibration", scales)
    out = tmp_path / "q.onnx"
    rep, migration = migrate_cache(cnn, cache, out)
    assert migration.match.missing == ("relu1",) and migration.left_float == ("relu1",)
    assert "c2" in {f.name for f in rep.kept_float} and "c2" not in {n.name for n in rep.quantized_nodes}
    assert set(activation_scales(out)) == {"input", "flat"}
    assert any("left in float" in line and "'relu1'" in line for line in migration.lines())


def test_missing_tensors_are_calibrated_from_data_with_the_cache_calibrator(tmp_path: Path, cnn: Path,
                                                                          cnn_data: Path) -> None:
    scales = awkward_scales([t for t in EVERY_TENSOR if t != "relu1"])
    cache = write_legacy_cache(tmp_path / "c.cache", "TRT-100300-MinMaxCalibration", scales)
    spec, _ = load_model_spec(cnn)
    ds = open_dataset(cnn_data, spec.inputs, role="calibration")
    out = tmp_path / "q.onnx"
    rep, migration = migrate_cache(cnn, cache, out, calibration_data=ds, batch_size=4)
    assert migration.calibrated == ("relu1",) and migration.left_float == ()
    written = activation_scales(out)
    # minmax (the cache's calibrator): the largest |relu1| over the data, as the FP32 model computes it.
    import onnxruntime as ort

    m = onnx.load(cnn)
    m.graph.output.append(helper.make_tensor_value_info("relu1", TensorProto.FLOAT, None))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    relu1 = sess.run(["relu1"], {"input": np.load(cnn_data)["input"]})[0]
    assert written["relu1"] == pytest.approx(np.abs(relu1).max() / 127, rel=1e-6)
    for t in ("input", "flat"):
        assert written[t].tobytes() == np.float32(scales[t]).tobytes()
    assert {n.name for n in rep.quantized_nodes} == {"c1", "c2", "fc"}


def test_entries_that_name_no_tensor_are_ignored_and_listed(tmp_path: Path, cnn: Path) -> None:
    scales = awkward_scales(EVERY_TENSOR)
    cache = write_legacy_cache(tmp_path / "c.cache", "TRT-8601-EntropyCalibration2", scales, extra_lines=(
        "(Unnamed Layer* 5) [Shuffle]_output: 3c010a14", "(Unnamed Layer* 9) [Constant]_output: 0"))
    match = read_legacy_cache(cache, cnn)
    assert match.unknown == ("(Unnamed Layer* 5) [Shuffle]_output", "(Unnamed Layer* 9) [Constant]_output")
    assert dict(match.scales) == {t: scales[t] for t in QUANTIZED}


def test_a_cache_of_another_model_is_refused(tmp_path: Path, cnn: Path, capsys: pytest.CaptureFixture) -> None:
    other = {f"/backbone/layer{i}/Conv_output_0": 0.01 * (i + 1) for i in range(12)} | {"input": 0.02}
    cache = write_legacy_cache(tmp_path / "other.cache", "TRT-8601-EntropyCalibration2", other)
    with pytest.raises(StaleArtifactError, match=r"not written for this model: only 1 of its 13 entries"):
        read_legacy_cache(cache, cnn)
    code = main(["quantize", "--model", str(cnn), "--from-cache", str(cache), "-o", str(tmp_path / "q.onnx")])
    assert code == EXIT_BAD_INPUT
    assert "not written for this model" in capsys.readouterr().err
    assert not (tmp_path / "q.onnx").exists()


def test_a_corrupt_line_is_bad_input_with_its_line_number(tmp_path: Path, cnn: Path) -> None:
    cache = write_legacy_cache(tmp_path / "c.cache", "TRT-8601-EntropyCalibration2", awkward_scales(EVERY_TENSOR),
                               extra_lines=("relu2 3c010a14",))
    with pytest.raises(DataError, match=r"line 10: 'relu2 3c010a14' is not 'tensor: <hex float32 scale>'"):
        read_legacy_cache(cache, cnn)
    no_header = tmp_path / "n.cache"
    no_header.write_text("input: 3c010a14\n")
    with pytest.raises(DataError, match="not a TensorRT calibration cache"):
        read_legacy_cache(no_header, cnn)
    assert DataError.exit_code == EXIT_BAD_INPUT


def test_a_zero_scale_leaves_its_node_float(tmp_path: Path, cnn: Path) -> None:
    scales = awkward_scales(EVERY_TENSOR) | {"flat": 0.0}
    cache = write_legacy_cache(tmp_path / "c.cache", "TRT-8601-EntropyCalibration2", scales)
    assert "flat: 0\n" in cache.read_text()
    rep, _ = migrate_cache(cnn, cache, tmp_path / "q.onnx")
    assert any(f.name == "fc" and "constant zero" in f.reason for f in rep.kept_float)


def test_round_trip_quantpipe_cache_gives_quantpipe_own_scales(tmp_path: Path, cnn: Path, cnn_data: Path) -> None:
    spec, _ = load_model_spec(cnn)
    ds = open_dataset(cnn_data, spec.inputs, role="calibration")
    cache = tmp_path / "own.cache"
    calibrate_to_cache(cnn, ds, methods=["entropy"], cache=cache, batch_size=4)
    sidecar = json.loads(sidecar_path(cache).read_text())
    amax = {n: t["amax"] for n, t in sidecar["tensors"].items() if t["kind"] != "weight"}
    options, _ = exact_scale_options(QuantizeOptions())
    write_qdq_model(cnn, amax, tmp_path / "own.onnx", options)
    migrate_cache(cnn, cache, tmp_path / "migrated.onnx")
    own, migrated = activation_scales(tmp_path / "own.onnx"), activation_scales(tmp_path / "migrated.onnx")
    assert set(own) == set(QUANTIZED)
    assert {k: v.tobytes() for k, v in migrated.items()} == {k: v.tobytes() for k, v in own.items()}
    in_cache = read_trt_cache(cache).scales
    assert {k: in_cache[k] for k in own} == {k: float(v) for k, v in own.items()}


def test_cli_reports_version_algorithm_missing_and_ignored(tmp_path: Path, cnn: Path, cnn_data: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    scales = awkward_scales([t for t in EVERY_TENSOR if t != "relu1"])
    cache = write_legacy_cache(tmp_path / "c.cache", "TRT-8601-EntropyCalibration2", scales,
                               extra_lines=("(Unnamed Layer* 5) [Shuffle]_output: 3c010a14",))
    out = tmp_path / "q.onnx"
    assert main(["quantize", "--model", str(cnn), "--from-cache", str(cache), "--calibration-data", str(cnn_data),
                 "-o", str(out), "-q"]) == EXIT_OK
    text = " ".join(capsys.readouterr().out.split())
    assert "TensorRT 8.6.1, EntropyCalibration2" in text
    assert "calibrated from the data (entropy): 'relu1'" in text
    assert "no tensor of the model (ignored): '(Unnamed Layer* 5) [Shuffle]_output'" in text
    assert set(activation_scales(out)) == set(QUANTIZED)


def test_fp16_and_from_cache_conflict(tmp_path: Path, cnn: Path, capsys: pytest.CaptureFixture) -> None:
    cache = write_legacy_cache(tmp_path / "c.cache", "TRT-8601-EntropyCalibration2", awkward_scales(EVERY_TENSOR))
    assert main(["quantize", "--model", str(cnn), "--from-cache", str(cache), "--fp16", "-o",
                 str(tmp_path / "q.onnx")]) == EXIT_BAD_INPUT
    assert "--fp16 and --from-cache" in capsys.readouterr().err


def test_tao_calibration_json_reads_as_the_cache_tao_writes_from_it(tmp_path: Path, cnn: Path) -> None:
    """TAO exports `{"tensor_scales": {tensor: amax}}` (--cal_json_file) and writes its cal.bin from the same
    mapping: scale = float32(amax / 127) under an EntropyCalibration2 header."""
    amax = {t: float(RNG.uniform(0.5, 20.0)) for t in EVERY_TENSOR}
    tao_json = tmp_path / "cal.json"
    tao_json.write_text(json.dumps({"tensor_scales": amax}, indent=4))
    cal_bin = write_legacy_cache(tmp_path / "cal.bin", "TRT-8601-EntropyCalibration2",
                                 {t: struct.unpack("f", struct.pack("f", a / 127.0))[0] for t, a in amax.items()})
    from_json, from_bin = read_legacy_cache(tao_json, cnn), read_legacy_cache(cal_bin, cnn)
    assert dict(from_json.scales) == dict(from_bin.scales) and len(from_json.scales) == len(QUANTIZED)
    assert from_json.cache.trt_version == "" and from_json.method == "entropy"
    rep, migration = migrate_cache(cnn, tao_json, tmp_path / "q.onnx")
    assert "TAO's QAT scales" in migration.lines()[0]
    assert {k: v.tobytes() for k, v in activation_scales(tmp_path / "q.onnx").items()} == {
        t: np.float32(from_bin.scales[t]).tobytes() for t in QUANTIZED}
    bad = tmp_path / "bad.json"
    bad.write_text('{"tensor_scales": {"input": "x"}}')
    with pytest.raises(DataError, match=r"tensor_scales\['input'\] is 'x'"):
        read_legacy_cache(bad, cnn)


def test_an_empty_cache_and_an_unknown_calibrator_are_refused(tmp_path: Path, cnn: Path) -> None:
    empty = write_legacy_cache(tmp_path / "e.cache", "TRT-8601-EntropyCalibration2", {})
    with pytest.raises(StaleArtifactError, match="holds no tensor scales"):
        read_legacy_cache(empty, cnn)
    odd = write_legacy_cache(tmp_path / "o.cache", "TRT-8601-FancyCalibration", awkward_scales(EVERY_TENSOR))
    with pytest.raises(DataError, match="names the calibrator 'FancyCalibration'"):
        read_legacy_cache(odd, cnn)
