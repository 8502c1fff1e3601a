"""The load stage: valid FP32 models are described; anything else is refused with exit code 2."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto

from quantpipe.errors import ModelError
from quantpipe.model import load_model_spec
from tests.conftest import make_mlp


def test_spec_of_mlp(mlp_model: Path) -> None:
    spec, _ = load_model_spec(mlp_model)
    assert spec.opset == 17
    assert [i.name for i in spec.inputs] == ["x"] and spec.inputs[0].shape == ("N", 8)
    assert spec.outputs[0].name == "logits"
    assert spec.op_counts == {"Gemm": 1, "MatMul": 1, "Relu": 1}
    assert spec.num_parameters == 8 * 16 + 16 * 4 + 4
    assert len(spec.sha256) == 64


def test_not_onnx(tmp_path: Path) -> None:
    p = tmp_path / "m.onnx"
    p.write_bytes(b"\x00garbage\xff" * 10)
    with pytest.raises(ModelError, match="not a valid ONNX file") as e:
        load_model_spec(p)
    assert e.value.exit_code == 2


def test_missing(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        load_model_spec(tmp_path / "none.onnx")


def test_fp16_model_refused(tmp_path: Path) -> None:
    p = make_mlp(tmp_path / "h.onnx", dtype=TensorProto.FLOAT16)
    with pytest.raises(ModelError, match="not an FP32 model: input 'x' is float16"):
        load_model_spec(p)


def test_checker_failure(tmp_path: Path) -> None:
    p = make_mlp(tmp_path / "m.onnx")
    m = onnx.load(p)
    m.graph.node[0].input[1] = "does_not_exist"
    onnx.save(m, p)
    with pytest.raises(ModelError, match="fails the ONNX checker"):
        load_model_spec(p)


def test_already_quantized_refused(tmp_path: Path) -> None:
    p = make_mlp(tmp_path / "m.onnx")
    m = onnx.load(p)
    m.graph.node[0].op_type = "QuantizeLinear"
    onnx.save(m, p)
    with pytest.raises(ModelError, match="already quantized"):
        load_model_spec(p)
