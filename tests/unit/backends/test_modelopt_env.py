"""ModelOpt's discovery, its skipped variants and its worker's failures: everything that needs no ModelOpt installed
(the runs with ModelOpt are in tests/e2e/test_modelopt.py)."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
import yaml

from quantpipe.backends.modelopt.build import build_modelopt_variants, run_worker
from quantpipe.backends.modelopt.env import VERIFIED_FILE, cache_venv, find_modelopt, probe_interpreter, venv_python
from quantpipe.config import ConfigError, parse_config
from quantpipe.errors import BuildError, MissingDependencyError
from quantpipe.inputs import load_inputs
from quantpipe.workspace import NullProgress, Workspace
from tests.conftest import EXAMPLE_CALIB, EXAMPLE_EVAL, EXAMPLE_MODEL, ROOT


@pytest.fixture()
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _fake_python(path: Path, modelopt: str | None) -> Path:
    """An 'interpreter' that answers the probe as one with (or without) nvidia-modelopt would."""
    answer = json.dumps({"modelopt": modelopt, "python": "3.11.0", "executable": str(path)})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho '{answer}'\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def _config(tmp: Path, **modelopt: object) -> object:
    doc = yaml.safe_load((ROOT / "pipeline.yaml").read_text())
    doc["model"]["path"] = str(EXAMPLE_MODEL)
    doc["data"]["calibration"]["path"] = str(EXAMPLE_CALIB)
    doc["data"]["evaluation"]["path"] = str(EXAMPLE_EVAL)
    doc["report"] = {"dir": str(tmp / "reports")}
    doc["build"]["backends"]["tensorrt"]["enabled"] = False
    doc["build"]["backends"]["modelopt"] = {"enabled": True, **modelopt}
    return parse_config(doc, base_dir=tmp)


def test_no_venv_names_the_setup_command(empty_cache: Path) -> None:
    found = find_modelopt()
    assert not found.available and found.source == "none"
    assert "quantpipe setup modelopt" in (found.reason or "") and str(cache_venv()) in (found.reason or "")
    assert cache_venv() == empty_cache / "quantpipe" / cache_venv().name


@pytest.mark.skipif(sys.platform == "win32", reason="the fake interpreter is a POSIX shell script")
def test_incomplete_then_verified_venv(empty_cache: Path) -> None:
    exe = _fake_python(venv_python(cache_venv()), "0.47.0")
    found = find_modelopt()
    assert not found.available and "incomplete" in (found.reason or "")  # set-up interrupted before its check
    (cache_venv() / VERIFIED_FILE).write_text("{}")
    found = find_modelopt()
    assert found.available and found.python == str(exe) and found.version == "0.47.0" and found.source == "cache"


@pytest.mark.skipif(sys.platform == "win32", reason="the fake interpreter is a POSIX shell script")
def test_configured_python_wins_and_must_have_modelopt(empty_cache: Path, tmp_path: Path) -> None:
    own = _fake_python(tmp_path / "own" / "python", "0.40.0")
    found = find_modelopt(own)
    assert found.available and found.source == "config" and found.version == "0.40.0"
    bare = _fake_python(tmp_path / "bare" / "python", None)
    found = find_modelopt(bare)
    assert not found.available and "has no nvidia-modelopt" in (found.reason or "")
    assert probe_interpreter(tmp_path / "missing" / "python")[0] is None


def test_this_interpreter_has_no_modelopt() -> None:
    """quantpipe's own environment must never hold ModelOpt (it patches onnxruntime at import)."""
    version, reason = probe_interpreter(sys.executable)
    assert version is None and "has no nvidia-modelopt" in (reason or "")


def test_config_variants_and_gate_names(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    assert [n for n in cfg.variant_names() if n.startswith("modelopt-")] == [  # type: ignore[attr-defined]
        "modelopt-int8", "modelopt-int8-qpscales", "modelopt-fp16"]
    cfg = _config(tmp_path, variants=["fp16"], calibration_method="max")
    assert [n for n in cfg.variant_names() if n.startswith("modelopt-")] == ["modelopt-fp16"]  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="int4"):
        _config(tmp_path, variants=["int4"])
    with pytest.raises(ConfigError, match="calibration_method"):
        _config(tmp_path, calibration_method="percentile")


