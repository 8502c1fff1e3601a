"""quantpipe's INT8 against NVIDIA ModelOpt's, side by side, on the open set, the ResNet-18 anchor and the digits CNN.

    python benchmarks/modelopt_compare.py --bench /path/to/.bench       # after `quantpipe setup modelopt`
    python benchmarks/modelopt_compare.py --bench .bench --modelopt-python /opt/mo/bin/python --write-results

Per model, each in a process of its own (so its peak RSS is its own, read from `os.wait4`):

- quantpipe, in two stages as the CLI runs them, each in its own process: calibration (the histograms and every
  method's amax, what `quantpipe calibrate` computes), then quantize from those tables (`quantpipe quantize`):
  `calibration.use: auto`, the default (the per-tensor range search by output effect), and `use: best` (the fast
  choice: per tensor the method with the least histogram MSE), unless --no-best; each writes the Q/DQ model with
  the calibration data (per-channel statistics, the split search, the rewrites);
- ModelOpt `entropy` and `max`: `modelopt.onnx.quantization.quantize` on the same calibration samples, on CPU
  (quantpipe's ModelOpt worker, one job per process; `high_precision_dtype=fp32`);
- ModelOpt placement with quantpipe's scales: the same, with quantpipe's `auto` scales as a TensorRT cache
  (`calibration_cache_path`), what the pipeline's `modelopt-int8-qpscales` does.

The ResNet-18-shaped anchor model (`resnet18`) is the one benchmarks/calibration.py builds (BasicBlocks
[2, 2, 2, 2], BatchNorm statistics from forward passes on the data, smooth-noise 3x224x224 images, fixed seeds): built
once into --anchor-dir by ModelOpt's interpreter, which has torch (quantpipe's environment need not), from 256
images; the first 64 calibrate, the last 64 evaluate.

Every INT8 model then runs on onnxruntime CPU with the Q/DQ arithmetic exact (`session.qdqisint8allowed`, no graph
optimisation) and is scored against the FP32 model: the task metric (EfficientNet-Lite0 and digits: top-1 agreement;
MiniLM: mean cosine of the sentence embedding) and the output SQNR. Time is each process's wall time (ModelOpt's
includes importing torch and ModelOpt: "import" says how much); peak RSS its own VmHWM. ModelOpt does calibration
and Q/DQ placement in one process: compare it with quantpipe's calibration row (the like stage) and its quantize
rows. --no-modelopt runs quantpipe's rows alone. The section "ModelOpt side by side" of
benchmarks/RESULTS.md is written with --write-results (the rest of the file is left as it is).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BEGIN = "<!-- modelopt:begin (benchmarks/modelopt_compare.py --write-results writes this block; edit the script) -->"
END = "<!-- modelopt:end -->"
SECTION = "## ModelOpt side by side (issue 17)"

MODELS = {
    # key: (title, model, calib, eval, output, metric)
    "effnet_lite0": ("EfficientNet-Lite0", "effnet_lite0/model.onnx", "effnet_lite0/calib.npz", "effnet_lite0/eval.npz",
                     "logits", "top1_agreement"),
    "minilm_l6": ("all-MiniLM-L6-v2", "minilm_l6/model.onnx", "minilm_l6/calib.npz", "minilm_l6/eval.npz",
                  "sentence_embedding", "cosine"),
    "resnet18": ("ResNet-18-shaped anchor (benchmarks/calibration.py's)", "resnet18.onnx", "calib.npz", "eval.npz",
                 "logits", "top1_agreement"),
    "digits": ("digits CNN (bundled)", str(ROOT / "examples/digits/digits_cnn.onnx"), str(ROOT / "calib_data/digits/calib.npz"),
               str(ROOT / "calib_data/digits/eval.npz"), "logits", "top1_agreement"),
}


ANCHOR_IMAGES = 256
ANCHOR_SPLIT = 64  # calibration: the first 64 images; evaluation: the last 64


def _anchor(folder: Path, python: str | None) -> Path:
    """The ResNet-18-shaped anchor (benchmarks/calibration.py's `build`, in an interpreter with torch: ModelOpt's by
    default) and its calibration / evaluation splits, built once into `folder`; the folder."""
    model, calib, eval_npz = (folder / MODELS["resnet18"][k] for k in (1, 2, 3))
    if not (model.is_file() and calib.is_file() and eval_npz.is_file()):
        if python is None:
            raise RuntimeError(f"the anchor model is not built in {folder} and building it needs torch: give "
                               "--modelopt-python (or --torch-python) an interpreter that has it")
        code = ("import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
                "from benchmarks.calibration import build; build(Path(sys.argv[2]), int(sys.argv[3]))")
        subprocess.run([python, "-c", code, str(ROOT), str(folder), str(ANCHOR_IMAGES)], check=True)
        images = folder / f"images_{ANCHOR_IMAGES}.npz"
        with np.load(images) as z:
            x = z["input"]
        for path, part in ((calib, x[:ANCHOR_SPLIT]), (eval_npz, x[-ANCHOR_SPLIT:])):
            tmp = path.with_suffix(".tmp.npz")
            with open(tmp, "wb") as fh:
                np.savez(fh, input=part)
            os.replace(tmp, path)
        images.unlink()
    return folder


def _child_quantpipe(model: str, calib: str, out_dir: str, stage: str = "calibrate") -> int:
    """One stage of quantpipe's INT8, in a process of its own so that its peak RSS is its own.

    `calibrate`: the histograms and every method's amax (what `quantpipe calibrate` computes), into tables.json;
    `auto` / `best`: from those tables, the ranges of `quantpipe quantize --method <stage>` (`auto`: the default,
    the range search; `best`: per tensor the method with the least histogram MSE) and the Q/DQ model written with
    the calibration data (statistics, split search, rewrites): int8.onnx and scales.cache into out_dir."""
    from quantpipe.calibration import calibrate_tables_in_memory
    from quantpipe.calibration.cache import write_trt_cache
    from quantpipe.data import open_dataset
    from quantpipe.model import load_model_spec
    from quantpipe.onnxgraph import load_onnx
    from quantpipe.quantize import QuantizeOptions, write_qdq_model
    from quantpipe.quantize.range_search import choose_ranges

    start = time.perf_counter()
    spec, _ = load_model_spec(model)
    del _
    ds = open_dataset(calib, spec.inputs, role="calibration")
    options = QuantizeOptions()
    tables_path = Path(out_dir) / "tables.json"
    if stage == "calibrate":
        tables = calibrate_tables_in_memory(model, ds, methods=["entropy", "minmax", "percentile", "mse", "best"],
                                            batch_size=32, device="cpu")
        tables_path.write_text(json.dumps(tables))
    else:
        tables = json.loads(tables_path.read_text())
        amax = choose_ranges(load_onnx(model), tables, options, ds, batch_size=32).amax if stage == "auto" else tables[stage]
        out = Path(out_dir) / stage
        out.mkdir(exist_ok=True)
        write_qdq_model(model, amax, out / "int8.onnx", options, calibration_data=ds, batch_size=32)
        write_trt_cache(out / "scales.cache", dict(sorted(amax.items())), method="entropy")
    Path(out_dir, f"child-{stage}.json").write_text(json.dumps({"seconds": time.perf_counter() - start,
                                                                "peak_rss_bytes": _vm_hwm()}))
    return 0


def _vm_hwm() -> int | None:
    """This process's own peak RSS (Linux VmHWM); `os.wait4`'s ru_maxrss of a child also counts the memory the parent
    had when it spawned it (Linux keeps that peak across exec), which dwarfs a small child."""
    with contextlib.suppress(OSError, StopIteration):
        line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    return None


def _measured(cmd: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, stderr) of one child process."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        err.seek(0)
        text = err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])}... failed ({proc.returncode}): {text[-3000:]}")
    return wall, int(usage.ru_maxrss) * 1024, text


def _outputs(model: str, eval_npz: str, output: str, int8: bool) -> np.ndarray:
    import onnx

    from quantpipe.ortsession import ort_session

    sess = ort_session(onnx.load(model), int8=int8, optimize=not int8)
    names = [i.name for i in sess.get_inputs()]
    with np.load(eval_npz) as z:
        arrays = {k: z[k] for k in names}
    n = next(iter(arrays.values())).shape[0]
    return np.concatenate([sess.run([output], {k: v[i:i + 16] for k, v in arrays.items()})[0] for i in range(0, n, 16)])


def _score(out: np.ndarray, ref: np.ndarray, metric: str) -> dict[str, float]:
    from quantpipe import metrics as M

    value = M.top1_agreement(out, ref) if metric == "top1_agreement" else M.mean_cosine(out, ref)
    return {"metric": float(value), "sqnr_db": float(M.sqnr_db(out, ref))}


def _bench_one(key: str, bench: Path, mo_python: str | None, work: Path, log: Any, with_best: bool = True) -> dict[str, Any]:
    """`bench`: the folder the model's relative paths are in (the open set's, or the anchor's)."""
    from quantpipe.backends.modelopt.build import WORKER

    title, model, calib, eval_npz, output, metric = MODELS[key]
    model, calib, eval_npz = (str(bench / p) if not Path(p).is_absolute() else p for p in (model, calib, eval_npz))
    out = work / key
    out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    ref = _outputs(model, eval_npz, output, int8=False)
    rows: list[dict[str, Any]] = []
    stages = [("calibrate", "quantpipe calibration (histograms + amax)"), ("auto", "quantpipe quantize, default (auto)")]
    if with_best:
        stages.append(("best", "quantpipe quantize, `use: best`"))
    for stage, label in stages:
        wall, rss, _ = _measured([sys.executable, __file__, "--child-quantpipe", model, calib, str(out),
                                  "--child-stage", stage])
        rss = json.loads((out / f"child-{stage}.json").read_text()).get("peak_rss_bytes") or rss
        row: dict[str, Any] = {"variant": label, "stage": stage, "wall_s": wall, "peak_rss_bytes": rss}
        if stage != "calibrate":
            row.update(_score(_outputs(str(out / stage / "int8.onnx"), eval_npz, output, int8=True), ref, metric))
        rows.append(row)
        log(f"{key}: {rows[-1]}")
    for name, method, cache in (("ModelOpt entropy", "entropy", None), ("ModelOpt max", "max", None),
                                ("ModelOpt placement, quantpipe scales", "entropy", str(out / "auto" / "scales.cache"))
                                ) if mo_python else ():
        tag = name.split()[-1] if cache is None else "qpscales"
        job = {"mode": "int8-qpscales" if cache else "int8", "model": model, "calibration_data": calib,
               "calibration_method": method, "calibration_cache": cache,
               "output": str(out / f"mo-{tag}.onnx"), "report": str(out / f"mo-{tag}.json")}
        (out / f"mo-{tag}.job.json").write_text(json.dumps({"jobs": [job]}))
        wall, rss, tail = _measured([mo_python, str(WORKER), str(out / f"mo-{tag}.job.json")])
        rep = json.loads((out / f"mo-{tag}.json").read_text())
        rss = rep.get("peak_rss_bytes") or rss  # the worker's own VmHWM
        imported = next((ln.split()[-2] for ln in tail.splitlines() if ln.startswith("modelopt imported in")), None)
        rows.append({"variant": name, "wall_s": wall, "peak_rss_bytes": rss, "modelopt_seconds": rep["seconds"],
                     "import_s": float(imported) if imported else None, "qdq": rep["quantize_linear"],
                     **_score(_outputs(str(out / f"mo-{tag}.onnx"), eval_npz, output, int8=True), ref, metric)})
        log(f"{key}: {rows[-1]}")
    return {"title": title, "metric": metric, "rows": rows, "measured": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "rss": "VmHWM of each process", "load": [round(load_before, 1), round(os.getloadavg()[0], 1)]}


