"""histograms.npz's encoding: the column layout (format 2, `calibration.histfile`) against the per-tensor one (format 1).

    python benchmarks/histograms_npz.py --bench .bench                       # digits, effnet_lite0, minilm_l6
    python benchmarks/histograms_npz.py --bench .bench --models effnet_lite0 --repeats 21

Collects each model's histograms once (CPU, the calibration data the open set's manifest names; the bundled
digits example without `--bench`), then times, interleaved (format 1, format 2, format 1 ...: a busy spell of a
shared machine hits both alike), the encoding to bytes (`histograms_npz`, what calibration's search stage waits
on) and the reading back (`load_histograms`); medians. Checks that both files read back to the same
histograms. Format 1 is the encoder quantpipe used before format 2, kept here as it was. Prints one JSON line
per model.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.calibration_overhead import models  # noqa: E402  (the same models, from the open set's manifest)


def format1_npz(histograms: Mapping[str, Any], kinds: Mapping[str, str]) -> bytes:
    """histograms.npz as quantpipe wrote it before format 2: `<name>/<field>` arrays, nine per tensor."""
    arrays: dict[str, np.ndarray] = {}
    for name, h in histograms.items():
        b = h.binned()
        arrays[f"{name}/counts"] = b.counts
        arrays[f"{name}/bin_width"] = np.asarray(b.bin_width, dtype=np.float64)
        arrays[f"{name}/absmax"] = np.asarray(h.absmax, dtype=np.float64)
        arrays[f"{name}/num_values"] = np.asarray(h.num_values, dtype=np.int64)
        arrays[f"{name}/num_bins"] = np.asarray(h.num_bins, dtype=np.int64)
        arrays[f"{name}/kind"] = np.asarray(kinds.get(name, "activation"))
        if h.range_exp is not None:
            arrays[f"{name}/range_exp"] = np.asarray(h.range_exp, dtype=np.int64)
        nz = np.flatnonzero(h.counts)
        fine = h.counts[: int(nz[-1]) + 1 if nz.size else 1]
        peak = int(fine.max(initial=0))
        dtype = next(t for t in (np.uint8, np.uint16, np.uint32, np.int64) if peak <= np.iinfo(t).max)
        arrays[f"{name}/fine_counts"] = fine.astype(dtype)
        arrays[f"{name}/fine_bins"] = np.asarray(h.fine_bins, dtype=np.int64)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for key, arr in arrays.items():
            with zf.open(key + ".npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.asanyarray(arr), allow_pickle=False)
    return buffer.getvalue()


def measure(name: str, model: Path, data: Path, repeats: int) -> dict[str, Any]:
    from quantpipe.calibration.collect import collect_histograms
    from quantpipe.calibration.histfile import histograms_npz, load_histograms
    from quantpipe.data import open_dataset
    from quantpipe.model import load_model_spec

    spec, _ = load_model_spec(model)
    stats = collect_histograms(model, open_dataset(data, spec.inputs, role="calibration"))
    encoders = {"format1": format1_npz, "format2": histograms_npz}
    encode: dict[str, list[float]] = {k: [] for k in encoders}
    decode: dict[str, list[float]] = {k: [] for k in encoders}
    blobs: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="histograms-npz-") as tmp:
        for _ in range(repeats):
            for key, fn in encoders.items():
                t0 = time.perf_counter()
                blobs[key] = fn(stats.histograms, stats.kinds)
                encode[key].append(time.perf_counter() - t0)
                path = Path(tmp) / f"{key}.npz"
                path.write_bytes(blobs[key])
                t0 = time.perf_counter()
                read = load_histograms(path)
                decode[key].append(time.perf_counter() - t0)
                if read != (stats.histograms, stats.kinds):
                    raise SystemExit(f"{name}: {key} does not read back to the histograms it was written from")
        members = {k: len(zipfile.ZipFile(io.BytesIO(b)).namelist()) for k, b in blobs.items()}
    return {
        "model": name, "tensors": len(stats.histograms), "repeats": repeats,
        **{f"{k}_encode_s": round(statistics.median(v), 4) for k, v in encode.items()},
        **{f"{k}_decode_s": round(statistics.median(v), 4) for k, v in decode.items()},
        **{f"{k}_bytes": len(b) for k, b in blobs.items()},
        **{f"{k}_members": n for k, n in members.items()},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", type=Path, help="the open set (shared/bench/build.sh output)")
    ap.add_argument("--models", nargs="+", help="default: digits, and effnet_lite0 and minilm_l6 with --bench")
    ap.add_argument("--repeats", type=int, default=11)
    a = ap.parse_args(argv)
    wanted = a.models or (["digits", "effnet_lite0", "minilm_l6"] if a.bench else ["digits"])
    for name, (model, data) in models(a.bench, wanted).items():
        print(json.dumps(measure(name, model, data, a.repeats)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
