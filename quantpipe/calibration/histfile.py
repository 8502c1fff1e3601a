"""histograms.npz: every calibration histogram of a run in one standard .npz, a column per field.

Layout (format_version 2; each row below is one array, T = the number of tensors, in graph order):

- `format_version`: int64 scalar, 2;
- `names`, `kinds`: str [T]: the tensor and its kind ("input", "activation" or "weight");
- the binned histogram the methods and the report use (bins start at 0): `counts` [sum of num_bins], every
  tensor's `num_bins[i]` bins one after the other (tensor i's start at `num_bins[:i].sum()`), and
  `bin_width` float64 [T];
- the exact streaming state, from which the histograms reload bit for bit (`load_histograms`): `absmax`
  float64 [T], `num_values`, `num_bins`, `fine_bins`, `range_exp` int64 [T], `has_range` bool [T] (False:
  no non-zero value yet, `range_exp` then means nothing), and the fine counts up to the last non-zero one
  (the bins above are zeros): tensor i's are `fine_counts_<fine_itemsize[i]>[fine_start[i]:][:fine_used[i]]`,
  the arrays `fine_counts_1`, `_2`, `_4`, `_8` (uint8, uint16, uint32, int64) holding each tensor's in the
  smallest type that fits them.

One array per field keeps the zip to 18 members: the earlier layout (format 1: `<name>/<field>` arrays, nine per
tensor) spent most of its encoding time on ~1800 members' headers and CRCs. Format-1 files (no
`format_version`) are still read. Counts are stored in the smallest unsigned type that holds them; they read
back as int64.
"""

from __future__ import annotations

import io
import logging
import math
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from quantpipe.calibration.histogram import StreamingHistogram
from quantpipe.errors import CalibrationError
from quantpipe.fsutil import atomic_path

__all__ = ["FORMAT_VERSION", "histograms_npz", "load_histograms", "save_histograms", "write_histograms"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
_ITEMSIZES: dict[int, type[np.integer[Any]]] = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.int64}


def save_histograms(
    path: str | os.PathLike[str],
    histograms: Mapping[str, StreamingHistogram],
    kinds: Mapping[str, str],
) -> Path:
    """Write every histogram to one compressed .npz (`histograms_npz`), atomically."""
    return write_histograms(path, histograms_npz(histograms, kinds))


def write_histograms(path: str | os.PathLike[str], npz: bytes) -> Path:
    """Write `histograms_npz`' bytes to `path`, atomically."""
    dest = Path(path)
    with atomic_path(dest, suffix=".npz") as tmp:
        tmp.write_bytes(npz)
    return dest


