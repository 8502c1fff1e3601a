"""Calibration and evaluation data: a stacked .npz, or a folder of per-sample .npz files.

A stacked .npz holds one array per model input, named as the input, samples stacked on axis 0
(plus, for evaluation, a labels array). A folder holds one .npz per sample (arrays with or without
the leading batch axis of 1); their shapes may differ along the model's dynamic axes, and samples
whose shapes differ are batched apart (consecutive samples of one shape are stacked up to the batch
size, so order is kept). Everything is validated against the model's inputs once, here.

A large array stored uncompressed in a stacked .npz (`numpy.savez`) is not loaded whole: its rows are
read from the file batch by batch, so memory holds one batch, not the data set (a compressed member,
`numpy.savez_compressed`, is loaded whole).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from quantpipe.artifacts import TensorInfo
from quantpipe.errors import DataError
from quantpipe.fsutil import sha256_file

__all__ = ["Batch", "Dataset", "open_dataset", "check_disjoint"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Batch:
    """One batch ready to feed: inputs by name, labels if any, and the sample indices it holds."""

    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None
    start: int

    @property
    def size(self) -> int:
        return int(next(iter(self.feeds.values())).shape[0])


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
    ) -> None:
        self.path = path
        self.inputs = tuple(inputs)
        self.labels_key = labels_key
        self.max_samples = max_samples
        self.role = role
        self._arrays = arrays
        self._samples = samples
        self._labels = labels
        self.fingerprint = fingerprint

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

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
            raise DataError(_label_msg(
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
        return tuple(name for name, arr in self._arrays.items() if isinstance(arr, _NpyMember))

    def batches(self, batch_size: int) -> Iterator[Batch]:
        """Yield batches in sample order; never more than `batch_size` samples, never mixed shapes."""
        if batch_size < 1:
            raise DataError(f"batch size must be at least 1, got {batch_size}")
        n = self.num_samples
        if self._arrays is not None:
            for start in range(0, n, batch_size):
                stop = min(start + batch_size, n)
                yield Batch(
                    feeds={k: v[start:stop] for k, v in self._arrays.items()},
                    labels=None if self._labels is None else self._labels[start:stop],
                    start=start,
                )
            return
        assert self._samples is not None
        for start, stop in self.batch_bounds(batch_size):
            feeds = {name: [] for name in self.input_names}  # type: dict[str, list[np.ndarray]]
            for sample in self._samples[start:stop]:
                arrays = _read_sample(sample.path, self.inputs)
                for name in self.input_names:
                    feeds[name].append(arrays[name])
            yield Batch(
                feeds={k: np.concatenate(v, axis=0) for k, v in feeds.items()},
                labels=None if self._labels is None else self._labels[start:stop],
                start=start,
            )

    def batch_bounds(self, batch_size: int) -> list[tuple[int, int]]:
        """(start, stop) of every batch `batches(batch_size)` yields, in order, without reading any data.

        A shard that starts at one of these starts and ends at one of these stops (`subset`) is batched
        exactly as the whole data set is there: what lets parallel evaluation reproduce one process bit for bit.
        """
        if batch_size < 1:
            raise DataError(f"batch size must be at least 1, got {batch_size}")
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
            arrays = {k: v.rows_slice(start, stop) if isinstance(v, _NpyMember) else v[start:stop]
                      for k, v in self._arrays.items()}
        return Dataset(
            self.path, self.inputs, labels_key=self.labels_key, max_samples=self.max_samples, role=self.role,
            arrays=arrays, samples=None if self._samples is None else self._samples[start:stop],
            labels=None if self._labels is None else self._labels[start:stop],
            fingerprint=f"{self.fingerprint}|samples={start}:{stop}",
        )

    def first_batch(self, batch_size: int) -> Batch:
        """The first batch (for latency measurement and shape checks)."""
        return next(self.batches(batch_size))


def _np_dtype(t: TensorInfo) -> np.dtype:
    return np.dtype(t.dtype)


_LAZY_MIN_BYTES = 1 << 20
"""Arrays at least this large, stored uncompressed, are read batch by batch instead of loaded."""


class _NpyMember:
    """A C-ordered array stored uncompressed inside a .npz, read a slice of rows at a time.

    `member[a:b]` returns a new ndarray of rows a..b (cast to `cast_to` when set); nothing else of the
    file is kept in memory.
    """

    def __init__(self, path: Path, offset: int, shape: tuple[int, ...], dtype: np.dtype, rows: int | None = None) -> None:
        self.path = path
        self.offset = offset
        self.full_shape = shape
        self.dtype = dtype
        self.rows = shape[0] if rows is None else rows
        self.cast_to: np.dtype | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.rows, *self.full_shape[1:])

    @property
    def ndim(self) -> int:
        return len(self.full_shape)

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.full_shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def head(self, n: int) -> _NpyMember:
        out = _NpyMember(self.path, self.offset, self.full_shape, self.dtype, min(self.rows, max(n, 0)))
        out.cast_to = self.cast_to
        return out

    def rows_slice(self, start: int, stop: int) -> _NpyMember:
        """Rows [start, stop) as a member of their own (nothing is read)."""
        out = _NpyMember(self.path, self.offset + start * self.row_bytes, self.full_shape, self.dtype, stop - start)
        out.cast_to = self.cast_to
        return out

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop, step = key.indices(self.rows)
        if step != 1:
            raise IndexError("only contiguous row slices are supported")
        n = max(stop - start, 0)
        arr = np.empty((n, *self.full_shape[1:]), dtype=self.dtype)
        with open(self.path, "rb") as fh:
            fh.seek(self.offset + start * self.row_bytes)
            got = fh.readinto(arr.data.cast("B"))
        if got != n * self.row_bytes:
            raise DataError(f"{self.path} ended early while reading rows {start}..{stop}; the file is truncated.")
        return arr.astype(self.cast_to) if self.cast_to is not None and self.cast_to != self.dtype else arr

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        arr = self[0: self.rows]
        return arr if dtype is None else arr.astype(dtype)

    def count_nonfinite(self, chunk_bytes: int = 1 << 24) -> int:
        """NaN/Inf values, counted in chunks (memory: one chunk)."""
        if self.dtype.kind not in "fc":
            return 0
        step = max(1, chunk_bytes // max(self.row_bytes, 1))
        bad = 0
        for start in range(0, self.rows, step):
            block = self[start: min(start + step, self.rows)]
            bad += int(block.size - np.count_nonzero(np.isfinite(block)))
        return bad


def _lazy_members(path: Path) -> dict[str, _NpyMember]:
    """Members of a .npz that are stored uncompressed, C-ordered and large, opened for reading by rows."""
    out: dict[str, _NpyMember] = {}
    try:
        with zipfile.ZipFile(path) as zf, open(path, "rb") as fh:
            for info in zf.infolist():
                if not info.filename.endswith(".npy") or info.compress_type != zipfile.ZIP_STORED:
                    continue
                if info.file_size < _LAZY_MIN_BYTES:
                    continue
                fh.seek(info.header_offset)
                local = fh.read(30)
                if len(local) != 30 or local[:4] != b"PK\x03\x04":
                    continue
                name_len = int.from_bytes(local[26:28], "little")
                extra_len = int.from_bytes(local[28:30], "little")
                fh.seek(info.header_offset + 30 + name_len + extra_len)
                version = np.lib.format.read_magic(fh)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
                else:
                    continue
                if fortran or dtype.hasobject or len(shape) == 0:
                    continue
                out[info.filename[: -len(".npy")]] = _NpyMember(path, fh.tell(), tuple(shape), dtype)
    except (OSError, ValueError, EOFError, NotImplementedError, zipfile.BadZipFile, zlib.error):
        return {}  # the eager loader reports unreadable files properly
    return out


def _load_npz(path: Path, skip: set[str] | frozenset[str] = frozenset()) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files if k not in skip}
    except FileNotFoundError as err:
        raise DataError(f"data file {path} does not exist. Check the path (relative paths resolve from pipeline.yaml's folder).") from err
    # A damaged archive raises more than BadZipFile: zlib.error (a compressed member), NotImplementedError
    # (flag or version bits zipfile does not know).
    except (zipfile.BadZipFile, zlib.error, NotImplementedError, ValueError, OSError, EOFError) as err:
        raise DataError(
            f"data file {path} is not a readable .npz archive ({err}). Write it with numpy.savez or "
            f"numpy.savez_compressed, one array per model input named as the input."
        ) from err


def _check_array(
    where: str, name: str, arr: np.ndarray, info: TensorInfo, *, per_sample: bool, check_finite: bool
) -> np.ndarray:
    """Validate one input array against the model input; return it with a batch axis."""
    if isinstance(arr, _NpyMember):
        return _check_lazy(where, name, arr, info, check_finite=check_finite)
    want = _np_dtype(info)
    rank = len(info.shape)
    if per_sample and arr.ndim == rank - 1:
        arr = arr[None]
    if arr.ndim != rank:
        raise DataError(
            f"{where}: array '{name}' has shape {list(arr.shape)} but model input '{name}' has rank {rank} "
            f"(shape {_fmt_shape(info.shape)}). Store samples stacked on axis 0"
            + (" (or one sample without the batch axis)." if per_sample else ".")
        )
    for axis, (got, dim) in enumerate(zip(arr.shape, info.shape, strict=True)):
        if axis == 0:
            continue
        if isinstance(dim, int) and dim > 0 and got != dim:
            raise DataError(
                f"{where}: array '{name}' has shape {list(arr.shape)} but model input '{name}' expects "
                f"{_fmt_shape(info.shape)} (axis {axis} must be {dim}). Resize or re-export the data to the model's input shape."
            )
    if arr.dtype != want:
        # float64 -> float32 and int32 -> int64 are harmless; int -> float usually means
        # unnormalised data (raw uint8 pixels), so it is refused rather than silently cast.
        kinds = (arr.dtype.kind, want.kind)
        same_kind = kinds[0] == kinds[1] or set(kinds) <= {"i", "u"}
        if not same_kind:
            raise DataError(
                f"{where}: array '{name}' has dtype {arr.dtype} but model input '{name}' is {want}. "
                f"Convert it, e.g. arr.astype(np.{want.name})."
            )
        arr = arr.astype(want)
    if check_finite and np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise DataError(
            f"{where}: array '{name}' contains {bad} NaN or Inf value(s). Calibration and evaluation need "
            f"finite inputs: clean or drop those samples."
        )
    return arr


def _check_lazy(where: str, name: str, arr: _NpyMember, info: TensorInfo, *, check_finite: bool) -> _NpyMember:
    """_check_array for an array read by rows: the same checks, from the header and a chunked scan."""
    probe = np.broadcast_to(np.zeros((), dtype=arr.dtype), arr.shape)  # shape and dtype checks read no data
    _check_array(where, name, probe, info, per_sample=False, check_finite=False)
    want = _np_dtype(info)
    arr.cast_to = want if arr.dtype != want else None
    if check_finite and (bad := arr.count_nonfinite()):
        raise DataError(
            f"{where}: array '{name}' contains {bad} NaN or Inf value(s). Calibration and evaluation need "
            f"finite inputs: clean or drop those samples."
        )
    return arr


def _fmt_shape(shape: Sequence[int | str | None]) -> str:
    return "[" + ", ".join("?" if d is None or (isinstance(d, int) and d < 0) else str(d) for d in shape) + "]"


def _read_sample(path: Path, inputs: Sequence[TensorInfo]) -> dict[str, np.ndarray]:
    raw = _load_npz(path)
    out = {}
    for info in inputs:
        if info.name not in raw:
            raise DataError(_missing_msg(str(path), info.name, raw.keys()))
        out[info.name] = _check_array(str(path), info.name, raw[info.name], info, per_sample=True, check_finite=True)
        if out[info.name].shape[0] != 1:
            raise DataError(f"{path}: a per-sample file must hold one sample, but '{info.name}' has {out[info.name].shape[0]}.")
    return out


def _missing_msg(where: str, name: str, present: object) -> str:
    return (
        f"{where}: no array named '{name}', which the model needs as an input (arrays present: "
        f"{sorted(present)}). Name each array after the model input it feeds (see `quantpipe inspect MODEL`)."  # type: ignore[call-overload]
    )


_EXACT_FLOAT_INT = 2.0**53
"""Floats are exact integers only up to 2**53; larger "class indices" cannot be told apart."""


def _label_msg(where: str, key: str, bad: np.ndarray, what: str, fix: str) -> str:
    shown = ", ".join(repr(v.item()) for v in np.unique(bad.reshape(-1))[:5])
    return (f"{where}: labels array '{key}' holds {bad.size} invalid label(s) (e.g. {shown}); {what}. {fix}. "
            f"Labels are one integer class index per sample.")


def _label_column(where: str, key: str, raw: Any, sequence: bool = False) -> np.ndarray:
    """The labels as one value per sample: shape [N] or [N, 1]; anything else (a scalar, one-hot rows) is refused.
    With `sequence` (CTC models): rows [N, L] of class indices padded with -1."""
    arr = np.asarray(raw)
    if sequence:
        if arr.ndim == 2:
            return arr
        raise DataError(f"{where}: labels array '{key}' has shape {list(arr.shape)}, but evaluate.task ctc reads "
                        f"label sequences: shape [N, L], class indices padded with -1 (e.g. [[3, 1, 4, -1], ...]).")
    if arr.ndim == 1 or (arr.ndim == 2 and arr.shape[1] == 1):
        return arr.reshape(-1)
    hint = " One-hot or score rows: store labels.argmax(axis=1)." if arr.ndim == 2 else ""
    raise DataError(
        f"{where}: labels array '{key}' has shape {list(arr.shape)}, but labels need one value per sample, shape [N] "
        f"or [N, 1].{hint} Store one integer class index per sample."
    )


def _one_label(path: Path, key: str, raw: Any) -> np.ndarray:
    """The label of one per-sample file: exactly one value."""
    arr = np.asarray(raw).reshape(-1)
    if arr.size != 1:
        raise DataError(
            f"{path}: labels array '{key}' holds {arr.size} values, but a per-sample file needs exactly one label "
            f"(its integer class index)."
        )
    return arr


def _checked_labels(where: str, key: str, labels: np.ndarray, n: int, max_samples: int | None,
                    sequence: bool = False) -> np.ndarray:
    """Labels validated as data: one per sample, integer class indices (exactly integral floats converted), >= 0.

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
        integral = np.isfinite(wide) & (np.abs(wide) <= _EXACT_FLOAT_INT)
        integral &= np.where(integral, wide, 0.0) == np.round(np.where(integral, wide, 0.0))
        if not np.all(integral):
            raise DataError(_label_msg(where, key, labels[~integral], f"labels are {labels.dtype} and these are not "
                                       f"whole numbers", f"Store the class index per sample as integers, e.g. "
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
    if np.any(negative):
        raise DataError(_label_msg(where, key, labels[negative], "class indices cannot be negative",
                                   "Drop unlabelled samples (e.g. -1 for 'unknown') or map them to a class"))
    return labels


def open_dataset(
    path: str | Path,
    inputs: Sequence[TensorInfo],
    *,
    labels_key: str | None = None,
    max_samples: int | None = None,
    role: str = "calibration",
    sequence_labels: bool = False,
) -> Dataset:
    """Open and validate a data source for a model with the given inputs.

    `sequence_labels`: the labels are rows [N, L] of class indices padded with -1 (CTC models; .npz files only).

    Raises DataError (exit 2) on a missing path, unreadable files, names/shapes/dtypes that do not
    fit the model, NaN/Inf values, mismatched sample counts, missing labels, or no samples at all.
    """
    path = Path(path)
    where = f"{role} data {path}"
    if not path.exists():
        raise DataError(f"{where} does not exist. Check the path (relative paths resolve from pipeline.yaml's folder).")
    if path.is_dir():
        if sequence_labels and labels_key is not None:
            raise DataError(f"{where} is a folder of per-sample files, but label sequences (evaluate.task ctc) are "
                            f"read from one .npz: store the inputs and a labels array [N, L] padded with -1 there.")
        return _open_folder(path, inputs, labels_key=labels_key, max_samples=max_samples, role=role)
    lazy = _lazy_members(path)
    raw: dict[str, Any] = dict(_load_npz(path, skip=set(lazy)))
    raw.update(lazy)
    arrays: dict[str, np.ndarray] = {}
    for info in inputs:
        if info.name not in raw:
            raise DataError(_missing_msg(where, info.name, raw.keys()))
        arr = raw[info.name]
        if max_samples is not None and arr.ndim > 0:  # a 0-d array is refused by _check_array, by its rank
            arr = arr.head(max_samples) if isinstance(arr, _NpyMember) else arr[:max_samples]
        arrays[info.name] = _check_array(where, info.name, arr, info, per_sample=False, check_finite=True)
    counts = {k: v.shape[0] for k, v in arrays.items()}
    if len(set(counts.values())) > 1:
        raise DataError(f"{where}: inputs hold different numbers of samples {counts}. Every input array needs one row per sample.")
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
        labels = _checked_labels(where, labels_key, _label_column(where, labels_key, raw[labels_key], sequence_labels),
                                 n, max_samples, sequence_labels)
    digest = hashlib.sha256()
    digest.update(sha256_file(path).encode())
    digest.update(f"|max={max_samples}|labels={labels_key}".encode())
    return Dataset(path, inputs, labels_key=labels_key, max_samples=max_samples, role=role, arrays=arrays,
                   samples=None, labels=labels, fingerprint=digest.hexdigest())


def _open_folder(
    path: Path, inputs: Sequence[TensorInfo], *, labels_key: str | None, max_samples: int | None, role: str
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
        arrays = _read_sample(f, inputs)
        samples.append(_Sample(f, tuple(arrays[i.name].shape for i in inputs)))
        digest.update(f"{f.name}:{sha256_file(f)}\n".encode())
        if labels_key is not None:
            raw = _load_npz(f)
            if labels_key not in raw:
                raise DataError(f"{f}: no labels array '{labels_key}' (arrays present: {sorted(raw)}). Every sample file needs its label.")
            labels.append(_one_label(f, labels_key, raw[labels_key]))
    digest.update(f"|max={max_samples}|labels={labels_key}".encode())
    checked = _checked_labels(where, labels_key, np.concatenate(labels), len(samples), None) if labels else None
    return Dataset(path, inputs, labels_key=labels_key, max_samples=max_samples, role=role, arrays=None,
                   samples=samples, labels=checked, fingerprint=digest.hexdigest())


def check_disjoint(a: Dataset, b: Dataset, limit: int = 4096) -> int:
    """Count samples of `b` that also appear in `a` (exact byte match of all inputs; first `limit` of each).

    Overlapping calibration and evaluation splits inflate accuracy; the pipeline warns when this is > 0.
    """
    def keys(ds: Dataset) -> set[bytes]:
        out: set[bytes] = set()
        for batch in ds.batches(64):
            for i in range(batch.size):
                h = hashlib.sha1()
                for name in ds.input_names:
                    h.update(np.ascontiguousarray(batch.feeds[name][i]).tobytes())
                out.add(h.digest())
            if len(out) >= limit:
                break
        return out

    return len(keys(a) & keys(b))


def feeds_signature(feeds: Mapping[str, np.ndarray]) -> str:
    """Short human description of a batch: name[shape] dtype."""
    return ", ".join(f"{k}{list(v.shape)} {v.dtype}" for k, v in feeds.items())
