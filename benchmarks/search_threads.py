"""The methods' search after calibration's data pass (`calibration.methods.compute_all`) against its thread cap.

    python benchmarks/search_threads.py --bench .bench --model effnet_lite0 --threads 1 2 4 8 16 --repeats 5

Collects the histograms of one model once (CPU), then times `compute_tables` (entropy, or `--methods`) over every
tensor with `methods.SEARCH_THREADS` set to each value (capped by the usable cores), median of `--repeats`, and
checks that every thread count gives the same tables. Prints one JSON line per thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", type=Path, required=True)
    ap.add_argument("--model", default="effnet_lite0")
    ap.add_argument("--methods", nargs="+", default=["entropy"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args(argv)
    from quantpipe.calibration import compute_tables, methods
    from quantpipe.calibration.collect import collect_histograms
    from quantpipe.data import open_dataset
    from quantpipe.model import load_model_spec

    model = a.bench / a.model / "model.onnx"
    spec, _ = load_model_spec(model)
    stats = collect_histograms(model, open_dataset(a.bench / a.model / "calib.npz", spec.inputs))
    first = None
    for t in a.threads:
        methods.SEARCH_THREADS = t
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            tables, _ = compute_tables(stats, a.methods)
            times.append(time.perf_counter() - t0)
        first = first or tables
        print(json.dumps({"search_threads": t, "cores": len(os.sched_getaffinity(0)), "tensors": len(stats.histograms),
                          "median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4),
                          "identical": tables == first}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
