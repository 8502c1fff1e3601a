"""`calibration.from_cache` on the bundled example: a TensorRT 8.6 cache's scales, exactly, in the INT8 variant."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from quantpipe.cli import main
from quantpipe.config import load_config
from quantpipe.errors import ConfigError
from quantpipe.migrate import tensors_to_quantize
from tests.conftest import EXAMPLE_CALIB, EXAMPLE_MODEL
from tests.e2e.test_pipeline import example_config, write_config


def legacy_cache(tmp: Path, drop: str | None) -> tuple[Path, dict[str, float]]:
    """A TensorRT 8.6 cache of the example (its scales from `quantpipe calibrate`, printed as TensorRT prints
    them), without `drop`, with one of TensorRT's own tensors."""
    own = tmp / "own.cache"
    assert main(["calibrate", "--model", str(EXAMPLE_MODEL), "--data", str(EXAMPLE_CALIB), "--method", "minmax",
                 "--cache", str(own), "-q"]) == 0
    scales = {}
    lines = ["TRT-8601-EntropyCalibration2"]
    for line in own.read_text().splitlines()[1:]:
        name, _, hexa = line.rpartition(": ")
        if name == drop:
            continue
        scales[name] = struct.unpack(">f", bytes.fromhex(hexa))[0]
        lines.append(f"{name}: {format(int(hexa, 16), 'x')}")
    lines.append("(Unnamed Layer* 7) [Shuffle]_output: 3c010a14")
    path = tmp / "trt86.cache"
    path.write_text("\n".join(lines) + "\n")
    return path, scales


def test_pipeline_int8_variant_takes_the_cache_scales(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    needed = tensors_to_quantize(onnx.load(EXAMPLE_MODEL))
    dropped = needed[1]
    cache, scales = legacy_cache(tmp_path, dropped)
    cfg = example_config(tmp_path)
    cfg["calibration"]["from_cache"] = str(cache)
    cfg["build"]["backends"] = {"onnxruntime": {"precisions": ["fp32", "int8"], "device": "cpu"},
                                "tensorrt": {"enabled": False}}
    cfg["evaluate"]["sensitivity"] = {"enabled": False}
    cfg["gate"] = {"rules": [{"variant": "ort-int8", "metric": "top1_agreement", "min": 0.9}]}
    assert main(["run", str(write_config(tmp_path, cfg)), "--run-id", "migrated", "-q"]) == 0
    run_dir = tmp_path / "reports" / "migrated"
    m = onnx.load(run_dir / "models" / "model.int8.onnx")
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    q_scales = {n.input[0]: inits[n.input[1]] for n in m.graph.node if n.op_type == "QuantizeLinear"}
    for t in needed:
        if t != dropped:
            assert q_scales[t].tobytes() == np.float32(scales[t]).tobytes(), t
    assert dropped in q_scales  # calibrated from the pipeline's data (entropy, the cache's calibrator)
    res = json.loads((run_dir / "results.json").read_text())
    record = next(v for v in res["variants"] if v["name"] == "ort-int8")["details"]["quantize"]["from_cache"]
    assert record["trt_version"] == "8.6.1" and record["algorithm"] == "EntropyCalibration2"
    assert record["calibrated"] == [dropped] and record["method"] == "entropy"
    assert record["ignored"] == ["(Unnamed Layer* 7) [Shuffle]_output"]
    assert record["disabled"] and record["left_float"] == []
    # The same cache at another path (a moved project) is the same calibration and build: reused, not re-run (the
    # fingerprints held its absolute path; found probing). Changed content is not.
    moved = tmp_path / "elsewhere" / cache.name
    moved.parent.mkdir()
    cache.rename(moved)
    cfg["calibration"]["from_cache"] = str(moved)
    assert main(["build", str(write_config(tmp_path, cfg))]) == 0
    text = " ".join(capsys.readouterr().err.split())
    assert "calibrate: inputs unchanged" in text and "build: inputs unchanged" in text, text


def test_a_missing_from_cache_file_is_a_config_error(tmp_path: Path) -> None:
    cfg = example_config(tmp_path)
    cfg["calibration"]["from_cache"] = "legacy/trt.cache"
    with pytest.raises(ConfigError, match=r"calibration.from_cache: .*legacy/trt.cache does not exist"):
        load_config(write_config(tmp_path, cfg))


def test_tensorrt_10_calibrator_reads_exactly_the_cache_scales(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TensorRT <= 10 (implicit INT8): the calibrator gets a cache of the migrated ranges, read without calibrating
    (EntropyCalibration2 header), whose scales are the legacy cache's, bit for bit."""
    from quantpipe.backends.tensorrt import build as trt_build
    from quantpipe.backends.tensorrt import plan as trt_plan
    from quantpipe.backends.tensorrt import version as trt_version
    from quantpipe.backends.tensorrt.version import api_for_version
    from quantpipe.build import stage_build
    from quantpipe.calibration import read_trt_cache
    from quantpipe.config import parse_config
    from quantpipe.inputs import load_inputs
    from quantpipe.pipeline import stage_calibrate
    from quantpipe.workspace import NullProgress, Workspace
    from tests.conftest import EXAMPLE_EVAL

    cache, scales = legacy_cache(tmp_path, drop=None)
    calls: list[dict] = []

    def fake_build(onnx_path: Path, out_path: Path, **kw: object) -> None:
        calls.append(kw)
        raise RuntimeError("stop after the first engine")

    monkeypatch.setattr(trt_plan, "variant_skip_reason", lambda *a, **k: None)
    monkeypatch.setattr(trt_version, "require_tensorrt", lambda: api_for_version("10.13.0"))
    monkeypatch.setattr(trt_build, "build_engine", fake_build)
    cfg = parse_config({
        "model": {"path": str(EXAMPLE_MODEL)},
        "data": {"calibration": {"path": str(EXAMPLE_CALIB), "max_samples": 16},
                 "evaluation": {"path": str(EXAMPLE_EVAL), "labels": "label", "max_samples": 16}, "batch_size": 8},
        "calibration": {"methods": ["entropy"], "use": "entropy", "from_cache": str(cache)},
        "build": {"backends": {"onnxruntime": {"precisions": ["fp32"]},
                               "tensorrt": {"enabled": True, "precisions": ["int8"]}}},
        "report": {"dir": str(tmp_path / "reports")},
    }, base_dir=tmp_path)
    ws = Workspace.for_config(cfg)
    li = load_inputs(cfg)
    summaries, amax = stage_calibrate(cfg, ws, li, NullProgress())
    with pytest.raises(RuntimeError, match="stop after"):
        stage_build(cfg, ws, li, amax, summaries, NullProgress())
    given = calls[0]["calibration"]
    assert given.cache_path.name == "best.cache" and given.method == "entropy"
    written = read_trt_cache(given.cache_path)
    assert written.header.endswith("-EntropyCalibration2")
    needed = tensors_to_quantize(onnx.load(EXAMPLE_MODEL))
    assert {t: written.scales[t] for t in needed} == {t: scales[t] for t in needed}
