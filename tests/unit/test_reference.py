"""`run_candidates`: many Q/DQ variants of one model, each computing only what differs from a base model, give
the same bits as each variant run alone in its own session (what the sensitivity and fallback searches did)."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest

from quantpipe import reference
from quantpipe.data import open_dataset
from quantpipe.model import tensor_info
from quantpipe.onnxgraph import expose_outputs
from quantpipe.ortsession import ort_session
from quantpipe.quantize import QuantizeOptions
from quantpipe.quantize.build import build_qdq_model
from quantpipe.quantize.downstream import changed_nodes, cut_below
from quantpipe.reference import prepare_reference, run_candidates, run_output
from tests.conftest import EXAMPLE_CALIB, EXAMPLE_MODEL


@pytest.fixture(scope="module")
def example_ctx():
    """The bundled digits CNN, an amax from its calibration data, 40 samples in batches of 16 (the last short)."""
    model = onnx.load(EXAMPLE_MODEL)
    ds = open_dataset(EXAMPLE_CALIB, [tensor_info(i) for i in model.graph.input], role="calibration")
    names = [o for n in model.graph.node for o in n.output]
    sess = ort_session(expose_outputs(model, names), optimize=False)
    x = next(iter(ds.batches(64))).feeds
    vals = dict(zip(names, sess.run(names, dict(x)), strict=True))
    amax = {k: float(np.abs(v).max()) for k, v in vals.items()} | {k: float(np.abs(v).max()) for k, v in x.items()}
    ctx = prepare_reference(EXAMPLE_MODEL, amax, ds, output=None, batch_size=16, max_samples=40,
                            options=QuantizeOptions(split_activations="off"), calibration_data=None)
    return ctx, amax


def _alone(models, ctx) -> list[np.ndarray]:
    return [run_output(ort_session(m, int8=True, optimize=False), ctx.feeds, ctx.output) for m in models]


def test_layers_kept_in_float_equal_their_own_runs(example_ctx) -> None:
    ctx, amax = example_ctx
    full, rep = build_qdq_model(ctx.model, amax, ctx.options)
    names = [q.name for q in rep.quantized_nodes]
    assert len(names) >= 3
    keeps = [build_qdq_model(ctx.model, amax, dataclasses.replace(ctx.options, keep_float_nodes=frozenset({n})))[0]
             for n in names]
    got = run_candidates(full, keeps, ctx.feeds, ctx.output, max_part=1.0, min_skipped=0.0)  # every part runs
    for name, a, b in zip(names, got, _alone(keeps, ctx), strict=True):
        assert np.array_equal(a, b), name
    # The later layers' parts are smaller than the model: the test exercises the cut, not whole runs.
    last = cut_below(keeps[-1], (), [ctx.output], nodes=changed_nodes(keeps[-1], full), base=full)
    assert 0 < len(last.nodes) < len(keeps[-1].graph.node)


def test_single_layers_equal_their_own_runs_and_take_bytes(example_ctx) -> None:
    ctx, amax = example_ctx
    _, rep = build_qdq_model(ctx.model, amax, ctx.options)
    singles = [build_qdq_model(ctx.model, amax, dataclasses.replace(ctx.options, only_nodes=frozenset({q.name})))[0]
               for q in rep.quantized_nodes]
    got = run_candidates(ctx.model.SerializeToString(), [m.SerializeToString() for m in singles], ctx.feeds,
                         ctx.output, max_part=1.0, min_skipped=0.0)
    for a, b in zip(got, _alone(singles, ctx), strict=True):
        assert np.array_equal(a, b)
    # Quantized layers change the output: a comparison that cannot fail proves nothing.
    assert not np.array_equal(got[0], ctx.ref)
    # A layer quantized alone is fed at its own input, not from the model's: the later layers' parts are smaller
    # than their models.
    last = cut_below(singles[-1], (), [ctx.output], nodes=changed_nodes(singles[-1], ctx.model), base=ctx.model)
    assert 0 < len(last.nodes) < len(singles[-1].graph.node) and set(last.feeds) - {i.name for i in ctx.model.graph.input}


def test_a_cut_is_fed_activations_but_never_a_constant(example_ctx) -> None:
    """A layer kept in float runs from the tensors above it, fed from the base (dequantized activations too), never
    from a dequantized weight or a Constant: onnxruntime prepacks constants, so a fed one could compute other bits."""
    ctx, amax = example_ctx
    full, rep = build_qdq_model(ctx.model, amax, ctx.options)
    producer = {o: n for n in full.graph.node for o in n.output}
    weights = {t.name for t in full.graph.initializer}
    fed_dequantized = 0
    for q in rep.quantized_nodes:
        keep = build_qdq_model(ctx.model, amax, dataclasses.replace(ctx.options, keep_float_nodes=frozenset({q.name})))[0]
        cut = cut_below(keep, (), [ctx.output], nodes=changed_nodes(keep, full), base=full)
        for f in cut.feeds:
            p = producer.get(f)
            assert p is None or not (p.op_type == "Constant" or all(i in weights for i in p.input if i)), (q.name, f)
            fed_dequantized += p is not None and p.op_type == "DequantizeLinear"
    assert fed_dequantized > 0  # the parts start below the layers above them, not at the model's input


def test_parts_run_only_where_they_skip_enough(example_ctx, monkeypatch) -> None:
    """By default a part that is most of its model runs whole; the estimate never changes a result."""
    ctx, amax = example_ctx
    full, rep = build_qdq_model(ctx.model, amax, ctx.options)
    keeps = [build_qdq_model(ctx.model, amax, dataclasses.replace(ctx.options, keep_float_nodes=frozenset({q.name})))[0]
             for q in rep.quantized_nodes]
    made: list[int] = []
    real = reference.ort_session
    monkeypatch.setattr(reference, "ort_session", lambda m, **kw: made.append(len(m.graph.node)) or real(m, **kw))
    got = run_candidates(full, keeps, ctx.feeds, ctx.output)
    for a, b in zip(got, _alone(keeps, ctx), strict=True):
        assert np.array_equal(a, b)
    parts = sum(1 for n in made if n < min(len(k.graph.node) for k in keeps))
    assert 0 < parts < len(keeps)  # the first layers run whole, the last ones as parts
