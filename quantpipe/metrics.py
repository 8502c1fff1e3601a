"""Accuracy and agreement metrics on plain numpy arrays (no model, no backend).

Shared by evaluate (variants vs the FP32 reference) and the sensitivity / fallback analysis.
Every scoring function takes arrays of shape [N, ...] and returns a Python float. Besides classification:
sequence models read by greedy CTC decoding (exact-match rate, character error rate) and dense maps read by
thresholding (IoU of the maps, agreement of their connected-component boxes); regression outputs (scores,
estimates, coordinates) in their own units (mean absolute error, SQNR against their variation, rank correlation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence as Sequence_

import numpy as np

__all__ = [
    "topk_accuracy", "top1_agreement", "mean_cosine", "sqnr_db", "worst_channel_sqnr_db", "channel_axis", "sqnr_from_sums",
    "SquaredSums", "finite_or_none", "max_abs_error",
    "ctc_greedy_decode", "label_sequences", "edit_distance", "exact_match_rate", "character_error_rate",
    "foreground", "mask_iou", "mask_ious", "component_boxes", "detection_boxes", "box_iou", "matched_boxes", "box_agreement",
    "class_map", "pixel_agreement", "mean_iou",
    "mean_abs_error", "centered_sqnr_db", "rank_correlation", "offset_db", "OffsetSums", "OFFSET_WARN_DB",
]


def _flat(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(x.shape[0], -1) if x.ndim > 1 else x.reshape(-1, 1)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """Fraction of samples whose label is among the k largest logits (ties broken by index). A negative label is not
    scored (a per-token label of a position nobody labels: -100, as Hugging Face writes it); NaN when none is."""
    logits = np.asarray(logits)
    labels = np.asarray(labels).reshape(-1)
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"{logits.shape[0]} predictions but {labels.shape[0]} labels")
    scored = labels >= 0
    if not scored.all():
        logits, labels = logits[scored], labels[scored]
        if not labels.size:
            return math.nan
    scores = logits.reshape(logits.shape[0], -1)
    k = min(k, scores.shape[1])
    topk = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(topk == labels[:, None], axis=1)))


def top1_agreement(pred: np.ndarray, ref: np.ndarray) -> float:
    """Fraction of samples whose argmax matches the reference's argmax."""
    p = np.asarray(pred).reshape(pred.shape[0], -1).argmax(axis=1)
    r = np.asarray(ref).reshape(ref.shape[0], -1).argmax(axis=1)
    return float(np.mean(p == r))


def mean_cosine(pred: np.ndarray, ref: np.ndarray) -> float:
    """Mean over samples of the cosine similarity of the flattened outputs (1.0 when both are zero).

    An output of one value per sample (a score, a probability, a regression) has no direction of its own: the
    cosine of two numbers is only their signs' agreement, 1.0 for any error that keeps the sign. There it is the
    cosine of the samples' values taken as one vector."""
    p, r = _flat(pred), _flat(ref)
    if p.shape[1] == 1:
        p, r = p.T, r.T
    num = np.sum(p * r, axis=1)
    den = np.linalg.norm(p, axis=1) * np.linalg.norm(r, axis=1)
    cos = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(np.all(p == r, axis=1), 1.0, 0.0))
    return float(np.mean(cos))


def channel_axis(shape: tuple[int, ...]) -> int | None:
    """The axis of an output's channels (its classes, box coordinates, maps): of axis 1 and the last axis, the one
    with fewer entries (ties: axis 1), for an output of rank 3 or more; None otherwise. A YOLO head [N, 4 + classes,
    anchors] and a segmentation map [N, C, H, W] have them on axis 1; a PicoDet head [N, anchors, classes] and a
    channels-last map on the last axis, where axis 1 would take every anchor for a channel."""
    if len(shape) < 3:
        return None
    return 1 if shape[1] <= shape[-1] else len(shape) - 1


def worst_channel_sqnr_db(pred: np.ndarray, ref: np.ndarray) -> tuple[int, int, float] | None:
    """(axis, channel, SQNR dB) of the worst channel (`channel_axis`) of an output of rank 3 or more with at least 2
    channels; None otherwise. Its channels can differ in scale by orders of magnitude (a YOLO head's box coordinates
    and class scores), and the pooled SQNR then only sees the large ones."""
    axis = channel_axis(pred.shape)
    if axis is None or pred.shape[axis] < 2:
        return None
    axes = tuple(k for k in range(pred.ndim) if k != axis)
    r = np.asarray(ref, dtype=np.float64)
    signal = np.sum(r * r, axis=axes)
    noise = np.sum((np.asarray(pred, dtype=np.float64) - r) ** 2, axis=axes)
    with np.errstate(divide="ignore"):
        db = np.where(signal > 0, 10 * np.log10(signal / np.maximum(noise, 1e-300)), np.inf)
    c = int(np.argmin(db))
    return (axis, c, float(db[c])) if math.isfinite(float(db[c])) else None


