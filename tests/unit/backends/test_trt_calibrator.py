"""quantpipe.backends.tensorrt.calibrator: implicit calibration (TensorRT <= 10) through the fake tensorrt's builder:
the calibrator classes, quantpipe's cache, device batches (on quantpipe.cuda's host-memory stand-in).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from quantpipe.backends.tensorrt.build import build_engine
from quantpipe.backends.tensorrt.calibrator import CalibrationInput
from quantpipe.errors import CalibrationError, StaleArtifactError
from tests.trt_fakes import GPU, PROFILES, calib_data, fp32_model


def test_calibrator_feeds_device_batches_then_writes_the_cache_through_quantpipe(tmp_path: Path, fake_trt: Any) -> None:
    from quantpipe.calibration.cache import read_trt_cache
    from quantpipe.cuda import HostAllocator

    rec = fake_trt("10.13.0.35")
    alloc = HostAllocator()
    cache = tmp_path / "entropy.cache"
    calib = CalibrationInput(method="entropy", cache_path=cache, dataset=calib_data(tmp_path), allocator=alloc)
    info = build_engine(fp32_model(tmp_path), tmp_path / "i8.engine", precision="int8", calibration=calib,
                        profiles=PROFILES, gpu=GPU)
    # opt shape [4, 4]: 10 samples give two full batches; the trailing 2 cannot be fed at TensorRT's fixed shape
    assert rec["batch_size"] == 4 and rec["batches"] == 2 and rec["served_cache"] is None
    assert rec["calibrator_base_init"] == "IInt8EntropyCalibrator2"
    assert rec["config"].flags == ["INT8"] and rec["config"].calibration_profile is rec["config"].profiles[0]
    assert alloc.num_allocs == 1 and alloc.live_bytes == 0  # one buffer for input x, freed after the build
    written = read_trt_cache(cache)  # TensorRT's result, re-written by quantpipe's cache module
    assert written.header == "TRT-101300-EntropyCalibration2"
    assert written.scales == pytest.approx({"x": 0.01, "y": 0.05}, rel=1e-6)
    summary = info.options["calibration"]
    assert summary == {"method": "entropy", "cache": str(cache), "used_quantpipe_cache": False, "batches_fed": 2,
                       "wrote_cache": str(cache)}


def test_quantpipe_cache_lets_tensorrt_skip_calibration(tmp_path: Path, fake_trt: Any) -> None:
    from quantpipe.calibration.cache import write_trt_cache

    rec = fake_trt("10.13.0.35")
    cache = write_trt_cache(tmp_path / "minmax.cache", {"x": 2.54, "y": 12.7}, method="minmax", trt_version="8.6.1")
    info = build_engine(fp32_model(tmp_path), tmp_path / "i8.engine", precision="int8", profiles=PROFILES, gpu=GPU,
                        calibration=CalibrationInput(method="minmax", cache_path=cache))
    assert rec["calibrator_base_init"] == "IInt8MinMaxCalibrator" and rec["batches"] == 0
    served = rec["served_cache"].decode().splitlines()
    # the header is rewritten for the installed TensorRT; the scales (amax / 127) are quantpipe's, bit for bit
    assert served[0] == "TRT-101300-MinMaxCalibration"
    assert served[1:] == ["x: 3ca3d70a", "y: 3dcccccd"]
    assert info.options["calibration"]["used_quantpipe_cache"] and info.options["calibration"]["batches_fed"] == 0
    assert cache.read_text().startswith("TRT-8601-MinMaxCalibration")  # quantpipe's file is left as it was


def test_cache_for_another_method_is_not_used(tmp_path: Path, fake_trt: Any) -> None:
    from quantpipe.calibration.cache import write_trt_cache
    from quantpipe.cuda import HostAllocator

    rec = fake_trt("10.13.0.35")
    cache = write_trt_cache(tmp_path / "q.cache", {"x": 1.0}, method="minmax")
    with pytest.raises(CalibrationError, match="neither was given"):
        build_engine(fp32_model(tmp_path), tmp_path / "a.engine", precision="int8", profiles=PROFILES, gpu=GPU,
                     calibration=CalibrationInput(method="entropy", cache_path=cache))
    build_engine(fp32_model(tmp_path), tmp_path / "b.engine", precision="int8", profiles=PROFILES, gpu=GPU,
                 calibration=CalibrationInput(method="entropy", cache_path=cache, dataset=calib_data(tmp_path),
                                              allocator=HostAllocator(), write_cache=False))
    assert rec["served_cache"] is None and rec["batches"] == 2
    assert cache.read_text().startswith("TRT-101300-MinMaxCalibration")  # not overwritten (write_cache=False)


def test_stale_quantpipe_cache_is_refused(tmp_path: Path, fake_trt: Any) -> None:
    from quantpipe.calibration.cache import make_fingerprint, write_sidecar, write_trt_cache

    fake_trt("10.13.0.35")
    fp = make_fingerprint(model_sha256="a" * 64, data_fingerprint="d1", method="entropy", percentile=99.99,
                          num_bins=2048, trt_version="10.13.0")
    cache = write_trt_cache(tmp_path / "entropy.cache", {"x": 1.0}, method="entropy")
    write_sidecar(cache, method="entropy", fingerprint=fp, tensors={"x": {"amax": 1.0}})
    other = dict(fp, data_fingerprint="d2")
    with pytest.raises(StaleArtifactError, match="calibration data changed"):
        build_engine(fp32_model(tmp_path), tmp_path / "m.engine", precision="int8", profiles=PROFILES, gpu=GPU,
                     calibration=CalibrationInput(cache_path=cache, fingerprint=other))


def test_errors_inside_tensorrt_callbacks_are_raised_after_the_build(tmp_path: Path, fake_trt: Any) -> None:
    from quantpipe.artifacts import TensorInfo
    from quantpipe.cuda import HostAllocator
    from quantpipe.data import open_dataset

    fake_trt("10.13.0.35")
    np.savez(tmp_path / "wrong.npz", z=np.zeros((8, 4), np.float32))  # no array for input 'x'
    wrong = open_dataset(tmp_path / "wrong.npz", [TensorInfo("z", "float32", (None, 4))])
    alloc = HostAllocator()
    with pytest.raises(CalibrationError, match="asked for calibration input 'x'"):
        build_engine(fp32_model(tmp_path), tmp_path / "m.engine", precision="int8", profiles=PROFILES, gpu=GPU,
                     calibration=CalibrationInput(dataset=wrong, allocator=alloc))
    assert not (tmp_path / "m.engine").exists() and alloc.live_bytes == 0