def histograms_npz(histograms: Mapping[str, StreamingHistogram], kinds: Mapping[str, str]) -> bytes:
    """Every histogram as the bytes of one compressed .npz (the module docstring gives the layout).

    Raises:
        CalibrationError: a tensor name ends with a NUL character (numpy's str arrays drop trailing NULs).
    """
    arrays = _columns(histograms, kinds)
    # zlib level 1: several times faster than np.savez_compressed's 6 and nearly as small (small integers).
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for key, arr in arrays.items():
            with zf.open(key + ".npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, arr, allow_pickle=False)
    return buffer.getvalue()


def _columns(histograms: Mapping[str, StreamingHistogram], kinds: Mapping[str, str]) -> dict[str, np.ndarray]:
    """The layout's arrays, in the order they are written."""
    names = list(histograms)
    hists = [histograms[n] for n in names]
    bad = [n for n in names if n.endswith("\0")]
    if bad:
        raise CalibrationError(f"tensor name {bad[0]!r} ends with a NUL character; histograms.npz cannot store it.")
    binned = [h.binned() for h in hists]
    fine = [_used_counts(h) for h in hists]
    itemsize = [np.dtype(_smallest_type(f)).itemsize for f in fine]
    start, filled = [], dict.fromkeys(_ITEMSIZES, 0)
    for f, size in zip(fine, itemsize, strict=True):
        start.append(filled[size])
        filled[size] += f.size
    counts = np.concatenate([b.counts for b in binned]) if binned else np.zeros(0, dtype=np.int64)
    arrays: dict[str, np.ndarray] = {
        "format_version": np.asarray(FORMAT_VERSION, dtype=np.int64),
        "names": np.asarray(names, dtype=str),
        "kinds": np.asarray([kinds.get(n, "activation") for n in names], dtype=str),
        "counts": counts.astype(_smallest_type(counts)),
        "bin_width": np.asarray([b.bin_width for b in binned], dtype=np.float64),
        "absmax": np.asarray([h.absmax for h in hists], dtype=np.float64),
        "num_values": np.asarray([h.num_values for h in hists], dtype=np.int64),
        "num_bins": np.asarray([h.num_bins for h in hists], dtype=np.int64),
        "fine_bins": np.asarray([h.fine_bins for h in hists], dtype=np.int64),
        "range_exp": np.asarray([0 if h.range_exp is None else h.range_exp for h in hists], dtype=np.int64),
        "has_range": np.asarray([h.range_exp is not None for h in hists], dtype=bool),
        "fine_itemsize": np.asarray(itemsize, dtype=np.int64),
        "fine_start": np.asarray(start, dtype=np.int64),
        "fine_used": np.asarray([f.size for f in fine], dtype=np.int64),
    }
    stores = {size: np.empty(filled[size], dtype=dtype) for size, dtype in _ITEMSIZES.items()}
    for f, size, at in zip(fine, itemsize, start, strict=True):
        stores[size][at:at + f.size] = f  # cast in the copy: one pass over each tensor's counts
    arrays.update((f"fine_counts_{size}", store) for size, store in stores.items())
    return arrays


def _used_counts(h: StreamingHistogram) -> np.ndarray:
    """The fine counts up to the last non-zero one (a view)."""
    counts = h.counts
    used = 1  # no non-zero value: only bin 0 (the zeros) can hold counts
    if h.range_exp is not None and h.absmax > 0.0:
        # The fine bin holding absmax is the last one any value reached (histogram.py's `binned` finds it so
        # too): found in O(1), where scanning 65536 bins for the last non-zero one takes ~0.7 ms a tensor.
        fine_bits = h.fine_bins.bit_length() - 1
        used = min(int(math.ldexp(h.absmax, fine_bits - h.range_exp)), h.fine_bins - 1) + 1
    if counts[used:].any() or not counts[used - 1]:  # a state not made by `update` / `merge`: scan it
        nz = np.flatnonzero(counts)
        used = int(nz[-1]) + 1 if nz.size else 0
    return counts[:used]


def _smallest_type(counts: np.ndarray) -> type[np.integer[Any]]:
    """The narrowest of uint8, uint16, uint32 and int64 that holds every count (all >= 0)."""
    peak = int(counts.max(initial=0))
    return next(t for t in _ITEMSIZES.values() if peak <= np.iinfo(t).max)


def load_histograms(path: str | os.PathLike[str]) -> tuple[dict[str, StreamingHistogram], dict[str, str]]:
    """Read save_histograms' file back: (tensor -> histogram, tensor -> kind), in the saved order; a file of
    the earlier layout (format 1) too.

    Raises:
        CalibrationError: unreadable, damaged, or written by a newer quantpipe (another format_version).
    """
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as z:
            if "format_version" not in z.files:  # format 1's keys all hold a "/"
                log.debug("%s has the format-1 layout (one array per tensor and field)", p)
                return _load_format1(z)
            version = int(z["format_version"])
            if version != FORMAT_VERSION:
                raise CalibrationError(
                    f"calibration histograms {p} have format_version {version}; this quantpipe reads "
                    f"{FORMAT_VERSION} (and the earlier layout). Re-run calibration to rewrite them."
                )
            return _load_columns(z)
    except CalibrationError:
        raise
    except (OSError, ValueError, KeyError, IndexError, zipfile.BadZipFile) as err:
        raise CalibrationError(f"calibration histograms {p} cannot be read ({err}); re-run calibration.") from err


def _load_columns(z: Any) -> tuple[dict[str, StreamingHistogram], dict[str, str]]:
    """The format-2 layout (the module docstring)."""
    names = [str(n) for n in z["names"]]
    kinds = [str(k) for k in z["kinds"]]
    absmax, num_values, num_bins, fine_bins, range_exp, has_range, itemsize, start, used = (
        z[k].tolist() for k in ("absmax", "num_values", "num_bins", "fine_bins", "range_exp", "has_range",
                                "fine_itemsize", "fine_start", "fine_used"))
    columns = (kinds, absmax, num_values, num_bins, fine_bins, range_exp, has_range, itemsize, start, used)
    if any(len(c) != len(names) for c in columns):
        raise ValueError(f"its per-tensor arrays do not all have {len(names)} entries")
    stores = {size: z[f"fine_counts_{size}"] for size in sorted(set(itemsize))}
    hists: dict[str, StreamingHistogram] = {}
    for i, name in enumerate(names):
        stored = stores[itemsize[i]][start[i]:start[i] + used[i]]
        if stored.size != used[i]:
            raise ValueError(f"tensor {name!r}'s fine counts run past fine_counts_{itemsize[i]}")
        fine = np.zeros(fine_bins[i], dtype=np.int64)
        fine[: stored.size] = stored
        hists[name] = StreamingHistogram.from_state(num_bins[i], fine, range_exp[i] if has_range[i] else None,
                                                    absmax[i], num_values[i])
    return hists, dict(zip(names, kinds, strict=True))


def _load_format1(z: Any) -> tuple[dict[str, StreamingHistogram], dict[str, str]]:
    """The format-1 layout (quantpipe before format_version 2): `<name>/<field>` arrays, nine per tensor."""
    hists: dict[str, StreamingHistogram] = {}
    kinds: dict[str, str] = {}
    keys = set(z.files)
    for key in z.files:
        if not key.endswith("/fine_counts"):
            continue
        name = key[: -len("/fine_counts")]
        rexp = f"{name}/range_exp"
        fine = np.zeros(int(z[f"{name}/fine_bins"]), dtype=np.int64)
        stored = z[key]
        fine[: stored.size] = stored
        hists[name] = StreamingHistogram.from_state(
            int(z[f"{name}/num_bins"]),
            fine,
            int(z[rexp]) if rexp in keys else None,
            float(z[f"{name}/absmax"]),
            int(z[f"{name}/num_values"]),
        )
        kinds[name] = str(z[f"{name}/kind"])
    return hists, kinds
