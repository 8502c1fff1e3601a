"""The model's outputs besides `model.output`: collected in the same evaluation pass and compared with FP32's.

The run judges one output (accuracy, the gate, sensitivity, fallback). A model with several (a face landmarker's
presence flag beside its landmarks, a pose model's five heads, an RNN's next state) can break in one the run does not
judge: the pose model's flags flipped on 15 of 120 samples while its landmarks were the judged output (found probing).
Every other output with a batch axis is therefore kept from the evaluation pass that computes the judged one (no
second pass) and compared with the reference's: SQNR against FP32 and against FP32's variation over the samples for
numbers, the fraction of samples read identically for integers and booleans. `other_outputs_sqnr_db`, the lowest,
is a gate metric; the collapse verdict names each one below its collapse limits (`collapse`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from quantpipe.metrics import centered_sqnr_db, finite_or_none, sqnr_db

__all__ = ["MASK_INPUT", "MAX_MB", "OTHER_KEY", "OtherArrays", "OtherCollector", "all_identical", "compare_others", "output_db",
           "log_others", "positions_of", "warn_nonfinite", "worst_db"]

log = logging.getLogger(__name__)

MAX_MB = 256
"""Other outputs are kept up to this many MB over the evaluation samples (per variant); the rest are not compared."""

OTHER_KEY = "other_outputs_sqnr_db"
"""EvalResult.metrics key: the lowest SQNR (dB) of the other outputs against FP32 (`worst_db`)."""

_TOO_LARGE = f"more than {MAX_MB} MB over the evaluation samples: not compared"
_NO_BATCH = "no axis of the batch's size: not compared"
_NOT_TENSOR = "not a numeric tensor (a sequence or map): not compared"
_VARIES = "its shape differs between batches: not compared"


@dataclasses.dataclass(frozen=True)
class OtherArrays:
    """A variant's other outputs over its samples (batch axis first) and why any were left out."""

    arrays: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    skipped: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @staticmethod
    def concat(parts: Sequence[OtherArrays]) -> OtherArrays:
        """Consecutive shards' arrays joined in order: what one process collects over all of them."""
        skipped: dict[str, str] = {}
        for p in parts:
            skipped.update(p.skipped)
        chunks: dict[str, list[np.ndarray]] = {}
        for n in (parts[0].arrays if parts else {}):
            if n in skipped:
                continue
            if any(n not in p.arrays for p in parts):
                skipped[n] = _NO_BATCH
            else:
                chunks[n] = [p.arrays[n] for p in parts]
        return _joined(chunks, skipped)


def _joined(chunks: Mapping[str, Sequence[np.ndarray]], skipped: dict[str, str]) -> OtherArrays:
    """Each output's chunks joined on the samples axis (one whose shape varies goes to `skipped`), then kept in order
    while those kept stay within MAX_MB together: a function of the whole arrays alone, so one pass and joined shards
    leave out the same outputs."""
    kept: dict[str, np.ndarray] = {}
    total = 0
    for name, parts in chunks.items():
        if name in skipped:
            continue
        try:
            a = np.concatenate(parts, axis=0)
        except ValueError:
            skipped[name] = _VARIES
            continue
        if total + a.nbytes > MAX_MB * 2**20:
            skipped[name] = _TOO_LARGE
        else:
            kept[name] = a
            total += a.nbytes
    return OtherArrays(kept, dict(sorted(skipped.items())))


def _batch_axis(shape: tuple[int, ...], size: int, preferred: int) -> int | None:
    """The axis that holds the batch's samples: `preferred` (model.output_batch_axis) where it has the batch's size,
    else the first axis that has it (an LSTM's state [layers, N, hidden]); None where none has."""
    if len(shape) > preferred and shape[preferred] == size:
        return preferred
    return next((i for i, s in enumerate(shape) if s == size), None)


class OtherCollector:
    """Collects, batch by batch, every output but `judged` (run_outputs' `others`). `axes`: outputs whose batch axis
    is known (a state output's, from the input it pairs with: `inputs.state_pairs`); the others' is guessed
    (`_batch_axis`: with a batch of 2, a state [2, N, 128] would be cut on its layer axis)."""

    def __init__(self, judged: str, preferred_axis: int = 0, axes: Mapping[str, int] | None = None) -> None:
        self.judged, self.axis, self.axes = judged, preferred_axis, dict(axes or {})
        self.chunks: dict[str, list[np.ndarray]] = {}
        self.skipped: dict[str, str] = {}
        self.bytes: dict[str, int] = {}

    def add(self, outs: Mapping[str, Any], batch_size: int) -> None:
        for name, value in outs.items():
            if name == self.judged or name in self.skipped:
                continue
            arr = np.asarray(value) if not isinstance(value, list | dict) else None
            if arr is None or arr.dtype.kind not in "fiub":
                self.skipped[name] = _NOT_TENSOR
                continue
            known = self.axes.get(name)
            ax = known if known is not None and arr.ndim > known and arr.shape[known] == batch_size else \
                _batch_axis(arr.shape, batch_size, self.axis)
            if ax is None:
                self.skipped[name] = _NO_BATCH
                continue
            self.bytes[name] = self.bytes.get(name, 0) + arr.nbytes
            if self.bytes[name] > MAX_MB * 2**20:  # over the limit alone: `_joined` would leave it out anyway
                self.skipped[name] = _TOO_LARGE
                self.chunks.pop(name, None)
                continue
            self.chunks.setdefault(name, []).append(np.ascontiguousarray(np.moveaxis(arr, ax, 0)) if ax else arr)

    def result(self) -> OtherArrays:
        return _joined(self.chunks, dict(self.skipped))


