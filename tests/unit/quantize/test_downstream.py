"""`cut_below`: the part of a graph a change reaches, run alone on tensors from one run of the whole graph, gives
the whole graph's bits (what split_search runs for each switched activation)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quantpipe.onnxgraph import Graph, expose_outputs
from quantpipe.ortsession import ort_session
from quantpipe.quantize.downstream import cut_below
from quantpipe.quantize.fake_quant import add_switched_rounding, reorder
from tests.conftest import float_model

RNG = np.random.default_rng(5)


def _f32(name: str, arr) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name)


def _switched() -> tuple[onnx.ModelProto, list[str]]:
    """x -> conv1 -> Relu = a -> conv2 -> Relu = b -> conv3 -> Add(a-branch skip) -> y, with a switched int8
    rounding on a and on b (scalar inputs s_a, s_b)."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["a"], name="act1"),
        helper.make_node("Conv", ["a", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["b"], name="act2"),
        helper.make_node("Conv", ["b", "w3", "b3"], ["c3"], name="conv3", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c3", "c1"], ["y"], name="skip"),
    ]
    inits = [_f32("w1", RNG.normal(size=(4, 3, 3, 3))), _f32("b1", RNG.normal(size=4)),
             _f32("w2", RNG.normal(size=(4, 4, 3, 3))), _f32("b2", RNG.normal(size=4)),
             _f32("w3", RNG.normal(size=(4, 4, 3, 3))), _f32("b3", RNG.normal(size=4))]
    m = float_model(nodes, inits, {"x": ["n", 3, 8, 8]}, {"y": ["n", 4, 8, 8]})
    g = Graph(m.graph)
    for t in ("a", "b"):
        m.graph.input.append(helper.make_tensor_value_info(f"s_{t}", TensorProto.FLOAT, []))
        m.graph.initializer.extend([_f32(f"s_{t}_c", 0.0), _f32(f"s_{t}_s", 0.05)])
        add_switched_rounding(m, g, t, f"s_{t}", f"s_{t}_c", f"s_{t}_s")
    reorder(m)
    return m, ["a", "b"]


def test_the_part_below_a_switch_gives_the_whole_graphs_bits() -> None:
    m, tensors = _switched()
    x = RNG.normal(size=(5, 3, 8, 8)).astype(np.float32)
    off = {"s_a": np.array(0.0, np.float32), "s_b": np.array(0.0, np.float32)}
    whole = ort_session(m, optimize=False)
    for t in tensors:
        cut = cut_below(m, [t], ["y"])
        assert cut.outputs == ["y"] and len(cut.nodes) < len(m.graph.node)
        assert "x" not in cut.feeds  # what lies above the switched tensor is not run again
        fed = [f for f in cut.feeds if f not in off]
        known = dict(zip(fed, ort_session(expose_outputs(m, fed), optimize=False).run(fed, {"x": x, **off}),
                         strict=True))
        part = ort_session(cut.model({f: np.dtype(np.float32) for f in cut.feeds}), optimize=False)
        on = {**off, f"s_{t}": np.array(1.0, np.float32)}
        got = part.run(["y"], {**known, **{k: v for k, v in on.items() if k in cut.feeds}})[0]
        want = whole.run(["y"], {"x": x, **on})[0]
        assert np.array_equal(got, want), t
        assert not np.array_equal(want, whole.run(["y"], {"x": x, **off})[0])  # the switch does change y


def test_a_change_that_misses_an_output_leaves_it_out() -> None:
    m, _ = _switched()
    m.graph.output.append(helper.make_tensor_value_info("c1", TensorProto.FLOAT, None))
    cut = cut_below(m, ["b"])
    assert cut.outputs == ["y"] and "c1" in cut.feeds
