"""The FP32 reference on a set of samples, and how a Q/DQ variant is run and scored against it: what the
per-layer sensitivity analysis (on the evaluation data) and the accuracy fallback (on the calibration or
validation data) share."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from quantpipe import metrics as M
from quantpipe.errors import ConfigError, EvaluationError
from quantpipe.evalconfig import TASK_SCORES
from quantpipe.execution import Executor
from quantpipe.onnxgraph import LARGE_MODEL_BYTES, expose_outputs, load_onnx, name_nodes, opset_of, tensor_outputs
from quantpipe.ortsession import ort_session
from quantpipe.quantize.build import prepare_opset
from quantpipe.quantize.downstream import NodeIndex, changed_nodes, constant_tensors, cut_below
from quantpipe.quantize.options import QuantizeOptions
from quantpipe.quantize.write import with_calibration_data
from quantpipe.taskmetrics import CLASSIFICATION, TaskSpec, task_score

__all__ = ["CANDIDATES_PER_RUN", "COUNTED_SCORES", "Reference", "first_samples", "prepare_reference", "run_candidates",
           "join_batches", "run_output", "score"]

#: Scores that count decisions (samples, lines, pixels, boxes): many layers score alike on them, so the searches
#: order equal scores by output SQNR. A regression's scores are continuous: no tie to order.
COUNTED_SCORES = ("top1_agreement", *(m for m, task in TASK_SCORES.items() if task != "regression"))


#: How many candidates `run_candidates` is given at once by the searches: their models and sessions are held
#: together, and each group costs one run of the base model.
CANDIDATES_PER_RUN = 16


@dataclasses.dataclass
class Reference:
    """The FP32 model, its reference outputs on the given samples, and how to build Q/DQ variants."""

    model: Any
    amax: Mapping[str, float]
    options: QuantizeOptions
    feeds: list[dict[str, np.ndarray]]
    ref: np.ndarray
    labels: np.ndarray | None
    output: str
    source_opset: int
    """The opset of the file the model came from, before the upgrade to the writer's (what a report names)."""
    output_axis: int = 0
    """The batch axis of `output` as the model computes it; `ref` and every candidate's output have it first."""



def prepare_reference(
    model_path: str | os.PathLike[str],
    amax: Mapping[str, float],
    dataset: Any,
    *,
    output: str | None,
    batch_size: int,
    max_samples: int | None,
    options: QuantizeOptions,
    calibration_data: Any | None,
    executor: Executor | None = None,
    output_axis: int = 0,
) -> Reference:
    """The FP32 model at the Q/DQ writer's opset, its `output` on the first `max_samples` samples of `dataset`,
    and `options` with what the calibration data decides (`with_calibration_data`; `executor`: its searches'
    workers)."""
    model = load_onnx(model_path)
    source_opset = opset_of(model)
    name_nodes(model.graph)
    # The reference graph is instrumented with the Q/DQ model's nodes (per-layer sensitivity): bring it to the
    # opset the quantizer writes (DequantizeLinear's `axis` needs 13), as build_qdq_model does.
    model, _, _, _ = prepare_opset(model, options.per_channel)
    name_nodes(model.graph)
    if calibration_data is not None:
        options = with_calibration_data(model, options, calibration_data, batch_size=batch_size, amax=amax,
                                        executor=executor)
    outputs = tensor_outputs(model)
    out = output or outputs[0]
    if out not in outputs:
        raise ConfigError(f"output '{out}' is not an output of {model_path} (outputs: {outputs}).")
    feeds, labels = first_samples(dataset, batch_size, max_samples, needed_by="sensitivity and fallback need")
    ref = run_output(ort_session(model), feeds, out, output_axis)
    return Reference(model, amax, options, feeds, ref, labels, out, source_opset, output_axis)


