"""The load stage: valid FP32 models are described; anything else is refused with exit code 2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from quantpipe.errors import ModelError
from quantpipe.model import load_model_spec, read_model_spec
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


def test_parameters_count_constant_nodes_and_subgraphs(tmp_path: Path) -> None:
    # Paddle exports keep every weight in a Constant node, silero-vad its weights in If branches: all are parameters.
    from onnx import helper, numpy_helper

    w = helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(np.ones((4, 3), np.float32)))
    branch = helper.make_graph([helper.make_node("Constant", [], ["b"],
                                                 value=numpy_helper.from_array(np.ones(5, np.float32)))],
                               "then", [], [helper.make_tensor_value_info("b", TensorProto.FLOAT, [5])])
    g = helper.make_graph(
        [w, helper.make_node("MatMul", ["x", "W"], ["y"]),
         helper.make_node("If", ["c"], ["z"], then_branch=branch, else_branch=branch)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4]),
         helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [5])],
        [numpy_helper.from_array(np.ones(2, np.float32), "unused")])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    spec, _ = read_model_spec(path)
    assert spec.num_parameters == 2 + 12 + 5 + 5


def test_an_input_shape_override_may_not_change_a_size_the_model_fixes() -> None:
    """CenterFace declares [10, 3, 32, 32] and runs any size: `model.inputs.input.shape: [-1, 3, -1, -1]` was
    accepted and calibration then failed in onnxruntime with exit 4 (found probing). Refused at load, with the fix."""
    from quantpipe.artifacts import TensorInfo
    from quantpipe.config import InputSpec
    from quantpipe.model import apply_input_overrides

    fixed = (TensorInfo("input.1", "float32", (10, 3, 32, 32)),)
    with pytest.raises(ModelError, match=r"fixes axis 2 of input 'input.1' at 32 \(\[10, 3, 32, 32\]\).*dynamic axes"):
        apply_input_overrides(fixed, {"input.1": InputSpec(shape=[-1, 3, -1, -1])})
    # the batch axis and the sizes the model leaves free may be said; the same sizes too
    free = (TensorInfo("x", "float32", ("N", 3, "H", "W")),)
    assert apply_input_overrides(free, {"x": InputSpec(shape=[-1, 3, 224, 224])})[0].shape == (-1, 3, 224, 224)
    assert apply_input_overrides(fixed, {"input.1": InputSpec(shape=[-1, 3, 32, 32])})[0].shape == (-1, 3, 32, 32)
