"""ortsession: the analysis sessions' options."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from quantpipe.ortsession import ort_session


def _relu() -> object:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_sessions_run_without_the_cpu_arena_and_compute_the_same():
    """The arena would keep the largest run's memory for the session's life (the range search's peak)."""
    x = np.array([[-1.0, 0.5, -0.0, 3.0]], np.float32)
    for optimize in (True, False):
        sess = ort_session(_relu(), optimize=optimize)
        assert sess.get_session_options().enable_cpu_mem_arena is False
        np.testing.assert_array_equal(sess.run(None, {"x": x})[0], np.maximum(x, 0))