def sqnr_db(pred: np.ndarray, ref: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio 10*log10(sum ref^2 / sum (pred-ref)^2); inf when identical."""
    p, r = _flat(pred), _flat(ref)
    noise = float(np.sum((p - r) ** 2))
    signal = float(np.sum(r**2))
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return float(10.0 * np.log10(signal / noise))


class SquaredSums:
    """Float64 squared sums of tensors (a signal's sum(x**2), an error's sum((y + offset - x)**2)) computed on one
    float64 scratch buffer that is reused from call to call.

    The searches take thousands of these sums on large activations. A fresh float64 copy for each one costs more
    than the sum itself: allocating it, the page faults, and the temporaries of the plain expression. Each sum here
    is `np.sum` over a contiguous float64 array of the tensor's own shape that holds the same values as the plain
    expression, so it gives the same bits (tests/unit/test_metrics.py checks it). The buffer grows to the largest
    tensor seen; drop the object to free it. Not safe to share between threads.
    """

    def __init__(self) -> None:
        self._buf = np.empty(0, dtype=np.float64)

    def _scratch(self, shape: tuple[int, ...]) -> np.ndarray:
        n = math.prod(shape)
        if self._buf.size < n:
            self._buf = np.empty(n, dtype=np.float64)
        return self._buf[:n].reshape(shape)

    def signal(self, x: np.ndarray, scale: np.ndarray | None = None) -> float:
        """sum(x**2), with x taken in float64; with `scale` (broadcasting against x), sum((x * scale)**2)."""
        x = np.asarray(x)
        d = self._scratch(x.shape)
        if scale is None:
            np.square(x, out=d, dtype=np.float64)
        else:
            np.copyto(d, x, casting="unsafe")
            np.multiply(d, scale, out=d)
            np.square(d, out=d)
        return float(np.sum(d))

    def error(self, y: np.ndarray, x: np.ndarray, offset: float = 0.0, scale: np.ndarray | None = None) -> float:
        """sum((y + offset - x)**2), with y and x taken in float64 (x may broadcast against y); with `scale`
        (broadcasting against y), sum(((y + offset - x) * scale)**2). An offset of 0 is not added (it could only
        turn a -0.0 into +0.0, which the square makes equal)."""
        y = np.asarray(y)
        d = self._scratch(y.shape)
        np.copyto(d, y, casting="unsafe")
        if offset:
            d += offset
        np.subtract(d, x, out=d)
        if scale is not None:
            np.multiply(d, scale, out=d)
        np.square(d, out=d)
        return float(np.sum(d))


def sqnr_from_sums(signal: float, noise: float) -> float:
    """SQNR (dB) from squared sums accumulated elsewhere (batch by batch, in order): inf when the noise is 0, -inf
    when the signal is."""
    return math.inf if noise == 0 else -math.inf if signal == 0 else 10.0 * math.log10(signal / noise)


def finite_or_none(x: float) -> float | None:
    """`x` as a float, None where it is inf or nan (what results.json records)."""
    return float(x) if math.isfinite(x) else None


def max_abs_error(pred: np.ndarray, ref: np.ndarray) -> float:
    """Largest absolute elementwise difference."""
    return float(np.max(np.abs(_flat(pred) - _flat(ref)))) if np.size(ref) else 0.0


# --------------------------------------------------------------------------- sequence models (CTC)

Sequence = tuple[int, ...]


def ctc_greedy_decode(logits: np.ndarray, *, blank: int = 0, layout: str = "NTC") -> list[Sequence]:
    """Greedy CTC decode of [N, T, C] (layout "NTC") or [N, C, T] ("NCT") scores: argmax per timestep, repeats
    collapsed, `blank` dropped. Works on logits or probabilities alike (argmax is the same)."""
    x = np.asarray(logits)
    if x.ndim != 3:
        raise ValueError(f"a CTC output must have 3 axes [N, T, C] or [N, C, T], got shape {list(x.shape)}")
    best = x.argmax(axis=2 if layout == "NTC" else 1)  # [N, T]
    prev = np.concatenate([np.full((best.shape[0], 1), -1, dtype=best.dtype), best[:, :-1]], axis=1)
    keep = (best != blank) & (best != prev)
    return [tuple(int(c) for c in row[k]) for row, k in zip(best, keep, strict=True)]


def label_sequences(labels: np.ndarray) -> list[Sequence]:
    """Label rows [N, L] of class indices padded with -1 -> one sequence per sample (the -1 entries dropped)."""
    lab = np.asarray(labels)
    lab = lab.reshape(lab.shape[0], -1)
    return [tuple(int(c) for c in row[row != -1]) for row in lab]


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance (insertions, deletions, substitutions, each costing 1)."""
    if len(a) < len(b):
        a, b = b, a
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        diag, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            diag, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diag + (ca != cb))
    return row[-1]


