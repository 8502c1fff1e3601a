"""The `evaluate` section of pipeline.yaml: which task the model solves, the metrics recorded, latency,
sensitivity, and when an INT8 variant counts as collapsed. Defaults live here and nowhere else."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from quantpipe.configbase import StrictModel, did_you_mean

__all__ = [
    "BUILTIN_METRICS",
    "TASK_METRICS",
    "HOOK_PATTERN",
    "CtcConfig",
    "DenseConfig",
    "DetectionConfig",
    "CollapseConfig",
    "LatencyConfig",
    "SensitivityConfig",
    "EvaluateConfig",
    "SegmentationConfig",
    "LATENCY_RULE_METRICS",
    "SensitivityMetric",
]

BUILTIN_METRICS = ("top1", "top5", "top1_agreement", "cosine", "sqnr_db", "max_abs_error",
                   "line_agreement", "cer", "line_accuracy", "label_cer", "map_iou", "map_iou_min", "box_agreement",
                   "pixel_agreement", "miou", "detection_agreement", "mae", "centered_sqnr_db", "rank_correlation",
                   "label_mae")
"""Names `evaluate.metrics` accepts besides `module:function` hooks."""

TASK_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("top1", "top5", "top1_agreement"),
    "ctc": ("line_agreement", "cer", "line_accuracy", "label_cer"),
    "dense": ("map_iou", "map_iou_min", "box_agreement"),
    "segmentation": ("pixel_agreement", "miou"),
    "detection": ("detection_agreement",),
    "regression": ("mae", "centered_sqnr_db", "rank_correlation", "label_mae"),
}
"""The task-specific metrics of each task (cosine, sqnr_db, max_abs_error apply to every task)."""

SensitivityMetric = Literal["sqnr_db", "cosine", "top1_agreement", "line_agreement", "map_iou", "box_agreement",
                            "pixel_agreement", "miou", "detection_agreement", "centered_sqnr_db"]
"""What the per-layer sensitivity can rank layers by (the output with one layer quantized alone)."""

LATENCY_RULE_METRICS = ("latency_ms", "latency_p99_ms", "throughput", "speedup")
"""Gate metrics read at one latency batch size (`GateRule.batch_size`)."""

TASK_SCORES: dict[str, str] = {"line_agreement": "ctc", "map_iou": "dense", "box_agreement": "dense",
                               "pixel_agreement": "segmentation", "miou": "segmentation",
                               "detection_agreement": "detection", "mae": "regression", "centered_sqnr_db": "regression"}
"""The search metrics (fallback budget, sensitivity metric) that read the output as `evaluate.task` says, and the
task each needs."""

HOOK_PATTERN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
"""`package.module:function`: a user metric hook."""


class CtcConfig(StrictModel):
    """Greedy CTC decoding of a sequence model's output."""

    blank: int = Field(default=0, ge=0)
    """Index of the CTC blank class."""
    layout: Literal["NTC", "NCT"] = "NTC"
    """Axes of the output: [N, T, C] (time, then classes; the common layout) or [N, C, T]."""


class DenseConfig(StrictModel):
    """How a dense output (detection / segmentation map) is thresholded into foreground."""

    threshold: float = 0.5
    """Foreground where the probability exceeds this."""
    logits: bool = False
    """The output holds logits: a sigmoid is applied before the threshold (0.5 then means logit 0)."""
    box_iou: float = Field(default=0.5, gt=0.0, le=1.0)
    """Two connected-component boxes match at this IoU or more (box_agreement)."""
    min_box_side: int = Field(default=3, ge=1)
    """Components whose box is narrower or shorter than this many pixels are specks, not boxes (box_agreement;
    DBNet's own post-processing drops boxes under 3 pixels a side)."""
    channels: Literal["auto", "first", "last"] = "auto"
    """Where a map output of rank 4 holds its channels: `first` [N, C, H, W] (PyTorch), `last` [N, H, W, C]
    (TensorFlow / TFLite exports); `auto`: last where the last axis is 1 (a map one pixel wide is none: a selfie
    segmenter's [N, 256, 256, 1] was read as 256 maps of 256 x 1, found probing), else first."""


