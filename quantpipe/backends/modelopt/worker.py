"""The script ModelOpt's interpreter runs: `python worker.py JOB.json` (quantpipe.backends.modelopt.build writes the job).

It runs in ModelOpt's own environment, where quantpipe is not installed, so it imports nothing of quantpipe and
only the standard library at module level (numpy, onnx and modelopt are imported in `main`, in that interpreter;
quantpipe's `deps.require()` does not exist there). Each job of JOB.json's `jobs` says:

- `mode`: `int8` (ModelOpt's calibration with `calibration_method`), `int8-qpscales` (the same, then the activation
  scales of `calibration_cache`, a TensorRT cache, through ModelOpt's placement) or `fp16` (AutoCast);
- `model`: the FP32 ONNX model; `calibration_data`: an .npz of one stacked array per model input;
- `output`, `report`: where the produced model and the JSON of what was done go, each written to a temporary name
  in its folder and renamed into place (a failed or interrupted run leaves neither).

ModelOpt's log goes to stderr, which the caller keeps and shows the tail of on failure.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _replace_into(tmp: Path, dest: Path) -> None:
    os.replace(tmp, dest)


def _peak_rss_bytes() -> int:
    """This process's peak resident set since it started this program (Linux: VmHWM). Not getrusage's ru_maxrss:
    across exec Linux keeps the peak of the memory the process had before, which for a child spawned with vfork is
    the parent's (a 580 MiB parent made every small child read 580 MiB)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    unit = 1 if sys.platform == "darwin" else 1024
    return unit * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _op_counts(model: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _quantize(job: dict[str, Any], tmp_out: Path) -> dict[str, Any]:
    import numpy as np
    from modelopt.onnx.quantization import quantize

    with np.load(job["calibration_data"]) as npz:
        data = {k: npz[k] for k in npz.files}
    cache = job.get("calibration_cache") if job["mode"] == "int8-qpscales" else None
    quantize(
        onnx_path=job["model"], quantize_mode="int8", calibration_data=data,
        calibration_method=job["calibration_method"], calibration_cache_path=cache, calibration_eps=["cpu"],
        high_precision_dtype="fp32", output_path=str(tmp_out), log_level="WARNING",
    )
    return {"calibration_method": job["calibration_method"], "calibration_cache": cache,
            "calibration_samples": int(next(iter(data.values())).shape[0]) if data else 0}


def _autocast(job: dict[str, Any], tmp_out: Path) -> dict[str, Any]:
    import onnx
    from modelopt.onnx.autocast import convert_to_mixed_precision

    model = convert_to_mixed_precision(
        onnx_path=job["model"], low_precision_type="fp16", keep_io_types=True,
        calibration_data=job["calibration_data"], providers=["cpu"],
    )
    onnx.save(model, str(tmp_out))
    return {"low_precision_type": "fp16", "keep_io_types": True}


def _private_copy(model: str, folder: Path) -> str:
    """The model and its external-data files copied into `folder`: ModelOpt rewrites the model it is given (seen:
    the bundled example's file changed on disk), and the user's model is not ours to change."""
    import onnx

    src = Path(model)
    proto = onnx.load(str(src), load_external_data=False)
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    for loc in locations:
        (folder / loc).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src.parent / loc, folder / loc)
    shutil.copyfile(src, folder / src.name)
    return str(folder / src.name)


def _one(job: dict[str, Any]) -> None:
    import modelopt
    import onnx

    start = time.perf_counter()
    out, report = Path(job["output"]), Path(job["report"])
    tmp_out = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp_report = report.with_name(f".{report.name}.{os.getpid()}.tmp")
    try:
        with tempfile.TemporaryDirectory(prefix=".modelopt-input-", dir=out.parent) as private:
            job = {**job, "model": _private_copy(job["model"], Path(private))}
            did = _autocast(job, tmp_out) if job["mode"] == "fp16" else _quantize(job, tmp_out)
        produced = onnx.load(str(tmp_out), load_external_data=False)
        counts = _op_counts(produced)
        doc = {
            "mode": job["mode"], "modelopt": modelopt.__version__, "onnx": onnx.__version__,
            "python": sys.version.split()[0], "seconds": round(time.perf_counter() - start, 3),
            "peak_rss_bytes": _peak_rss_bytes(), "nodes": len(produced.graph.node),
            "quantize_linear": counts.get("QuantizeLinear", 0), "dequantize_linear": counts.get("DequantizeLinear", 0),
            "casts": counts.get("Cast", 0), **did,
        }
        tmp_report.write_text(json.dumps(doc, indent=1, sort_keys=True), encoding="utf-8")
        _replace_into(tmp_out, out)
        _replace_into(tmp_report, report)
    finally:
        for tmp in (tmp_out, tmp_report):
            if tmp.exists():
                tmp.unlink()


def main(argv: list[str]) -> int:
    """Run every job of JOB.json (`{"jobs": [...]}`) in order, in this one process: ModelOpt's import (torch) costs
    seconds, paid once. `peak_rss_bytes` is this process's peak so far (run one job per process to measure one)."""
    if len(argv) != 2:
        print("usage: worker.py JOB.json", file=sys.stderr)
        return 2
    start = time.perf_counter()
    jobs = json.loads(Path(argv[1]).read_text(encoding="utf-8"))["jobs"]
    import modelopt.onnx.quantization  # noqa: F401  (the import's cost, once, reported below)

    print(f"modelopt imported in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    for job in jobs:
        _one(job)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
