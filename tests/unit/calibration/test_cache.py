"""TensorRT caches, sidecars, saved histograms, stale-cache refusal and the calibrate stage's files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantpipe.artifacts import TensorInfo
from quantpipe.calibration import (
    MIN_AMAX,
    calibrate,
    load_cache,
    load_histograms,
    read_trt_cache,
    select_amax,
    sidecar_path,
    write_trt_cache,
)
from quantpipe.calibration.cache import decode_trt_version, encode_trt_version
from quantpipe.calibration.histfile import save_histograms
from quantpipe.calibration.histogram import StreamingHistogram
from quantpipe.data import open_dataset
from quantpipe.errors import CalibrationError, ConfigError, StaleArtifactError

RNG = np.random.default_rng(11)

# The calibration table printed in NVIDIA/TensorRT samples/sampleINT8/README.md ("Calibration file"):
# TensorRT's own format, written by TensorRT 7.0's IInt8EntropyCalibrator2 for the MNIST sample.
TENSORRT_SAMPLE_CACHE = """TRT-7000-EntropyCalibration2
data: 3c008912
conv1: 3c88edfc
pool1: 3c88edfc
conv2: 3ddc858b
pool2: 3ddc858b
ip1: 3db6bd6e
ip2: 3e691968
prob: 3c010a14
"""


def _model(path: Path) -> Path:
    w = numpy_helper.from_array(RNG.standard_normal((4, 3)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["y"])], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], [w],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


def _data(path: Path, n: int = 24, scale: float = 1.0) -> Path:
    np.savez(path, x=(RNG.standard_normal((n, 4)) * scale).astype(np.float32))
    return path


INPUTS = (TensorInfo("x", "float32", ("N", 4)),)


def test_reads_tensorrts_own_cache_and_writes_it_back_identically(tmp_path: Path) -> None:
    src = tmp_path / "CalibrationTablemnist"
    src.write_text(TENSORRT_SAMPLE_CACHE)
    cache = read_trt_cache(src)
    assert cache.header == "TRT-7000-EntropyCalibration2" and cache.algorithm == "EntropyCalibration2"
    assert cache.trt_version == "7.0.0"
    assert list(cache.scales) == ["data", "conv1", "pool1", "conv2", "pool2", "ip1", "ip2", "prob"]
    assert cache.scales["prob"] == struct.unpack(">f", bytes.fromhex("3c010a14"))[0]
    assert cache.scales["prob"] * 127 == pytest.approx(1.0, rel=1e-3)  # softmax output: amax ~1
    out = write_trt_cache(tmp_path / "again.cache", cache.amax, method="entropy", trt_version="7.0.0")
    assert out.read_text() == TENSORRT_SAMPLE_CACHE


def test_round_trip_is_bit_exact(tmp_path: Path) -> None:
    amax = {"input": 2.5, "conv/out:0": 0.1234567, "(Unnamed Layer* 3) [Shuffle]_output": 1e-3, "zero": 0.0}
    for method, algorithm in (("entropy", "EntropyCalibration2"), ("minmax", "MinMaxCalibration"),
                              ("percentile", "EntropyCalibration2"), ("mse", "EntropyCalibration2"),
                              ("best", "EntropyCalibration2")):
        path = write_trt_cache(tmp_path / f"{method}.cache", amax, method=method, trt_version="8.6.1")
        back = read_trt_cache(path)
        assert back.header == f"TRT-8601-{algorithm}" and back.trt_version == "8.6.1"
        assert back.scales == {k: float(np.float32(max(v, MIN_AMAX) / 127)) for k, v in amax.items()}
        # amax -> scale -> amax -> scale is stable, so caches can be rewritten for another TensorRT version.
        again = write_trt_cache(tmp_path / "again.cache", back.amax, method=method, trt_version="10.13.0")
        assert read_trt_cache(again).scales == back.scales
    assert read_trt_cache(tmp_path / "entropy.cache").scales["zero"] > 0  # TensorRT needs a positive scale
    with pytest.raises(ConfigError, match="valid methods"):
        write_trt_cache(tmp_path / "x.cache", amax, method="kl")


def test_tensorrt_zero_scale_lines_and_bad_files(tmp_path: Path) -> None:
    p = tmp_path / "trt8.cache"
    p.write_text("TRT-8401-EntropyCalibration2\ninput: 3caa54fc\n366: 0\n(Unnamed Layer* 64) [Shuffle]_output: 0\n")
    c = read_trt_cache(p)
    assert c.trt_version == "8.4.1" and c.scales["366"] == 0.0 and len(c.scales) == 3
    bad = tmp_path / "bad.cache"
    bad.write_text("not a cache\n")
    with pytest.raises(CalibrationError, match="TRT-<version>-<algorithm>"):
        read_trt_cache(bad)
    bad.write_text("TRT-8601-MinMaxCalibration\ninput 3caa54fc\n")
    with pytest.raises(CalibrationError, match="line 2"):
        read_trt_cache(bad)
    with pytest.raises(CalibrationError, match="does not exist"):
        read_trt_cache(tmp_path / "missing.cache")


def test_trt_version_encoding() -> None:
    assert encode_trt_version("10.13.0") == "101300" and encode_trt_version("10.3.0.26") == "100300"
    assert encode_trt_version("8.6.1.6") == "8601" and encode_trt_version("7.0.0") == "7000"
    assert encode_trt_version("8601") == "8601"
    assert decode_trt_version("101300") == "10.13.0" and decode_trt_version("8601") == "8.6.1"


def test_calibrate_writes_caches_sidecars_and_histograms(tmp_path: Path) -> None:
    model = _model(tmp_path / "m.onnx")
    ds = open_dataset(_data(tmp_path / "d.npz"), INPUTS)
    out = tmp_path / "calib"
    summaries = calibrate(model, ds, methods=["entropy", "minmax", "best"], out_dir=out, batch_size=5)
    assert [s.method for s in summaries] == ["entropy", "minmax", "best"]
    assert sorted(p.name for p in out.iterdir()) == [
        "best.cache", "best.json", "entropy.cache", "entropy.json", "histograms.npz", "minmax.cache", "minmax.json"]
    s = summaries[0]
    assert s.num_samples == 24 and s.num_tensors == 3  # x, h, y (the weight W is not in the cache)
    assert s.fingerprint["method"] == "entropy" and s.fingerprint["data_fingerprint"] == ds.fingerprint
    cache = read_trt_cache(s.cache_path)
    assert list(cache.scales) == ["x", "h", "y"]
    side = json.loads(Path(s.json_path).read_text())
    assert side["tensors"]["W"]["kind"] == "weight" and side["tensors"]["W"]["in_cache"] is False
    assert side["tensors"]["y"]["histogram"]["num_values"] == 72 and side["num_samples"] == 24
    assert side["tensors"]["x"]["scale"] == cache.scales["x"]
    assert json.loads(Path(summaries[2].json_path).read_text())["tensors"]["h"]["method"] in ("entropy", "minmax",
                                                                                              "percentile", "mse")
    minmax = read_trt_cache(summaries[1].cache_path)
    assert minmax.algorithm == "MinMaxCalibration"
    assert minmax.scales["x"] == float(np.float32(np.abs(np.load(tmp_path / "d.npz")["x"]).max() / 127))
    # The saved histograms reload exactly and give the same amax (the report reads counts and bin_width).
    hists, kinds = load_histograms(out / "histograms.npz")
    assert kinds["W"] == "weight" and set(hists) == {"x", "W", "h", "y"}
    assert select_amax(out, "entropy", summaries) == {k: v for k, v in side_amax(s.json_path).items() if k != "W"}
    assert set(select_amax(out, "best", summaries[:2])) == {"x", "h", "y"}
    with np.load(out / "histograms.npz") as z:
        h = list(z["names"]).index("h")
        assert z["counts"].shape == (4 * 2048,) and z["num_bins"][h] == 2048 and z["bin_width"][h] > 0


def side_amax(json_path: str) -> dict[str, float]:
    return {k: v["amax"] for k, v in json.loads(Path(json_path).read_text())["tensors"].items()}


def test_cache_mode_names_files_beside_the_cache(tmp_path: Path) -> None:
    model = _model(tmp_path / "m.onnx")
    ds = open_dataset(_data(tmp_path / "d.npz"), INPUTS)
    one = calibrate(model, ds, methods=["entropy"], cache=tmp_path / "out" / "model.cache")
    assert Path(one[0].cache_path).name == "model.cache" and Path(one[0].json_path).name == "model.json"
    assert (tmp_path / "out" / "model.histograms.npz").is_file()
    two = calibrate(model, ds, methods=["entropy", "minmax"], cache=tmp_path / "OUT")
    assert [Path(s.cache_path).name for s in two] == ["OUT.entropy", "OUT.minmax"]
    assert sidecar_path(tmp_path / "OUT") == tmp_path / "OUT.json"
    with pytest.raises(ConfigError, match="kl"):
        calibrate(model, ds, methods=["kl"], cache=tmp_path / "x.cache")


def test_stale_cache_is_refused_naming_what_changed(tmp_path: Path) -> None:
    model = _model(tmp_path / "m.onnx")
    ds = open_dataset(_data(tmp_path / "d.npz"), INPUTS)
    [s] = calibrate(model, ds, methods=["percentile"], out_dir=tmp_path / "c")
    fp = dict(s.fingerprint)
    assert load_cache(s.cache_path, fp).cache.scales == read_trt_cache(s.cache_path).scales
    with pytest.raises(StaleArtifactError, match=r"the model changed \(sha256 [0-9a-f]{12}… -> cd34"):
        load_cache(s.cache_path, {**fp, "model_sha256": "cd34" * 16})
    with pytest.raises(StaleArtifactError, match="calibration data changed.*; the percentile changed \\(99.99 -> 99.9\\)"):
        load_cache(s.cache_path, {**fp, "data_fingerprint": "ab" * 32, "percentile": "99.9"})
    with pytest.raises(StaleArtifactError, match="the method changed \\(percentile -> entropy\\)"):
        load_cache(s.cache_path, {**fp, "method": "entropy"})
    # An edited cache no longer matches its sidecar.
    path = Path(s.cache_path)
    path.write_text(path.read_text().replace("x:", "x :"))
    with pytest.raises(StaleArtifactError, match="modified after it was written"):
        load_cache(path, fp)
    Path(s.json_path).unlink()
    with pytest.raises(StaleArtifactError, match="no sidecar"):
        load_cache(path, fp)


def test_failed_calibration_leaves_no_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(tmp_path / "m.onnx")
    ds = open_dataset(_data(tmp_path / "d.npz"), INPUTS)
    out = tmp_path / "c"
    import quantpipe.calibration as calib

    def boom(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(calib, "write_sidecar", boom)  # interrupted after the histograms and the first cache
    with pytest.raises(KeyboardInterrupt):
        calibrate(model, ds, methods=["entropy"], out_dir=out)
    # What was finished is complete; nothing half-written, and the orphan cache is not trusted.
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    with pytest.raises(StaleArtifactError, match="no sidecar"):
        load_cache(out / "entropy.cache", {})

    monkeypatch.setattr(np.lib.format, "write_array", boom)
    with pytest.raises(KeyboardInterrupt):
        save_histograms(tmp_path / "h.npz", {"t": StreamingHistogram()}, {"t": "activation"})
    assert list(tmp_path.glob("*h.npz*")) == []


# --------------------------------------------------------------------------- found by the property tests

@pytest.mark.parametrize("hex_scale", ["7fc00000", "7f800000", "bf800000"])  # NaN, +inf, -1.0
def test_unusable_scales_are_refused(tmp_path: Path, hex_scale: str) -> None:
    p = tmp_path / "x.cache"
    p.write_text(f"TRT-101300-EntropyCalibration2\nconv1: {hex_scale}\n")
    with pytest.raises(CalibrationError, match=r"line 2: tensor 'conv1' has scale .* a calibration scale is a finite"):
        read_trt_cache(p)


def test_amax_beyond_float32_is_refused_not_written_as_inf(tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match="beyond the float32 range"):
        write_trt_cache(tmp_path / "x.cache", {"t": 1e300}, method="entropy")


def test_tensor_names_with_unicode_line_separators_round_trip(tmp_path: Path) -> None:
    names = {"a\u2028b": 1.0, "c\x85d": 2.0, "e\x0cf": 3.0}  # str.splitlines() split these lines apart
    cache = read_trt_cache(write_trt_cache(tmp_path / "x.cache", names, method="entropy"))
    assert list(cache.scales) == list(names)
