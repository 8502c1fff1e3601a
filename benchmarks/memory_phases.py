"""Where quantpipe's peak memory sits: the peak RSS of each phase of calibrate-and-quantize, on the open set.

    python benchmarks/memory_phases.py --bench /path/to/.bench [--models effnet_lite0,minilm_l6] [--json out.json]

Three stages, each in a process of its own (so each stage's peak is its own):

- `calibrate`: the histograms and every method's amax (`calibrate_tables_in_memory`, what `quantpipe calibrate`
  computes);
- `auto`: `calibration.use: auto`'s range search (`choose_ranges`) on those tables;
- `write`: the Q/DQ model from the chosen amax with the calibration data (`write_qdq_model`: per-channel statistics,
  the split search, GPTQ codes, the rewrites and the writing).

Within a stage, each phase is the time between two of quantpipe's log messages (plus the stage's own marks): at each
boundary the process's peak RSS (Linux VmHWM) is read and reset to the current RSS (`/proc/self/clear_refs` 5), so
every phase's number is its own exact peak, not a sampled one. "start" is the RSS after importing quantpipe,
onnx, onnxruntime and numpy, which every phase includes.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODELS = {"effnet_lite0": ("effnet_lite0/model.onnx", "effnet_lite0/calib.npz"),
          "minilm_l6": ("minilm_l6/model.onnx", "minilm_l6/calib.npz"),
          "digits": (str(ROOT / "examples/digits/digits_cnn.onnx"), str(ROOT / "calib_data/digits/calib.npz"))}
METHODS = ["entropy", "minmax", "percentile", "mse", "best"]
STAGES = ("calibrate", "auto", "write")


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


class PhaseMeter(logging.Handler):
    """Splits a process's life into phases at each log record (or `mark`): each phase's exact peak RSS."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.phases: list[dict[str, Any]] = []
        self.label = "start"
        self.t0 = time.perf_counter()
        self.mark("start")

    def mark(self, label: str) -> None:
        now = time.perf_counter()
        self.phases.append({"phase": self.label, "peak_mib": round(_status("VmHWM") / 2**20, 1),
                            "end_rss_mib": round(_status("VmRSS") / 2**20, 1), "seconds": round(now - self.t0, 2)})
        Path("/proc/self/clear_refs").write_text("5")
        self.label, self.t0 = label[:110], now

    def emit(self, record: logging.LogRecord) -> None:
        self.mark(record.getMessage())


def _stage(stage: str, model: str, calib: str, work: Path) -> dict[str, Any]:
    import numpy  # noqa: F401  (imported before the first mark, like the rest)
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401

    from quantpipe.calibration import calibrate_tables_in_memory
    from quantpipe.data import open_dataset
    from quantpipe.model import load_model_spec
    from quantpipe.onnxgraph import load_onnx
    from quantpipe.quantize import QuantizeOptions, write_qdq_model
    from quantpipe.quantize.range_search import choose_ranges

    meter = PhaseMeter()
    logging.getLogger("quantpipe").addHandler(meter)
    logging.getLogger("quantpipe").setLevel(logging.INFO)
    spec, _ = load_model_spec(model)
    ds = open_dataset(calib, spec.inputs, role="calibration")
    options = QuantizeOptions()
    meter.mark(f"{stage}: begin")
    if stage == "calibrate":
        tables = calibrate_tables_in_memory(model, ds, methods=METHODS, batch_size=32, device="cpu")
        meter.mark("calibrate: end")
        (work / "tables.json").write_text(json.dumps(tables))
    elif stage == "auto":
        tables = json.loads((work / "tables.json").read_text())
        amax = choose_ranges(load_onnx(model), tables, options, ds, batch_size=32).amax
        meter.mark("auto: end")
        (work / "amax.json").write_text(json.dumps(amax))
    else:
        amax = json.loads((work / "amax.json").read_text())
        write_qdq_model(model, amax, work / "int8.onnx", options, calibration_data=ds, batch_size=32)
        meter.mark("write: end")
    meter.mark("exit")
    return {"stage": stage, "vm_hwm_mib": round(max(p["peak_mib"] for p in meter.phases), 1),
            "phases": meter.phases[1:]}


def run_model(key: str, bench: Path) -> list[dict[str, Any]]:
    model, calib = (str(bench / p) if not Path(p).is_absolute() else p for p in MODELS[key])
    out = []
    with tempfile.TemporaryDirectory(prefix="memphases-") as tmp:
        for stage in STAGES:
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--child", stage, model, calib, tmp],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{key} {stage} failed: {proc.stderr[-3000:]}")
            rec = json.loads(Path(tmp, f"{stage}.json").read_text())
            rec["wall_s"] = round(time.perf_counter() - t0, 1)
            out.append(rec)
            print(f"{key} {stage}: peak {rec['vm_hwm_mib']} MiB, {rec['wall_s']} s", file=sys.stderr, flush=True)
            for p in rec["phases"]:
                print(f"    {p['peak_mib']:8.1f} MiB peak {p['end_rss_mib']:8.1f} end {p['seconds']:7.2f} s  {p['phase']}",
                      file=sys.stderr, flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bench", type=Path, default=Path("."), help="the open benchmark set (manifest.json's folder)")
    p.add_argument("--models", default="effnet_lite0,minilm_l6")
    p.add_argument("--json", type=Path, help="write the phases here")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        stage, model, calib, work = args.child
        rec = _stage(stage, model, calib, Path(work))
        Path(work, f"{stage}.json").write_text(json.dumps(rec))
        return 0
    results = {k.strip(): run_model(k.strip(), args.bench) for k in args.models.split(",") if k.strip()}
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