class SegmentationConfig(StrictModel):
    """How a semantic segmentation output is read: one class per pixel."""

    class_axis: int = 1
    """The axis of the class scores: 1 for [N, C, H, W], -1 for channels-last [N, H, W, C]. An integer output
    (a model that ends in ArgMax) is read as the class map itself."""


class DetectionConfig(StrictModel):
    """How a detector's raw head is read into detections, as its own post-processing reads it: the best class's
    score (times objectness) above a threshold, then non-maximum suppression class by class."""

    layout: Literal["auto", "NCA", "NAC"] = "auto"
    """`NCA`: [N, 4 + classes, anchors] (Ultralytics YOLOv8 / 11); `NAC`: [N, anchors, 4 + classes], or 5 + classes
    with objectness (YOLOv5 / v7, YOLOX with its boxes decoded); `auto`: the shorter of axes 1 and 2 holds the box
    and class columns."""
    objectness: bool = False
    """The column after the box holds objectness (YOLOv5 / v7 / YOLOX): a detection scores objectness x class."""
    box_format: Literal["cxcywh", "xyxy"] = "cxcywh"
    """The four box columns: centre and size, or two corners."""
    logits: bool = False
    """The scores are logits: a sigmoid is applied before the threshold."""
    score_threshold: float = Field(default=0.25, ge=0.0, lt=1.0)
    """A detection scores above this (Ultralytics' default); a probability, also with `logits` (after the sigmoid)."""
    nms_iou: float = Field(default=0.45, gt=0.0, le=1.0)
    """A box overlapping a higher-scored one of its class by more than this IoU is suppressed."""
    max_detections: int = Field(default=300, ge=1)
    """Detections per image kept at most, the highest scored."""
    box_iou: float = Field(default=0.5, gt=0.0, le=1.0)
    """A detection matches one of FP32's of the same class at this IoU or more (detection_agreement)."""


class CollapseConfig(StrictModel):
    """When an INT8 variant counts as collapsed: the report then says so first, with cause and fix.

    A healthy INT8 model sits at 20-40 dB output SQNR and >= 0.95 agreement. Below 10 dB the error's RMS is a
    third of the signal's or more, where decisions flip across the board; below 0.5 agreement most samples
    are read differently from FP32: broken, not merely imprecise (the gate rules judge the finer budget).
    """

    min_sqnr_db: float = 10.0
    min_agreement: float = 0.5
    """For top1_agreement, line_agreement, map_iou, box_agreement, pixel_agreement and detection_agreement."""
    warn_sqnr_db: float = 20.0
    """Above the collapse limits but below these, the variant is reported as degraded, first as well (a warning:
    far from a healthy INT8 model, with the same cause and fix); 0 / 0.0 turn the warning off. With task regression
    both SQNR limits judge `centered_sqnr_db`, the error against the output's variation over the samples."""
    warn_agreement: float = 0.95


class LatencyConfig(StrictModel):
    enabled: bool = True
    warmup: int = Field(default=10, ge=0)
    iterations: int = Field(default=50, ge=1)
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 32])
    max_seconds: float | None = Field(default=60.0, gt=0)
    """Per variant and batch size: where one run is slow enough that warmup + iterations would pass this, fewer
    runs are timed (at least 5) and the log says so; None: always the configured counts."""

    @field_validator("batch_sizes")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(b < 1 for b in v):
            raise ValueError("batch_sizes must be a non-empty list of positive integers")
        return sorted(set(v))


class SensitivityConfig(StrictModel):
    enabled: bool = True
    top: int = Field(default=10, ge=1)
    max_samples: int = Field(default=64, ge=1)
    """Evaluation samples used for the per-layer analysis (it runs the model once per layer)."""
    one_at_a_time: bool = True
    metric: SensitivityMetric = "sqnr_db"
    """The model-output metric of one layer quantized alone (task metrics: ties ordered by output SQNR)."""


