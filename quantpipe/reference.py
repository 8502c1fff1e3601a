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
from quantpipe.onnxgraph import load_onnx, name_nodes
from quantpipe.ortsession import ort_session
from quantpipe.quantize.build import prepare_opset
from quantpipe.quantize.options import QuantizeOptions
from quantpipe.quantize.write import with_calibration_data
from quantpipe.taskmetrics import CLASSIFICATION, TaskSpec, task_score

__all__ = ["Reference", "prepare_reference", "run_output", "score"]


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
) -> Reference:
    model = load_onnx(model_path)
    name_nodes(model.graph)
    # The reference graph is instrumented with the Q/DQ model's nodes (per-layer sensitivity): bring it to the
    # opset the quantizer writes (DequantizeLinear's `axis` needs 13), as build_qdq_model does.
    model, _, _, _ = prepare_opset(model, options.per_channel)
    name_nodes(model.graph)
    if calibration_data is not None:
        options = with_calibration_data(model, options, calibration_data, batch_size=batch_size, amax=amax)
    outputs = [o.name for o in model.graph.output]
    out = output or outputs[0]
    if out not in outputs:
        raise ConfigError(f"output '{out}' is not an output of {model_path} (outputs: {outputs}).")
    feeds: list[dict[str, np.ndarray]] = []
    labels: list[np.ndarray] = []
    seen = 0
    for batch in dataset.batches(batch_size):
        f = dict(batch.feeds)
        lab = batch.labels
        if max_samples is not None and seen + batch.size > max_samples:
            keep = max_samples - seen
            f = {k: v[:keep] for k, v in f.items()}
            lab = None if lab is None else lab[:keep]
        feeds.append(f)
        if lab is not None:
            labels.append(np.asarray(lab))
        seen += next(iter(f.values())).shape[0]
        if max_samples is not None and seen >= max_samples:
            break
    if not feeds:
        raise EvaluationError("the evaluation data holds no samples; sensitivity and fallback need at least one.")
    ref = run_output(ort_session(model), feeds, out)
    return Reference(model, amax, options, feeds, ref, np.concatenate(labels) if labels else None, out)


def run_output(sess: Any, feeds: Sequence[Mapping[str, np.ndarray]], output: str) -> np.ndarray:
    """`output` of `sess` over every batch of `feeds`, concatenated."""
    return np.concatenate([sess.run([output], dict(f))[0] for f in feeds], axis=0)



def score(name: str, out: np.ndarray, ref: np.ndarray, labels: np.ndarray | None,
          task: TaskSpec = CLASSIFICATION) -> float:
    """Metric `name` of the output `out` against the FP32 `ref` (top1_drop: against `labels`; line_agreement and
    map_iou read the output as `task` says)."""
    if name in ("line_agreement", "map_iou"):
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
    raise ConfigError(f"unknown metric '{name}'; expected one of sqnr_db, cosine, top1_agreement, top1_drop, "
                      "line_agreement, map_iou.")