def test_missing_modelopt_skips_with_reason_and_command(empty_cache: Path, tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    li = load_inputs(cfg)  # type: ignore[arg-type]
    variants = build_modelopt_variants(cfg, Workspace(tmp_path / "ws"), li, {}, NullProgress())  # type: ignore[arg-type]
    assert [v.name for v in variants] == ["modelopt-int8", "modelopt-int8-qpscales", "modelopt-fp16"]
    assert [v.precision for v in variants] == ["int8", "int8", "fp16"]
    for v in variants:
        assert not v.ran and "quantpipe setup modelopt" in (v.skipped or "")
    required = _config(tmp_path, required=True)
    with pytest.raises(MissingDependencyError, match="required is true") as err:
        build_modelopt_variants(required, Workspace(tmp_path / "ws"), li, {}, NullProgress())  # type: ignore[arg-type]
    assert err.value.exit_code == 3


def test_required_modelopt_missing_exits_3_before_work(empty_cache: Path, tmp_path: Path) -> None:
    from quantpipe.cli import main

    doc = yaml.safe_load((ROOT / "pipeline.yaml").read_text())
    doc["model"]["path"] = str(EXAMPLE_MODEL)
    doc["data"]["calibration"]["path"] = str(EXAMPLE_CALIB)
    doc["data"]["evaluation"]["path"] = str(EXAMPLE_EVAL)
    doc["report"] = {"dir": str(tmp_path / "reports")}
    doc["build"]["backends"]["modelopt"] = {"enabled": True, "required": True}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert main(["build", str(path), "-q"]) == 3
    assert not (tmp_path / "reports" / ".work" / doc["name"] / "calibration").exists()  # failed before calibrating


def test_worker_failure_is_a_build_error_with_the_output_tail(tmp_path: Path) -> None:
    """This interpreter has no modelopt: the worker fails at its import, and the error shows why."""
    job = {"mode": "int8", "model": str(EXAMPLE_MODEL), "calibration_data": str(EXAMPLE_CALIB),
           "calibration_method": "entropy", "output": str(tmp_path / "m.onnx"), "report": str(tmp_path / "m.json")}
    with pytest.raises(BuildError, match="modelopt") as err:
        run_worker(sys.executable, [job], tmp_path, "modelopt")
    assert "ModuleNotFoundError" in str(err.value) and err.value.exit_code == 4
    assert sorted(os.listdir(tmp_path)) == []  # no job file, no half model, no report left


def test_python_path_is_absolute_but_not_resolved(tmp_path: Path) -> None:
    """A venv's python is a symlink to the base interpreter: resolving it would run outside the venv."""
    real = _fake_python(tmp_path / "base" / "python3", "0.47.0")
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "python").symlink_to(real)
    cfg = _config(tmp_path, python="venv/bin/python")
    assert cfg.build.backends.modelopt.python == tmp_path / "venv" / "bin" / "python"  # type: ignore[attr-defined]


def test_torch_index_choice() -> None:
    from quantpipe.backends.modelopt.install import cpu_torch_index

    assert cpu_torch_index(None) is None  # nothing probed: pip's own indexes
    assert cpu_torch_index("off") is None
    assert cpu_torch_index("https://example.invalid/simple/") == "https://example.invalid/simple/"


