"""GPU benchmark: calibration on CUDA against this host's CPU, and onnxruntime CUDA FP32 / FP16 latency.

On the GPU host (onnxruntime-gpu installed, see ../shared/gpu/README.md):

    python benchmarks/gpu.py --out OUTDIR [--bench .bench] [--models digits,effnet_lite0]

writes OUTDIR/gpu_results.json (after every model, so a cut-short run keeps what it measured) and
OUTDIR/gpu_section.md. Back on the development machine,

    python benchmarks/gpu.py --render OUTDIR/gpu_results.json [--render ...]

merges result files and rewrites the GPU section of benchmarks/RESULTS.md (between its markers only;
the other sections belong to other benchmarks).

What it measures, per model:
- calibration (`quantpipe.calibration.collect.collect_histograms`) on the CPU execution provider and on
  the CUDA one: wall time of the whole call, the first (cold) run apart from the warm ones; the
  speed-up is the ratio of the warm medians;
- whether both give the same scales: per tensor, the difference of absmax (minmax), of the 99.99th
  percentile and of the entropy amax (where quantpipe's methods module is present), in units of one
  histogram bin (absmax / 2048);
- onnxruntime latency at batch 1 and 32: CPU FP32, CUDA FP32 and CUDA FP16 (quantpipe's FP16 model),
  end to end (host arrays in and out, perf_counter after warm-up) and, on CUDA, the compute alone with
  inputs and outputs bound on the device (IOBinding, synchronised).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
BEGIN = "<!-- gpu:begin (benchmarks/gpu.py --render writes this block; edit the script, not the block) -->"
END = "<!-- gpu:end -->"
CUDA_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
CPU_PROVIDERS = ("CPUExecutionProvider",)


@dataclasses.dataclass
class CalibRun:
    """One device's calibration runs of one model."""

    device_requested: str
    device_used: str
    seconds: list[float]
    stats: Any
    notes: list[str]

    @property
    def warm_median(self) -> float:
        warm = self.seconds[1:] or self.seconds
        return float(statistics.median(warm))


def model_inputs(model: str | Path) -> tuple[Any, ...]:
    from quantpipe.model import load_model_spec

    spec, _ = load_model_spec(model)
    return spec.inputs


def _cuda_ep_usable(model: str | Path) -> tuple[bool, str]:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False, f"onnxruntime {ort.__version__} has no CUDAExecutionProvider"
    sess = ort.InferenceSession(str(model), providers=list(CUDA_PROVIDERS))
    if sess.get_providers()[0] != "CUDAExecutionProvider":
        return False, f"a CUDA session fell back to {sess.get_providers()}"
    return True, "CUDAExecutionProvider"


def calibrate_once(
    model: str | Path, data: str | Path, *, device: str, batch_size: int = 32, repeats: int = 1,
    max_samples: int | None = None, cuda_options: Mapping[str, str] | None = None,
) -> CalibRun:
    """Run `collect_histograms` `repeats` times on `device` ('cpu' or 'cuda'); keep the last stats."""
    from quantpipe.calibration.collect import collect_histograms
    from quantpipe.data import open_dataset

    dataset = open_dataset(data, model_inputs(model), max_samples=max_samples)
    notes: list[str] = []
    providers = CPU_PROVIDERS
    used = "cpu"
    if device == "cuda":
        ok, why = _cuda_ep_usable(model)
        if ok:
            providers, used = CUDA_PROVIDERS, "cuda"
            cupy = _optional("cupy")
            notes.append(f"CuPy {cupy.__version__}: histograms on the device" if cupy is not None
                         else "CuPy missing: CUDA outputs histogrammed on the host")
        else:
            notes.append(f"CUDA requested but unavailable ({why}); ran on CPU")
    seconds: list[float] = []
    stats = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        stats = collect_histograms(model, dataset, batch_size=batch_size, providers=providers, cuda_options=cuda_options)
        seconds.append(time.perf_counter() - t0)
    return CalibRun(device, used, seconds, stats, notes)


