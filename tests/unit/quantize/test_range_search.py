"""`calibration.use: auto` (quantize.range_search): each activation's amax chosen by its effect on the output."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from quantpipe import quantize as Q
from quantpipe.data import open_dataset
from quantpipe.model import tensor_info
from quantpipe.quantize.range_search import PER_TENSOR, choose_ranges

RNG = np.random.default_rng(7)


def _model() -> onnx.ModelProto:
    """x -> MatMul(w1) = h -> MatMul(w2) = y; h's channel 0 is rare and large, and w2 reads it heavily."""
    w1 = np.eye(8, dtype=np.float32)
    w2 = np.full((8, 4), 0.05, np.float32)
    w2[0, :] = 1.0
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
         helper.make_node("MatMul", ["h", "w2"], ["y"], name="mm2")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _x(n: int) -> np.ndarray:
    x = RNG.uniform(-1, 1, size=(n, 8)).astype(np.float32)
    x[::4, 0] = 40.0  # the large, important activation
    return x


def _tables(clip_h: float = 2.0) -> dict[str, dict[str, float]]:
    """Hand-made: entropy clips h at `clip_h` (far below its 40), minmax keeps it whole."""
    return {"entropy": {"x": 40.0, "h": clip_h}, "minmax": {"x": 40.0, "h": 40.0},
            "percentile": {"x": 40.0, "h": 30.0}, "mse": {"x": 40.0, "h": 1.5}}


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # exact Q/DQ semantics
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(["y"], {"x": x})[0]


def _dataset(tmp_path, model, x):
    np.savez(tmp_path / "c.npz", x=x)
    return open_dataset(tmp_path / "c.npz", [tensor_info(i) for i in model.graph.input], role="calibration")


def test_auto_keeps_the_range_that_matters(tmp_path) -> None:
    model, x = _model(), _x(32)
    ds = _dataset(tmp_path, model, x)
    opts = Q.QuantizeOptions(smooth_alpha=None, bias_correction=False)
    got = choose_ranges(model, _tables(), opts, ds, batch_size=8)
    assert got.per_tensor["h"]["method"] == "minmax"  # entropy's clip costs the most output SQNR
    assert got.amax["h"] == 40.0
    assert got.per_tensor["h"]["noise_db"]["minmax"] > got.per_tensor["h"]["noise_db"]["entropy"] + 10
    ref = _run(model, x)

    def err(amax) -> float:
        return float(np.mean((_run(Q.build_qdq_model(model, amax, opts)[0], x) - ref) ** 2))

    assert err(got.amax) < err(_tables()["entropy"]) / 10
    summary = got.summary()
    assert summary["mattered_most"][0]["tensor"] == "h"
    # Deterministic: the same data gives the same choice.
    again = choose_ranges(model, _tables(), opts, ds, batch_size=4)
    assert again.amax == got.amax and again.winner == got.winner


def test_safeguard_returns_a_single_method_when_it_is_better(tmp_path) -> None:
    model, x = _model(), _x(32)
    ds = _dataset(tmp_path, model, x)
    opts = Q.QuantizeOptions(smooth_alpha=None, bias_correction=False)
    tables = _tables()
    # A `best` table better than anything the per-tensor candidates offer: x and h at their exact max.
    tables["best"] = {"x": float(np.abs(x).max()), "h": float(np.abs(x).max())}
    tables["minmax"] = {"x": 80.0, "h": 80.0}
    tables["percentile"] = {"x": 80.0, "h": 80.0}
    got = choose_ranges(model, tables, opts, ds, batch_size=8)
    assert got.model_db["best"] >= max(v for k, v in got.model_db.items() if k != "best")
    assert got.winner == "best" and got.amax == tables["best"]
    assert PER_TENSOR in got.model_db