def first_samples(dataset: Any, batch_size: int, max_samples: int | None, *, needed_by: str
                  ) -> tuple[list[dict[str, np.ndarray]], np.ndarray | None]:
    """The feeds of the first `max_samples` samples of `dataset` (all: None) in batches of `batch_size`, and their
    labels when the data has them. EvaluationError when there is no sample (`needed_by`: who says they need one)."""
    feeds: list[dict[str, np.ndarray]] = []
    labels: list[np.ndarray] = []
    seen = 0
    for batch in dataset.batches(batch_size):
        f = batch.feeds
        lab = batch.labels
        if max_samples is not None and seen + batch.size > max_samples:
            keep = max_samples - seen
            f = f.rows(0, keep)
            lab = None if lab is None else lab[:keep]
        feeds.append(f)
        if lab is not None:
            labels.append(np.asarray(lab))
        seen += f.size
        if max_samples is not None and seen >= max_samples:
            break
    if not feeds:
        raise EvaluationError(f"the evaluation data holds no samples; {needed_by} at least one.")
    return feeds, (np.concatenate(labels) if labels else None)


def run_output(sess: Any, feeds: Sequence[Mapping[str, np.ndarray]], output: str, axis: int = 0) -> np.ndarray:
    """`output` of `sess` over every batch of `feeds`, concatenated on its batch axis `axis`, which comes first."""
    return join_batches([sess.run([output], dict(f))[0] for f in feeds], axis)


def join_batches(chunks: Sequence[np.ndarray], axis: int) -> np.ndarray:
    """Batches of an output whose batch axis is `axis` (a time-major RNN's [T, N, C]: 1), joined, samples first."""
    out = np.concatenate(chunks, axis=axis)
    return np.ascontiguousarray(np.moveaxis(out, axis, 0)) if axis else out



def run_candidates(base: Any, candidates: Sequence[Any], feeds: Sequence[Mapping[str, np.ndarray]], output: str, *,
                   max_part: float = 0.8, min_skipped: float = 1.5, threads: int | None = None,
                   output_axis: int = 0) -> list[np.ndarray]:
    """`output` of each candidate model over every batch of `feeds` (concatenated), as `run_output` of its own
    session gives it, computing only what differs from `base`.

    Each candidate differs from `base` in a few nodes (a layer kept in float or quantized alone): a candidate runs
    only the part of its graph those nodes reach (`downstream.cut_below`), fed with the tensors it reads from one
    run of `base` with them exposed (any tensor but a constant: `downstream.constant_tensors`). Every model runs
    as written (`ort_session(int8=True, optimize=False)`: the exact Q/DQ arithmetic, no fusion that depends on
    the whole chain), so a node given the same inputs computes the same bits, and a part the same bits as its
    whole model; tests/unit/test_reference.py and tools/golden.py check it. A
    candidate whose part is more than `max_part` of its model (by estimated multiply-adds) runs whole, and so do all
    when the parts together skip fewer than `min_skipped` whole runs (the run of `base` that feeds them costs about
    one).

    Models may be given as ModelProto or serialized bytes, feeds are numpy arrays: the arguments pickle, so a
    worker process can evaluate a share of the candidates (`quantpipe.candidates`; `threads`: onnxruntime's
    intra-op threads there, the worker's share of the cores; the outputs do not depend on it).
    """
    import onnx

    def session(m: Any) -> Any:
        return ort_session(m, int8=True, optimize=False, threads=threads)

    models = [_proto(c) for c in candidates]
    if len(models) < 2 or _proto(base).ByteSize() >= LARGE_MODEL_BYTES:  # shape inference needs a < 2 GB proto
        return [run_output(session(m), feeds, output, output_axis) for m in models]
    base = _proto(base)
    inputs = {i.name for i in base.graph.input}
    index, base_constants = NodeIndex(base), constant_tensors(base)  # once for all the candidates
    cuts = [cut_below(m, (), [output], nodes=changed_nodes(m, index), base=base, base_constants=base_constants)
            for m in models]
    if not any(set(c.feeds) - inputs for c in cuts):  # every part reaches up to the inputs: each runs whole
        return [run_output(session(m), feeds, output, output_axis) for m in models]
    shapes = {v.name: v for v in onnx.shape_inference.infer_shapes(base).graph.value_info}
    # A part that is most of its model runs whole, and parts run at all only where what they skip together
    # outweighs the run of `base` that feeds them (estimated by multiply-adds).
    cost = _node_costs(base, shapes)
    mean = sum(cost.values()) / max(1, len(cost))
    frac = [sum(cost.get(n.name, mean) for n in c.nodes) / max(1e-9, sum(cost.get(n.name, mean) for n in m.graph.node))
            for c, m in zip(cuts, models, strict=True)]
    cut_at = [k for k, c in enumerate(cuts) if frac[k] <= max_part and set(c.feeds) - inputs]
    if sum(1.0 - frac[k] for k in cut_at) < min_skipped:
        cut_at = []
    outs: list[list[np.ndarray]] = [[] for _ in models]
    for k, m in enumerate(models):
        if k not in cut_at:
            outs[k] = [run_output(session(m), feeds, output, output_axis)]
    if cut_at:
        exposed = sorted({f for k in cut_at for f in cuts[k].feeds if f not in inputs} - {output})
        sess = session(expose_outputs(base, exposed, shapes))
        names = [output, *exposed]
        parts: dict[int, Any] = {}
        for f in feeds:
            known = {**dict(zip(names, sess.run(names, dict(f)), strict=True)), **f}
            for k in cut_at:
                cut = cuts[k]
                if output not in cut.outputs:  # the change does not reach the output
                    outs[k].append(known[output])
                    continue
                if k not in parts:
                    parts[k] = session(cut.model({t: known[t].dtype for t in cut.feeds}, shapes))
                outs[k].append(parts[k].run([output], {t: known[t] for t in cut.feeds})[0])
    return [o[0] if k not in cut_at else join_batches(o, output_axis) for k, o in enumerate(outs)]