def _machine(mo_python: str | None) -> dict[str, Any]:
    import onnxruntime

    cpu = platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    mo = [] if mo_python is None else subprocess.run([mo_python, "-c", "import importlib.metadata as m; print(m.version('nvidia-modelopt'), "
                         "m.version('torch'), m.version('onnxruntime-gpu'))"], capture_output=True, text=True).stdout.split()
    return {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu,
            "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "modelopt": mo[0] if mo else None,
            "modelopt_torch": mo[1] if len(mo) > 1 else None, "modelopt_ort": mo[2] if len(mo) > 2 else None}


def _markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [BEGIN, "", f"Measured {m['date']} on {m['cpu']}, {m['cores']} cores, **shared with other jobs** (times are "
             f"noisy; read them as rough): quantpipe on Python {m['python']}, onnxruntime {m['onnxruntime']}; "
             + (f"ModelOpt {m['modelopt']} (torch {m['modelopt_torch']}, onnxruntime-gpu {m['modelopt_ort']} on CPU) in its "
                "own venv. " if m.get("modelopt") else "ModelOpt not run (--no-modelopt). ")
             + "quantpipe's calibration and quantize stages ran each in a process of its own (ModelOpt's one process does both). "
             "Peak RSS is each process's own: VmHWM where the table says so, "
             "else `os.wait4`'s ru_maxrss, which also counts the benchmark process's memory at the time it spawned the "
             "child (Linux keeps that peak across exec): a floor of up to 577 MiB, below every such number shown. INT8 models run "
             "on onnxruntime CPU with the Q/DQ arithmetic exact; the metric and SQNR are against the FP32 model's "
             "output on the evaluation split. `python benchmarks/modelopt_compare.py --bench .bench --write-results`.", ""]
    for key, r in sorted(results["models"].items(), key=lambda kv: list(MODELS).index(kv[0]) if kv[0] in MODELS else 99):
        label = "top-1 agreement" if r["metric"] == "top1_agreement" else "cosine"
        when = f", measured {r['measured']}" if r.get("measured") else ""
        if r.get("load"):
            when += f"; 1-min load average {r['load'][0]:g} before, {r['load'][1]:g} after, on {m['cores']} cores"
        lines += [f"**{r['title']}** ({key}{when}; peak RSS: {r.get('rss', 'os.wait4 ru_maxrss')})", "", f"| variant | {label} | SQNR dB | wall s | of it: import s | peak RSS MiB |",
                  "|---|---|---|---|---|---|"]
        for row in r["rows"]:
            imp = f"{row['import_s']:.1f}" if row.get("import_s") is not None else "—"
            metric = f"{row['metric']:.4f} | {row['sqnr_db']:.1f}" if "metric" in row else "— | —"
            lines.append(f"| {row['variant']} | {metric} | {row['wall_s']:.1f} | {imp} | "
                         f"{row['peak_rss_bytes'] / 2**20:.0f} |")
        lines.append("")
    return "\n".join([*lines, END])


