"""Calibration and evaluation data: a stacked .npz, or a folder of per-sample .npz files.

A stacked .npz holds one array per model input, named as the input, samples stacked on the input's
batch axis (axis 0 unless `model.batch_axis` / `model.inputs.<name>.batch_axis` say otherwise, e.g. an
RNN state [layers, N, hidden]), plus, for evaluation, a labels array. A folder holds one .npz per sample
(arrays with or without the batch axis of 1); their shapes may differ along the model's dynamic axes,
and samples whose shapes differ are batched apart (consecutive samples of one shape are stacked up to
the batch size, so order is kept). Everything is validated against the model's inputs once, when opened.
Inside, every input is held with its samples on axis 0; a batch is handed out in the model's layout
(`Feeds`, which knows each input's batch axis).

A large array stored uncompressed in a stacked .npz (`numpy.savez`) is not loaded whole: its rows are
read from the file batch by batch, so memory holds one batch, not the data set (a compressed member,
`numpy.savez_compressed`, is loaded whole). The files themselves are read and their arrays checked in
`quantpipe.datafiles`; this module holds the data set, its labels and its batching.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from quantpipe.artifacts import TensorInfo
from quantpipe.datafiles import (
    NpyMember,
    batch_first,
    check_array,
    check_batch_axis,
    check_layout,
    is_npy,
    lazy_members,
    load_npz,
    missing_msg,
    read_sample,
    samples_first,
)
from quantpipe.errors import DataError
from quantpipe.fsutil import sha256_file
from quantpipe.labels import checked_labels, label_column, label_message, one_label, value_labels, value_rows

__all__ = ["Batch", "Dataset", "Feeds", "open_dataset", "varying_output", "check_disjoint", "sample_count", "sample_rows"]

log = logging.getLogger(__name__)


class Feeds(dict[str, np.ndarray]):
    """A batch's model inputs by name, each in the model's layout; `axes` holds the batch axis of the inputs
    batched on another axis than 0."""

    def __init__(self, arrays: Mapping[str, np.ndarray] | None = None, axes: Mapping[str, int] | None = None) -> None:
        super().__init__(arrays or {})
        self.axes = {k: a for k, a in (axes or {}).items() if a}

    @property
    def size(self) -> int:
        """The samples it holds."""
        name, arr = next(iter(self.items()))
        return int(arr.shape[self.axes.get(name, 0)])

    def rows(self, start: int, stop: int) -> Feeds:
        """Samples [start, stop) (clipped to the batch), each input sliced on its batch axis."""
        out = {}
        for k, v in self.items():
            a = self.axes.get(k, 0)
            out[k] = np.ascontiguousarray(v[(slice(None),) * a + (slice(start, stop),)]) if a else v[start:stop]
        return Feeds(out, self.axes)


def sample_count(feeds: Mapping[str, np.ndarray]) -> int:
    """The samples a batch of model inputs holds (`Feeds.size`; a plain mapping: its first input's axis 0)."""
    return feeds.size if isinstance(feeds, Feeds) else int(next(iter(feeds.values())).shape[0])


def sample_rows(feeds: Mapping[str, np.ndarray], start: int, stop: int) -> Mapping[str, np.ndarray]:
    """Samples [start, stop) of a batch of model inputs (`Feeds.rows`; a plain mapping: on axis 0)."""
    return feeds.rows(start, stop) if isinstance(feeds, Feeds) else {k: v[start:stop] for k, v in feeds.items()}


@dataclasses.dataclass(frozen=True)
class Batch:
    """One batch ready to feed: inputs by name (in the model's layout), labels if any, and the sample indices it
    holds."""

    feeds: Feeds
    labels: np.ndarray | None
    start: int

    @property
    def size(self) -> int:
        return self.feeds.size


@dataclasses.dataclass(frozen=True)
class _Sample:
    """A per-sample file: its path and its arrays' shapes (arrays are read when batched)."""

    path: Path
    shapes: tuple[tuple[int, ...], ...]


class Dataset:
    """Samples validated against a model's inputs; iterate with `batches(batch_size)`."""

    def __init__(
        self,
        path: Path,
        inputs: Sequence[TensorInfo],
        *,
        labels_key: str | None,
        max_samples: int | None,
        role: str,
        arrays: dict[str, np.ndarray] | None,
        samples: list[_Sample] | None,
        labels: np.ndarray | None,
        fingerprint: str,
        batch_axes: Mapping[str, int] | None = None,
    ) -> None:
        self.path = path
        self.inputs = tuple(inputs)
        self.batch_axes = {k: a for k, a in (batch_axes or {}).items() if a}
        """Inputs batched on another axis than 0, and that axis."""
        self._batch_first = tuple(batch_first(t, self.batch_axes.get(t.name, 0)) for t in self.inputs)
        self.labels_key = labels_key
        self.max_samples = max_samples
        self.role = role
        self._arrays = arrays
        self._samples = samples
        self._labels = labels
        self.fingerprint = fingerprint
        self._told_cap = False

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def _fixed(self) -> tuple[int, TensorInfo] | None:
        """The smallest fixed batch dimension of the inputs and its input (a model exported with batch 1; an RNN
        state [1, 1, H]), None when every input's batch dimension is dynamic."""
        fixed = [(d, t) for t, b in zip(self.inputs, self._batch_first, strict=True)
                 if b.shape and isinstance(d := b.shape[0], int) and d > 0]
        return min(fixed, key=lambda f: f[0]) if fixed else None

    @property
    def max_batch(self) -> int | None:
        """The most samples one run of the model takes (None: any number)."""
        fixed = self._fixed()
        return None if fixed is None else fixed[0]

    def per_run(self, batch_size: int) -> int:
        """The samples per run for a requested `batch_size`: never more than the model takes (`max_batch`)."""
        if batch_size < 1:
            raise DataError(f"batch size must be at least 1, got {batch_size}")
        fixed = self._fixed()
        if fixed is None or batch_size <= fixed[0]:
            return batch_size
        cap, info = fixed
        if not self._told_cap:
            self._told_cap = True
            # Said once, by whichever step asks first: not with that step's batch size, which need not be the
            # configured one (a check at load asked for 8 where data.batch_size was 32: found probing).
            log.info("model input '%s' has a fixed batch dimension (%s): %s data runs %d sample(s) at a time, "
                     "whatever the batch size asked", info.name, list(info.shape), self.role, cap)
        return cap

    @property
    def num_samples(self) -> int:
        if self._arrays is not None:
            return int(next(iter(self._arrays.values())).shape[0])
        assert self._samples is not None
        return len(self._samples)

    @property
    def labels(self) -> np.ndarray | None:
        """Labels for every sample (None when the data carries none)."""
        return self._labels

    def check_label_range(self, classes: int, output: str) -> None:
        """Refuse labels outside [0, classes) of the model output they are scored against (DataError, exit 2)."""
        if self._labels is None or classes < 1:
            return
        bad = self._labels >= classes
        if np.any(bad):
            raise DataError(label_message(
                f"{self.role} data {self.path}", self.labels_key or "labels", self._labels[bad],
                f"class indices must be in [0, {classes}): output '{output}' has {classes} classes",
                f"Store each sample's class index in 0..{classes - 1}, or set model.output to the output these "
                f"labels index",
            ))

    @property
    def is_folder(self) -> bool:
        return self._samples is not None

    @property
    def streamed_inputs(self) -> tuple[str, ...]:
        """Inputs of a stacked .npz read from the file batch by batch instead of held in memory.

        Large arrays stored uncompressed are streamed; compressed ones are loaded whole. Empty for a folder,
        whose samples are read per batch anyway.
        """
        if self._arrays is None:
            return ()
        return tuple(name for name, arr in self._arrays.items() if isinstance(arr, NpyMember))

    def head_feeds(self, batch_size: int, max_samples: int | None) -> Iterator[Mapping[str, np.ndarray]]:
        """The inputs of the first `max_samples` samples (all of them when None), batch by batch (`batches`): what
        the searches and the measurements on "the first N calibration samples" run on."""
        seen = 0
        for batch in self.batches(batch_size):
            feeds = batch.feeds if max_samples is None else sample_rows(batch.feeds, 0, max_samples - seen)
            yield feeds
            seen += sample_count(feeds)
            if max_samples is not None and seen >= max_samples:
                return

    def batches(self, batch_size: int) -> Iterator[Batch]:
        """Yield batches in sample order; never more than `batch_size` samples (nor than the model takes:
        `per_run`), never mixed shapes."""
        batch_size = self.per_run(batch_size)
        n = self.num_samples
        if self._arrays is not None:
            for start in range(0, n, batch_size):
                stop = min(start + batch_size, n)
                yield Batch(
                    feeds=self._feeds({k: v[start:stop] for k, v in self._arrays.items()}),
                    labels=None if self._labels is None else self._labels[start:stop],
                    start=start,
                )
            return
        assert self._samples is not None
        for start, stop in self.batch_bounds(batch_size):
            feeds = {name: [] for name in self.input_names}  # type: dict[str, list[np.ndarray]]
            for sample in self._samples[start:stop]:
                arrays = read_sample(sample.path, self._batch_first, self.batch_axes)
                for name in self.input_names:
                    feeds[name].append(arrays[name])
            yield Batch(
                feeds=self._feeds({k: np.concatenate(v, axis=0) for k, v in feeds.items()}),
                labels=None if self._labels is None else self._labels[start:stop],
                start=start,
            )

    def _feeds(self, rows: Mapping[str, np.ndarray]) -> Feeds:
        """Inputs held samples-first, in the model's layout."""
        return Feeds({k: np.ascontiguousarray(np.moveaxis(v, 0, a)) if (a := self.batch_axes.get(k, 0)) else v
                      for k, v in rows.items()}, self.batch_axes)

    def batch_bounds(self, batch_size: int) -> list[tuple[int, int]]:
        """(start, stop) of every batch `batches(batch_size)` yields, in order, without reading any data.

        A shard that starts at one of these starts and ends at one of these stops (`subset`) is batched
        exactly as the whole data set is there: what lets parallel evaluation reproduce one process bit for bit.
        """
        batch_size = self.per_run(batch_size)
        n = self.num_samples
        if self._samples is None:
            return [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
        bounds, start = [], 0
        while start < n:
            shapes = self._samples[start].shapes
            stop = start + 1
            while stop < n and stop - start < batch_size and self._samples[stop].shapes == shapes:
                stop += 1
            bounds.append((start, stop))
            start = stop
        return bounds

    def subset(self, start: int, stop: int) -> Dataset:
        """Samples [start, stop) as a Dataset of their own (labels included; nothing is read).

        Used to shard work across processes: it pickles small (lazily read arrays and folder samples travel as
        file references, in-memory arrays as their rows only).
        """
        n = self.num_samples
        if not 0 <= start < stop <= n:
            raise DataError(f"cannot take samples [{start}, {stop}) of {self.role} data {self.path} ({n} samples).")
        arrays = None
        if self._arrays is not None:
            arrays = {k: v.rows_slice(start, stop) if isinstance(v, NpyMember) else v[start:stop]
                      for k, v in self._arrays.items()}
        return Dataset(
            self.path, self.inputs, labels_key=self.labels_key, max_samples=self.max_samples, role=self.role,
            arrays=arrays, samples=None if self._samples is None else self._samples[start:stop],
            labels=None if self._labels is None else self._labels[start:stop],
            fingerprint=f"{self.fingerprint}|samples={start}:{stop}", batch_axes=self.batch_axes,
        )

    def first_batch(self, batch_size: int) -> Batch:
        """The first batch (for latency measurement and shape checks)."""
        return next(self.batches(batch_size))

    def extreme_shapes(self) -> tuple[int, int] | None:
        """The indices of a smallest and a largest sample by element count, when a folder's samples come in more
        than one shape (None otherwise): what a check that the outputs keep one shape runs."""
        if self._samples is None or len({s.shapes for s in self._samples}) < 2:
            return None
        sizes = [sum(int(np.prod(shape)) for shape in s.shapes) for s in self._samples]
        return int(np.argmin(sizes)), int(np.argmax(sizes))


def varying_output(output: str, shapes: Sequence[tuple[int, ...]], who: str, role: str = "evaluation") -> DataError:
    """The error for an output whose shape follows its input's, which quantpipe cannot compare as one array."""
    return DataError(
        f"output '{output}' of {who} changes shape with the input ({sorted(set(shapes))}): the {role} "
        f"samples differ in shape, and quantpipe compares a variant's outputs with FP32's as one array. Give "
        f"data.{role} samples of one shape (resize or pad them, as a detector's serving code does; a per-token "
        f"output of padded sequences: also set evaluate.valid_mask to the attention mask, so padding is not "
        f"scored), or set model.output in pipeline.yaml to an output of fixed size (e.g. a pooled embedding or the "
        f"logits).")


def open_dataset(
    path: str | Path,
    inputs: Sequence[TensorInfo],
    *,
    labels_key: str | None = None,
    max_samples: int | None = None,
    role: str = "calibration",
    sequence_labels: bool = False,
    batch_axes: Mapping[str, int] | None = None,
    position_labels: bool = False,
    target_labels: bool = False,
) -> Dataset:
    """Open and validate a data source for a model with the given inputs.

    `sequence_labels`: the labels are rows [N, L] of class indices padded with -1 (CTC models; .npz files only).
    `position_labels`: the labels may be rows [N, T], a class per position of a per-token output (evaluate.valid_mask),
    negative where a position is not scored (-100, as Hugging Face writes them; .npz files only).
    `target_labels`: the labels are each sample's target values (evaluate.task regression; `labels.value_labels`).
    `batch_axes`: the batch axis of each input whose samples are not stacked on axis 0 (ConfigError when the input
    has no such axis).

    Raises DataError (exit 2) on a missing path, unreadable files, names/shapes/dtypes that do not
    fit the model, NaN/Inf values, mismatched sample counts, missing labels, or no samples at all.
    """
    path = Path(path)
    where = f"{role} data {path}"
    axes = {t.name: a for t in inputs if (a := (batch_axes or {}).get(t.name, 0))}
    for t in inputs:
        check_batch_axis(t.name, t, axes.get(t.name, 0))
    if not path.exists():
        raise DataError(f"{where} does not exist. Check the path (relative paths resolve from pipeline.yaml's folder).")
    if path.is_dir():
        if sequence_labels and labels_key is not None:
            raise DataError(f"{where} is a folder of per-sample files, but label sequences (evaluate.task ctc) are "
                            f"read from one .npz: store the inputs and a labels array [N, L] padded with -1 there.")
        return _open_folder(path, inputs, labels_key=labels_key, max_samples=max_samples, role=role, axes=axes,
                            targets=target_labels)
    raw = _read_stacked(path, where, inputs)
    arrays: dict[str, np.ndarray] = {}
    for info in inputs:
        if info.name not in raw:
            raise DataError(missing_msg(where, info.name, raw.keys()))
        check_layout(where, info.name, tuple(getattr(raw[info.name], "shape", ())), info, axes.get(info.name, 0))
        arr = samples_first(raw[info.name], axes.get(info.name, 0), len(info.shape))
        if max_samples is not None and arr.ndim > 0:  # a 0-d array is refused by check_array, by its rank
            arr = arr.head(max_samples) if isinstance(arr, NpyMember) else arr[:max_samples]
        arrays[info.name] = check_array(where, info.name, arr, batch_first(info, axes.get(info.name, 0)),
                                        per_sample=False, check_finite=True)
    counts = {k: v.shape[0] for k, v in arrays.items()}
    if len(set(counts.values())) > 1:
        raise DataError(f"{where}: inputs hold different numbers of samples {counts}. Every input array needs one row per "
                        f"sample; an input whose samples are stacked on another axis (an RNN state [layers, N, hidden]) "
                        f"needs that axis in pipeline.yaml: model.inputs.<name>.batch_axis (`quantpipe quantize` / `calibrate` "
                        f"without one: --batch-axis NAME=AXIS).")
    n = next(iter(counts.values())) if counts else 0
    if n == 0:
        raise DataError(f"{where} holds no samples. Calibration and evaluation need at least one.")
    labels = None
    if labels_key is not None:
        if labels_key not in raw:
            raise DataError(
                f"{where}: no labels array '{labels_key}' (arrays present: {sorted(raw)}). Set data.evaluation.labels "
                f"to the name of the labels array, or remove it to evaluate without labels."
            )
        if target_labels:
            labels = value_labels(where, labels_key, raw[labels_key], n, max_samples)
        else:
            column = label_column(where, labels_key, raw[labels_key], sequence_labels, position_labels)
            labels = checked_labels(where, labels_key, column, n, max_samples, sequence_labels,
                                    positions=column.ndim == 2 and not sequence_labels)
    digest = hashlib.sha256()
    digest.update(sha256_file(path).encode())
    digest.update(f"|max={max_samples}|labels={labels_key}{_axes_tag(axes)}".encode())
    return _fits_fixed_batch(where, Dataset(path, inputs, labels_key=labels_key, max_samples=max_samples, role=role,
                                            arrays=arrays, samples=None, labels=labels,
                                            fingerprint=digest.hexdigest(), batch_axes=axes))


def _read_stacked(path: Path, where: str, inputs: Sequence[TensorInfo]) -> dict[str, Any]:
    """A stacked data file's arrays by name: an .npz's (large uncompressed members read by rows), or a .npy's one
    array, which feeds a model of one input (memory-mapped, read batch by batch)."""
    if not is_npy(path):
        lazy = lazy_members(path)
        raw: dict[str, Any] = dict(load_npz(path, skip=set(lazy)))
        raw.update(lazy)
        return raw
    if len(inputs) != 1:
        raise DataError(f"{where} is a .npy file, which holds one unnamed array, but the model has {len(inputs)} "
                        f"inputs ({[t.name for t in inputs]}). Store them in one .npz, one array per input named as "
                        f"the input: numpy.savez(path, {', '.join(f'{t.name}=...' for t in inputs)}).")
    try:
        return {inputs[0].name: np.load(path, mmap_mode="r", allow_pickle=False)}
    except (ValueError, OSError) as err:
        raise DataError(f"{where} is not a readable .npy file ({err}). Write it with numpy.save.") from err


def _axes_tag(axes: Mapping[str, int]) -> str:
    """The batch axes in a data set's fingerprint (nothing when every input is batched on axis 0, as before)."""
    return "".join(f"|axis:{k}={a}" for k, a in sorted(axes.items()))


def _fits_fixed_batch(where: str, ds: Dataset) -> Dataset:
    """Refuse a sample count a model with a fixed batch of k > 1 cannot be run on (its last run would be short)."""
    fixed = ds._fixed()
    if fixed is not None and fixed[0] > 1 and ds.num_samples % fixed[0]:
        k, info = fixed
        raise DataError(
            f"{where} holds {ds.num_samples} samples, but model input '{info.name}' takes exactly {k} per run "
            f"(shape {list(info.shape)}), so the last run would hold {ds.num_samples % k}. Give a multiple of {k} "
            f"samples (max_samples: {ds.num_samples - ds.num_samples % k}), or export the model with a dynamic "
            f"batch axis.")
    return ds


def _open_folder(
    path: Path, inputs: Sequence[TensorInfo], *, labels_key: str | None, max_samples: int | None, role: str,
    axes: Mapping[str, int], targets: bool = False,
) -> Dataset:
    where = f"{role} data folder {path}"
    files = sorted(p for p in path.iterdir() if p.suffix == ".npz" and p.is_file())
    if max_samples is not None:
        files = files[:max_samples]
    if not files:
        raise DataError(f"{where} holds no .npz files. Put one sample per .npz file in it (arrays named as the model inputs).")
    samples: list[_Sample] = []
    labels: list[np.ndarray] = []
    digest = hashlib.sha256()
    for f in files:
        arrays = read_sample(f, [batch_first(t, axes.get(t.name, 0)) for t in inputs], axes)
        samples.append(_Sample(f, tuple(arrays[i.name].shape for i in inputs)))
        digest.update(f"{f.name}:{sha256_file(f)}\n".encode())
        if labels_key is not None:
            raw = load_npz(f)
            if labels_key not in raw:
                raise DataError(f"{f}: no labels array '{labels_key}' (arrays present: {sorted(raw)}). Every sample file needs its label.")
            labels.append(np.asarray(raw[labels_key]) if targets else one_label(f, labels_key, raw[labels_key]))
    digest.update(f"|max={max_samples}|labels={labels_key}{_axes_tag(axes)}".encode())
    checked = None  # labels are read only with a key
    if labels_key is not None and labels:
        checked = (value_rows(where, labels_key, labels, len(samples)) if targets else
                   checked_labels(where, labels_key, np.concatenate(labels), len(samples), None))
    return _fits_fixed_batch(where, Dataset(path, inputs, labels_key=labels_key, max_samples=max_samples, role=role,
                                            arrays=None, samples=samples, labels=checked,
                                            fingerprint=digest.hexdigest(), batch_axes=axes))


def check_disjoint(a: Dataset, b: Dataset, limit: int = 4096) -> int:
    """Count samples of `b` that also appear in `a` (exact byte match of all inputs; first `limit` of each).

    Overlapping calibration and evaluation splits inflate accuracy; the pipeline warns when this is > 0.
    """
    def keys(ds: Dataset) -> set[bytes]:
        out: set[bytes] = set()
        for batch in ds.batches(min(64, ds.max_batch or 64)):  # (a fixed batch: its size, said nothing about)
            for i in range(batch.size):
                h = hashlib.sha1()
                row = batch.feeds.rows(i, i + 1)
                for name in ds.input_names:
                    h.update(np.ascontiguousarray(row[name]).tobytes())
                out.add(h.digest())
            if len(out) >= limit:
                break
        return out

    return len(keys(a) & keys(b))


def feeds_signature(feeds: Mapping[str, np.ndarray]) -> str:
    """Short human description of a batch: name[shape] dtype."""
    return ", ".join(f"{k}{list(v.shape)} {v.dtype}" for k, v in feeds.items())