class EvaluateConfig(StrictModel):
    task: Literal["classification", "ctc", "dense", "segmentation", "detection", "regression"] = "classification"
    """What the output means: class scores [N, classes], CTC sequence scores [N, T, C], dense maps (thresholded),
    a segmentation's class scores per pixel [N, C, H, W] (argmax), a detector's raw head (decoded, NMS), or values
    read as numbers (regression: a score, an estimate, coordinates; judged in their units and against their
    variation over the samples, not against an offset they sit around)."""
    metrics: list[str] = Field(default_factory=lambda: ["top1", "top5", "top1_agreement", "cosine", "sqnr_db",
                                                        "max_abs_error"])
    """Built-in names (BUILTIN_METRICS; the default suits classification, and the task's own metrics are
    always added for every task but classification) and `module:function` hooks returning {name: number}."""
    ctc: CtcConfig = Field(default_factory=CtcConfig)
    dense: DenseConfig = Field(default_factory=DenseConfig)
    segmentation: SegmentationConfig = Field(default_factory=SegmentationConfig)
    detection: DetectionConfig = Field(default_factory=DetectionConfig)
    collapse: CollapseConfig = Field(default_factory=CollapseConfig)
    latency: LatencyConfig = Field(default_factory=LatencyConfig)
    sensitivity: SensitivityConfig = Field(default_factory=SensitivityConfig)
    valid_mask: str | None = None
    """A model input, nonzero where a position of model.output counts: an attention mask [N, T] over padded
    sequences whose output is [N, T, ...]. The metrics, the gate, the sensitivity and the fallback then read those
    positions alone (padding nobody reads counted in every number: found probing). Not with task ctc (its time
    steps are not the input's positions) or detection."""

    @model_validator(mode="before")
    @classmethod
    def _regression_ranks_by_the_variation(cls, data: Any) -> Any:
        """With task regression, the sensitivity's default metric is centered_sqnr_db: sqnr_db's order, each number
        against the output's variation, as the verdict judges it (sqnr_db read 45 dB per layer beside a 29.7 dB
        model, the offset of the face's landmark pixels)."""
        if isinstance(data, dict) and data.get("task") == "regression":
            sens = data.get("sensitivity")
            if sens is None or (isinstance(sens, dict) and "metric" not in sens):
                data = {**data, "sensitivity": {**(sens or {}), "metric": "centered_sqnr_db"}}
        return data

    @model_validator(mode="after")
    def _mask_fits_the_task(self) -> EvaluateConfig:
        if self.valid_mask is not None and self.task in ("ctc", "detection"):
            raise ValueError(f"valid_mask reads the output's positions [N, T, ...]; with task {self.task} they are "
                             f"not the input's positions: leave valid_mask out, or score with a hook")
        return self

    @field_validator("metrics")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        for name in v:
            if name not in BUILTIN_METRICS and not HOOK_PATTERN.match(name):
                raise ValueError(f"unknown metric '{name}'{did_you_mean(name, BUILTIN_METRICS)}; expected one of "
                                 f"{', '.join(BUILTIN_METRICS)}, or a hook written package.module:function")
        return v

    def hooks(self) -> list[str]:
        """The `module:function` entries of `metrics`."""
        return [m for m in self.metrics if ":" in m]

    def listed(self) -> list[str]:
        """The metrics pipeline.yaml lists itself (none where `metrics` is left at its default)."""
        return list(self.metrics) if "metrics" in self.model_fields_set else []

    def wanted(self) -> list[str]:
        """Built-in metrics to record: those asked for plus, for every task but classification, the task's own."""
        names = [m for m in self.metrics if ":" not in m]
        extra = [m for m in TASK_METRICS[self.task] if m not in names] if self.task != "classification" else []
        return names + extra