def exact_match_rate(pred: Sequence_[Sequence], ref: Sequence_[Sequence]) -> float:
    """Fraction of samples whose sequence equals the reference sequence."""
    if len(pred) != len(ref):
        raise ValueError(f"{len(pred)} sequences but {len(ref)} references")
    return float(np.mean([p == r for p, r in zip(pred, ref, strict=True)])) if ref else float("nan")


def character_error_rate(pred: Sequence_[Sequence], ref: Sequence_[Sequence]) -> float:
    """Corpus CER: total edit distance over total reference length (edits over 1 when every reference is empty)."""
    if len(pred) != len(ref):
        raise ValueError(f"{len(pred)} sequences but {len(ref)} references")
    edits = sum(edit_distance(p, r) for p, r in zip(pred, ref, strict=True))
    return edits / max(1, sum(len(r) for r in ref))


# --------------------------------------------------------------------------- dense maps (detection / segmentation)


def foreground(x: np.ndarray, *, threshold: float = 0.5, logits: bool = False) -> np.ndarray:
    """Boolean map of `x > threshold`; with `logits` the sigmoid is applied first (so 0.5 means logit 0)."""
    x = np.asarray(x, dtype=np.float64)
    if logits:
        # sigmoid(x) > t  <=>  x > log(t / (1 - t)): exact, and no overflow in exp for large logits.
        if threshold <= 0.0 or threshold >= 1.0:
            return np.full(x.shape, threshold <= 0.0)
        return x > math.log(threshold / (1.0 - threshold))
    return x > threshold


def mask_iou(pred: np.ndarray, ref: np.ndarray) -> float:
    """Mean over samples of |pred AND ref| / |pred OR ref| of boolean maps [N, ...]; 1.0 when both are empty."""
    return float(np.mean(mask_ious(pred, ref)))


