"""The `gate` section of pipeline.yaml: the metrics a release rule can judge and the rules themselves. Defaults
live here and nowhere else."""

from __future__ import annotations

import re

from pydantic import Field, model_validator

from quantpipe.configbase import StrictModel, did_you_mean
from quantpipe.evalconfig import TASK_METRICS

__all__ = ["GATE_METRICS", "NEEDS_LABELS", "TASK_OF_METRIC", "CLASS_SCORE_METRICS", "GateRule", "GateConfig"]

GATE_METRICS: dict[str, str] = {
    "top1": "labelled top-1 accuracy (fraction)",
    "top5": "labelled top-5 accuracy (fraction)",
    "top1_drop": "reference top-1 minus this variant's top-1 (fraction; needs labels)",
    "top5_drop": "reference top-5 minus this variant's top-5 (fraction; needs labels)",
    "top1_agreement": "fraction of samples whose argmax matches the FP32 reference",
    "cosine": "mean cosine similarity of the output with the FP32 reference",
    "sqnr_db": "output SQNR against the FP32 reference, dB",
    "line_agreement": "CTC: fraction of samples whose greedy-decoded sequence equals FP32's",
    "cer": "CTC: character error rate of the decoded sequences against FP32's (edits / FP32's length)",
    "line_accuracy": "CTC: fraction of samples decoded exactly as their label sequence (needs labels)",
    "label_cer": "CTC: character error rate against the label sequences (needs labels)",
    "line_accuracy_drop": "CTC: reference line_accuracy minus this variant's (fraction; needs labels)",
    "map_iou": "dense: mean IoU of the thresholded output map with FP32's",
    "map_iou_min": "dense: the lowest sample's IoU of the thresholded map with FP32's (a map lost on one sample: 0)",
    "box_agreement": "dense: F1 of the thresholded map's connected-component boxes against FP32's (IoU >= box_iou)",
    "pixel_agreement": "segmentation: fraction of pixels whose class (argmax) equals FP32's",
    "miou": "segmentation: mean over classes of the IoU of the class maps with FP32's",
    "detection_agreement": "detection: F1 of the decoded detections against FP32's (same class, IoU >= box_iou)",
    "mae": "regression: mean absolute difference from FP32's output, in the output's units",
    "centered_sqnr_db": "regression: SQNR against FP32's variation over the samples (its mean taken out), dB",
    "rank_correlation": "regression: Spearman correlation with FP32 over the samples, mean over the output's values",
    "label_mae": "regression: mean absolute difference from the labels' target values (needs labels)",
    "label_mae_increase": "regression: this variant's label_mae minus the reference's (needs labels)",
    "max_abs_error": "largest absolute difference from the FP32 reference",
    "other_outputs_sqnr_db": "the lowest SQNR of the model's outputs besides model.output against FP32's (against "
                             "FP32's variation over the samples where it varies), dB",
    "latency_ms": "median latency per batch, ms (at `batch_size`, default the largest measured)",
    "latency_p99_ms": "p99 latency per batch, ms",
    "throughput": "samples per second at the median latency",
    "speedup": "latency of `vs` divided by this variant's latency (x)",
    "size_mb": "model or engine file size, MB",
}

#: Gate metrics only one task measures, and the task.
TASK_OF_METRIC: dict[str, str] = {
    **{m: t for t, ms in TASK_METRICS.items() if t != "classification" for m in ms}, "line_accuracy_drop": "ctc",
    "label_mae_increase": "regression"}
#: Gate metrics read from class scores [N, classes] of 2 classes or more (or per position, with valid_mask): measured
#: with evaluate.task classification alone.
CLASS_SCORE_METRICS = frozenset({"top1", "top5", "top1_agreement", "top1_drop", "top5_drop"})
#: Gate metrics measured against the evaluation data's labels.
NEEDS_LABELS = frozenset({"top1", "top5", "top1_drop", "top5_drop", "line_accuracy", "label_cer", "line_accuracy_drop",
                          "label_mae", "label_mae_increase"})


class GateRule(StrictModel):
    """One release rule, e.g. {variant: ort-int8, metric: top1_drop, max: 0.01}.

    `vs` names the variant a relative metric compares with (speedup; defaults to the FP32 reference).
    `baseline: true` judges the change against the same variant in the baseline run instead:
    observed = this run's value - baseline's value.
    """

    variant: str
    metric: str
    min: float | None = None
    max: float | None = None
    vs: str | None = None
    batch_size: int | None = Field(default=None, ge=1)
    baseline: bool = False
    name: str | None = None

    @model_validator(mode="after")
    def _check(self) -> GateRule:
        if self.metric not in GATE_METRICS and not re.match(r"^[A-Za-z_]\w*$", self.metric):
            raise ValueError(f"unknown metric '{self.metric}'{did_you_mean(self.metric, GATE_METRICS)}; known: {', '.join(GATE_METRICS)}")
        if self.min is None and self.max is None:
            raise ValueError(f"rule for {self.variant} {self.metric} needs `min` or `max`")
        if self.vs is not None and self.metric != "speedup":
            raise ValueError("`vs` applies only to metric speedup")
        return self

    def describe(self) -> str:
        """Human form, e.g. 'ort-int8 top1_drop <= 0.01'."""
        if self.name:
            return self.name
        parts = [self.variant, self.metric]
        if self.baseline:
            parts.append("change vs baseline")
        if self.vs:
            parts.append(f"vs {self.vs}")
        if self.batch_size:
            parts.append(f"@bs{self.batch_size}")
        bounds = []
        if self.min is not None:
            bounds.append(f">= {self.min:g}")
        if self.max is not None:
            bounds.append(f"<= {self.max:g}")
        return " ".join(parts) + " " + " and ".join(bounds)


class GateConfig(StrictModel):
    rules: list[GateRule] = Field(default_factory=list)
