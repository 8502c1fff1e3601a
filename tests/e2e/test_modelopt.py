"""NVIDIA ModelOpt's three variants on the bundled example, beside quantpipe's, in the report and the gate; and the
interop check: quantpipe's TensorRT cache imported by ModelOpt gives Q/DQ scales equal to quantpipe's.

Needs ModelOpt set up (`quantpipe setup modelopt`, or QUANTPIPE_TEST_MODELOPT_PYTHON naming an interpreter that has
it); skipped with that reason elsewhere. CI sets it up (.ci/run).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from quantpipe.backends.modelopt.env import find_modelopt
from quantpipe.calibration.cache import amax_to_scale, read_trt_cache
from quantpipe.cli import main
from quantpipe.fsutil import sha256_file
from tests.conftest import EXAMPLE_MODEL
from tests.e2e.test_pipeline import example_config, write_config

_PYTHON = os.environ.get("QUANTPIPE_TEST_MODELOPT_PYTHON")
_ENV = find_modelopt(_PYTHON)
pytestmark = pytest.mark.skipif(not _ENV.available, reason=f"ModelOpt is not available: {_ENV.reason}")

MO = ("modelopt-int8", "modelopt-int8-qpscales", "modelopt-fp16")


def _modelopt_config(tmp: Path) -> dict:
    cfg = example_config(tmp)
    cfg["model"]["path"] = str(shutil.copyfile(EXAMPLE_MODEL, tmp / "digits_cnn.onnx"))
    cfg["build"]["backends"]["tensorrt"]["enabled"] = False
    cfg["build"]["backends"]["modelopt"] = {"enabled": True, "calibration_method": "entropy",
                                            **({"python": _PYTHON} if _PYTHON else {})}
    cfg["evaluate"]["sensitivity"] = {"enabled": True, "max_samples": 16, "metric": "cosine"}
    cfg["gate"]["rules"] += [
        {"variant": "modelopt-int8", "metric": "top1_agreement", "min": 0.9},
        {"variant": "modelopt-int8-qpscales", "metric": "top1_agreement", "min": 0.9},
        {"variant": "modelopt-fp16", "metric": "top1_agreement", "min": 0.99},
    ]
    return cfg


@pytest.fixture(scope="module")
def mo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path, Path]:
    tmp = tmp_path_factory.mktemp("modelopt")
    cfg = write_config(tmp, _modelopt_config(tmp))
    code = main(["run", str(cfg), "--run-id", "first", "-q"])
    return code, tmp / "reports" / "first", cfg


def test_three_variants_evaluated_reported_and_gated(mo_run: tuple[int, Path, Path]) -> None:
    code, run_dir, cfg = mo_run
    assert sha256_file(cfg.parent / "digits_cnn.onnx") == sha256_file(EXAMPLE_MODEL)  # ModelOpt got a copy
    res = json.loads((run_dir / "results.json").read_text())
    ev = {e["variant"]: e for e in res["evaluations"]}
    for name in MO:
        assert not ev[name]["skipped"], ev[name]["skipped"]
        m = ev[name]["metrics"]
        assert m["top1_agreement"] >= 0.9 and m["cosine"] > 0.99 and m["top1"] >= 0.9, (name, m)
        assert [x["batch_size"] for x in ev[name]["latency"]] == [1, 32]
        assert (run_dir / "models" / f"{name}.onnx").is_file()
    variants = {v["name"]: v for v in res["variants"]}
    assert variants["modelopt-int8"]["details"]["modelopt"]["quantize_linear"] > 0
    assert variants["modelopt-fp16"]["details"]["modelopt"]["quantize_linear"] == 0
    outcomes = {o["rule"]: o["passed"] for o in res["gate"]["outcomes"]}
    assert sum(1 for r in outcomes if r.startswith("modelopt-")) == 3 and all(outcomes.values()), outcomes
    assert code == 0
    report = (run_dir / "report.md").read_text()
    assert all(name in report for name in MO)
    junit = (run_dir / "junit.xml").read_text()
    assert "modelopt-int8-qpscales top1_agreement" in junit


def test_modelopt_int8_variants_get_a_per_layer_sensitivity(mo_run: tuple[int, Path, Path]) -> None:
    """Each ModelOpt INT8 model, judged as written: one row per node reading its Q/DQ pairs, worst first."""
    _, run_dir, _ = mo_run
    res = json.loads((run_dir / "results.json").read_text())
    variants = {v["name"]: v for v in res["variants"]}
    assert res["sensitivity"]  # quantpipe's own, as before
    assert "sensitivity" not in variants["modelopt-fp16"]["details"]
    for name in ("modelopt-int8", "modelopt-int8-qpscales"):
        rows = variants[name]["details"]["sensitivity"]
        model = onnx.load(str(run_dir / "models" / f"{name}.onnx"))
        dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        readers = {n.name for n in model.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
                   and any(i in dq for i in n.input)}
        assert {r["node"] for r in rows} == readers and len(rows) == len(readers) >= 3, name
        assert all(r["metric_name"] == "cosine" and r["output_metric"] is not None for r in rows)
        assert [r["output_metric"] for r in rows] == sorted(r["output_metric"] for r in rows)
        assert all(0.9 < r["output_metric"] <= 1.0 + 1e-6 for r in rows), rows
    report_md, report_html = (run_dir / "report.md").read_text(), (run_dir / "report.html").read_text()
    for name in ("modelopt-int8", "modelopt-int8-qpscales"):
        worst = variants[name]["details"]["sensitivity"][0]["node"]
        heading = f"{name}: the model as written, each node's own Q/DQ kept alone"
        assert heading in report_md and heading in report_html
        section = report_md.split(f"#### {heading}", 1)[1].split("####", 1)[0]
        assert f"`{worst}`" in section.split("|---|", 1)[1].splitlines()[1]  # worst node on the first row
    assert "modelopt-fp16: the model as written" not in report_md


def test_modelopt_int8_is_exact_qdq_of_its_calibration(mo_run: tuple[int, Path, Path]) -> None:
    """ModelOpt's model is an explicit Q/DQ model with int8 zero points (what TensorRT 11 builds as is)."""
    _, run_dir, _ = mo_run
    model = onnx.load(str(run_dir / "models" / "modelopt-int8.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    qs = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert qs
    for q in qs:
        assert inits[q.input[2]].dtype == np.int8 and not inits[q.input[2]].any()


def test_quantpipe_scales_through_modelopt_placement_are_equal(mo_run: tuple[int, Path, Path]) -> None:
    """The interop check: for every activation both quantize, ModelOpt's Q scale is quantpipe's scale, bit for bit."""
    _, run_dir, cfg_path = mo_run
    ws = cfg_path.parent / "reports" / ".work" / "digits-cnn" / "modelopt"
    ours = read_trt_cache(ws / "quantpipe_scales.cache").scales
    auto = json.loads((cfg_path.parent / "reports" / ".work" / "digits-cnn" / "calibration" / "auto_ranges.json").read_text())
    assert ours == {k: amax_to_scale(v) for k, v in auto["amax"].items()}  # the cache is calibration.use's scales
    model = onnx.load(str(run_dir / "models" / "modelopt-int8-qpscales.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    compared = 0
    for q in (n for n in model.graph.node if n.op_type == "QuantizeLinear"):
        if q.input[0] in ours:
            assert float(np.float32(inits[q.input[1]])) == ours[q.input[0]], q.input[0]
            compared += 1
    assert compared >= 5, f"only {compared} tensors in common"


def test_rerun_reuses_modelopt_models(mo_run: tuple[int, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _, _, cfg = mo_run
    folder = cfg.parent / "reports" / ".work" / "digits-cnn" / "modelopt"
    before = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.onnx")}
    assert main(["build", str(cfg)]) == 0
    assert "build (modelopt): inputs unchanged" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.onnx")} == before and len(before) == 3
