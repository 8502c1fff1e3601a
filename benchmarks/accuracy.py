"""INT8 / FP16 accuracy on the open benchmark set: quantpipe against onnxruntime's quantize_static.

    python benchmarks/accuracy.py --bench .bench            # build the set first: bash ../shared/bench/build.sh .bench

For EfficientNet-Lite0 and all-MiniLM-L6-v2 it runs, in one process on ONNX Runtime CPU:

- onnxruntime `quantize_static` (QDQ, per-channel S8 weights, U8 activations, MinMax, after `quant_pre_process`),
  the baseline the issue quotes;
- quantpipe: calibration with `quantpipe.calibration` (histograms once, every method), Q/DQ placement as
  TensorRT wants it, smoothing and bias correction from the calibration data, per method and as ablations;
- quantpipe's per-layer sensitivity (one layer at a time) and the accuracy-driven fallback;
- quantpipe's FP16 model.

It writes the section "INT8 accuracy (open benchmark set)" of benchmarks/RESULTS.md (the other sections are
left as they are) and a JSON with every number beside it.

Metrics follow the set's README: EfficientNet top-1 agreement with the stored FP32 top-1, MiniLM mean cosine of
the sentence embedding with the stored FP32 embedding. INT8 models run with
`quantpipe.ortsession.ORT_INT8_SESSION_CONFIG` unless the row says "default session".
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SECTION = "## INT8 accuracy (open benchmark set)"
BEGIN = "<!-- accuracy:begin (benchmarks/accuracy.py --bench .bench writes this block; edit the script, not the block) -->"
END = "<!-- accuracy:end -->"
METHODS = ("entropy", "minmax", "percentile", "mse", "best")


@dataclasses.dataclass
class Bench:
    key: str
    title: str
    dir: Path
    output: str
    metric: str  # "top1_agreement" | "cosine"
    ref_key: str
    fallback_metric: str
    fallback_target: float

    @property
    def model(self) -> Path:
        return self.dir / "model.onnx"


def _benches(root: Path) -> list[Bench]:
    return [
        Bench("effnet_lite0", "EfficientNet-Lite0", root / "effnet_lite0", "logits", "top1_agreement", "fp32_top1",
              "top1_agreement", 0.99),
        Bench("minilm_l6", "all-MiniLM-L6-v2", root / "minilm_l6", "sentence_embedding", "cosine",
              "fp32_sentence_embedding", "cosine", 0.99),
    ]


def _machine() -> dict[str, Any]:
    import onnx
    import onnxruntime

    cpu = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"model name\s*:\s*(.+)", text)
        cpu = m.group(1).strip() if m else cpu
        fl = re.search(r"flags\s*:\s*(.+)", text)
        flags = set(fl.group(1).split()) if fl else set()
    except OSError:
        pass
    simd = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "simd": simd,
        "python": platform.python_version(),
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
    }


class Evaluator:
    """Runs a model (in memory or on disk) over the eval split and scores it against the stored FP32 reference."""

    def __init__(self, bench: Bench) -> None:
        with np.load(bench.dir / "eval.npz") as z:
            self.arrays = {k: z[k] for k in z.files}
        self.bench = bench
        self.ref = self.arrays[bench.ref_key]
        self.fp32_out: np.ndarray | None = None
        self.last_sqnr: float | None = None

    def outputs(self, sess: Any) -> np.ndarray:
        names = [i.name for i in sess.get_inputs()]
        n = self.ref.shape[0]
        outs = [sess.run([self.bench.output], {k: self.arrays[k][i:i + 16] for k in names})[0] for i in range(0, n, 16)]
        return np.concatenate(outs, axis=0)

    def score(self, out: np.ndarray) -> float:
        from quantpipe import metrics as M

        if self.bench.metric == "top1_agreement":
            return float(np.mean(out.argmax(axis=1) == self.ref))
        return M.mean_cosine(out, self.ref)

    def __call__(self, sess: Any) -> float:
        out = self.outputs(sess)
        if self.fp32_out is None:
            self.fp32_out = out  # the first session scored is the FP32 model's: the SQNR reference
        sq = _sqnr_db(out, self.fp32_out)
        self.last_sqnr = sq if np.isfinite(sq) else None  # identical outputs: no noise to measure
        return self.score(out)


def _sqnr_db(out: np.ndarray, ref: np.ndarray) -> float:
    from quantpipe import metrics as M

    return float(M.sqnr_db(out, ref))


def _session(model: Any, *, mode: str) -> Any:
    """mode: 'int8' (quantpipe's recommended config), 'default' (onnxruntime defaults), 'exact' (no fusions)."""
    import onnxruntime as ort

    from quantpipe.ortsession import ORT_INT8_SESSION_CONFIG

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if mode == "exact":
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if mode == "int8":
        for k, v in ORT_INT8_SESSION_CONFIG.items():
            opts.add_session_config_entry(k, v)
    src = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def _ort_baseline(bench: Bench, tmp: Path) -> Path:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with np.load(bench.dir / "calib.npz") as z:
        calib = {k: z[k] for k in z.files}
    names = list(calib)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            n = calib[names[0]].shape[0]
            self._it = iter([{k: calib[k][i:i + 1] for k in names} for i in range(n)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    pre = tmp / f"{bench.key}.pre.onnx"
    out = tmp / f"{bench.key}.ort_int8.onnx"
    # quant_pre_process leaves its scratch files (sym_shape_infer_temp.onnx, <uuid>.data) in the working
    # directory when symbolic shape inference fails: run it from the temporary folder.
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        try:
            quant_pre_process(str(bench.model), str(pre))
        except Exception:  # symbolic shape inference gives up on the exported BERT graph; ONNX inference suffices
            quant_pre_process(str(bench.model), str(pre), skip_symbolic_shape=True)
    finally:
        os.chdir(cwd)
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    return out


def run_bench(bench: Bench, args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    import onnx

    from quantpipe import quantize as Q
    from quantpipe.calibration import compute_tables
    from quantpipe.calibration.collect import collect_histograms
    from quantpipe.data import open_dataset
    from quantpipe.fallback import accuracy_fallback
    from quantpipe.model import tensor_info
    from quantpipe.sensitivity import layer_sensitivity

    ev = Evaluator(bench)
    model = onnx.load(str(bench.model))
    inputs = [tensor_info(i) for i in model.graph.input]
    calib = open_dataset(bench.dir / "calib.npz", inputs, role="calibration")
    evald = open_dataset(bench.dir / "eval.npz", inputs, role="evaluation")
    rows: list[dict[str, Any]] = []
    res: dict[str, Any] = {"model": bench.title, "metric": bench.metric, "rows": rows,
                           "eval_samples": int(ev.ref.shape[0]), "calib_samples": int(calib.num_samples)}

    def row(name: str, value: float, **extra: Any) -> None:
        # output SQNR against this run's FP32 output (logits / embedding): steadier than agreement on 63 crops
        rows.append({"variant": name, "value": value, "sqnr_db": ev.last_sqnr, **extra})
        log(f"  {bench.key}: {name}: {value:.4f} ({_fmt(ev.last_sqnr, 'db')} dB)")

    row("FP32 (self-check against the stored reference)", ev(_session(model, mode="default")))

    with tempfile.TemporaryDirectory(prefix="qp-acc-") as tmp_s:
        tmp = Path(tmp_s)
        # onnxruntime baseline
        t = time.perf_counter()
        base = _ort_baseline(bench, tmp)
        row("onnxruntime quantize_static (default session)", ev(_session(str(base), mode="default")),
            seconds=round(time.perf_counter() - t, 1))
        row("onnxruntime quantize_static (exact Q/DQ arithmetic, no ORT fusions)", ev(_session(str(base), mode="exact")))

        # quantpipe calibration: histograms once, every method
        t = time.perf_counter()
        stats = collect_histograms(str(bench.model), calib, batch_size=16)
        tables, _ = compute_tables(stats, list(METHODS), percentile=args.percentile)
        amax = {m: {n: a for n, a in tables[m].items() if stats.kinds[n] != "weight"} for m in METHODS}
        cal_s = time.perf_counter() - t
        t = time.perf_counter()
        cstats = Q.collect_channel_stats(model, calib, batch_size=16)
        res["seconds"] = {"histograms_and_methods": round(cal_s, 1),
                          "channel_stats": round(time.perf_counter() - t, 1)}
        # split_activations: auto, as pipeline.yaml and `quantpipe quantize` default to
        t = time.perf_counter()
        base_opts = Q.with_calibration_data(model, Q.QuantizeOptions(channel_stats=cstats, split_activations="auto"),
                                            calib, batch_size=16, amax=amax[args.method])
        res["seconds"]["choose_splits"] = round(time.perf_counter() - t, 1)

        for m in METHODS:
            q, rep = Q.build_qdq_model(model, amax[m], base_opts)
            row(f"quantpipe INT8, {m}", ev(_session(q, mode="int8")), quantized=len(rep.quantized_nodes),
                smoothed=len(rep.smoothed_tensors), bias_corrected=len(rep.bias_corrected))
        head = args.method
        # The headline model goes through the real writer (checker, atomic save), then runs from the file.
        out = tmp / f"{bench.key}.int8.onnx"
        t = time.perf_counter()
        rep = Q.quantize_model(bench.model, amax[head], out, base_opts)
        res["headline"] = {"method": head, "quantized": len(rep.quantized_nodes), "num_quantizable": rep.num_quantizable,
                           "smoothed": list(rep.smoothed_tensors), "bias_corrected": len(rep.bias_corrected),
                           "shifted": len(rep.shifted_tensors), "split": [list(x) for x in rep.split_tensors],
                           "kept_float": len(rep.kept_float), "write_seconds": round(time.perf_counter() - t, 1),
                           "warnings": list(rep.warnings)}
        row(f"quantpipe INT8, {head}, written file", ev(_session(str(out), mode="int8")))
        row(f"quantpipe INT8, {head}, written file, onnxruntime default session", ev(_session(str(out), mode="default")))
        row(f"quantpipe INT8, {head}, written file, exact Q/DQ arithmetic", ev(_session(str(out), mode="exact")))
        for label, opts in (
            ("placement only (no shift, no smoothing, no bias correction)", Q.QuantizeOptions(shift_nonnegative=False)),
            ("placement + non-negative shift", Q.QuantizeOptions()),
            ("placement + shift + bias correction", dataclasses.replace(base_opts, smooth_alpha=None)),
            ("placement + shift + smoothing", dataclasses.replace(base_opts, bias_correction=False)),
            ("headline without the shift", dataclasses.replace(base_opts, shift_nonnegative=False)),
            ("headline without split activations", dataclasses.replace(base_opts, split_activations="off")),
            ("headline without residual-Add Q/DQ", dataclasses.replace(base_opts, quantize_residual_add=False)),
            ("headline without attention (activation x activation) MatMul Q/DQ",
             dataclasses.replace(base_opts, quantize_activation_matmul=False)),
        ):
            q, rep2 = Q.build_qdq_model(model, amax[head], opts)
            row(f"quantpipe INT8, {head}, {label}", ev(_session(q, mode="int8")), quantized=len(rep2.quantized_nodes))
        # GPTQ weight rounding (opt-in): codes fitted to each layer's calibration inputs.
        t = time.perf_counter()
        gptq_opts = Q.with_calibration_data(model, dataclasses.replace(base_opts, weight_rounding="gptq"), calib,
                                            batch_size=16, amax=amax[head])
        res["seconds"]["gptq_codes"] = round(time.perf_counter() - t, 1)
        q, rep2 = Q.build_qdq_model(model, amax[head], gptq_opts)
        row(f"quantpipe INT8, {head}, GPTQ weight rounding ({len(rep2.gptq_rounded)} weights)",
            ev(_session(q, mode="int8")), quantized=len(rep2.quantized_nodes), gptq=len(rep2.gptq_rounded))

        # FP16
        f16 = tmp / f"{bench.key}.fp16.onnx"
        frep = Q.write_fp16_model(bench.model, f16, amax=amax["minmax"])
        row("quantpipe FP16", ev(_session(str(f16), mode="default")))
        res["fp16"] = {"kept_fp32": [f"{k.name} ({k.op_type})" for k in frep.kept_fp32],
                       "out_of_range": [dataclasses.asdict(o) for o in frep.out_of_range],
                       "activation_overflow": len(frep.activation_overflow), "underflow_values": frep.underflow_values}

        # sensitivity (one layer at a time, capped) and fallback
        if not args.skip_sensitivity:
            t = time.perf_counter()
            sens = layer_sensitivity(bench.model, str(out), amax[head], evald, output=bench.output,
                                     one_at_a_time=args.sensitivity_layers or True, max_samples=64, batch_size=16,
                                     options=Q.QuantizeOptions(channel_stats=cstats))
            res["sensitivity_seconds"] = round(time.perf_counter() - t, 1)
            res["sensitivity"] = [dataclasses.asdict(s) for s in sens[: args.top]]
        if not args.skip_fallback:
            for key, label, opts in (("fallback", "", base_opts), ("fallback_gptq", "GPTQ, ", gptq_opts)):
                t = time.perf_counter()
                # Chosen on the calibration data, judged (below) on the evaluation data: never the same samples.
                _, fb = accuracy_fallback(bench.model, amax[head], calib, metric=bench.fallback_metric,  # type: ignore[arg-type]
                                          target=bench.fallback_target, output=bench.output, batch_size=16,
                                          options=opts, keep_in="fp16")
                res[key] = {**dataclasses.asdict(fb), "seconds": round(time.perf_counter() - t, 1)}
                # The fallback judges against the FP32 model run here; score the final model on the stored reference too.
                q, _ = Q.build_qdq_model(model, amax[head], dataclasses.replace(
                    opts, keep_float_nodes=frozenset(s.node for s in fb.steps)))
                row(f"quantpipe INT8, {head}, {label}fallback for {bench.fallback_metric} >= {bench.fallback_target} "
                    f"({len(fb.steps)} of {fb.num_quantizable} layers in float)", ev(_session(q, mode="int8")))
    return res


def _fmt(v: float | None, metric: str) -> str:
    if v is None:
        return "-"
    if metric == "db":
        return f"{v:.1f}"
    return f"{v:.3f}" if metric == "top1_agreement" else f"{v:.4f}"


def render(results: dict[str, Any], args: argparse.Namespace) -> str:
    m = results["machine"]
    lines = [BEGIN,
             f"Run {m['date']} on {m['cpu']} ({m['cores']} cores; SIMD: {', '.join(m['simd']) or 'none found'}); "
             f"Python {m['python']}, onnx {m['onnx']}, onnxruntime {m['onnxruntime']} (CPU), numpy {m['numpy']}.",
             f"Command: `python benchmarks/accuracy.py --bench {args.bench} --method {args.method}`. Numbers: "
             "EfficientNet-Lite0 top-1 agreement with the stored FP32 top-1 (63 eval crops); all-MiniLM-L6-v2 mean "
             "cosine of the sentence embedding with the stored FP32 embedding (24 padded eval sentences); both "
             "calibrated on calib.npz as it is (padding included). Output SQNR: the model output (logits, embedding) "
             "against this run's FP32 output on the same eval samples, 10 log10(sum ref^2 / sum err^2).", ""]
    for b in results["benches"]:
        metric = b["metric"]
        lines += [f"### {b['model']} ({'top-1 agreement' if metric == 'top1_agreement' else 'mean cosine'})", "",
                  "| variant | value | output SQNR (dB) |", "|---|---:|---:|"]
        lines += [f"| {r['variant']} | {_fmt(r['value'], metric)} | {_fmt(r.get('sqnr_db'), 'db')} |"
                  for r in b["rows"]]
        h = b.get("headline", {})
        if h:
            lines += ["", f"Headline quantpipe model ({h['method']}): {h['quantized']} nodes quantized of "
                      f"{h['num_quantizable']} quantizable, {len(h['smoothed'])} activations smoothed, "
                      f"{h['bias_corrected']} biases corrected, {h.get('shifted', 0)} non-negative activations shifted, "
                      f"{', '.join(f'{t} split in {k}' for t, k in h.get('split', [])) or 'no activation split'}; "
                      f"written and checked (full_check) in {h['write_seconds']} s."]
        fb = b.get("fallback")
        if fb:
            verdict = "met" if fb["met"] else "NOT met"
            lines += ["", f"Fallback, budget {fb['metric']} >= {fb['target']}: **{verdict}**, {fb['initial']:.4f} -> "
                      f"{fb['final']:.4f}, keeping {len(fb['steps'])} of {fb['num_quantizable']} quantizable layers "
                      f"({100 * len(fb['steps']) / max(fb['num_quantizable'], 1):.1f}%) in float (FP16 on TensorRT, FP32 "
                      f"in this ONNX Runtime model), {fb['seconds']} s" + (":" if fb["steps"] else "."), ""]
            if fb["steps"]:
                lines += ["| kept in float | op | metric before | after |", "|---|---|---:|---:|"]
                lines += [f"| {s['node']} | {s['op_type']} | {s['metric_before']:.4f} | {s['metric_after']:.4f} |"
                          for s in fb["steps"]]
        sens = b.get("sensitivity")
        if sens:
            lines += ["", f"Most sensitive layers (only that layer quantized: output SQNR in dB, lower is worse; "
                      f"accumulated SQNR of its output in the full INT8 model), {b.get('sensitivity_seconds')} s:", "",
                      "| layer | op | output SQNR, alone (dB) | accumulated SQNR (dB) |", "|---|---|---:|---:|"]
            lines += [f"| {s['node']} | {s['op_type']} | {_fmt(s['output_metric'], 'db')} | {_fmt(s['sqnr_db'], 'db')} |"
                      for s in sens]
        f16 = b.get("fp16", {})
        if f16:
            oor = ", ".join(f"{o['tensor']} (|x| {o['max_abs']:.3g}: {o['action']})" for o in f16["out_of_range"]) or "none"
            lines += ["", f"FP16: kept in FP32: {', '.join(f16['kept_fp32']) or 'none'}; out-of-range constants: {oor}; "
                      f"{f16['underflow_values']} constant values flush to zero."]
        lines.append("")
    lines += [END]
    return "\n".join(lines)


def write_section(path: Path, block: str) -> None:
    """Put the generated block into this script's section of RESULTS.md, leaving everything else alone.

    The section's hand-written reading (above the block) is kept; a missing file or section is created.
    """
    from quantpipe.fsutil import atomic_write_text

    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    start = text.find(SECTION)
    if start < 0:
        new = text.rstrip("\n") + "\n\n" + SECTION + "\n\n" + block + "\n"
    else:
        nxt = re.search(r"^## ", text[start + len(SECTION):], flags=re.M)
        end = start + len(SECTION) + nxt.start() if nxt else len(text)
        section = text[start:end]
        b0, b1 = section.find("<!-- accuracy:begin"), section.find(END)
        if b0 >= 0 and b1 > b0:
            section = section[:b0] + block + section[b1 + len(END):]
        else:
            section = section.rstrip("\n") + "\n\n" + block + "\n"
        new = text[:start] + section.rstrip("\n") + "\n" + ("\n" + text[end:] if text[end:].strip() else "")
    atomic_write_text(path, new)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bench", default=".bench", help="the open benchmark set (bash ../shared/bench/build.sh DIR)")
    p.add_argument("--method", default="best", choices=METHODS,
                   help="calibration method of the headline model (default: best, as pipeline.yaml uses)")
    p.add_argument("--percentile", type=float, default=99.99)
    p.add_argument("--models", nargs="*", default=None, help="subset of: effnet_lite0 minilm_l6")
    p.add_argument("--skip-fallback", action="store_true")
    p.add_argument("--skip-sensitivity", action="store_true")
    p.add_argument("--sensitivity-layers", type=int, default=0,
                   help="layers measured one at a time (0: all of them)")
    p.add_argument("--top", type=int, default=10, help="rows of the sensitivity table")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    p.add_argument("--no-write", action="store_true", help="print the section instead of writing RESULTS.md")
    p.add_argument("--render", metavar="JSON", help="re-render the block from an accuracy_results.json (no runs)")
    args = p.parse_args(argv)
    if args.render:
        results = json.loads(Path(args.render).read_text(encoding="utf-8"))
        section = render(results, args)
        if args.no_write:
            print(section)
        else:
            write_section(Path(args.results), section)
        return 0

    root = Path(args.bench).resolve()  # absolute: the onnxruntime baseline runs from a temporary folder
    benches = [b for b in _benches(root) if args.models is None or b.key in args.models]
    missing = [str(b.model) for b in benches if not b.model.is_file()]
    if missing:
        print(f"missing {missing}: build the set with `bash ../shared/bench/build.sh {root}`", file=sys.stderr)
        return 2

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    results: dict[str, Any] = {"machine": _machine(), "benches": []}
    for b in benches:
        log(f"{b.title} ...")
        t = time.perf_counter()
        r = run_bench(b, args, log)
        r["total_seconds"] = round(time.perf_counter() - t, 1)
        results["benches"].append(r)
    section = render(results, args)
    if args.no_write:
        print(section)
        return 0
    out = Path(args.results)
    write_section(out, section)
    from quantpipe.fsutil import atomic_write_json

    atomic_write_json(out.with_name("accuracy_results.json"), results)
    log(f"wrote {out} and {out.with_name('accuracy_results.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
