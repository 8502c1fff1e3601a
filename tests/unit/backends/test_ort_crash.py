"""A variant whose session crashes onnxruntime (a segfault in a graph optimizer: onnxruntime 1.32 on quantpipe's FP16
model of a transformer, found probing) costs that variant, not the run: the session is created first in a child
process, level after level."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from quantpipe.artifacts import Variant
from quantpipe.backends import onnxruntime as B
from quantpipe.evaluate import ORT_OPTIMIZATION_KEY, open_runner, with_sessions_checked

#: A child that segfaults (as onnxruntime did) at the levels in argv[5:], else opens the session as OrtRunner does.
CRASHING = ("import os, signal, sys\n"
            "if sys.argv[4] in sys.argv[5].split(','): os.kill(os.getpid(), signal.SIGSEGV)\n" + B.CHILD_CODE)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


def _crashing_at(monkeypatch: pytest.MonkeyPatch, levels: str) -> None:
    real = B.subprocess.run
    monkeypatch.setattr(B.subprocess, "run", lambda cmd, **kw: real([*cmd, levels], **kw))
    monkeypatch.setattr(B, "CHILD_CODE", CRASHING)


def test_a_crash_at_the_default_level_runs_the_variant_one_level_lower(model: Path, monkeypatch) -> None:
    assert B.survivable_optimization(model, "ort-fp16", "cpu") == ("all", None)  # the real child opens it
    _crashing_at(monkeypatch, "all")
    assert B.crash_opening(model, "ort-fp16", "cpu") == "SIGSEGV"
    variants = [Variant("ort-fp16", "onnxruntime", "fp16", "cpu", artifact=str(model)),
                Variant("trt-fp16", "tensorrt", "fp16", "cuda", skipped="no TensorRT")]
    checked = with_sessions_checked(variants)
    assert checked[0].ran and checked[0].details[ORT_OPTIMIZATION_KEY] == "extended" and checked[1] == variants[1]
    with open_runner(checked[0], 1) as runner:  # the runner opens it at that level
        assert runner.optimization == "extended"
        np.testing.assert_array_equal(runner.infer({"x": np.array([[-1, 0, 2]], np.float32)})["y"], [[0, 0, 2]])


def test_a_variant_that_crashes_at_every_level_is_skipped_with_the_reason(model: Path, monkeypatch) -> None:
    _crashing_at(monkeypatch, "all,extended,basic,disabled")
    (v,) = with_sessions_checked([Variant("ort-int8", "onnxruntime", "int8", "cpu", artifact=str(model))])
    assert not v.ran and v.skipped == "onnxruntime crashes (SIGSEGV) creating its session"
