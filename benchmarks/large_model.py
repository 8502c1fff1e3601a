"""A model over protobuf's 2 GB limit through every stage: time and peak memory per stage.

    python benchmarks/large_model.py --dir /tmp/large        # ~20 min on 2 shared cores; prints a Markdown table
    python benchmarks/large_model.py --dir /tmp/large --dims 2048 1024 2048 --samples 4   # a quick smoke run

It writes (tests/bigmodel.py) a chain of four float32 MatMuls, x[N, 16384] -> 9216 -> 16384 -> 9216 -> 16384
with a Relu between them (2.42 GB of weights in one `model.onnx.data` beside the 627-byte `model.onnx`, as
`onnx.save_model(..., save_as_external_data=True)` writes it), 8 calibration and 8 evaluation samples, and a
pipeline.yaml with the onnxruntime CPU variants (FP32, FP16, INT8), per-layer sensitivity on, TensorRT off.
Then it runs, each in its own process, `quantpipe inspect`, `quantpipe calibrate`, `quantpipe build` and
`quantpipe evaluate` (evaluation of the three variants, sensitivity, report, gate), then `quantpipe run` again
(everything reused but evaluation), and records each one's wall time and peak RSS (os.wait4's rusage of that
process alone). `--fallback` adds a `build.fallback` budget (the accuracy fallback's candidates on this model).

Why not a test: on the 2-core development machine the whole run takes 13-20 minutes (sensitivity alone about
8: one onnxruntime session per candidate layer, each over 2.4 GB), well past what CI spends on one test. The
tests run the same stages on a few-MB model with external data (tests/unit/test_external_data.py,
tests/e2e/test_external_data.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.bigmodel import LARGE_DIMS  # noqa: E402

QUANTPIPE = [sys.executable, "-m", "quantpipe"]


def _measure(cmd: list[str], cwd: Path) -> tuple[float, float, int]:
    """(seconds, peak RSS in GB, exit code) of one command in its own process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code not in (0, 1):
        err = proc.stderr.read() if proc.stderr else ""
        sys.stderr.write(f"{' '.join(cmd)} exited {code}:\n{err[-3000:]}\n")
    return seconds, usage.ru_maxrss / 1024**2, code


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, required=True, help="folder for the model, data and reports (~6 GB)")
    ap.add_argument("--dims", type=int, nargs="+", default=list(LARGE_DIMS))
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--fallback", action="store_true", help="add build.fallback (cosine >= 0.9999, 2 layers)")
    args = ap.parse_args()
    folder = args.dir.resolve()
    # Written by a child process: this one stays small, so the children it forks start small (a forked child's
    # peak RSS counts the parent's pages until it execs).
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from tests.bigmodel import write_matmul_chain; "
            f"write_matmul_chain({str(folder)!r}, {list(args.dims)!r}, samples={args.samples})")
    build_s, build_gb, build_code = _measure([sys.executable, "-c", code], ROOT)
    yaml = folder / "pipeline.yaml"
    if args.fallback:
        text = yaml.read_text().replace("  quantize:\n", "  fallback: {metric: cosine, min: 0.9999, max_layers: 2}\n"
                                        "  quantize:\n")
        yaml.write_text(text)
    size = sum(p.stat().st_size for p in folder.glob("model.onnx*"))
    rows = [("write the model (tests/bigmodel.py)", build_s, build_gb, build_code)]
    steps = [("inspect", [*QUANTPIPE, "inspect", "model.onnx"]),
             ("calibrate", [*QUANTPIPE, "calibrate", "pipeline.yaml", "-q"]),
             ("build (FP16 + INT8 writers; calibration reused)", [*QUANTPIPE, "build", "pipeline.yaml", "-q"]),
             ("evaluate (3 variants, sensitivity, report, gate; build reused)",
              [*QUANTPIPE, "evaluate", "pipeline.yaml", "-q"]),
             ("run again (all reused but evaluate)", [*QUANTPIPE, "run", "pipeline.yaml", "-q"])]
    for name, cmd in steps:
        sec, gb, code = _measure(cmd, folder)
        rows.append((name, sec, gb, code))
        print(f"{name}: {sec:.1f} s, {gb:.2f} GB peak RSS, exit {code}", flush=True)
    load = os.getloadavg()
    print(f"\n{dt.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {load[0]:.1f}; model {size / 1e9:.2f} GB (dims {args.dims}, {args.samples} samples)\n")
    print("| step | wall time (s) | peak RSS (GB) | exit |\n|---|---|---|---|")
    for name, sec, gb, code in rows:
        print(f"| {name} | {sec:.1f} | {gb:.2f} | {code} |")
    return 0 if all(code in (0, 1) for *_, code in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
