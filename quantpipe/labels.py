"""Labels validated as data: one integer class index per sample, a class per position of a per-token output
(evaluate.valid_mask), a CTC label sequence per sample, or, for evaluate.task regression, the target values
themselves. `quantpipe.data` reads them from the files; here they are checked."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from quantpipe.errors import DataError

__all__ = ["EXACT_FLOAT_INT", "label_message", "label_column", "one_label", "checked_labels", "value_labels",
           "value_rows"]

log = logging.getLogger(__name__)

EXACT_FLOAT_INT = 2.0**53
"""Floats are exact integers only up to 2**53; larger "class indices" cannot be told apart."""


def label_message(where: str, key: str, bad: np.ndarray, what: str, fix: str) -> str:
    shown = ", ".join(repr(v.item()) for v in np.unique(bad.reshape(-1))[:5])
    return (f"{where}: labels array '{key}' holds {bad.size} invalid label(s) (e.g. {shown}); {what}. {fix}. "
            f"Labels are integer class indices: one per sample, or one per position with evaluate.valid_mask.")


def label_column(where: str, key: str, raw: Any, sequence: bool = False, positions: bool = False) -> np.ndarray:
    """The labels as one value per sample: shape [N] or [N, 1]; anything else (a scalar, one-hot rows) is refused.
    With `sequence` (CTC models): rows [N, L] of class indices padded with -1; with `positions`: rows [N, T] are
    per-position labels too."""
    arr = np.asarray(raw)
    if sequence:
        if arr.ndim == 2:
            return arr
        raise DataError(f"{where}: labels array '{key}' has shape {list(arr.shape)}, but evaluate.task ctc reads "
                        f"label sequences: shape [N, L], class indices padded with -1 (e.g. [[3, 1, 4, -1], ...]).")
    if arr.ndim == 1 or (arr.ndim == 2 and arr.shape[1] == 1):
        return arr.reshape(-1)
    if positions and arr.ndim == 2:
        return arr
    hint = (" One-hot or score rows: store labels.argmax(axis=1); a label per token of a per-token output: set "
            "evaluate.valid_mask (its positions are scored)." if arr.ndim == 2 else "")
    raise DataError(
        f"{where}: labels array '{key}' has shape {list(arr.shape)}, but labels need one value per sample, shape [N] "
        f"or [N, 1].{hint} Store one integer class index per sample."
    )


def one_label(path: Path, key: str, raw: Any) -> np.ndarray:
    """The label of one per-sample file: exactly one value."""
    arr = np.asarray(raw).reshape(-1)
    if arr.size != 1:
        raise DataError(
            f"{path}: labels array '{key}' holds {arr.size} values, but a per-sample file needs exactly one label "
            f"(its integer class index); labels per position (evaluate.valid_mask) are read from one .npz of padded "
            f"samples, as rows [N, T]."
        )
    return arr


def checked_labels(where: str, key: str, labels: np.ndarray, n: int, max_samples: int | None,
                   sequence: bool = False, *, positions: bool = False) -> np.ndarray:
    """Labels validated as data: one per sample, integer class indices (exactly integral floats converted), >= 0;
    `positions` (rows [N, T], a label per position): negative where a position is not scored.

    The upper bound needs the model output's class count: `Dataset.check_label_range`.
    """
    if max_samples is not None:
        labels = labels[:max_samples]
    if labels.shape[0] != n:
        raise DataError(f"{where}: labels array '{key}' holds {labels.shape[0]} labels for {n} samples. "
                        f"Give one label per sample, in the order of the samples.")
    kind = labels.dtype.kind
    if kind == "f":
        wide = labels.astype(np.float64)  # float16 cannot even hold the 2**53 bound
        integral = np.isfinite(wide) & (np.abs(wide) <= EXACT_FLOAT_INT)
        integral &= np.where(integral, wide, 0.0) == np.round(np.where(integral, wide, 0.0))
        if not np.all(integral):
            raise DataError(label_message(where, key, labels[~integral], f"labels are {labels.dtype} and these are "
                                          f"not whole numbers", f"Store the class index per sample as integers, e.g. "
                                          f"np.savez(..., {key}=labels.astype(np.int64))"))
        log.info("%s: labels array '%s' is %s holding whole numbers; converted to int64 class indices.",
                 where, key, labels.dtype)
        labels = labels.astype(np.int64)
    elif kind == "b":
        log.info("%s: labels array '%s' is boolean; read as class indices 0 and 1.", where, key)
        labels = labels.astype(np.int64)
    elif kind not in "iu":
        raise DataError(
            f"{where}: labels array '{key}' has dtype {labels.dtype}, but labels are integer class indices. "
            f"Store them as integers, e.g. np.savez(..., {key}=labels.astype(np.int64))."
        )
    negative = labels < (-1 if sequence else 0)  # -1 pads a label sequence
    if np.any(negative) and not positions:  # per-position labels: negative where a position is not scored
        raise DataError(label_message(where, key, labels[negative], "class indices cannot be negative",
                                      "Drop unlabelled samples (e.g. -1 for 'unknown') or map them to a class"))
    return labels


def value_labels(where: str, key: str, raw: Any, n: int, max_samples: int | None) -> np.ndarray:
    """evaluate.task regression's labels: each sample's target values ([N] or [N, ...]) as float64 rows [N, K], read
    in order against model.output's K values per sample; DataError where they are not numbers, not finite, or not
    one row per sample."""
    arr = np.asarray(raw)
    if arr.ndim == 0:
        raise DataError(f"{where}: labels array '{key}' is a single value; regression labels hold each sample's "
                        f"target values, one row per sample: shape [N] or [N, values].")
    arr = arr[:max_samples] if max_samples is not None else arr
    if arr.shape[0] != n:
        raise DataError(f"{where}: labels array '{key}' holds {arr.shape[0]} rows for {n} samples. Give each sample "
                        f"its target values, in the order of the samples.")
    if arr.dtype.kind not in "fiub":
        raise DataError(f"{where}: labels array '{key}' has dtype {arr.dtype}; regression labels are numbers (the "
                        f"target values). Store them as floats, e.g. np.savez(..., {key}=targets.astype(np.float32)).")
    values = arr.astype(np.float64).reshape(n, -1)
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        raise DataError(f"{where}: labels array '{key}' holds NaN or infinite values in {int(bad.sum())} sample(s) "
                        f"(e.g. sample {int(np.flatnonzero(bad)[0])}); regression labels are each sample's target "
                        f"values. Drop those samples, or give them their targets.")
    return values


def value_rows(where: str, key: str, rows: list[np.ndarray], n: int) -> np.ndarray:
    """`value_labels` of a folder's per-sample files: each file's labels array is that sample's target values."""
    widths = sorted({r.size for r in rows})
    if len(widths) > 1:
        raise DataError(f"{where}: the per-sample files' labels arrays '{key}' hold {widths[0]} to {widths[-1]} values; "
                        f"regression labels need the same number of target values in every sample (model.output's).")
    return value_labels(where, key, np.stack([np.asarray(r).reshape(-1) for r in rows]), n, None)
