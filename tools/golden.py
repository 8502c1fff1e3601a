"""Golden check: a refactor must write the same artifacts, byte for byte.

Runs the bundled example (``quantpipe run pipeline.yaml``, as it is and with GPTQ and the accuracy fallback) and ``quantpipe calibrate`` / ``quantpipe quantize``
(INT8 with methods entropy and best, split activations and GPTQ on and off, and ``--fp16``) on the open benchmark
set, each in a fresh temporary workspace, and records the sha256 of every artifact they write:

- ONNX models and TensorRT calibration caches: their bytes;
- ``.npz`` files: the name, dtype, shape and bytes of each array (the zip container stamps the time);
- JSON files: the document with run-dependent fields removed (timestamps, durations, latencies, the environment)
  and the workspace's path replaced by ``<root>``.

Where a run has them, the per-layer sensitivity table and the fallback's steps are also recorded as they are
(``<job>/sensitivity``, ``<job>/fallback``: every number as ``float.hex``), not only hashed inside results.json, so a
check that fails on them prints what changed. ``effnet_fallback`` runs ``quantpipe run`` on EfficientNet-Lite0 of
the open set (24 calibration and evaluation samples, ``build.fallback: {metric: top1_agreement, min: 0.99}``,
sensitivity on).

    python tools/golden.py record .golden/before.json [--bench .bench] [--only example,effnet_lite0,minilm_l6]
    python tools/golden.py check .golden/before.json  [--bench .bench] [--only ...]

``--src DIR`` runs the quantpipe package of another tree (e.g. a ``git worktree`` of the commit before a
refactor), so both sides are measured with one script and one environment.

``check`` re-runs the same commands and exits 1 when any artifact differs (it names each one), 0 when all are
identical. Hashes are of this machine's floating point: record and check on the same machine. The open set is
built by ``shared/bench/build.sh`` (``--bench`` points at its output); without it only the example runs.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent

# Fields whose values differ between two runs of the same inputs (wall clock, machine, timings).
VOLATILE_KEYS = frozenset({"created", "seconds", "latency", "environment", "wall_seconds", "stage_seconds",
                           "elapsed", "duration_s", "timings"})
# Artifacts that are renderings of results.json plus latencies (checked through results.json instead).
SKIPPED_SUFFIXES = (".html", ".md", ".csv", ".xml", ".png", ".svg", ".log")

# quantize cases on the open set: (label, extra CLI arguments).
QUANTIZE_CASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("entropy", ("--method", "entropy")),
    ("entropy-nosplit", ("--method", "entropy", "--split-activations", "off")),
    ("best", ("--method", "best")),
    ("best-nosplit", ("--method", "best", "--split-activations", "off")),
    ("best-gptq", ("--method", "best", "--weight-rounding", "gptq")),
    ("best-gptq-nosplit", ("--method", "best", "--weight-rounding", "gptq", "--split-activations", "off")),
)
OPEN_MODELS = ("effnet_lite0", "minilm_l6")
EXAMPLE_JOBS = ("example", "example-fallback")
SEARCH_JOBS = ("effnet_fallback",)
SEARCH_SAMPLES = 24


BUSY_WARNING = "latency is being measured on a busy machine"
"""evaluate's warning when other work loads the machine: present or not by the load, left out of the digests."""


def _normalize(value: Any, root: str) -> Any:
    if isinstance(value, dict):
        return {k: _normalize(v, root) for k, v in sorted(value.items())
                if k not in VOLATILE_KEYS and not k.endswith(("_ms", "_seconds"))}
    if isinstance(value, list):  # the busy-machine warning comes with the neighbours' load, not with the code
        return [_normalize(v, root) for v in value if not (isinstance(v, str) and BUSY_WARNING in v)]
    if isinstance(value, str):  # the run's warnings can say how busy the machine was
        return re.sub(r"load average [0-9.]+", "load average <n>", value.replace(root, "<root>"))
    return value


def digest(path: Path, root: Path) -> str:
    """The sha256 of what the artifact means (see the module docstring for each kind)."""
    h = hashlib.sha256()
    if path.suffix == ".json":
        doc = _normalize(json.loads(path.read_text()), str(root.resolve()))
        h.update(json.dumps(doc, sort_keys=True).encode())
    elif path.suffix == ".npz":
        with zipfile.ZipFile(path) as zf:
            for name in sorted(zf.namelist()):
                arr = np.load(io.BytesIO(zf.read(name)), allow_pickle=False)
                h.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
                h.update(np.ascontiguousarray(arr).tobytes())
    else:
        h.update(path.read_bytes())
    return h.hexdigest()