def test_equal_candidates_are_measured_once_and_clear_losers_stop_early(tmp_path) -> None:
    model, x = _model(), _x(32)
    ds = _dataset(tmp_path, model, x)
    opts = Q.QuantizeOptions(smooth_alpha=None, bias_correction=False)
    tables = _tables()
    tables["percentile"] = {"x": 40.0, "h": 40.0}  # minmax's amax: measured once
    got = choose_ranges(model, tables, opts, ds, batch_size=8)
    h = got.per_tensor["h"]
    assert h["noise_db"]["percentile"] == h["noise_db"]["minmax"]
    assert h["method"] == "minmax" and h["amax"] == 40.0 and got.amax["h"] == 40.0
    # entropy's and mse's clips of the rare 40 lose on the first 8 samples already: not measured further.
    assert h["pruned"] == {"entropy": 8, "mse": 8, "between entropy and minmax": 8}  # sqrt(2 * 40): clips too
    # A close candidate is measured until it loses, and never pruned when it would win.
    tables["percentile"] = {"x": 40.0, "h": 42.0}  # no clip, a 5 % coarser step: close to minmax
    close = choose_ranges(model, tables, opts, ds, batch_size=8).per_tensor["h"]
    assert close["method"] == "minmax" and close["pruned"]["entropy"] == 8
    assert 8 < close["pruned"].get("percentile", 32) <= 32
    # The pruning is exact: with the close candidate's noise known in full (one batch), the same choice.
    whole = choose_ranges(model, tables, opts, ds, batch_size=32).per_tensor["h"]
    assert whole["method"] == close["method"] and whole["amax"] == close["amax"]


def test_a_wide_gap_between_candidates_is_searched_at_its_midpoint(tmp_path) -> None:
    # h's rare 40s need an amax of 40: entropy's 10 clips them, minmax's 160 rounds the bulk [-1, 1] to 0 / +-1.26.
    model, x = _model(), _x(32)
    ds = _dataset(tmp_path, model, x)
    opts = Q.QuantizeOptions(smooth_alpha=None, bias_correction=False)
    tables = {"entropy": {"x": 40.0, "h": 10.0}, "minmax": {"x": 40.0, "h": 160.0},
              "percentile": {"x": 40.0, "h": 160.0}, "mse": {"x": 40.0, "h": 10.0}}
    h = choose_ranges(model, tables, opts, ds, batch_size=8).per_tensor["h"]
    assert h["method"] == "between entropy and minmax" and h["amax"] == 40.0  # sqrt(10 * 160)
    assert h["noise_db"]["between entropy and minmax"] > max(h["noise_db"]["entropy"], h["noise_db"]["minmax"]) + 10
    tables["minmax"] = tables["percentile"] = {"x": 40.0, "h": 19.0}  # 1.9x apart: no midpoint
    assert set(choose_ranges(model, tables, opts, ds, batch_size=8).per_tensor["h"]["noise_db"]) == set(tables)


