"""The .npz files behind a data source, read and checked against the model inputs they feed.

A stacked .npz is read with numpy (`load_npz`), except its large members stored uncompressed (`numpy.savez`),
which `lazy_members` opens for reading by rows (`NpyMember`): memory then holds one batch, not the data set. A
per-sample file is read whole (`read_sample`). Every array is checked once against its model input
(`check_array`: rank, static dims, dtype, finite values); `quantpipe.data` builds the data set from these.
"""

from __future__ import annotations

import dataclasses
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from quantpipe.artifacts import TensorInfo
from quantpipe.errors import ConfigError, DataError

__all__ = ["DYNAMIC_AXES_HINT", "LAZY_MIN_BYTES", "NpyMember", "batch_first", "check_array", "check_batch_axis",
           "check_layout", "is_npy", "lazy_members", "load_npz", "missing_msg", "read_sample", "samples_first"]


#: How to give a model whose declared input size is a placeholder free axes (its error messages say it).
DYNAMIC_AXES_HINT = ("If the declared size is a placeholder (a fully convolutional network runs any size), give the "
                     "model dynamic axes: export it again with torch.onnx.export(..., dynamic_axes=...), or name its "
                     "input and output dims instead of fixing them (README: fixed input sizes, five lines of onnx).")


def _np_dtype(t: TensorInfo) -> np.dtype:
    return np.dtype(t.dtype)


LAZY_MIN_BYTES = 1 << 20
"""Arrays at least this large, stored uncompressed, are read batch by batch instead of loaded."""


