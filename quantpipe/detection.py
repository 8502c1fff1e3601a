"""A detector's raw head read into detections, and their agreement with FP32's detections.

The single-output layouts detectors are exported with for TensorRT: [N, 4 + C, anchors] (Ultralytics YOLOv8 / 11:
cx, cy, w, h, then C class scores; layout NCA) and [N, anchors, 5 + C] (YOLOv5 / v7 and YOLOX with the boxes
decoded: cx, cy, w, h, objectness, C class scores; layout NAC). Each anchor is scored by its best class (times its
objectness); anchors above the score threshold go through non-maximum suppression class by class, as the
detectors' own post-processing does. Two sets of detections agree where a detection is matched one-to-one by one
of the same class at IoU >= a bound. numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

__all__ = ["Detections", "features_last", "head_problem", "decode", "nms", "iou_matrix", "matched_detections",
           "detection_agreement"]

MAX_CANDIDATES = 30000
"""Anchors above the score threshold that go into NMS at most, the highest scored (Ultralytics' own cap)."""


class Detections(NamedTuple):
    """The detections of one image: boxes [K, 4] (x0, y0, x1, y1), scores [K], classes [K]."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray


def features_last(out: np.ndarray, layout: str = "auto") -> np.ndarray:
    """The head as [N, anchors, features]: NAC as it is, NCA transposed; `auto` takes the shorter of axes 1 and 2
    for the features (a head has more anchors than box and class columns). ValueError unless rank 3."""
    out = np.asarray(out)
    if out.ndim != 3:
        raise ValueError(f"a detection head needs 3 axes [N, 4 + classes, anchors] or [N, anchors, 4 + classes], "
                         f"got shape {list(out.shape)}")
    if layout == "auto":
        layout = "NCA" if out.shape[1] < out.shape[2] else "NAC"
    return np.swapaxes(out, 1, 2) if layout == "NCA" else out


def head_problem(out: np.ndarray, *, layout: str = "auto", objectness: bool = False, logits: bool = False) -> str | None:
    """Why `out` (a batch of FP32 outputs) cannot be the head these settings describe, or None. Settings that do not
    fit the head decode nonsense without an error (found probing: layout NAC on a YOLOv8 head read 2096 box values
    as class scores; objectness on it left no detection on either side, and agreement 1.0 passed the gate)."""
    try:
        head = features_last(out, layout)
    except ValueError as err:
        return str(err)
    anchors, cols = head.shape[1], head.shape[2]
    if layout != "auto" and cols > anchors:
        other = "NCA" if layout == "NAC" else "NAC"
        return (f"layout {layout} reads the head {list(np.shape(out))} as {anchors} anchors of {cols} columns; a head "
                f"has more anchors than box and class columns, so it looks like {other} (or leave layout: auto)")
    first = 5 if objectness else 4
    if cols <= first:
        return (f"its {cols} columns per anchor hold no class scores after the {first} box"
                f"{' and objectness' if objectness else ''} columns")
    scores = head[..., 4:] if objectness else head[..., first:]
    lo, hi = float(np.min(scores)), float(np.max(scores))
    if not logits and (lo < -1e-3 or hi > 1.0 + 1e-3):
        return (f"its score columns{' (objectness included)' if objectness else ''} hold {lo:.4g} to {hi:.4g}, not "
                f"probabilities: set evaluate.detection.logits: true if they are logits; box columns read as scores "
                f"mean a wrong layout or objectness")
    return None


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of `a` [P, 4] with every box of `b` [R, 4] (x0, y0, x1, y1). Two boxes of no area (a width
    or height of 0) have IoU 1 where they are the same box, 0 otherwise."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    w = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    h = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = w * h
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    same = np.all(a[:, None, :] == b[None, :, :], axis=2)
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), same.astype(np.float64))


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float, max_keep: int | None = None) -> np.ndarray:
    """Greedy non-maximum suppression: indices of the kept boxes, highest score first; a box is dropped when its
    IoU with a kept one exceeds `iou`. Equal scores keep their order."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    keep: list[int] = []
    while order.size and (max_keep is None or len(keep) < max_keep):
        first, order = int(order[0]), order[1:]
        keep.append(first)
        if order.size:
            order = order[iou_matrix(boxes[first], boxes[order])[0] <= iou]
    return np.asarray(keep, dtype=np.int64)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for large logits


def decode(out: np.ndarray, *, layout: str = "auto", objectness: bool = False, box_format: str = "cxcywh",
           logits: bool = False, score_threshold: float = 0.25, nms_iou: float = 0.45,
           max_detections: int = 300) -> list[Detections]:
    """Each image's detections (see the module's docstring), in float64."""
    head = features_last(out, layout).astype(np.float64)
    first = 5 if objectness else 4
    if head.shape[2] <= first:
        raise ValueError(f"a detection head of {head.shape[2]} columns per anchor holds no class scores after its "
                         f"{first} box{' and objectness' if objectness else ''} columns (shape {list(np.shape(out))})")
    scores = _sigmoid(head[..., first:]) if logits else head[..., first:]
    if objectness:
        scores = scores * (_sigmoid(head[..., 4:5]) if logits else head[..., 4:5])
    dets = []
    for boxes, s in zip(head[..., :4], scores, strict=True):
        classes = np.argmax(s, axis=1)
        best = np.take_along_axis(s, classes[:, None], axis=1)[:, 0]
        idx = np.flatnonzero(best > score_threshold)
        idx = idx[np.argsort(-best[idx], kind="stable")][:MAX_CANDIDATES]
        b = boxes[idx]
        if box_format == "cxcywh":
            b = np.concatenate([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], axis=1)
        # One NMS for every class: each class's boxes moved apart by more than all boxes span.
        span = float(np.ptp(b)) + 1.0 if b.size else 1.0
        keep = nms(b + (classes[idx] * span)[:, None], best[idx], nms_iou, max_detections)
        dets.append(Detections(b[keep], best[idx][keep], classes[idx][keep]))
    return dets


def matched_detections(pred: Detections, ref: Detections, min_iou: float = 0.5) -> int:
    """One-to-one matches of the same class at IoU >= min_iou, the highest-IoU pairs first."""
    iou = iou_matrix(pred.boxes, ref.boxes)
    iou[pred.classes[:, None] != ref.classes[None, :]] = -1.0
    i, j = np.nonzero(iou >= min_iou)
    used_p: set[int] = set()
    used_r: set[int] = set()
    for k in np.lexsort((j, i, -iou[i, j])):
        if int(i[k]) not in used_p and int(j[k]) not in used_r:
            used_p.add(int(i[k]))
            used_r.add(int(j[k]))
    return len(used_p)


def detection_agreement(pred: Sequence[Detections], ref: Sequence[Detections], min_iou: float = 0.5) -> float:
    """F1 of the detections against the reference's, pooled over the images: 2 * matches / (detections + reference
    detections); 1.0 when neither side detects anything."""
    if len(pred) != len(ref):
        raise ValueError(f"{len(pred)} images of detections but {len(ref)} of reference detections")
    matches = sum(matched_detections(p, r, min_iou) for p, r in zip(pred, ref, strict=True))
    total = sum(len(p.scores) + len(r.scores) for p, r in zip(pred, ref, strict=True))
    return 2.0 * matches / total if total else 1.0
