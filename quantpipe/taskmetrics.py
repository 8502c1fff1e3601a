"""Task metrics: what a sequence model (CTC), a dense-map model, a segmentation, a detector or a regression is judged
on, and user metric hooks.

evaluate records them for every variant; the accuracy fallback and the per-layer sensitivity score one of them
(`task_score`). The arithmetic lives in quantpipe.metrics; this module reads a model output the way its task
means it (decode, threshold, NMS) and names the numbers; a detector's decoding lives in quantpipe.detection.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import math
import numbers
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NoReturn

import numpy as np

from quantpipe import detection as D
from quantpipe import metrics as M
from quantpipe.configbase import did_you_mean
from quantpipe.errors import ConfigError, EvaluationError
from quantpipe.evalconfig import (
    BUILTIN_METRICS,
    CtcConfig,
    DenseConfig,
    DetectionConfig,
    EvaluateConfig,
    SegmentationConfig,
)
from quantpipe.fsutil import sha256_file

__all__ = ["ALL_OUTPUTS", "CLASSIFICATION", "TaskSpec", "task_metrics", "task_score", "load_hook", "run_hooks",
           "hooks_sha256", "only_all_output_readers", "reads_all_outputs"]

SEQUENCE_VS_REF = ("line_agreement", "cer")
SEQUENCE_VS_LABELS = ("line_accuracy", "label_cer")
DENSE = ("map_iou", "box_agreement")
SEGMENTATION = ("pixel_agreement", "miou")
DETECTION = ("detection_agreement",)
REGRESSION_FNS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "mae": M.mean_abs_error, "centered_sqnr_db": M.centered_sqnr_db, "rank_correlation": M.rank_correlation}
REGRESSION = tuple(REGRESSION_FNS)


def _default(model: Any, field: str) -> Any:
    """A config field's default: TaskSpec's defaults live in config alone."""
    return model.model_fields[field].default


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """How an output is read: its task and that task's options (see config: evaluate.task, .ctc, .dense,
    .segmentation, .detection as det_*; the defaults are the config's own)."""

    task: str = _default(EvaluateConfig, "task")
    blank: int = _default(CtcConfig, "blank")
    layout: str = _default(CtcConfig, "layout")
    threshold: float = _default(DenseConfig, "threshold")
    logits: bool = _default(DenseConfig, "logits")
    box_iou: float = _default(DenseConfig, "box_iou")
    min_box_side: int = _default(DenseConfig, "min_box_side")
    channels: str = _default(DenseConfig, "channels")
    class_axis: int = _default(SegmentationConfig, "class_axis")
    det_layout: str = _default(DetectionConfig, "layout")
    det_objectness: bool = _default(DetectionConfig, "objectness")
    det_box_format: str = _default(DetectionConfig, "box_format")
    det_logits: bool = _default(DetectionConfig, "logits")
    det_score_threshold: float = _default(DetectionConfig, "score_threshold")
    det_nms_iou: float = _default(DetectionConfig, "nms_iou")
    det_max_detections: int = _default(DetectionConfig, "max_detections")
    det_box_iou: float = _default(DetectionConfig, "box_iou")
    valid_mask: str | None = None
    """The input whose nonzero positions of the output count (evaluate.valid_mask); None: every position."""
    hooks: tuple[str, ...] = ()
    """evaluate.metrics' `module:function` hooks: a metric one of them returns can hold the fallback's budget."""

    @classmethod
    def from_config(cls, ev: EvaluateConfig) -> TaskSpec:
        d = ev.detection
        return cls(task=ev.task, blank=ev.ctc.blank, layout=ev.ctc.layout, threshold=ev.dense.threshold,
                   logits=ev.dense.logits, box_iou=ev.dense.box_iou, min_box_side=ev.dense.min_box_side,
                   channels=ev.dense.channels,
                   class_axis=ev.segmentation.class_axis, det_layout=d.layout, det_objectness=d.objectness,
                   det_box_format=d.box_format, det_logits=d.logits, det_score_threshold=d.score_threshold,
                   det_nms_iou=d.nms_iou, det_max_detections=d.max_detections, det_box_iou=d.box_iou,
                   valid_mask=ev.valid_mask, hooks=tuple(ev.hooks()))

    def hook_score(self, name: str, out: np.ndarray, ref: np.ndarray, labels: np.ndarray | None) -> float:
        """The metric `name` as `hooks` return it on these outputs (whole, as evaluate gives them); ConfigError
        where none returns it or it is no finite number."""
        readers = [h for h in self.hooks if reads_all_outputs(h)]
        got = run_hooks([h for h in self.hooks if h not in readers], out, ref, labels)
        if name not in got and readers:
            self.refuse_readers(name, readers)
        if name not in got:
            raise ConfigError(f"build.fallback.metric '{name}' was not returned by the evaluate.metrics hooks "
                              f"({', '.join(self.hooks) or 'none'}; they returned: {', '.join(sorted(got)) or 'nothing'})"
                              f"{did_you_mean(name, sorted(got))}; name a metric they return.")
        value = got[name]
        return float(value) if value is not None else math.nan

    def check_fallback_hooks(self, name: str) -> None:
        """ConfigError where every hook reads all outputs, so that none can give the fallback's metric `name` (the
        fallback's candidates compute model.output alone): said before the search starts."""
        if self.hooks and all(reads_all_outputs(h) for h in self.hooks):
            self.refuse_readers(name, self.hooks)

    @staticmethod
    def refuse_readers(name: str, readers: Sequence[str]) -> NoReturn:
        """The ConfigError for a fallback metric only hooks reading every output could give."""
        raise ConfigError(
            f"build.fallback.metric '{name}' can only come from {', '.join(readers)}, which read(s) every output of "
            f"the model ({ALL_OUTPUTS}), while the fallback's candidates compute model.output alone. Budget the "
            f"fallback on a metric of a hook that reads model.output alone (join the heads in the graph, e.g. one "
            f"Concat output, and make it model.output), or on a built-in metric such as cosine.")

    def valid_of(self, feeds: Iterable[Mapping[str, np.ndarray]]) -> np.ndarray | None:
        """The positions that count over these batches' samples (`valid_mask`'s input, as bool, batches joined); None
        without `valid_mask`."""
        if self.valid_mask is None:
            return None
        return np.concatenate([np.asarray(f[self.valid_mask]) != 0 for f in feeds])

    def judged(self, x: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
        """`x` [N, T, ...] at the positions `valid` [N, T] marks: [K, ...] (each position a sample), or [1, K, ...]
        for a dense or segmentation output (a map's axes kept); `x` itself where `valid` is None."""
        if valid is None:
            return x
        if np.shape(x)[:2] != valid.shape:
            raise EvaluationError(
                f"evaluate.valid_mask '{self.valid_mask}' has shape {list(valid.shape)}, but model.output has "
                f"{list(np.shape(x))}: its first two axes must be the mask's [N, T]. Point valid_mask at the input "
                f"that marks the output's positions, or leave it out.")
        kept = np.asarray(x)[valid]
        return kept[None] if self.task in ("dense", "segmentation") else kept

    def judged_all(self, out: np.ndarray, ref: np.ndarray | None, labels: np.ndarray | None, valid: np.ndarray | None
                   ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """`judged` of an output, its reference and per-position labels ([N, T]; per-sample labels stay whole)."""
        if valid is None:
            return out, ref, labels
        per_position = labels is not None and np.shape(labels)[:2] == valid.shape
        return (self.judged(out, valid), None if ref is None else self.judged(ref, valid),
                self.judged(labels, valid) if per_position else labels)  # type: ignore[arg-type]

    def decode(self, out: np.ndarray) -> list[tuple[int, ...]]:
        """Greedy CTC decode; a clear EvaluationError when the output is not [N, T, C] / [N, C, T]."""
        if np.ndim(out) != 3:
            raise EvaluationError(
                f"evaluate.task is ctc, but the output has shape {list(np.shape(out))}; CTC decoding needs 3 axes "
                f"(evaluate.ctc.layout: {self.layout}). Set model.output to the sequence scores, or change evaluate.task.")
        classes = np.shape(out)[2 if self.layout == "NTC" else 1]
        if self.blank >= classes:
            raise EvaluationError(f"evaluate.ctc.blank is {self.blank}, but the output has {classes} classes on its "
                                  f"class axis (layout {self.layout}); set the blank index the model was trained with.")
        return M.ctc_greedy_decode(out, blank=self.blank, layout=self.layout)

    def mask(self, out: np.ndarray) -> np.ndarray:
        """The thresholded foreground of a dense output, as maps [N, H, W] or [N, C, H, W] (`maps`)."""
        return M.foreground(self.maps(out), threshold=self.threshold, logits=self.logits)

    def maps(self, out: np.ndarray) -> np.ndarray:
        """A dense output with its channels (rank 4) on axis 1, as `channels` says; a clear EvaluationError when it
        is no map."""
        if np.ndim(out) < 3:
            raise EvaluationError(
                f"evaluate.task is dense, but the output has shape {list(np.shape(out))}; a map needs [N, H, W] or "
                f"[N, C, H, W]. Set model.output to the probability / logit map, or change evaluate.task.")
        last = np.ndim(out) == 4 and (self.channels == "last" or (self.channels == "auto" and np.shape(out)[-1] == 1
                                                                   and np.shape(out)[1] != 1))
        return np.moveaxis(out, -1, 1) if last else out

    def classes(self, out: np.ndarray) -> np.ndarray:
        """The class map of a segmentation output: argmax over `class_axis` ([N, C, H, W] -> [N, H, W])."""
        out = np.asarray(out)
        if out.dtype.kind in "iu":
            return out
        if out.ndim < 3 or not -out.ndim <= self.class_axis < out.ndim or self.class_axis in (0, -out.ndim) \
                or out.shape[self.class_axis] < 2:
            raise EvaluationError(
                f"evaluate.task is segmentation, but the output has shape {list(out.shape)}, which has no class axis "
                f"{self.class_axis} of 2 or more classes beside the samples; it needs [N, C, H, W] class scores "
                f"(evaluate.segmentation.class_axis: 1) or [N, H, W, C] (-1). A one-map foreground output: use "
                f"evaluate.task: dense.")
        return M.class_map(out, axis=self.class_axis)

    def detections(self, out: np.ndarray) -> list[D.Detections]:
        """Each sample's detections from a detector's raw head (quantpipe.detection.decode)."""
        try:
            return D.decode(out, layout=self.det_layout, objectness=self.det_objectness,
                            box_format=self.det_box_format, logits=self.det_logits,
                            score_threshold=self.det_score_threshold, nms_iou=self.det_nms_iou,
                            max_detections=self.det_max_detections)
        except ValueError as err:
            raise EvaluationError(
                f"evaluate.task is detection, but model.output cannot be read as a detector's raw head: {err}. Point "
                f"model.output at the head before any NMS ([N, 4 + classes, anchors] as YOLOv8 exports it, or "
                f"[N, anchors, 5 + classes] with evaluate.detection.objectness: true as YOLOv5 / YOLOX do), or change "
                f"evaluate.task.") from err


CLASSIFICATION = TaskSpec()
"""Today's reading of an output: class scores (no decoding, no threshold)."""


def task_metrics(out: np.ndarray, ref: np.ndarray | None, labels: np.ndarray | None, wanted: Sequence[str],
                 spec: TaskSpec) -> dict[str, float | None]:
    """The task's metrics among `wanted` (against the FP32 `ref` and, for CTC, the label sequences)."""
    res: dict[str, float | None] = {}
    if spec.task == "ctc":
        pred = spec.decode(out)
        if ref is not None:
            gold = spec.decode(ref)
            if "line_agreement" in wanted:
                res["line_agreement"] = M.exact_match_rate(pred, gold)
            if "cer" in wanted:
                res["cer"] = M.character_error_rate(pred, gold)
        if labels is not None and np.shape(labels)[0] == len(pred):
            seqs = M.label_sequences(labels)
            if "line_accuracy" in wanted:
                res["line_accuracy"] = M.exact_match_rate(pred, seqs)
            if "label_cer" in wanted:
                res["label_cer"] = M.character_error_rate(pred, seqs)
    elif spec.task == "dense" and ref is not None:
        mine, theirs = spec.mask(out), spec.mask(ref)
        if {"map_iou", "map_iou_min"} & set(wanted):  # the mean hides a sample whose map is lost (a person gone)
            ious = M.mask_ious(mine, theirs)
            res.update({"map_iou": float(np.mean(ious)), "map_iou_min": float(np.min(ious))})
        if "box_agreement" in wanted:
            res["box_agreement"] = M.box_agreement(mine, theirs, spec.box_iou, spec.min_box_side)
    elif spec.task == "segmentation" and ref is not None:
        mine, theirs = spec.classes(out), spec.classes(ref)
        if "pixel_agreement" in wanted:
            res["pixel_agreement"] = M.pixel_agreement(mine, theirs)
        if "miou" in wanted:
            res["miou"] = M.mean_iou(mine, theirs)
    elif spec.task == "detection" and ref is not None and "detection_agreement" in wanted:
        res["detection_agreement"] = D.detection_agreement(spec.detections(out), spec.detections(ref), spec.det_box_iou)
    elif spec.task == "regression":
        if ref is not None:
            res.update({n: M.finite_or_none(REGRESSION_FNS[n](out, ref)) for n in REGRESSION if n in wanted})
        if labels is not None and "label_mae" in wanted and np.size(labels) == np.size(out):
            res["label_mae"] = M.mean_abs_error(np.reshape(out, np.shape(labels)), labels)
    return res


def task_score(name: str, out: np.ndarray, ref: np.ndarray, spec: TaskSpec) -> float:
    """One task metric against the FP32 output (for the fallback's budget and the sensitivity ranking)."""
    needs = ("ctc" if name in SEQUENCE_VS_REF else "dense" if name in DENSE
             else "segmentation" if name in SEGMENTATION else "detection" if name in DETECTION
             else "regression" if name in REGRESSION else None)
    if needs is None or spec.task != needs:
        raise ConfigError(f"the metric {name} needs evaluate.task: "
                          f"{needs or 'ctc, dense, segmentation, detection or regression'} "
                          f"(it is "
                          f"{spec.task}); "
                          f"set evaluate.task, or use sqnr_db, cosine or top1_agreement.")
    if needs == "regression":
        return REGRESSION_FNS[name](out, ref)  # inf for identical outputs, as sqnr_db
    value = task_metrics(out, ref, None, (name,), spec)[name]
    return float("nan") if value is None else float(value)


MetricHook = Callable[..., Mapping[str, float]]
"""(outputs, reference or None, labels or None), and `all_outputs` / `all_reference` where it declares them."""


def hooks_sha256(hooks: Sequence[str]) -> str:
    """One sha256 over each hook's name and its module's source file (what a fallback chosen by a hook's metric
    depends on: a cached build is reused only while they are the same)."""
    h = hashlib.sha256()
    for spec in hooks:
        load_hook(spec)  # a ConfigError naming the hook where it cannot be imported
        module = sys.modules[spec.partition(":")[0]]
        h.update(spec.encode() + b"\0")
        path = getattr(module, "__file__", None)
        if path and os.path.isfile(path):
            h.update(sha256_file(path).encode())
    return h.hexdigest()


def load_hook(spec: str) -> MetricHook:
    """Import `package.module:function` (ConfigError naming the hook when it cannot be found)."""
    module_name, _, func_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # an import error inside the user's module is theirs to see, named
        raise ConfigError(f"evaluate.metrics hook '{spec}': module {module_name} cannot be imported "
                          f"({type(err).__name__}: {err}). Install the package or put its folder on PYTHONPATH.") from err
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ConfigError(f"evaluate.metrics hook '{spec}': {module_name} has no function {func_name}. "
                          f"Write it as package.module:function, the function taking (outputs, reference, labels).")
    return func


ALL_OUTPUTS = "all_outputs"
"""The keyword a hook declares to be given every output of the model, not only model.output (`run_hooks`)."""

ALL_REFERENCE = "all_reference"
"""The keyword a hook declares to be given FP32's every output beside them."""


def _parameters(func: Any) -> Mapping[str, Any]:
    """The names a hook's signature declares (none for a builtin or C function, whose signature cannot be read)."""
    try:
        return inspect.signature(func).parameters
    except (TypeError, ValueError):
        return {}


def reads_all_outputs(spec: str) -> bool:
    """Whether the hook declares a parameter `all_outputs`: it is then given every output of the model by name."""
    return ALL_OUTPUTS in _parameters(load_hook(spec))


def only_all_output_readers(hooks: Sequence[str]) -> bool:
    """Whether there are hooks and every one reads all outputs, so that none can hold the fallback's budget. False
    where one cannot be imported here (`quantpipe gate` judging a run elsewhere): nothing is then assumed."""
    try:
        return bool(hooks) and all(reads_all_outputs(h) for h in hooks)
    except ConfigError:
        return False


def run_hooks(hooks: Sequence[str], out: np.ndarray, ref: np.ndarray | None, labels: np.ndarray | None, *,
              all_outputs: Mapping[str, np.ndarray] | None = None,
              all_reference: Mapping[str, np.ndarray] | None = None) -> dict[str, float | None]:
    """Call each hook with (outputs, reference outputs or None, labels or None); merge the named numbers. A hook
    that declares `all_outputs` (and `all_reference`) is also given every output of the model by name, each with its
    batch axis first (model.output's as `out`), and FP32's (None without a reference): a detector whose scores and
    boxes are separate outputs is decoded from both."""
    res: dict[str, float | None] = {}
    for spec in hooks:
        func = load_hook(spec)
        kwargs: dict[str, Any] = {}
        params = _parameters(func)
        if ALL_OUTPUTS in params:
            if all_outputs is None:
                raise ConfigError(f"evaluate.metrics hook '{spec}' reads every output ({ALL_OUTPUTS}), but only "
                                  f"model.output was computed here.")
            kwargs[ALL_OUTPUTS] = dict(all_outputs)
            if ALL_REFERENCE in params:
                kwargs[ALL_REFERENCE] = None if all_reference is None else dict(all_reference)
        try:
            got: Any = func(out, ref, labels, **kwargs)
        except Exception as err:
            raise EvaluationError(f"evaluate.metrics hook '{spec}' raised {type(err).__name__}: {err}. Fix the hook "
                                  f"(it is called with outputs {list(out.shape)}, the FP32 reference outputs or "
                                  f"None, and the labels or None"
                                  + (f"; {ALL_OUTPUTS}: {', '.join(kwargs[ALL_OUTPUTS])}" if kwargs else "")
                                  + ").") from err
        if not isinstance(got, Mapping):
            raise EvaluationError(f"evaluate.metrics hook '{spec}' returned {type(got).__name__}; it must return a "
                                  f"dict of metric name -> number, e.g. {{'coco_map': 0.41}}.")
        for name, value in got.items():
            _check_hook_value(spec, name, value, res)
            res[name] = float(value) if math.isfinite(float(value)) else None
    return res


def _check_hook_value(spec: str, name: Any, value: Any, seen: Mapping[str, Any]) -> None:
    if not isinstance(name, str) or not name.isidentifier():
        raise EvaluationError(f"evaluate.metrics hook '{spec}' returned the metric name {name!r}; names must be "
                              f"identifiers (letters, digits, _), as gate rules name them.")
    if name in BUILTIN_METRICS or name.endswith("_drop") or name in seen:
        raise EvaluationError(f"evaluate.metrics hook '{spec}' returned '{name}', which is already a quantpipe "
                              f"metric or another hook's; rename it (e.g. '{name}_hook').")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise EvaluationError(f"evaluate.metrics hook '{spec}' returned {name} = {value!r}; values must be numbers.")