class NpyMember:
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

    def head(self, n: int) -> NpyMember:
        out = NpyMember(self.path, self.offset, self.full_shape, self.dtype, min(self.rows, max(n, 0)))
        out.cast_to = self.cast_to
        return out

    def rows_slice(self, start: int, stop: int) -> NpyMember:
        """Rows [start, stop) as a member of their own (nothing is read)."""
        out = NpyMember(self.path, self.offset + start * self.row_bytes, self.full_shape, self.dtype, stop - start)
        out.cast_to = self.cast_to
        return out

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop, step = key.indices(self.rows)
        if step != 1:
            raise IndexError("only contiguous row slices are supported")
        arr = self._read(start, stop)
        return arr.astype(self.cast_to) if self.cast_to is not None and self.cast_to != self.dtype else arr

    def _read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as stored (no cast)."""
        n = max(stop - start, 0)
        arr = np.empty((n, *self.full_shape[1:]), dtype=self.dtype)
        with open(self.path, "rb") as fh:
            fh.seek(self.offset + start * self.row_bytes)
            got = fh.readinto(arr.data.cast("B"))
        if got != n * self.row_bytes:
            raise DataError(f"{self.path} ended early while reading rows {start}..{stop}; the file is truncated.")
        return arr

    def _blocks(self, chunk_bytes: int) -> Iterator[np.ndarray]:
        """The rows as stored, a chunk of about `chunk_bytes` at a time (memory: one chunk)."""
        step = max(1, chunk_bytes // max(self.row_bytes, 1))
        for start in range(0, self.rows, step):
            yield self._read(start, min(start + step, self.rows))

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        arr = self[0: self.rows]
        return arr if dtype is None else arr.astype(dtype)

    def count_nonfinite(self, chunk_bytes: int = 1 << 24) -> int:
        """NaN/Inf values, counted in chunks (memory: one chunk)."""
        if self.dtype.kind not in "fc":
            return 0
        bad = 0
        for block in self._blocks(chunk_bytes):
            block = block.astype(self.cast_to) if self.cast_to is not None else block  # as fed (float64 -> 32: inf)
            bad += int(block.size - np.count_nonzero(np.isfinite(block)))
        return bad

    def value_range(self, chunk_bytes: int = 1 << 24) -> tuple[int, int] | None:
        """The smallest and largest value of an integer array as stored, read in chunks; None when empty."""
        ranges = [(int(b.min()), int(b.max())) for b in self._blocks(chunk_bytes) if b.size]
        return (min(r[0] for r in ranges), max(r[1] for r in ranges)) if ranges else None


def lazy_members(path: Path) -> dict[str, NpyMember]:
    """Members of a .npz that are stored uncompressed, C-ordered and large, opened for reading by rows."""
    out: dict[str, NpyMember] = {}
    try:
        with zipfile.ZipFile(path) as zf, open(path, "rb") as fh:
            for info in zf.infolist():
                if not info.filename.endswith(".npy") or info.compress_type != zipfile.ZIP_STORED:
                    continue
                if info.file_size < LAZY_MIN_BYTES:
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
                out[info.filename[: -len(".npy")]] = NpyMember(path, fh.tell(), tuple(shape), dtype)
    except (OSError, ValueError, EOFError, NotImplementedError, zipfile.BadZipFile, zlib.error):
        return {}  # the eager loader reports unreadable files properly
    return out


def is_npy(path: Path) -> bool:
    """Whether `path` is a .npy file (one array; numpy's magic string), not an .npz archive."""
    try:
        with open(path, "rb") as fh:
            return fh.read(6) == b"\x93NUMPY"
    except OSError:
        return False


def load_npz(path: Path, skip: set[str] | frozenset[str] = frozenset()) -> dict[str, np.ndarray]:
    if is_npy(path):
        raise DataError(f"data file {path} is a .npy file, which holds one unnamed array; quantpipe reads .npz "
                        f"archives, one array per model input named as the input: numpy.savez(path, <input>=array).")
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


def _dtype_advice(got: np.dtype, want: np.dtype) -> str:
    """How to fix data of another kind than the input: a float array for an integer input is usually data already
    normalised for a model that normalises inside its graph (uint8 pixels in, the Cast / Sub / Div first), where a
    cast would turn 0.0-1.0 values into 0 and 1 (found probing)."""
    if got.kind == "f" and want.kind in "iu":
        return (f"The model takes raw integers ({want.name}: for images, 0-255 pixels) and likely normalises them "
                f"inside its graph: store the data as it was before your normalisation, as {want.name}, not a cast "
                f"of normalised floats (arr.astype(np.{want.name}) would turn 0.0-1.0 values into 0 and 1).")
    if got.kind in "iub" and want.kind == "f":
        # Raw pixels (or token codes) for a float input: the model expects them preprocessed. A bare astype gives
        # 0-255 floats to a model trained on [-1, 1]: calibration passes and the INT8 model reads nothing (a text
        # recognizer calibrated so read 0 of 160 lines, found probing).
        return (f"Integers for a float input are usually raw data (image pixels 0-255): apply the preprocessing the "
                f"model was trained with, exactly as your serving code does (e.g. (pixels / 255 - mean) / std, "
                f"resized and laid out as the model's input), and store that as {want.name}. A bare "
                f"arr.astype(np.{want.name}) is right only if the model itself normalises its input.")
    return f"Convert it, e.g. arr.astype(np.{want.name})."


def check_array(
    where: str, name: str, arr: np.ndarray, info: TensorInfo, *, per_sample: bool, check_finite: bool
) -> np.ndarray:
    """Validate one input array against the model input; return it with a batch axis."""
    if not info.shape:
        raise DataError(
            f"{where}: model input '{name}' is a scalar (rank 0), and quantpipe feeds every input as samples stacked "
            f"on a leading axis, so it cannot feed this one. Make the value your deployment feeds part of the model: "
            f"`quantpipe prepare MODEL OUT --fix {name}=VALUE` writes it as a constant (and folds the If branches it "
            f"decides), then quantize OUT.")
    if isinstance(arr, NpyMember):
        return _check_lazy(where, name, arr, info, check_finite=check_finite)
    if per_sample and arr.ndim == len(info.shape) - 1:
        arr = arr[None]
    _check_header(where, name, arr.shape, arr.dtype, info, per_sample=per_sample)
    want = _np_dtype(info)
    if arr.dtype != want:
        _check_int_range(where, name, arr.dtype, want, lambda: (int(arr.min()), int(arr.max())) if arr.size else None)
        arr = arr.astype(want)
    if check_finite and np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise DataError(
            f"{where}: array '{name}' contains {bad} NaN or Inf value(s). Calibration and evaluation need "
            f"finite inputs: clean or drop those samples."
        )
    return arr


def _check_header(where: str, name: str, shape: tuple[int, ...], dtype: np.dtype, info: TensorInfo, *,
                  per_sample: bool) -> None:
    """The checks an array's shape and dtype decide (no data read): its rank, its fixed dimensions, and a dtype of
    another kind than the input's."""
    rank = len(info.shape)
    if len(shape) != rank:
        raise DataError(
            f"{where}: array '{name}' has shape {list(shape)} but model input '{name}' has rank {rank} "
            f"(shape {_fmt_shape(info.shape)}). Store samples stacked on axis 0"
            + (" (or one sample without the batch axis)." if per_sample else ".")
        )
    for axis, (got, dim) in enumerate(zip(shape, info.shape, strict=True)):
        if axis == 0:
            continue
        if isinstance(dim, int) and dim > 0 and got != dim:
            raise DataError(
                f"{where}: array '{name}' has shape {list(shape)} but model input '{name}' expects "
                f"{_fmt_shape(info.shape)} (axis {axis} must be {dim}). Resize or re-export the data to the model's "
                f"input shape. " + DYNAMIC_AXES_HINT
            )
    want = _np_dtype(info)
    # float64 -> float32 and int32 -> int64 are harmless; int -> float usually means
    # unnormalised data (raw uint8 pixels), so it is refused rather than silently cast.
    kinds = (dtype.kind, want.kind)
    if dtype != want and not (kinds[0] == kinds[1] or set(kinds) <= {"i", "u"}):
        raise DataError(f"{where}: array '{name}' has dtype {dtype} but model input '{name}' is {want}. "
                        + _dtype_advice(dtype, want))


def _check_lazy(where: str, name: str, arr: NpyMember, info: TensorInfo, *, check_finite: bool) -> NpyMember:
    """check_array for an array read by rows: the same checks, from the header and a chunked scan."""
    _check_header(where, name, arr.shape, arr.dtype, info, per_sample=False)
    want = _np_dtype(info)
    _check_int_range(where, name, arr.dtype, want, arr.value_range)
    arr.cast_to = want if arr.dtype != want else None
    if check_finite and (bad := arr.count_nonfinite()):
        raise DataError(
            f"{where}: array '{name}' contains {bad} NaN or Inf value(s). Calibration and evaluation need "
            f"finite inputs: clean or drop those samples."
        )
    return arr


def _check_int_range(where: str, name: str, have: np.dtype, want: np.dtype,
                     value_range: Callable[[], tuple[int, int] | None]) -> None:
    """DataError where integers of dtype `have` do not all fit the input's narrower integer dtype `want`: the cast
    would wrap them around silently (uint8 200 -> int8 -56; an int64 id beyond 2**31 -> int32). `value_range`
    (the data's smallest and largest value; None when empty) is read only where the cast can narrow."""
    if want.kind not in "iu" or np.can_cast(have, want, "safe"):
        return
    found = value_range()
    if found is None:
        return
    lo, hi = found
    limits = np.iinfo(want)
    if lo >= limits.min and hi <= limits.max:
        return
    raise DataError(
        f"{where}: array '{name}' has dtype {have} with values {lo}..{hi}, but model input '{name}' is {want} "
        f"({limits.min}..{limits.max}): casting would wrap the values outside that range around. Store values the "
        f"model takes (token ids within its vocabulary, pixel codes in its range), or check that this array is "
        f"the one meant for this input.")


def _fmt_shape(shape: Sequence[int | str | None]) -> str:
    return "[" + ", ".join("?" if d is None or (isinstance(d, int) and d < 0) else str(d) for d in shape) + "]"


def batch_first(info: TensorInfo, axis: int) -> TensorInfo:
    """`info` with its batch axis `axis` moved first: how a data set holds the input inside."""
    if not axis:
        return info
    shape = list(info.shape)
    return dataclasses.replace(info, shape=(shape.pop(axis), *shape))


def check_layout(where: str, name: str, shape: tuple[int, ...], info: TensorInfo, axis: int) -> None:
    """An array stored in the model's layout with its samples on `axis` (not 0): DataError, in the file's and the
    model's own shapes, where a fixed dimension does not fit (`check_array` would name the batch-first views, which
    the user never wrote), saying when the file holds its samples first instead."""
    if not axis or len(shape) != len(info.shape):
        return
    bad = [(k, got, dim) for k, (got, dim) in enumerate(zip(shape, info.shape, strict=True))
           if k != axis and isinstance(dim, int) and dim > 0 and got != dim]
    if not bad:
        return
    k, got, dim = bad[0]
    moved = (*shape[1:axis + 1], shape[0], *shape[axis + 1:])
    fits = all(m == d for m, d in zip(moved, info.shape, strict=True) if isinstance(d, int) and d > 0)
    raise DataError(
        f"{where}: array '{name}' has shape {list(shape)}; model input '{name}' is {_fmt_shape(info.shape)} with its "
        f"samples on axis {axis} (its batch axis in pipeline.yaml), so the array's axis {k} must be {dim}, not {got}."
        + (f" The array holds its samples on axis 0 instead: store it in the model's layout, "
           f"np.moveaxis(arr, 0, {axis}) (shape {list(moved)})." if fits else
           " Store the array in the model's layout, its samples on that axis."))


def samples_first(arr: Any, axis: int, rank: int) -> Any:
    """A data array in the model's layout with its samples moved from the batch axis `axis` to axis 0 (an array
    read by rows is read whole for that); any other rank is left to `check_array` to refuse."""
    if not axis or np.ndim(arr) != rank:
        return arr
    return np.moveaxis(arr[:] if isinstance(arr, NpyMember) else arr, axis, 0)


def check_batch_axis(name: str, info: TensorInfo, axis: int) -> None:
    """Refuse a batch axis the input does not have (ConfigError, exit 2)."""
    if not 0 <= axis < max(len(info.shape), 1):
        raise ConfigError(
            f"pipeline.yaml gives model input '{name}' (shape {_fmt_shape(info.shape)}) batch axis {axis}, which it "
            f"does not have. Set model.inputs.{name}.batch_axis (or model.batch_axis) to the axis its samples are "
            f"stacked on, 0 to {max(len(info.shape) - 1, 0)}.")


def read_sample(path: Path, inputs: Sequence[TensorInfo],
                batch_axes: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
    """One per-sample file's arrays, samples first: `inputs` as `batch_first` gives them, and the batch axis of
    each input batched elsewhere than 0 (the file holds the model's layout, with or without that axis)."""
    raw = load_npz(path)
    out = {}
    for info in inputs:
        if info.name not in raw:
            raise DataError(missing_msg(str(path), info.name, raw.keys()))
        arr = samples_first(raw[info.name], (batch_axes or {}).get(info.name, 0), len(info.shape))
        out[info.name] = check_array(str(path), info.name, arr, info, per_sample=True, check_finite=True)
        if out[info.name].shape[0] != 1:
            raise DataError(f"{path}: a per-sample file must hold one sample, but '{info.name}' has {out[info.name].shape[0]}.")
    return out


def missing_msg(where: str, name: str, present: object) -> str:
    return (
        f"{where}: no array named '{name}', which the model needs as an input (arrays present: "
        f"{sorted(present)}). Name each array after the model input it feeds (see `quantpipe inspect MODEL`)."  # type: ignore[call-overload]
    )