def test_modelopt_models_feed_tensorrt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`trt-modelopt-<variant>`: an engine built from ModelOpt's ONNX model with the explicit-quantization plan (the
    TensorRT 11 path); a ModelOpt variant that was skipped gives a skipped engine with the same reason."""
    from quantpipe.artifacts import Variant
    from quantpipe.backends.modelopt import build as mo_build
    from quantpipe.backends.tensorrt import build as trt_build
    from quantpipe.backends.tensorrt import plan as trt_plan
    from quantpipe.backends.tensorrt import version as trt_version
    from quantpipe.backends.tensorrt.metadata import EngineInfo
    from quantpipe.backends.tensorrt.version import api_for_version
    from quantpipe.build import stage_build

    calls: list[dict[str, object]] = []

    def fake_engine(onnx_path: Path, out_path: Path, **kw: object) -> EngineInfo:
        calls.append({"onnx": Path(onnx_path), **kw})
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_bytes(b"engine")
        return EngineInfo(path=str(out_path), metadata_path=str(out_path) + ".json", precision=kw["precision"],  # type: ignore[arg-type]
                          tensorrt_version="11.4.0", gpu_name="fake", compute_capability="9.0", source_model=str(onnx_path),
                          source_sha256=str(kw["source_sha256"]), engine_sha256="0" * 64, size_bytes=6, build_seconds=0.0,
                          strongly_typed=True, int8_mode="qdq", options={})

    mo_model = tmp_path / "int8.onnx"
    mo_model.write_bytes(EXAMPLE_MODEL.read_bytes())
    fake_mo = [Variant("modelopt-int8", "modelopt", "int8", "cpu", artifact=str(mo_model), size_bytes=1),
               Variant("modelopt-fp16", "modelopt", "fp16", "cpu", skipped="ModelOpt is not set up; run `x`")]
    monkeypatch.setattr(mo_build, "build_modelopt_variants", lambda *a, **k: fake_mo)
    monkeypatch.setattr(trt_plan, "variant_skip_reason", lambda *a, **k: "tensorrt: not installed")
    cfg = _config(tmp_path, variants=["int8", "fp16"])
    cfg = cfg.model_copy(update={"build": cfg.build.model_copy(update={"backends": cfg.build.backends.model_copy(update={  # type: ignore[attr-defined]
        "tensorrt": cfg.build.backends.tensorrt.model_copy(update={"enabled": True, "precisions": ["int8"]}),  # type: ignore[attr-defined]
        "onnxruntime": cfg.build.backends.onnxruntime.model_copy(update={"precisions": ["fp32"]})})})})  # type: ignore[attr-defined]
    assert "trt-modelopt-int8" in cfg.variant_names()
    li = load_inputs(cfg)
    ws = Workspace(tmp_path / "ws")
    variants, _, _ = stage_build(cfg, ws, li, {}, [], NullProgress())
    skipped = {v.name: v.skipped for v in variants if not v.ran}
    assert skipped["trt-modelopt-int8"] == "tensorrt: not installed"  # no TensorRT here: skipped, saying why
    assert skipped["trt-modelopt-fp16"] == "tensorrt: not installed"
    monkeypatch.setattr(trt_plan, "variant_skip_reason", lambda *a, **k: None)
    monkeypatch.setattr(trt_version, "require_tensorrt", lambda: api_for_version("11.4.0"))
    monkeypatch.setattr(trt_build, "build_engine", fake_engine)
    variants, _, _ = stage_build(cfg, ws, li, {}, [], NullProgress())
    built = next(v for v in variants if v.name == "trt-modelopt-int8")
    assert next(v for v in variants if v.name == "trt-modelopt-fp16").skipped == "ModelOpt is not set up; run `x`"
    assert built.ran and built.backend == "tensorrt" and built.precision == "int8"
    (call,) = [c for c in calls if c["onnx"] == mo_model]
    assert call["int8_mode"] == "qdq" and call["precision"] == "int8" and call.get("calibration") is None
    assert built.details["source_sha256"] == call["source_sha256"]


def test_doctor_reports_modelopt_without_importing_it(empty_cache: Path) -> None:
    from quantpipe.deps import doctor_lines, probe_env

    env = probe_env()
    assert env["modelopt"]["available"] is False and "quantpipe setup modelopt" in env["modelopt"]["install"]
    (line,) = [text for ok, text in doctor_lines(env) if text.startswith("ModelOpt")]
    assert "not available" in line and "quantpipe setup modelopt" in line
    assert "modelopt" not in sys.modules