MASK_INPUT = "attention_mask"
"""The input whose nonzero positions [N, T] mark the positions of other outputs [N, T, ...] that count, where
evaluate.valid_mask is not set (a transformer export's padding)."""


def positions_of(dataset: Any, batch_size: int) -> np.ndarray | None:
    """The evaluation data's MASK_INPUT as bool [N, T], batches joined; None where it has none (`compare_others`)."""
    if not any(t.name == MASK_INPUT for t in dataset.inputs):
        return None
    masks = [np.asarray(b.feeds[MASK_INPUT]) != 0 for b in dataset.batches(batch_size)]
    return np.concatenate(masks) if masks and all(m.ndim == 2 for m in masks) else None


def compare_others(out: OtherArrays, ref: OtherArrays, positions: np.ndarray | None = None,
                   ) -> dict[str, dict[str, float | None]]:
    """Each output both sides hold, against the reference's: `sqnr_db` and `centered_sqnr_db` for numbers (None
    where identical or where the reference does not vary; `nonfinite`, the count, where the output holds NaN or Inf),
    `identical` (fraction of samples read the same) for integers and booleans. An output [N, T, ...] is read at the `positions` [N, T] that count alone (a sentence
    encoder's token output read 11.8 dB over its padding and 19.9 dB over its real tokens; found probing)."""
    found: dict[str, dict[str, float | None]] = {}
    for name, r in ref.arrays.items():
        o = out.arrays.get(name)
        if o is None or o.shape != r.shape:
            continue
        if positions is not None and r.shape[:2] == positions.shape and r.dtype.kind == "f":
            o, r = o[positions], r[positions]
        if r.dtype.kind == "f":
            o32, r32 = o.astype(np.float32), r.astype(np.float32)
            bad = int(o32.size - np.count_nonzero(np.isfinite(o32)))
            if bad:  # an FP16 overflow: no SQNR to read, and the verdict reads it as none
                found[name] = {"sqnr_db": None, "centered_sqnr_db": None, "max_abs_error": None, "nonfinite": bad}
                continue
            found[name] = {"sqnr_db": finite_or_none(sqnr_db(o32, r32)),
                           "centered_sqnr_db": finite_or_none(centered_sqnr_db(o32, r32)),
                           "max_abs_error": finite_or_none(float(np.max(np.abs(o32 - r32))) if r.size else 0.0)}
        else:
            same = np.all((o == r).reshape(len(r), -1), axis=1) if len(r) else np.ones(0, bool)
            found[name] = {"identical": float(same.mean()) if len(same) else 1.0}
    return found


def output_db(m: Mapping[str, float | None]) -> tuple[float, str] | None:
    """One numeric other output's SQNR as the gate and the verdict read it, and what it is against: FP32's variation
    over the samples where the reference varies (a flag's logit around an offset), else FP32; -inf where either side
    holds NaN or Inf, or where the reference is all zeros and the output is not. None where it equals FP32's, or for
    an integer output."""
    if m.get("nonfinite"):
        return -math.inf, "FP32"  # NaN or Inf where FP32 has numbers: nothing below it
    if "max_abs_error" not in m:
        return None
    err = m["max_abs_error"]
    if err is None:
        return -math.inf, "FP32"  # no finite error: FP32's own output holds NaN or Inf
    if err == 0.0:
        return None
    v = m.get("centered_sqnr_db")
    if v is not None:
        return float(v), "FP32's variation over the samples"
    v = m.get("sqnr_db")
    return (-math.inf if v is None else float(v)), "FP32"


def worst_db(found: Mapping[str, Mapping[str, float | None]]) -> tuple[str, float] | None:
    """The numeric other output with the lowest SQNR (`output_db`) and that SQNR; None where there is no numeric one
    or every one equals FP32's."""
    read = [(name, db[0]) for name, m in found.items() if (db := output_db(m)) is not None]
    return min(read, key=lambda t: t[1]) if read else None


def all_identical(found: Mapping[str, Mapping[str, float | None]]) -> bool:
    """Whether every numeric other output equals FP32's (its SQNR is +inf, recorded as null)."""
    errs = [m["max_abs_error"] for m in found.values() if "max_abs_error" in m]
    return bool(errs) and all(e == 0.0 for e in errs)


def warn_nonfinite(variant: str, found: Mapping[str, Mapping[str, float | None]]) -> None:
    """Warn of other outputs that hold NaN or Inf where FP32's hold numbers (`compare_others`' `nonfinite`)."""
    for name, m in found.items():
        if m.get("nonfinite"):
            log.warning("%s: output '%s' (besides model.output) holds %d NaN or Inf value(s) where FP32's holds numbers "
                        "(an FP16 model: a value beyond 65504 overflows; the build's warnings name those it found).",
                        variant, name, int(m["nonfinite"] or 0))


def log_others(ref: OtherArrays, judged: str) -> None:
    """Say which of the reference's other outputs every variant is compared on, and which not and why."""
    if ref.arrays:
        log.info("outputs besides model.output '%s' compared with FP32's (other_outputs_sqnr_db, the collapse verdict): "
                 "%s", judged, ", ".join(ref.arrays))
    for name, why in ref.skipped.items():
        log.info("output '%s' (besides model.output '%s'): %s", name, judged, why)