def _artifacts(folder: Path) -> Iterator[Path]:
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink() and not p.name.endswith(SKIPPED_SUFFIXES) and ".work" not in p.parts:
            yield p


SOURCE = REPO  # the quantpipe tree whose code runs (--src)


def _quantpipe(args: list[str], cwd: Path) -> None:
    # The package is imported from SOURCE, whatever is installed: record with one tree, check with another.
    boot = f"import sys; sys.path.insert(0, {str(SOURCE)!r}); from quantpipe.cli import main; sys.exit(main())"
    cmd = [sys.executable, "-c", boot, *args, "-q"]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    # `run` exits 1 when the gate fails: that is an outcome to record, not a crash.
    if proc.returncode not in (0, 1):
        raise SystemExit(f"golden: `{' '.join(cmd)}` failed with exit {proc.returncode}:\n{proc.stderr[-3000:]}")


def run_example(work: Path, job: str) -> dict[str, str]:
    """The bundled example as it is (``example``), or with GPTQ and the accuracy fallback (``example-fallback``)."""
    for item in ("pipeline.yaml", "examples", "calib_data"):
        src = REPO / item
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, work / item)
    if job == "example-fallback":
        cfg = yaml.safe_load((work / "pipeline.yaml").read_text())
        cfg["build"]["quantize"]["weight_rounding"] = "gptq"
        # A cosine this close to 1 is out of reach with any layer quantized: the search keeps max_layers layers.
        cfg["build"]["fallback"] = {"metric": "cosine", "min": 0.99999999, "max_layers": 2}
        (work / "pipeline.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return _run_pipeline(work, job)


def _run_pipeline(work: Path, job: str) -> dict[str, str]:
    _quantpipe(["run", "pipeline.yaml", "--run-id", "golden"], work)
    run = work / "reports" / "golden"
    out = {f"{job}/{p.relative_to(run)}": digest(p, work) for p in _artifacts(run)}
    return {**out, **search_results(run / "results.json", job)}


def _hex(x: Any) -> Any:
    return float(x).hex() if isinstance(x, float) else x


def search_results(results: Path, job: str) -> dict[str, str]:
    """The sensitivity table and the fallback's steps of a run, as they are (numbers as float.hex)."""
    if not results.is_file():
        return {}
    doc = json.loads(results.read_text())
    out = {}
    sens = doc.get("sensitivity") or []
    if sens:
        rows = [[r.get("node"), r.get("op_type"), r.get("tensor"), _hex(r.get("sqnr_db")), _hex(r.get("output_metric")),
                 r.get("metric_name")] for r in sens]
        out[f"{job}/sensitivity"] = json.dumps(rows)
    fb = doc.get("fallback")
    if fb:
        steps = [[s.get("node"), _hex(s.get("metric_before")), _hex(s.get("metric_after"))] for s in fb.get("steps", [])]
        out[f"{job}/fallback"] = json.dumps({"kept": [s[0] for s in steps], "steps": steps, "met": fb.get("met"),
                                             "initial": _hex(fb.get("initial")), "final": _hex(fb.get("final"))})
    return out


def run_search_case(bench: Path, work: Path, job: str) -> dict[str, str]:
    """``quantpipe run`` on EfficientNet-Lite0 with the accuracy fallback and the sensitivity analysis."""
    src = bench / "effnet_lite0"
    for split in ("calib", "eval"):
        with np.load(src / f"{split}.npz") as d:
            np.savez(work / f"{split}.npz", **{k: d[k][:SEARCH_SAMPLES] for k in d.files})
    cfg = {
        "version": 1, "name": "golden-effnet-fallback",
        "model": {"path": str(src / "model.onnx"), "output": "logits"},
        "data": {"calibration": {"path": "calib.npz"}, "evaluation": {"path": "eval.npz", "labels": "fp32_top1"},
                 "batch_size": 8},
        "calibration": {"methods": ["entropy", "minmax"], "use": "entropy", "device": "cpu"},
        "build": {"backends": {"onnxruntime": {"precisions": ["fp32", "int8"], "device": "cpu"},
                               "tensorrt": {"enabled": False}},
                  "fallback": {"metric": "top1_agreement", "min": 0.99}},
        "evaluate": {"metrics": ["top1_agreement", "sqnr_db"], "latency": {"enabled": False},
                     "sensitivity": {"enabled": True}},
        "report": {"dir": "reports", "formats": ["json"]},
    }
    (work / "pipeline.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return _run_pipeline(work, job)


def run_open_model(bench: Path, name: str, work: Path) -> dict[str, str]:
    model, calib = bench / name / "model.onnx", bench / name / "calib.npz"
    out: dict[str, str] = {}
    cache = work / "calib.cache"
    _quantpipe(["calibrate", "--model", str(model), "--data", str(calib), "--method", "entropy", "--method", "minmax",
                "--method", "percentile", "--method", "mse", "--cache", str(cache)], work)
    for p in _artifacts(work):
        out[f"{name}/calibrate/{p.relative_to(work)}"] = digest(p, work)
    for label, extra in QUANTIZE_CASES:
        dst = work / f"{label}.int8.onnx"
        _quantpipe(["quantize", "--model", str(model), "--data", str(calib), "--out", str(dst), *extra], work)
        out[f"{name}/quantize/{label}.int8.onnx"] = digest(dst, work)
    fp16 = work / "model.fp16.onnx"
    _quantpipe(["quantize", "--model", str(model), "--fp16", "--out", str(fp16)], work)
    out[f"{name}/quantize/model.fp16.onnx"] = digest(fp16, work)
    return out


def collect(bench: Path | None, only: set[str] | None) -> dict[str, str]:
    digests: dict[str, str] = {}
    jobs: list[str] = [*EXAMPLE_JOBS, *OPEN_MODELS, *SEARCH_JOBS]
    for job in jobs:
        if only is not None and job not in only:
            continue
        model = "effnet_lite0" if job in SEARCH_JOBS else job
        if job not in EXAMPLE_JOBS and (bench is None or not (bench / model / "model.onnx").is_file()):
            print(f"golden: {job}: skipped (no open set at {bench}; build it with shared/bench/build.sh)")
            continue
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"golden-{job}-") as tmp:
            work = Path(tmp)
            if job in EXAMPLE_JOBS:
                found = run_example(work, job)
            elif job in SEARCH_JOBS:
                found = run_search_case(bench.resolve(), work, job)  # type: ignore[union-attr]
            else:
                found = run_open_model(bench.resolve(), job, work)  # type: ignore[union-attr]
        print(f"golden: {job}: {len(found)} artifacts in {time.perf_counter() - t0:.0f} s")
        digests.update(found)
    return digests


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["record", "check"])
    p.add_argument("file", type=Path, help="the recorded digests (JSON)")
    p.add_argument("--bench", type=Path, default=REPO / ".bench", help="the open set (shared/bench/build.sh output)")
    p.add_argument("--only", help="comma-separated subset of: " + ",".join((*EXAMPLE_JOBS, *OPEN_MODELS, *SEARCH_JOBS)))
    p.add_argument("--src", type=Path, default=REPO, help="the quantpipe source tree to run (default: this one)")
    args = p.parse_args(argv)
    global SOURCE
    SOURCE = args.src.resolve()
    only = set(args.only.split(",")) if args.only else None
    now = collect(args.bench, only)
    if args.mode == "record":
        args.file.parent.mkdir(parents=True, exist_ok=True)
        args.file.write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")
        print(f"golden: recorded {len(now)} artifacts in {args.file}")
        return 0
    before: dict[str, str] = json.loads(args.file.read_text())
    if only is not None:
        before = {k: v for k, v in before.items() if k.split("/", 1)[0] in only}
    changed = sorted(k for k in before.keys() & now.keys() if before[k] != now[k])
    missing, extra = sorted(before.keys() - now.keys()), sorted(now.keys() - before.keys())
    for k in changed:
        print(f"golden: DIFFERS  {k}")
        if k.endswith(("/sensitivity", "/fallback")):  # recorded as they are: say what changed
            print(f"  before: {before[k][:2000]}\n  now:    {now[k][:2000]}")
    for k in missing:
        print(f"golden: MISSING  {k}")
    for k in extra:
        print(f"golden: NEW      {k}")
    same = len(before.keys() & now.keys()) - len(changed)
    print(f"golden: {same} of {len(before)} artifacts identical"
          + ("" if not (changed or missing or extra) else f"; {len(changed)} differ, {len(missing)} missing, {len(extra)} new"))
    return 1 if changed or missing or extra else 0


if __name__ == "__main__":
    raise SystemExit(main())