def _node_costs(model: Any, shapes: Mapping[str, Any]) -> dict[str, float]:
    """Rough multiply-adds per sample of each node: its output's elements (symbolic dimensions as 1), times the
    weight elements per output channel for Conv / ConvTranspose / Gemm / MatMul with a constant weight."""
    known = {**shapes, **{v.name: v for v in model.graph.output}}
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    out: dict[str, float] = {}
    for n in model.graph.node:
        v = known.get(n.output[0]) if n.output else None
        elems = 1.0
        if v is not None:
            for d in v.type.tensor_type.shape.dim:
                elems *= d.dim_value if d.dim_value > 0 else 1
        w = weights.get(n.input[1]) if len(n.input) > 1 else None
        if w and n.op_type in ("Conv", "ConvTranspose"):
            elems *= float(np.prod(w[1:]))
        elif w and n.op_type in ("Gemm", "MatMul"):
            elems *= float(w[0])
        out[n.name] = elems
    return out


def _proto(model: Any) -> Any:
    import onnx

    if isinstance(model, bytes):
        m = onnx.ModelProto()
        m.ParseFromString(model)
        return m
    return model


#: The metrics `score` computes itself; any other name is a hook's (`TaskSpec.hooks`).
SCORES = ("sqnr_db", "cosine", "top1_agreement", "top1_drop", *TASK_SCORES)


def score(name: str, out: np.ndarray, ref: np.ndarray, labels: np.ndarray | None,
          task: TaskSpec = CLASSIFICATION, valid: np.ndarray | None = None) -> float:
    """Metric `name` of the output `out` against the FP32 `ref` (top1_drop: against `labels`; line_agreement and
    map_iou / box_agreement / pixel_agreement / miou / detection_agreement read the output as `task` says), at the
    positions `valid` marks (`TaskSpec.judged`; None: all)."""
    if task.hooks and name not in SCORES:
        return task.hook_score(name, out, ref, labels)  # a hook's metric, on the whole outputs as evaluate gives them
    out, ref_, labels = task.judged_all(out, ref, labels, valid)
    ref = ref if ref_ is None else ref_
    if name in TASK_SCORES:
        return task_score(name, out, ref, task)
    if name == "sqnr_db":
        return M.sqnr_db(out, ref)
    if name == "cosine":
        return M.mean_cosine(out, ref)
    if name == "top1_agreement":
        return M.top1_agreement(out, ref)
    if name == "top1_drop":
        if labels is None:
            raise ConfigError("the metric top1_drop needs labels in the data it is measured on (for the fallback: "
                              "data.validation.labels); use top1_agreement or cosine without labels.")
        return M.topk_accuracy(ref, labels, 1) - M.topk_accuracy(out, labels, 1)
    raise ConfigError(f"unknown metric '{name}'; expected one of {', '.join(SCORES)}.")


