"""`calibration.use: auto` (quantize.range_search): each activation's amax chosen by its effect on the output."""

from __future__ import annotations

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
    assert h["pruned"] == {"entropy": 8, "mse": 8}
    # A close candidate is measured until it loses, and never pruned when it would win.
    tables["percentile"] = {"x": 40.0, "h": 42.0}  # no clip, a 5 % coarser step: close to minmax
    close = choose_ranges(model, tables, opts, ds, batch_size=8).per_tensor["h"]
    assert close["method"] == "minmax" and close["pruned"]["entropy"] == 8
    assert 8 < close["pruned"].get("percentile", 32) <= 32
    # The pruning is exact: with the close candidate's noise known in full (one batch), the same choice.
    whole = choose_ranges(model, tables, opts, ds, batch_size=32).per_tensor["h"]
    assert whole["method"] == close["method"] and whole["amax"] == close["amax"]