def profile_phases(model: str | Path, data: str | Path, *, device: str, batch_size: int = 32) -> dict[str, float]:
    """Where one warm calibration call spends its time (the phase timings collect_histograms reports)."""
    run = calibrate_once(model, data, device=device, batch_size=batch_size, repeats=1)
    stats = run.stats
    spent = {
        "plan tensors (shape inference)": stats.plan_seconds,
        "session creation": stats.session_seconds,
        "weight histograms": stats.weight_seconds,
    }
    if run.device_used == "cuda":  # on the CPU, inference is counted in "other"
        spent["inference + copies (CUDA, IOBinding)"] = stats.inference_seconds
    spent["activation histograms"] = stats.histogram_seconds - stats.weight_seconds
    total = run.seconds[-1]
    out = {k: round(v, 4) for k, v in spent.items()}
    out["other (load, data, CPU inference)"] = round(total - sum(spent.values()), 4)
    out["total"] = round(total, 4)
    return out


def scaling(model: str | Path, data: str | Path, *, repeat: int, batch_size: int, log: Any) -> dict[str, Any]:
    """Warm calibration time with the data as is and repeated `repeat` times, on both devices.

    The open set is small (63 EfficientNet images): a CUDA call's fixed cost (a fresh session builds a cuDNN
    plan per convolution and input shape) dominates it. Repeating the same samples shows the per-sample rate
    that a real calibration set (hundreds of images) gets; the histograms scale, the scales do not change.
    """
    z = np.load(data)
    out: dict[str, Any] = {"batch_size": batch_size, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "calib_x.npz"
        np.savez(big, **{k: np.concatenate([z[k]] * repeat) for k in z.files})
        for path in (Path(data), big):
            row: dict[str, Any] = {}
            for device in ("cpu", "cuda"):
                run = calibrate_once(model, path, device=device, batch_size=batch_size, repeats=1)
                row["samples"] = run.stats.num_samples
                row[f"{device}_seconds"] = round(run.seconds[-1], 4)
                row[f"{device}_used"] = run.device_used
            row["speedup"] = round(row["cpu_seconds"] / row["cuda_seconds"], 2)
            out["rows"].append(row)
            log(f"  scaling: {row}")
    return out


def conv_search_variants(model: str | Path, data: str | Path, *, batch_size: int) -> dict[str, Any]:
    """Warm CUDA calibration time with each cuDNN algorithm search (collect.py's choice is HEURISTIC)."""
    from quantpipe.calibration.collect import CUDA_CALIBRATION_OPTIONS

    out: dict[str, Any] = {}
    for search in ("EXHAUSTIVE", "HEURISTIC", "DEFAULT"):
        options = {**CUDA_CALIBRATION_OPTIONS, "cudnn_conv_algo_search": search}
        run = calibrate_once(model, data, device="cuda", batch_size=batch_size, repeats=2, cuda_options=options)
        out[search] = round(run.seconds[-1], 4)
    return out


def _optional(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except Exception:
        return None


def _entropy_fn() -> Any:
    """quantpipe's entropy method over a StreamingHistogram, if the methods module offers one."""
    methods = _optional("quantpipe.calibration.methods")
    if methods is None:
        return None
    for name in ("entropy_amax", "entropy"):
        fn = getattr(methods, name, None)
        if callable(fn):
            return fn
    return None


def compare_amax(cpu: CalibRun, gpu: CalibRun) -> dict[str, Any]:
    """Per-tensor scale differences, CPU vs CUDA, in histogram bins (absmax / num_bins of the CPU run)."""
    a, b = cpu.stats.histograms, gpu.stats.histograms
    common = [n for n in a if n in b and cpu.stats.kinds.get(n) != "weight"]
    entropy = _entropy_fn()
    worst = {"minmax": 0.0, "p99.99": 0.0, "entropy": 0.0}
    over = {"minmax": 0, "p99.99": 0, "entropy": 0}
    worst_tensor = {"minmax": "", "p99.99": "", "entropy": ""}
    identical = 0
    entropy_errors: list[str] = []
    for name in common:
        ha, hb = a[name], b[name]
        if ha == hb:
            identical += 1
        width = ha.absmax / ha.num_bins if ha.absmax > 0 else 0.0
        pairs = {"minmax": (ha.absmax, hb.absmax), "p99.99": (ha.percentile(99.99), hb.percentile(99.99))}
        if entropy is not None:
            try:
                pairs["entropy"] = (float(entropy(ha)), float(entropy(hb)))
            except Exception as err:  # record, do not hide: the table says entropy was not compared
                if len(entropy_errors) < 3:
                    entropy_errors.append(f"{name}: {type(err).__name__}: {err}")
        for key, (x, y) in pairs.items():
            d = abs(float(x) - float(y)) / width if width > 0 else (0.0 if x == y else float("inf"))
            over[key] += int(d > 1.0)
            if d > worst[key]:
                worst[key], worst_tensor[key] = d, name
    compared = ["minmax", "p99.99"] + (["entropy"] if entropy is not None and not entropy_errors else [])
    return {
        "tensors": len(common),
        "identical_histograms": identical,
        "compared": compared,
        "worst_bins_by_method": {k: round(worst[k], 4) for k in compared},
        "worst_tensor_by_method": {k: worst_tensor[k] for k in compared},
        "tensors_over_1_bin": {k: over[k] for k in compared},
        "worst_bins": round(max(worst[k] for k in compared), 4) if common else 0.0,
        "entropy_errors": entropy_errors,
    }


def write_fp16(model: str | Path, out: Path) -> str | None:
    """quantpipe's FP16 model; returns a note when it had to bypass write_fp16_model's saving step."""
    from quantpipe import quantize
    from quantpipe.onnxgraph import load_onnx

    try:
        quantize.write_fp16_model(model, out)
        return None
    except AttributeError as err:  # a saving bug in the FP16 writer must not cost the GPU run its FP16 numbers
        import onnx

        fp16, _ = quantize.build_fp16_model(load_onnx(model))
        onnx.checker.check_model(fp16)
        onnx.save(fp16, str(out))
        return f"write_fp16_model failed ({type(err).__name__}: {err}); FP16 model built with build_fp16_model and onnx.save"


def ort_latency(model: str | Path, device: str, feeds: Mapping[str, np.ndarray], *, warmup: int, iterations: int) -> dict[str, Any]:
    from quantpipe.backends.onnxruntime import OrtRunner

    with OrtRunner(model, f"ort_{device}", device=device) as runner:
        providers = list(runner.session.get_providers())
        t = runner.measure(feeds, warmup, iterations)
    out: dict[str, Any] = {"providers": providers[:1], "total_median_ms": float(np.median(t.total)),
                           "total_p90_ms": float(np.percentile(t.total, 90)), "total_p99_ms": float(np.percentile(t.total, 99))}
    if t.compute is not None:
        out.update(compute_median_ms=float(np.median(t.compute)), compute_p90_ms=float(np.percentile(t.compute, 90)),
                   compute_p99_ms=float(np.percentile(t.compute, 99)))
    return out


def machine_info() -> dict[str, Any]:
    from quantpipe.deps import probe_env

    env = probe_env()
    gpus = env["gpu"].get("gpus") or []
    cpu_model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cupy = _optional("cupy")
    return {
        "gpu": gpus[0]["name"] if gpus else None,
        "gpu_memory": gpus[0]["memory"] if gpus else None,
        "driver": gpus[0]["driver"] if gpus else None,
        "cuda": env.get("cuda"),
        "cpu": cpu_model,
        "cpu_cores": env["cpu_count"],
        "python": env["python"],
        "onnxruntime": env["onnxruntime"],
        "onnxruntime_providers": env["onnxruntime_providers"],
        "cupy": getattr(cupy, "__version__", None),
        "numpy": env["numpy"],
    }


def bench_model(name: str, model: Path, calib: Path, *, batch_size: int, cpu_repeats: int, cuda_repeats: int,
                lat_iters: int, log: Any, profile: bool = False, scale_repeat: int = 1) -> dict[str, Any]:
    res: dict[str, Any] = {"model": str(model.relative_to(ROOT) if model.is_relative_to(ROOT) else model),
                           "calib": str(calib.name)}
    log(f"[{name}] calibration on CPU x{cpu_repeats}")
    cpu = calibrate_once(model, calib, device="cpu", batch_size=batch_size, repeats=cpu_repeats)
    log(f"[{name}]   {[f'{s:.2f}' for s in cpu.seconds]} s")
    log(f"[{name}] calibration on CUDA x{cuda_repeats}")
    gpu = calibrate_once(model, calib, device="cuda", batch_size=batch_size, repeats=cuda_repeats)
    log(f"[{name}]   {[f'{s:.2f}' for s in gpu.seconds]} s ({gpu.device_used}; {'; '.join(gpu.notes)})")
    res["calibration"] = {
        "samples": cpu.stats.num_samples, "batch_size": batch_size, "tensors": len(cpu.stats.histograms),
        "cpu_seconds": [round(s, 4) for s in cpu.seconds], "cuda_seconds": [round(s, 4) for s in gpu.seconds],
        "cuda_device_used": gpu.device_used, "notes": gpu.notes,
        "speedup_warm_median": round(cpu.warm_median / gpu.warm_median, 2) if gpu.warm_median > 0 else None,
        "speedup_cold": round(cpu.seconds[0] / gpu.seconds[0], 2) if gpu.seconds[0] > 0 else None,
    }
    if profile:
        res["calibration"]["phases_cpu"] = profile_phases(model, calib, device="cpu", batch_size=batch_size)
        res["calibration"]["phases_cuda"] = profile_phases(model, calib, device="cuda", batch_size=batch_size)
        log(f"[{name}]   phases CPU {res['calibration']['phases_cpu']}")
        log(f"[{name}]   phases CUDA {res['calibration']['phases_cuda']}")
        if gpu.device_used == "cuda":
            res["calibration"]["cuda_conv_search"] = conv_search_variants(model, calib, batch_size=batch_size)
            log(f"[{name}]   CUDA call seconds by cuDNN search: {res['calibration']['cuda_conv_search']}")
    if scale_repeat > 1:
        res["scaling"] = scaling(model, calib, repeat=scale_repeat, batch_size=64, log=log)
    res["scales"] = compare_amax(cpu, gpu)
    log(f"[{name}]   scales: {res['scales']}")

    inputs = model_inputs(model)
    z = np.load(calib)
    latency: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        fp16: Path | None = Path(tmp) / f"{name}_fp16.onnx"
        try:
            note = write_fp16(model, fp16)  # type: ignore[arg-type]
            if note:
                res.setdefault("notes", []).append(note)
                log(f"[{name}]   {note}")
        except Exception as err:
            log(f"[{name}]   FP16 model failed: {type(err).__name__}: {err}")
            res.setdefault("notes", []).append(f"no FP16 model: {type(err).__name__}: {err}")
            fp16 = None
        for bs in (1, 32):
            feeds = {t.name: np.ascontiguousarray(z[t.name][:bs]) for t in inputs}
            if next(iter(feeds.values())).shape[0] < bs:
                continue
            row: dict[str, Any] = {}
            row["cpu_fp32"] = ort_latency(model, "cpu", feeds, warmup=5, iterations=max(10, lat_iters // 10))
            if gpu.device_used == "cuda":
                row["cuda_fp32"] = ort_latency(model, "cuda", feeds, warmup=20, iterations=lat_iters)
                if fp16 is not None:
                    row["cuda_fp16"] = ort_latency(fp16, "cuda", feeds, warmup=20, iterations=lat_iters)
            latency[f"batch{bs}"] = row
            log(f"[{name}]   latency batch {bs}: " + ", ".join(
                f"{k} {v['total_median_ms']:.3f} ms" + (f" (compute {v['compute_median_ms']:.3f})" if "compute_median_ms" in v else "")
                for k, v in row.items()))
    res["latency"] = latency
    return res


def _models(bench: Path, wanted: Sequence[str]) -> dict[str, tuple[Path, Path]]:
    known = {
        "digits": (ROOT / "examples" / "digits" / "digits_cnn.onnx", ROOT / "calib_data" / "digits" / "calib.npz"),
        "effnet_lite0": (bench / "effnet_lite0" / "model.onnx", bench / "effnet_lite0" / "calib.npz"),
        "minilm_l6": (bench / "minilm_l6" / "model.onnx", bench / "minilm_l6" / "calib.npz"),
    }
    return {k: known[k] for k in wanted if k in known}


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "command": " ".join(sys.argv),
        "models": {},
        "skipped": {},
        "notes": list(args.note or []),
    }

    def log(msg: str) -> None:
        print(msg, flush=True)

    log(f"machine: {results['machine']}")
    for name, (model, calib) in _models(Path(args.bench), args.models.split(",")).items():
        if not (model.is_file() and calib.is_file()):
            results["skipped"][name] = f"{model} or {calib} not present on this machine"
            log(f"[{name}] skipped: not present")
            continue
        try:
            results["models"][name] = bench_model(
                name, model, calib, batch_size=args.batch_size, cpu_repeats=args.cpu_repeats,
                cuda_repeats=args.cuda_repeats, lat_iters=args.iterations, log=log, profile=args.profile,
                scale_repeat=args.scale_repeat,
            )
        except Exception as err:  # record and go on with the next model
            import traceback

            results["skipped"][name] = f"failed: {type(err).__name__}: {err}"
            traceback.print_exc()
        (out / "gpu_results.json").write_text(json.dumps(results, indent=2))
    (out / "gpu_results.json").write_text(json.dumps(results, indent=2))
    (out / "gpu_section.md").write_text(render_section([results]))
    print(render_section([results]))
    return 0


# ------------------------------------------------------------------------------------------ render


def _ms(v: Mapping[str, Any] | None, key: str = "total_median_ms") -> str:
    return "–" if not v or key not in v else f"{v[key]:.3f}"


def render_section(all_results: Sequence[Mapping[str, Any]]) -> str:
    lines: list[str] = []
    for res in all_results:
        m = res["machine"]
        lines += [
            f"Run {res['date']} on **{m.get('gpu') or 'no GPU'}** ({m.get('gpu_memory')}, driver {m.get('driver')}, "
            f"{m.get('cuda') or 'CUDA ?'}); host CPU {m.get('cpu')} ({m.get('cpu_cores')} cores); Python {m.get('python')}, "
            f"onnxruntime {m.get('onnxruntime')} (providers {', '.join(m.get('onnxruntime_providers') or [])}), "
            f"CuPy {m.get('cupy')}, numpy {m.get('numpy')}.",
            f"Command: `{res.get('command', '')}`",
            "",
        ]
        lines += [f"Note: {n}" for n in res.get("notes", [])]
        if res.get("notes"):
            lines.append("")
        models = res.get("models", {})
        if models:
            lines += [
                "Calibration (`collect_histograms`, whole call incl. session creation; cold = first run, "
                "speed-up = ratio of the warm medians; scale difference = worst tensor, in histogram bins of absmax/2048):",
                "",
                "| model | samples | tensors | CPU cold / warm s | CUDA cold / warm s | speed-up (warm) | "
                "identical histograms | worst scale diff (bins) |",
                "|---|---:|---:|---|---|---:|---:|---|",
            ]
            for name, r in models.items():
                c, s = r["calibration"], r["scales"]
                cpu_s, gpu_s = c["cpu_seconds"], c["cuda_seconds"]
                diff = ", ".join(f"{k} {v:g}" for k, v in s["worst_bins_by_method"].items())
                lines.append(
                    f"| {name} | {c['samples']} | {c['tensors']} | {cpu_s[0]:.2f} / {_warm(cpu_s):.2f} | "
                    f"{gpu_s[0]:.2f} / {_warm(gpu_s):.2f} ({c['cuda_device_used']}) | {c['speedup_warm_median']}x | "
                    f"{s['identical_histograms']}/{s['tensors']} | {diff} |"
                )
            bullets: list[str] = []
            for name, r in models.items():
                c = r["calibration"]
                for key, label in (("phases_cpu", "CPU"), ("phases_cuda", "CUDA")):
                    if key in c:
                        parts = ", ".join(f"{k} {v:.3f}" for k, v in c[key].items() if k != "total")
                        bullets.append(f"- {name}, where one warm {label} call spends its {c[key]['total']:.3f} s: {parts}.")
                if isinstance(c.get("cuda_conv_search"), dict) and "skipped" not in c["cuda_conv_search"]:
                    parts = ", ".join(f"{k} {v:.3f} s" for k, v in c["cuda_conv_search"].items())
                    bullets.append(f"- {name}, warm CUDA call by cuDNN algorithm search: {parts}.")
                over = r["scales"].get("tensors_over_1_bin")
                if over and any(over.values()):
                    worst = r["scales"]["worst_tensor_by_method"]
                    bullets.append(f"- {name}, tensors whose scale differs by more than one bin: "
                                   + ", ".join(f"{k} {v} (worst: {worst[k]})" for k, v in over.items() if v) + ".")
            if bullets:
                lines += ["", *bullets]
            scaled = {n: r["scaling"] for n, r in models.items() if "scaling" in r}
            if scaled:
                lines += [
                    "",
                    "Calibration time against the number of samples (warm calls, batch 64; the larger set repeats the "
                    "open set's samples, which changes the histograms' counts but not their shape):",
                    "",
                    "| model | samples | CPU s | CUDA s | speed-up |",
                    "|---|---:|---:|---:|---:|",
                ]
                for name, sc in scaled.items():
                    for row in sc["rows"]:
                        lines.append(f"| {name} | {row['samples']} | {row['cpu_seconds']:.2f} | {row['cuda_seconds']:.2f}"
                                     f"{'' if row['cuda_used'] == 'cuda' else ' (cpu)'} | {row['speedup']}x |")
            notes = {n for r in models.values() for n in [*r["calibration"]["notes"], *r.get("notes", [])]}
            if notes:
                lines += ["", "Notes: " + "; ".join(sorted(notes)) + "."]
            lines += [
                "",
                "onnxruntime latency, ms per batch (median; end to end with host arrays, and on CUDA the compute alone "
                "with IOBinding in parentheses; p90/p99 in gpu_results.json):",
                "",
                "| model | batch | CPU FP32 | CUDA FP32 | CUDA FP16 |",
                "|---|---:|---:|---:|---:|",
            ]
            for name, r in models.items():
                for key, row in r["latency"].items():
                    cells = [_ms(row.get("cpu_fp32"))]
                    for k in ("cuda_fp32", "cuda_fp16"):
                        v = row.get(k)
                        cells.append(f"{_ms(v)} ({_ms(v, 'compute_median_ms')})" if v else "–")
                    lines.append(f"| {name} | {key.removeprefix('batch')} | " + " | ".join(cells) + " |")
        for name, why in res.get("skipped", {}).items():
            lines.append(f"\n{name}: not measured ({why}).")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _warm(seconds: Sequence[float]) -> float:
    return float(statistics.median(seconds[1:] or seconds))


def render_into_results(paths: Sequence[str]) -> int:
    all_results = [json.loads(Path(p).read_text()) for p in paths]
    block = f"{BEGIN}\n{render_section(all_results)}{END}"
    text = RESULTS_MD.read_text() if RESULTS_MD.is_file() else "# Benchmark results\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n## GPU\n\n`python benchmarks/gpu.py` on a GPU host (how: docs/tensorrt.md, benchmarks/gpu.py).\n\n" + block + "\n"
    from quantpipe.fsutil import atomic_write_text

    atomic_write_text(RESULTS_MD, text)
    print(f"updated the GPU section of {RESULTS_MD}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="folder for gpu_results.json and gpu_section.md")
    p.add_argument("--bench", default=str(ROOT / ".bench"), help="the open benchmark set (../shared/bench/build.sh)")
    p.add_argument("--models", default="digits,effnet_lite0", help="comma-separated: digits, effnet_lite0, minilm_l6")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cpu-repeats", type=int, default=3)
    p.add_argument("--cuda-repeats", type=int, default=4)
    p.add_argument("--iterations", type=int, default=200, help="timed iterations per CUDA latency measurement")
    p.add_argument("--profile", action="store_true", help="also time the calibration call's phases on each device")
    p.add_argument("--scale-repeat", type=int, default=1,
                   help="also calibrate on the data repeated N times (batch 64), on both devices")
    p.add_argument("--note", action="append", help="a note recorded with the results (repeatable)")
    p.add_argument("--render", nargs="+", metavar="RESULTS_JSON", help="rewrite the GPU section of RESULTS.md from these")
    args = p.parse_args(argv)
    if args.render:
        return render_into_results(args.render)
    if not args.out:
        p.error("--out is required to measure (or give --render)")
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