def _branchy() -> onnx.ModelProto:
    """A residual block with a side output: r1 feeds a Conv, the residual Add and the side branch y2, so the part
    below a tensor reads tensors from above it and reaches one output or both."""
    rng = np.random.default_rng(3)

    def w(*shape: int) -> np.ndarray:
        return rng.normal(0, 0.3, size=shape).astype(np.float32)

    conv = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", **conv),
         helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
         helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", **conv),
         helper.make_node("Add", ["r1", "c2"], ["s"], name="add"),
         helper.make_node("Relu", ["s"], ["r2"], name="relu2"),
         helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
         helper.make_node("Flatten", ["p"], ["f"], name="flat"),
         helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], name="fc", transB=1),
         helper.make_node("Conv", ["r1", "w4", "b4"], ["y2"], name="side", kernel_shape=[1, 1])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5]),
         helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["n", 2, 8, 8])],
        [numpy_helper.from_array(a, k) for k, a in {
            "w1": w(8, 4, 3, 3), "b1": w(8), "w2": w(8, 8, 3, 3), "b2": w(8), "w3": w(5, 8), "b3": w(5),
            "w4": w(2, 8, 1, 1), "b4": w(2)}.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_alone_pass_matches_the_whole_model_with_one_tensor_rounded(tmp_path, monkeypatch) -> None:
    """Each candidate's noise, measured on the part below its tensor, is the whole model's with only that tensor
    rounded (the pass's oracle, computed here the long way: every candidate on every batch), and neither the
    grouping of the tensors nor the workers' shares change a number."""
    from quantpipe.onnxgraph import Graph
    from quantpipe.quantize import range_search as RS
    from quantpipe.quantize.fake_quant import add_switched_rounding, output_error, reorder

    model = _branchy()
    x = np.random.default_rng(5).normal(0, 1, size=(24, 4, 8, 8)).astype(np.float32)
    x[::5, 0, 2, 2] = 12.0  # a rare outlier: clipping it costs, keeping it coarsens the step
    ds = _dataset(tmp_path, model, x)
    full = onnx.helper.make_model(model.graph, opset_imports=model.opset_import)
    del full.graph.output[:]
    names = ["x", "c1", "r1", "c2", "s", "r2", "p", "f", "y", "y2"]
    for n in names:
        full.graph.output.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, None))
    acts = dict(zip(names, ort.InferenceSession(full.SerializeToString(), providers=["CPUExecutionProvider"])
                    .run(names, {"x": x}), strict=True))
    top = {n: float(np.abs(a).max()) for n, a in acts.items()}
    tables = {m: {n: top[n] * k for n in names} for m, k in
              (("entropy", 0.4), ("minmax", 1.0), ("percentile", 0.75), ("mse", 0.55))}
    opts = Q.QuantizeOptions(smooth_alpha=None, bias_correction=False)
    got = choose_ranges(model, tables, opts, ds, batch_size=8)
    assert {"x", "r1", "f"} <= set(got.per_tensor)  # r1: three readers, both outputs below it

    def whole(t: str, a: float, xb: np.ndarray) -> list[np.ndarray]:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        for n in ("q_on", "q_c", "q_s"):
            m.graph.input.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, []))
        add_switched_rounding(m, Graph(m.graph), t, "q_on", "q_c", "q_s")
        reorder(m)
        shift = t in ("r1", "r2")  # Relu outputs: the non-negative shift's grid
        centre, step = (a / 2, a / 254) if shift else (0.0, a / 127)
        return _run_all(m, {"x": xb, "q_on": np.array(1, np.float32), "q_c": np.array(centre, np.float32),
                               "q_s": np.array(step, np.float32)})

    batches = [x[i:i + 8] for i in range(0, 24, 8)]
    refs = [_run_all(model, {"x": b}) for b in batches]
    signals = np.cumsum([sum(float(np.sum(np.square(r, dtype=np.float64))) for r in rb) for rb in refs])
    for t, rec in got.per_tensor.items():
        per_batch = {a: [output_error(whole(t, a, b), r) for b, r in zip(batches, refs, strict=True)]
                     for a in {tables[m][t] for m in RS.AUTO_CANDIDATES}}
        noise = {a: sum(e) for a, e in per_batch.items()}
        assert rec["amax"] == min(noise, key=lambda a: (noise[a], -a)), t
        for meth, db in rec["noise_db"].items():
            k = rec["pruned"].get(meth, 24) // 8  # a pruned candidate's noise is that of its first k batches
            assert db == min(300.0, 10 * math.log10(signals[k - 1] / sum(per_batch[tables[meth][t]][:k]))), (t, meth)
    # One tensor per FP32 run, by count or because the feeds exceed the memory bound: the same records
    # (tests/unit/execution/test_searches.py deals them to workers).
    for name, value in (("TENSORS_PER_RUN", 1), ("FRONTIER_BYTES", 1)):
        with monkeypatch.context() as m:
            m.setattr(RS, name, value)
            again = choose_ranges(model, tables, opts, ds, batch_size=8)
        assert again.per_tensor == got.per_tensor and again.amax == got.amax


def _run_all(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def test_a_long_alone_pass_says_how_far_it_got(tmp_path, monkeypatch, caplog) -> None:
    import logging

    from quantpipe.quantize import range_search as RS

    model, x = _model(), _x(16)
    ds = _dataset(tmp_path, model, x)
    monkeypatch.setattr(RS, "TENSORS_PER_RUN", 1)
    monkeypatch.setattr(RS, "PROGRESS_SECONDS", 0.0)
    with caplog.at_level(logging.INFO, logger="quantpipe"):
        tables = _tables()
        tables["entropy"]["x"] = 20.0  # x's candidates differ too: two activations to measure
        choose_ranges(model, tables, Q.QuantizeOptions(smooth_alpha=None, bias_correction=False), ds, batch_size=8)
    assert "auto ranges: 1 of 2 activations measured" in caplog.text
    assert "s left)" in caplog.text  # and about how long the rest takes
    assert "calibration.use: best" not in caplog.text  # a short pass: no way round it to offer
    caplog.clear()
    monkeypatch.setattr(RS, "LONG_PASS_SECONDS", 0.0)  # a pass with minutes to go says, once, how to skip it
    with caplog.at_level(logging.INFO, logger="quantpipe"):
        choose_ranges(model, tables, Q.QuantizeOptions(smooth_alpha=None, bias_correction=False), ds, batch_size=8)
    assert caplog.text.count("`calibration.use: best` (quantize --method best) takes one method") == 1
