"""Calibrate and evaluate over several workers give one process's results exactly: the same cache, sidecar and
histograms.npz bytes, the same outputs and metrics; with local worker processes and on a real Ray cluster."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from quantpipe.artifacts import Variant
from quantpipe.calibration import calibrate
from quantpipe.data import open_dataset
from quantpipe.evaluate import open_runner, run_outputs, sharded_outputs
from quantpipe.execution import InProcess, LocalPool, RayPool
from quantpipe.model import load_model_spec
from tests.conftest import EXAMPLE_CALIB, EXAMPLE_EVAL, EXAMPLE_MODEL

METHODS = ["entropy", "minmax", "percentile", "mse"]


def _calibrated(executor, out: Path) -> dict[str, str]:
    """sha256 of every file calibration wrote (sidecars without their timing and batching lines)."""
    spec, _ = load_model_spec(EXAMPLE_MODEL)
    ds = open_dataset(EXAMPLE_CALIB, spec.inputs)
    calibrate(EXAMPLE_MODEL, ds, methods=METHODS, out_dir=out, batch_size=16, executor=executor)
    digests = {}
    for p in sorted(out.iterdir()):
        data = p.read_bytes()
        if p.suffix == ".json":  # wall time, creation time and the count of runs differ; the tensors may not
            doc = json.loads(data)
            data = json.dumps([doc["tensors"], doc["fingerprint"]], sort_keys=True).encode()
        digests[p.name] = hashlib.sha256(data).hexdigest()
    return digests


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict[str, str]:
    return _calibrated(InProcess(), tmp_path_factory.mktemp("w1"))


def test_calibration_with_2_local_workers_is_bit_identical(one_process, tmp_path):
    with LocalPool(2) as pool:
        sharded = _calibrated(pool, tmp_path)
    assert sharded == one_process
    assert {"entropy.cache", "histograms.npz"} <= set(sharded)


def test_calibration_on_ray_is_bit_identical(ray_cluster, one_process, tmp_path):
    assert _calibrated(RayPool(2), tmp_path) == one_process


def _variants(tmp: Path) -> list[Variant]:
    from quantpipe.quantize import write_fp16_model

    fp16 = tmp / "fp16.onnx"
    write_fp16_model(EXAMPLE_MODEL, fp16)
    return [Variant("ort-fp32", "onnxruntime", "fp32", "cpu", artifact=str(EXAMPLE_MODEL)),
            Variant("ort-fp16", "onnxruntime", "fp16", "cpu", artifact=str(fp16))]


@pytest.fixture(scope="module")
def eval_case(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    spec, _ = load_model_spec(EXAMPLE_MODEL)
    ds = open_dataset(EXAMPLE_EVAL, spec.inputs, labels_key="label", role="evaluation")
    variants = _variants(tmp)
    expected = {}
    for v in variants:
        with open_runner(v, None) as runner:
            expected[v.name] = run_outputs(runner, ds, "logits", 24)
    return ds, variants, expected


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_sharded_outputs_equal_one_process(engine, eval_case, request):
    ds, variants, expected = eval_case
    if engine == "ray":
        request.getfixturevalue("ray_cluster")
    executor = RayPool(3) if engine == "ray" else LocalPool(3)
    seen = []
    try:
        outs = sharded_outputs(executor, variants, ds, output="logits", batch_size=24, threads=1, on_samples=seen.append)
    finally:
        executor.close()
    assert sum(seen) == len(variants) * ds.num_samples  # progress: every sample of every variant, once
    for v in variants:
        assert outs[v.name].judged.shape == expected[v.name].shape
        np.testing.assert_array_equal(outs[v.name].judged, expected[v.name])


def _pipeline_run(tmp: Path, execution: dict):
    """Calibrate, build and evaluate the example (ONNX Runtime FP32/FP16/INT8, no latency) with `execution`."""
    from quantpipe.config import parse_config
    from quantpipe.pipeline import run_stages
    from tests.e2e.test_pipeline import example_config

    cfg = example_config(tmp)
    cfg["calibration"] = {"methods": ["entropy", "minmax"], "use": "entropy"}
    cfg["build"]["backends"] = {"onnxruntime": {"precisions": ["fp32", "fp16", "int8"]}, "tensorrt": {"enabled": False}}
    cfg["evaluate"]["sensitivity"] = {"enabled": False}
    cfg["evaluate"]["latency"] = {"enabled": False}
    cfg["execution"] = execution
    res, run_dir = run_stages(parse_config(cfg, base_dir=tmp), until="evaluate", run_id="run")
    assert res is not None and run_dir is not None
    files = {n: (run_dir / "calibration" / n).read_bytes() for n in ("entropy.cache", "minmax.cache", "histograms.npz")}
    return [(e.variant, e.num_samples, e.metrics) for e in res.evaluations], files


@pytest.fixture(scope="module")
def pipeline_one_worker(tmp_path_factory):
    return _pipeline_run(tmp_path_factory.mktemp("p1"), {"workers": 1})


@pytest.mark.parametrize("execution", [{"workers": 2}, {"engine": "ray", "workers": 2}], ids=["local", "ray"])
def test_a_pipeline_run_on_2_workers_reports_what_1_worker_reports(execution, pipeline_one_worker, tmp_path, request):
    """The whole pipeline (calibrate, build, evaluate) on 2 workers against engine local with 1 worker."""
    if execution.get("engine") == "ray":
        request.getfixturevalue("ray_cluster")
    evaluations, files = _pipeline_run(tmp_path, execution)
    assert evaluations == pipeline_one_worker[0]
    assert files == pipeline_one_worker[1]
    assert [v for v, _, m in evaluations if m] == ["ort-fp32", "ort-fp16", "ort-int8"]


def test_standalone_calibrate_takes_the_execution_flags(tmp_path, capsys):
    from quantpipe.cli import main
    from quantpipe.errors import EXIT_BAD_INPUT

    args = ["calibrate", "--model", str(EXAMPLE_MODEL), "--data", str(EXAMPLE_CALIB), "-q"]
    assert main([*args, "--cache", str(tmp_path / "one.cache"), "--workers", "1"]) == 0
    assert main([*args, "--cache", str(tmp_path / "two.cache"), "--workers", "2"]) == 0
    assert (tmp_path / "one.cache").read_bytes() == (tmp_path / "two.cache").read_bytes()
    assert main([*args, "--workers", "0"]) == EXIT_BAD_INPUT
    assert main([*args, "--engine", "local", "--ray-address", "ray://127.0.0.1:10001"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "workers" in err and "engine: ray" in err
