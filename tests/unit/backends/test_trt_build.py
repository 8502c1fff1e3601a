"""quantpipe.backends.tensorrt.build: the build path driven against a fake `tensorrt` module that has only the names
each version really has (a name the 10.x -> 11.x migration guide removed raises AttributeError on the fake 11.x,
as it would on the real one); see tests/trt_fakes.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from quantpipe.backends.tensorrt.build import build_engine
from quantpipe.backends.tensorrt.calibrator import CalibrationInput
from quantpipe.backends.tensorrt.metadata import check_engine_metadata, read_engine_metadata
from quantpipe.errors import BuildError, CalibrationError
from quantpipe.fsutil import sha256_file
from tests.trt_fakes import GPU, PROFILES, fp16_model, fp32_model, qdq_model


def test_build_fp16_on_10_uses_the_builder_flag_and_writes_metadata(tmp_path: Path, fake_trt: Any) -> None:
    rec = fake_trt("10.13.0.35")
    out = tmp_path / "engines" / "m_fp16.engine"
    info = build_engine(fp32_model(tmp_path), out, precision="fp16", profiles=PROFILES, workspace_mib=256,
                        timing_cache=tmp_path / "timing.cache", gpu=GPU, tf32=False)
    assert rec["network_flags"] == 0
    assert rec["config"].flags == ["FP16"] and rec["config"].cleared == ["TF32"]
    assert rec["config"].pool == 256 << 20
    assert rec["config"].profiles[0].shapes == {"x": ((1, 4), (4, 4), (8, 4))}
    assert out.read_bytes() == b"ENGINE:FP16"
    meta = read_engine_metadata(out)
    assert meta["tensorrt_version"] == "10.13.0.35" and meta["gpu_name"] == GPU.name
    assert meta["compute_capability"] == "9.0" and meta["precision"] == "fp16"
    assert meta["source_sha256"] == info.source_sha256 and len(info.source_sha256) == 64
    assert meta["options"]["profiles"]["x"]["opt"] == [4, 4] and meta["options"]["workspace_mib"] == 256
    check_engine_metadata(meta, engine_path=out, tensorrt_version="10.13.0.35", gpu=GPU,
                          engine_sha256=sha256_file(out))


def test_timing_cache_is_reused_between_builds(tmp_path: Path, fake_trt: Any) -> None:
    rec = fake_trt("10.13.0.35")
    cache = tmp_path / "timing.cache"
    model = fp32_model(tmp_path)
    build_engine(model, tmp_path / "a.engine", precision="fp32", profiles=PROFILES, timing_cache=cache, gpu=GPU)
    assert cache.read_bytes() == b"TIMING:1"
    build_engine(model, tmp_path / "b.engine", precision="fp16", profiles=PROFILES, timing_cache=cache, gpu=GPU)
    assert rec["timing_cache_inputs"] == [b"", b"TIMING:1"]


def test_build_on_8_6_sets_explicit_batch(tmp_path: Path, fake_trt: Any) -> None:
    rec = fake_trt("8.6.1.6")
    build_engine(fp32_model(tmp_path, batch=2), tmp_path / "m.engine", precision="fp32", gpu=GPU)
    assert rec["network_flags"] == 1 << 0


def test_build_on_11_is_strongly_typed_and_touches_no_removed_name(tmp_path: Path, fake_trt: Any) -> None:
    rec = fake_trt("11.1.0")
    info = build_engine(fp16_model(tmp_path), tmp_path / "f16.engine", precision="fp16", profiles=PROFILES, gpu=GPU)
    assert rec["network_flags"] == 1 << 1 and rec["config"].flags == []
    assert info.strongly_typed and read_engine_metadata(info.path)["options"]["source_kind"] == "fp16"
    info = build_engine(qdq_model(tmp_path), tmp_path / "i8.engine", precision="int8", profiles=PROFILES, gpu=GPU)
    assert info.int8_mode == "qdq" and rec["config"].flags == []
    with pytest.raises(BuildError, match="removed implicit INT8 calibration"):
        build_engine(fp32_model(tmp_path), tmp_path / "x.engine", precision="int8", int8_mode="calibrator", gpu=GPU)
    with pytest.raises(BuildError, match="write_fp16_model"):
        build_engine(fp32_model(tmp_path), tmp_path / "x.engine", precision="fp16", profiles=PROFILES, gpu=GPU)
    assert not (tmp_path / "x.engine").exists()


def test_dynamic_input_without_profile_is_refused(tmp_path: Path, fake_trt: Any) -> None:
    fake_trt("10.13.0.35")
    with pytest.raises(BuildError, match="min_shape, opt_shape and max_shape"):
        build_engine(fp32_model(tmp_path), tmp_path / "m.engine", precision="fp32", gpu=GPU)
    assert not (tmp_path / "m.engine").exists()


def test_calibrator_int8_needs_cache_or_data(tmp_path: Path, fake_trt: Any) -> None:
    fake_trt("10.13.0.35")
    with pytest.raises(BuildError, match="needs a CalibrationInput"):
        build_engine(fp32_model(tmp_path), tmp_path / "m.engine", precision="int8", profiles=PROFILES, gpu=GPU)
    with pytest.raises(CalibrationError, match="neither was given"):
        build_engine(fp32_model(tmp_path), tmp_path / "m.engine", precision="int8", profiles=PROFILES, gpu=GPU,
                     calibration=CalibrationInput(cache_path=tmp_path / "missing.cache"))