def _write_results(md: str) -> None:
    path = ROOT / "benchmarks" / "RESULTS.md"
    text = path.read_text(encoding="utf-8")
    if BEGIN.split(" (")[0] in text:
        head, rest = text.split(BEGIN.split(" (")[0], 1)
        text = head + md + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\n{md}\n"
    path.write_text(text, encoding="utf-8")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bench", type=Path, help="the open benchmark set (manifest.json's folder)")
    p.add_argument("--models", default="effnet_lite0,minilm_l6,resnet18,digits")
    p.add_argument("--anchor-dir", type=Path, default=ROOT / ".bench" / "calib-bench",
                   help="where the ResNet-18 anchor and its data are built (once)")
    p.add_argument("--torch-python", help="an interpreter with torch to build the anchor (default: ModelOpt's)")
    p.add_argument("--modelopt-python", help="ModelOpt's interpreter (default: the `quantpipe setup modelopt` venv)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "modelopt_results.json")
    p.add_argument("--write-results", action="store_true", help="rewrite the section of benchmarks/RESULTS.md")
    p.add_argument("--no-best", action="store_true", help="leave out the `calibration.use: best` row")
    p.add_argument("--no-modelopt", action="store_true", help="quantpipe's rows only")
    p.add_argument("--merge", type=Path, help="keep the other models' results from this earlier --out JSON")
    p.add_argument("--child-quantpipe", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--child-stage", default="calibrate", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_quantpipe:
        return _child_quantpipe(*args.child_quantpipe, stage=args.child_stage)
    from quantpipe.backends.modelopt.env import find_modelopt

    env = find_modelopt(args.modelopt_python)
    if not env.available and not args.no_modelopt:
        print(f"ModelOpt is not available: {env.reason} (--no-modelopt runs quantpipe's rows alone)", file=sys.stderr)
        return 3
    mo_python = None if args.no_modelopt else str(env.python)
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    if any(k not in ("digits", "resnet18") for k in keys) and args.bench is None:
        p.error("--bench is needed for the open set's models")
    results: dict[str, Any] = {"machine": _machine(mo_python), "models": {}}
    if args.merge:  # earlier results of the models not re-run now (each row says when it was measured)
        old = json.loads(args.merge.read_text())
        results["models"] = {k: {"measured": f"in the run started {old['machine']['date']}", **v}
                             for k, v in old["models"].items() if k not in keys}
    with tempfile.TemporaryDirectory(prefix="modelopt-compare-") as tmp:
        for key in keys:
            folder = (_anchor(args.anchor_dir, args.torch_python or (str(env.python) if env.available else None))
                      if key == "resnet18" else args.bench or Path("."))
            results["models"][key] = _bench_one(key, folder, mo_python, Path(tmp),
                                                lambda s: print(s, file=sys.stderr, flush=True), not args.no_best)
    args.out.write_text(json.dumps(results, indent=1))
    md = _markdown(results)
    print(md)
    if args.write_results:
        _write_results(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
