"""Graph helpers of `quantpipe.onnxgraph` that the quantizer's rewrites share."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quantpipe.onnxgraph import Graph, depthwise_convs, drop_unused_initializers


def test_drop_unused_initializers_removes_only_unread_tensors_and_keeps_the_order() -> None:
    inits = [numpy_helper.from_array(np.full((3,), i, np.float32), f"w{i}") for i in range(6)]
    # w1 and w4 are read by nodes, w3 is a graph input with a default (an initializer that is also an input),
    # w5 is a graph output; w0 and w2 are read by nothing
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w1"], ["y"]), helper.make_node("Mul", ["y", "w4"], ["z"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3]),
         helper.make_tensor_value_info("w3", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [3]),
         helper.make_tensor_value_info("w5", TensorProto.FLOAT, [3])],
        initializer=inits)
    model = helper.make_model(graph)
    expected = onnx.ModelProto()
    expected.CopyFrom(model)
    keep = [t for t in expected.graph.initializer if t.name in {"w1", "w3", "w4", "w5"}]
    del expected.graph.initializer[:]
    expected.graph.initializer.extend(keep)

    drop_unused_initializers(model.graph, Graph(model.graph))
    assert [t.name for t in model.graph.initializer] == ["w1", "w3", "w4", "w5"]
    assert model.SerializeToString() == expected.SerializeToString()  # the kept tensors' bytes, in order
    drop_unused_initializers(model.graph, Graph(model.graph))  # nothing left to drop
    assert model.SerializeToString() == expected.SerializeToString()


def test_depthwise_convs_are_one_input_channel_per_group() -> None:
    def w(name: str, shape: tuple[int, ...]) -> onnx.TensorProto:
        return numpy_helper.from_array(np.zeros(shape, np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w_dw"], ["a"], name="dw", group=8),  # [8, 1, 3, 3], 8 groups
        helper.make_node("Conv", ["a", "w_grouped"], ["b"], name="grouped", group=2),  # [8, 4, 3, 3]: 4 per group
        helper.make_node("Conv", ["b", "w_dense"], ["c"], name="dense"),
        helper.make_node("Constant", [], ["w_const"], value=w("v", (8, 1, 3, 3))),
        helper.make_node("Conv", ["c", "w_const"], ["d"], name="dw_const", group=8),  # weight in a Constant node
        helper.make_node("Conv", ["d", "w_unknown"], ["y"], name="dw_dq", group=8),  # shape unknown (a DQ's output)
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16]),
                                           helper.make_tensor_value_info("w_unknown", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [w("w_dw", (8, 1, 3, 3)), w("w_grouped", (8, 4, 3, 3)), w("w_dense", (8, 8, 3, 3))])
    assert depthwise_convs(helper.make_model(graph)) == {"dw", "dw_const", "dw_dq"}


def test_weights_listed_as_inputs_are_read_as_weights(tmp_path) -> None:
    from quantpipe.onnxgraph import load_onnx, weights_as_inputs

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
                               helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 3  # IR < 4: every initializer must be an input; without them it needs IR 4
    onnx.save(model, tmp_path / "m.onnx")
    loaded = load_onnx(tmp_path / "m.onnx")
    assert [i.name for i in loaded.graph.input] == ["x"] and loaded.ir_version == 4
    onnx.checker.check_model(loaded)
    assert weights_as_inputs(loaded) == []  # nothing left to drop
    kept = load_onnx(tmp_path / "m.onnx", weights_listed=True)
    assert [i.name for i in kept.graph.input] == ["x", "w"] and weights_as_inputs(kept) == ["w"]


def test_a_converters_joined_node_name_is_cut_for_the_log_and_the_verdict() -> None:
    from quantpipe.onnxgraph import NAME_CHARS, short_name

    joined = "model/conv2d_5/Conv2D;model/batch_normalization_5/FusedBatchNormV3;model/conv2d_5/BiasAdd"
    assert short_name(joined) == "model/conv2d_5/Conv2D…"
    long = "a" * 40 + "/" + "b" * 40
    cut = short_name(long)
    assert len(cut) <= NAME_CHARS and cut.startswith("a" * 29) and cut.endswith("b" * 29) and "…" in cut
    assert short_name("fc1") == "fc1"
