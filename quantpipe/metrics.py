"""Accuracy and agreement metrics on plain numpy arrays (no model, no backend).

Shared by evaluate (variants vs the FP32 reference) and the sensitivity / fallback analysis.
Every function takes arrays of shape [N, ...] and returns a Python float.
"""

from __future__ import annotations

import numpy as np

__all__ = ["topk_accuracy", "top1_agreement", "mean_cosine", "sqnr_db", "max_abs_error"]


def _flat(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(x.shape[0], -1) if x.ndim > 1 else x.reshape(-1, 1)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """Fraction of samples whose label is among the k largest logits (ties broken by index)."""
    logits = np.asarray(logits)
    labels = np.asarray(labels).reshape(-1)
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"{logits.shape[0]} predictions but {labels.shape[0]} labels")
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
    """Mean over samples of the cosine similarity of the flattened outputs (1.0 when both are zero)."""
    p, r = _flat(pred), _flat(ref)
    num = np.sum(p * r, axis=1)
    den = np.linalg.norm(p, axis=1) * np.linalg.norm(r, axis=1)
    cos = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(np.all(p == r, axis=1), 1.0, 0.0))
    return float(np.mean(cos))


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


def max_abs_error(pred: np.ndarray, ref: np.ndarray) -> float:
    """Largest absolute elementwise difference."""
    return float(np.max(np.abs(_flat(pred) - _flat(ref)))) if np.size(ref) else 0.0
