"""A detector's raw head read into detections (quantpipe.detection), against a plain reading written here from the
description (per anchor, per class, in Python loops), and their agreement with FP32's."""

from __future__ import annotations

import numpy as np
import pytest

from quantpipe import detection as D
from quantpipe.errors import ConfigError, EvaluationError
from quantpipe.taskmetrics import TaskSpec, task_metrics, task_score


def _iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def _plain(head_nac: np.ndarray, threshold: float, nms_iou: float, objectness: bool = False) -> list[set]:
    """Each image's detections as {(class, x0, y0, x1, y1)}: best class per anchor, threshold, NMS class by class."""
    first = 5 if objectness else 4
    images = []
    for anchors in head_nac.astype(np.float64):
        cands: dict[int, list] = {}
        for row in anchors:
            scores = row[first:] * (row[4] if objectness else 1.0)
            c = int(np.argmax(scores))
            if scores[c] > threshold:
                cx, cy, w, h = row[:4]
                cands.setdefault(c, []).append((float(scores[c]), (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)))
        kept = set()
        for c, boxes in cands.items():
            boxes.sort(key=lambda t: -t[0])
            chosen: list = []
            for _, box in boxes:
                if all(_iou(box, k) <= nms_iou for k in chosen):
                    chosen.append(box)
            kept |= {(c, *np.round(b, 9)) for b in chosen}
        images.append(kept)
    return images


def _as_sets(dets: list[D.Detections]) -> list[set]:
    return [{(int(c), *np.round(b, 9)) for b, c in zip(d.boxes, d.classes, strict=True)} for d in dets]


def _head(rng: np.random.Generator, n: int, anchors: int, classes: int, objectness: bool = False) -> np.ndarray:
    """[N, anchors, 4 (+1) + classes]: clustered boxes (so NMS has work), scores in [0, 1)."""
    centres = rng.uniform(0, 64, (n, anchors // 4 + 1, 2))
    pick = rng.integers(0, centres.shape[1], (n, anchors))
    xy = np.take_along_axis(centres, pick[..., None], axis=1) + rng.normal(0, 2, (n, anchors, 2))
    wh = rng.uniform(4, 16, (n, anchors, 2))
    cols = [xy, wh] + ([rng.uniform(0, 1, (n, anchors, 1))] if objectness else [])
    return np.concatenate(cols + [rng.uniform(0, 1, (n, anchors, classes))], axis=2).astype(np.float32)


@pytest.mark.parametrize("objectness", [False, True])
def test_decode_equals_the_plain_reading(objectness: bool) -> None:
    rng = np.random.default_rng(3)
    for _ in range(5):
        head = _head(rng, 2, 120, 3, objectness)
        got = D.decode(np.swapaxes(head, 1, 2), objectness=objectness, score_threshold=0.6, nms_iou=0.45)  # NCA
        assert _as_sets(got) == _plain(head, 0.6, 0.45, objectness)
        assert sum(len(s) for s in _as_sets(got)) > 4
        assert _as_sets(D.decode(head, layout="NAC", objectness=objectness, score_threshold=0.6)) == _as_sets(got)


def test_decode_orders_by_score_caps_and_reads_logits_and_corners() -> None:
    head = np.array([[[10, 10, 20, 20, 0.9, 0.1], [11, 11, 21, 21, 0.8, 0.1], [10, 10, 20, 20, 0.1, 0.7],
                      [40, 40, 50, 50, 0.3, 0.2]]], np.float32)  # [1, anchors, 4 + 2], corners
    (d,) = D.decode(head, layout="NAC", box_format="xyxy", score_threshold=0.25, nms_iou=0.45)
    # The second box overlaps the first of its class and goes; the third is another class and stays.
    assert d.classes.tolist() == [0, 1, 0] and np.allclose(d.scores, [0.9, 0.7, 0.3])
    assert d.boxes[0].tolist() == [10, 10, 20, 20]
    (one,) = D.decode(head, layout="NAC", box_format="xyxy", max_detections=1)
    assert len(one.scores) == 1 and one.scores[0] == pytest.approx(0.9)
    logits = head.copy()
    logits[..., 4:] = np.log(head[..., 4:] / (1 - head[..., 4:]))
    (same,) = D.decode(logits, layout="NAC", box_format="xyxy", logits=True)
    assert np.allclose(same.scores, d.scores) and same.classes.tolist() == d.classes.tolist()


def test_agreement_matches_one_to_one_by_class_and_iou() -> None:
    ref = D.Detections(np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float), np.array([0.9, 0.8]), np.array([0, 1]))
    same = D.detection_agreement([ref], [ref])
    moved = D.Detections(np.array([[0, 0, 10, 10], [26, 26, 36, 36]], float), np.array([0.9, 0.8]), np.array([0, 1]))
    other_class = D.Detections(ref.boxes, ref.scores, np.array([1, 0]))
    doubled = D.Detections(np.array([[0, 0, 10, 10], [0, 0, 10, 10]], float), np.array([0.9, 0.8]), np.array([0, 0]))
    assert same == 1.0
    assert D.detection_agreement([moved], [ref]) == pytest.approx(0.5)  # IoU 16/184: one of two matched
    assert D.detection_agreement([other_class], [ref]) == 0.0
    assert D.detection_agreement([doubled], [ref]) == pytest.approx(0.5)  # one match per reference detection
    empty = D.Detections(np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64))
    assert D.detection_agreement([empty], [empty]) == 1.0 and D.detection_agreement([empty], [ref]) == 0.0


def test_task_metrics_read_a_head_and_refuse_what_is_not_one() -> None:
    rng = np.random.default_rng(0)
    ref = np.swapaxes(_head(rng, 3, 64, 4), 1, 2)
    spec = TaskSpec(task="detection")
    assert task_metrics(ref, ref, None, ("detection_agreement",), spec) == {"detection_agreement": 1.0}
    noisy = ref + rng.normal(0, 0.2, ref.shape).astype(np.float32)
    assert 0.0 < task_score("detection_agreement", noisy, ref, spec) < 1.0
    with pytest.raises(EvaluationError, match="raw head"):
        spec.detections(np.zeros((2, 10), np.float32))
    with pytest.raises(EvaluationError, match="no class scores"):
        TaskSpec(task="detection", det_objectness=True).detections(np.zeros((1, 5, 40), np.float32))
    with pytest.raises(ConfigError, match="needs evaluate.task: detection"):
        task_score("detection_agreement", ref, ref, TaskSpec())


def test_a_box_of_no_area_matches_itself_only() -> None:
    flat = np.array([[0, 5, 10, 5], [0, 6, 10, 6]], float)
    assert D.iou_matrix(flat, flat).tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_settings_that_do_not_fit_the_head_are_named() -> None:
    rng = np.random.default_rng(5)
    v8 = np.swapaxes(_head(rng, 2, 200, 3), 1, 2)  # [2, 7, 200]: NCA
    assert D.head_problem(v8) is None and D.head_problem(v8, layout="NCA") is None
    assert "looks like NCA" in D.head_problem(v8, layout="NAC")
    boxes_as_scores = v8.copy()
    boxes_as_scores[:, 4:] *= 300  # scores in pixels: not probabilities
    assert "not probabilities" in D.head_problem(boxes_as_scores)
    assert D.head_problem(boxes_as_scores, logits=True) is None
    assert "no class scores" in D.head_problem(v8[:, :5], objectness=True)
    assert "3 axes" in D.head_problem(v8[:, :, 0])
