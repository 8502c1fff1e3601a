"""How far onnxruntime's own intra-op threads take one model run: the ceiling on what worker processes add (issue 18).

    python benchmarks/ort_threads.py --bench .bench [--models effnet_lite0] [--threads 1 2 4 8 16] [--repeats 3]

`workers: 1` runs every search in one process with onnxruntime on all cores; N workers run it on one thread each
(`execution.threads_per_worker`). So N workers can beat one by at most N / (onnxruntime's own speed-up at N
threads), before any overhead: this script measures that speed-up, for the models' runs as the searches make them
(`ortsession.ort_session`: the FP32 model, and its Q/DQ model as written, graph optimizations off, weights folded),
one pass over the evaluation samples at `--batch-size`, session created outside the timing. Median of `--repeats`.
It prints a Markdown table; `--out` writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _passes(session: Any, feeds: list[dict[str, np.ndarray]], repeats: int) -> float:
    out = session.get_outputs()[0].name
    session.run([out], feeds[0])  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for f in feeds:
            session.run([out], f)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(bench: Path, name: str, threads: list[int], batch_size: int, repeats: int) -> list[dict[str, Any]]:
    from quantpipe.calibration import calibrate, select_amax
    from quantpipe.onnxgraph import load_onnx
    from quantpipe.ortsession import ort_session
    from quantpipe.quantize.build import build_qdq_model
    from quantpipe.quantize.options import QuantizeOptions

    folder = bench / name
    model_path = folder / "model.onnx"
    with np.load(folder / "eval.npz") as d:
        arrays = {k: d[k] for k in d.files}
    model = load_onnx(model_path)
    inputs = [i.name for i in model.graph.input if i.name in arrays]
    n = len(arrays[inputs[0]])
    feeds = [{k: arrays[k][i:i + batch_size] for k in inputs} for i in range(0, n, batch_size)]
    from quantpipe.data import open_dataset
    from quantpipe.model import load_model_spec

    spec, _ = load_model_spec(model_path)
    calib = open_dataset(folder / "calib.npz", spec.inputs)
    with tempfile.TemporaryDirectory() as out:
        amax = select_amax(out, "minmax", calibrate(model_path, calib, methods=["minmax"], out_dir=out,
                                                    batch_size=batch_size))
    qdq = build_qdq_model(model, amax, QuantizeOptions())[0]
    rows = []
    for kind, m, kw in (("fp32", model, {"optimize": False}), ("q/dq as written", qdq, {"int8": True, "optimize": False})):
        base = None
        for t in threads:
            s = _passes(ort_session(m, threads=t, **kw), feeds, repeats)
            base = base or s
            rows.append({"model": name, "graph": kind, "threads": t, "seconds": s, "speedup": base / s, "samples": n})
            print(f"{name:14s} {kind:16s} threads={t:<3d} {s:8.3f} s  {base / s:5.2f}x", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", type=Path, default=ROOT / ".bench")
    ap.add_argument("--models", nargs="+", default=["effnet_lite0"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    rows = [r for name in args.models for r in measure(args.bench, name, args.threads, args.batch_size, args.repeats)]
    cpu = platform.processor() or platform.machine()
    print(f"\n{cpu}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; median of {args.repeats} passes\n")
    print("| model | graph | threads | s per pass | speed-up over 1 thread | N / speed-up (workers' ceiling) |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['graph']} | {r['threads']} | {r['seconds']:.3f} | {r['speedup']:.2f}x | "
              f"{r['threads'] / r['speedup']:.2f}x |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