def mask_ious(pred: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Each sample's |pred AND ref| / |pred OR ref| of boolean maps [N, ...]; 1.0 where both are empty."""
    p = np.asarray(pred, dtype=bool).reshape(pred.shape[0], -1)
    r = np.asarray(ref, dtype=bool).reshape(ref.shape[0], -1)
    inter = np.sum(p & r, axis=1)
    union = np.sum(p | r, axis=1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


Box = tuple[int, int, int, int]
"""(row0, col0, row1, col1), inclusive."""


def component_boxes(mask: np.ndarray) -> list[Box]:
    """Bounding boxes of the 8-connected components of a 2-D boolean map.

    Run-length labelling: each row's runs of True are found with numpy, runs that touch a run of the row above
    (8-connectivity: overlapping or diagonal) are joined with union-find. Cost grows with the number of runs,
    not pixels, so a 640x640 probability map takes milliseconds.
    """
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2:
        raise ValueError(f"component_boxes needs a 2-D map, got shape {list(m.shape)}")
    runs: list[tuple[int, int, int]] = []  # (row, first col, last col)
    row_runs: list[list[int]] = []
    for r, line in enumerate(m):
        edges = np.flatnonzero(np.diff(np.concatenate(([0], line.view(np.int8), [0]))))
        ids = []
        for s, e in zip(edges[::2], edges[1::2], strict=True):
            ids.append(len(runs))
            runs.append((r, int(s), int(e) - 1))
        row_runs.append(ids)
    parent = list(range(len(runs)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for r in range(1, len(row_runs)):
        above, here = row_runs[r - 1], row_runs[r]
        i = 0
        for k in here:
            _, s, e = runs[k]
            while i < len(above) and runs[above[i]][2] < s - 1:
                i += 1
            j = i
            while j < len(above) and runs[above[j]][1] <= e + 1:
                parent[root(above[j])] = root(k)
                j += 1
    boxes: dict[int, list[int]] = {}
    for k, (r, s, e) in enumerate(runs):
        b = boxes.setdefault(root(k), [r, s, r, e])
        b[0], b[1], b[2], b[3] = min(b[0], r), min(b[1], s), max(b[2], r), max(b[3], e)
    return [(b[0], b[1], b[2], b[3]) for b in boxes.values()]


def box_iou(a: Box, b: Box) -> float:
    """IoU of two inclusive pixel boxes."""
    h = min(a[2], b[2]) - max(a[0], b[0]) + 1
    w = min(a[3], b[3]) - max(a[1], b[1]) + 1
    inter = max(0, h) * max(0, w)
    area = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - inter
    return inter / area


def matched_boxes(pred: Sequence_[Box], ref: Sequence_[Box], min_iou: float = 0.5) -> int:
    """One-to-one matches at IoU >= min_iou, the highest-IoU pairs first."""
    pairs = sorted(((box_iou(p, r), i, j) for i, p in enumerate(pred) for j, r in enumerate(ref)), reverse=True)
    used_p: set[int] = set()
    used_r: set[int] = set()
    for iou, i, j in pairs:
        if iou < min_iou:
            break
        if i not in used_p and j not in used_r:
            used_p.add(i)
            used_r.add(j)
    return len(used_p)


def detection_boxes(mask: np.ndarray, min_side: int = 1) -> list[Box]:
    """`component_boxes` of a 2-D boolean map at least `min_side` pixels a side: narrower or shorter ones are specks,
    not detections (DBNet's post-processing drops boxes under 3 pixels a side)."""
    return [b for b in component_boxes(mask) if min(b[2] - b[0], b[3] - b[1]) + 1 >= min_side]


def box_agreement(pred: np.ndarray, ref: np.ndarray, min_iou: float = 0.5, min_side: int = 1) -> float:
    """F1 of the connected-component boxes of boolean maps [N, ..., H, W] against the reference's, matched at
    IoU >= min_iou, pooled over every sample and map: 2 * matches / (boxes + reference boxes); 1.0 with no boxes.
    Boxes narrower or shorter than `min_side` pixels are specks, not detections (DBNet's post-processing drops
    boxes under 3 pixels a side), and are left out of both sides."""
    p = np.asarray(pred, dtype=bool)
    r = np.asarray(ref, dtype=bool)
    if p.ndim < 3:
        raise ValueError(f"box_agreement needs maps [N, H, W] or [N, C, H, W], got shape {list(p.shape)}")
    p = p.reshape(-1, *p.shape[-2:])
    r = r.reshape(-1, *r.shape[-2:])
    matches = total = 0
    for pm, rm in zip(p, r, strict=True):
        pb, rb = (detection_boxes(m, min_side) for m in (pm, rm))
        matches += matched_boxes(pb, rb, min_iou)
        total += len(pb) + len(rb)
    return 2.0 * matches / total if total else 1.0


def class_map(x: np.ndarray, axis: int = 1) -> np.ndarray:
    """Each pixel's class: the argmax over `axis` of a score map [N, C, H, W] (or channels-last with axis -1); an
    integer map (a model that ends in ArgMax) is its own class map."""
    x = np.asarray(x)
    return x if x.dtype.kind in "iu" else np.argmax(x, axis=axis)


def pixel_agreement(pred: np.ndarray, ref: np.ndarray) -> float:
    """Fraction of pixels (over all samples) whose class equals the reference's."""
    return float(np.mean(np.asarray(pred) == np.asarray(ref)))


def mean_iou(pred: np.ndarray, ref: np.ndarray) -> float:
    """Mean over the classes present in either map of the class's IoU, pooled over all samples (one confusion
    matrix for the data set, as segmentation benchmarks count it); 1.0 when both are empty."""
    p = np.asarray(pred, dtype=np.int64).ravel()
    r = np.asarray(ref, dtype=np.int64).ravel()
    if p.size == 0:
        return 1.0
    lo = int(min(p.min(), r.min()))
    k = int(max(p.max(), r.max())) - lo + 1
    both = np.bincount((p - lo)[p == r], minlength=k)
    either = np.bincount(p - lo, minlength=k) + np.bincount(r - lo, minlength=k) - both
    present = either > 0
    return float(np.mean(both[present] / either[present]))


# --------------------------------------------------------------------------- regression (scores, estimates)


def mean_abs_error(pred: np.ndarray, ref: np.ndarray) -> float:
    """Mean absolute difference from `ref` over every value, in the output's own units (a MOS, pixels, Hz)."""
    return float(np.mean(np.abs(_flat(pred) - _flat(ref))))


def centered_sqnr_db(pred: np.ndarray, ref: np.ndarray) -> float:
    """SQNR against what the reference varies by: 10*log10(sum (ref - mean)^2 / sum (pred - ref)^2), each value's mean
    over the samples (axis 0) taken out of the signal alone. An output around an offset (a quality score of 2.3-3.3)
    reads its error against the differences the model makes, not against the offset; inf when identical, -inf when
    the reference does not vary."""
    p, r = _flat(pred), _flat(ref)
    return sqnr_from_sums(float(np.sum((r - r.mean(axis=0)) ** 2)), float(np.sum((p - r) ** 2)))


#: An output whose mean over the samples holds this much more power than its variation around it (dB) is said so
#: (evaluate's warning, `quantpipe quantize`'s closing line). Class scores, embeddings and maps sit at 0.5-4.7 dB on
#: the example and the open and real sets; a detector's raw head 18.9, face landmarks 15.6, pose landmarks 9.3-9.6
#: (16.1 dB against FP32, 6.8 around their mean: collapsed), a quality score 12-17.
OFFSET_WARN_DB = 6.0


class OffsetSums:
    """`offset_db` of an output seen batch by batch: each value's sum over the samples (one sample's size, float64)
    and the squared sum. Batches whose samples differ in shape (dynamic axes) have no offset: nan."""

    def __init__(self) -> None:
        self.count, self.total, self.sums = 0, 0.0, np.zeros(0)
        self.varying = False

    @classmethod
    def of(cls, ref: np.ndarray, chunk: int = 64) -> OffsetSums:
        """The sums over a whole output, `chunk` samples at a time: a large one is never copied whole in float64."""
        sums = cls()
        for i in range(0, len(ref), chunk):
            sums.add(np.asarray(ref[i:i + chunk]))
        return sums

    def add(self, batch: np.ndarray) -> None:
        x = _flat(batch)
        if self.count and x.shape[1:] != self.sums.shape:
            self.varying = True
        if self.varying:
            return
        self.sums = self.sums + x.sum(axis=0) if self.count else x.sum(axis=0)
        self.total += float(np.sum(x * x))
        self.count += len(x)

    def db(self) -> float:
        """10*log10(sum x^2 / sum (x - mean)^2); inf where the output does not vary (a spread 120 dB under the total
        is taken as none: the one-pass sums leave rounding there), nan with fewer than 2 samples."""
        if self.count < 2 or self.varying:
            return math.nan
        return sqnr_from_sums(self.total, self.spread())

    def spread(self) -> float:
        """sum (x - mean)^2 over every value (0 below 1e-12 of the squared sum)."""
        spread = self.total - float(self.sums @ self.sums) / max(self.count, 1)
        return spread if spread > 1e-12 * self.total else 0.0

    def mean(self) -> float:
        """The mean of every value."""
        return float(self.sums.sum()) / max(self.count * self.sums.size, 1)


def offset_db(ref: np.ndarray) -> float:
    """How much more power an output holds than its variation over the samples (axis 0), in dB: 10*log10(sum ref^2 /
    sum (ref - mean)^2), what `sqnr_db` reads above `centered_sqnr_db` for any error; inf where it never varies."""
    return OffsetSums.of(ref).db()


def rank_correlation(pred: np.ndarray, ref: np.ndarray) -> float:
    """Spearman's rank correlation with `ref` over the samples, per output value, averaged over the values the
    reference varies in (ties share their mean rank; a value `pred` holds constant where `ref` varies counts 0):
    whether the variant orders the samples as FP32 does. NaN with fewer than 3 samples or no varying value."""
    import pandas as pd

    p, r = _flat(pred), _flat(ref)
    varies = np.ptp(r, axis=0) > 0
    if len(r) < 3 or not varies.any():
        return math.nan
    rp = pd.DataFrame(p[:, varies]).rank().to_numpy()
    rr = pd.DataFrame(r[:, varies]).rank().to_numpy()
    rp, rr = rp - rp.mean(axis=0), rr - rr.mean(axis=0)
    norm = np.sqrt(np.sum(rp * rp, axis=0) * np.sum(rr * rr, axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where(norm > 0, np.sum(rp * rr, axis=0) / np.where(norm > 0, norm, 1.0), 0.0)
    return float(np.mean(rho))
