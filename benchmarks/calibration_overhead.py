"""Calibration's wall time against one plain FP32 onnxruntime pass over the same data (issue 18's target: <= 1.2x).

    python benchmarks/calibration_overhead.py --bench .bench               # 5 repeats, prints the table
    python benchmarks/calibration_overhead.py --bench .bench --write       # ... and rewrites its RESULTS.md block
    python benchmarks/calibration_overhead.py --bench .bench --json out.json --repeats 3 --models digits
    python benchmarks/calibration_overhead.py --bench .bench --models effnet_lite0 --device cuda --repeat-samples 8

For each model (the bundled digits example, and EfficientNet-Lite0 and all-MiniLM-L6-v2 of the open set that
`--bench` points at; manifest.json names their files), in one process, repeats interleaved (one of each case
per round, so a busy spell of a shared machine hits every case alike), the median of:

- `plain`: what a user has without quantpipe: an onnxruntime CPU InferenceSession with default SessionOptions,
  created, then run over the calibration data in batches of `--batch-size`, the model's outputs only;
- `plain, calibration's options`: the same pass with the SessionOptions calibration uses (no thread spinning,
  no CPU arena; collect.session_options);
- `plain, calibration's runs`: the same, with the batches split into runs of as many samples as calibration's
  runs hold (it splits them to keep one run's activations under DEFAULT_MAX_RUN_BYTES);
- `exposed`: the same pass with every tensor calibration runs onnxruntime for exposed as a graph output and
  fetched (then dropped), split as calibration splits it: onnxruntime's share of calibration, no histogram;
- `exposed, arena`: the same with onnxruntime's CPU arena on (calibration's options turn it off to keep the
  peak memory low: without it every run's buffers are fresh pages, hence the page faults counted per case);
- `calibrate`: quantpipe.calibration.calibrate with `methods=["entropy"]` (`quantpipe calibrate`'s default),
  one worker, the files written to a temporary folder; its parts from `calibrate(timings=...)`: plan (shape
  inference), session (exposing the tensors: the model copy with extra outputs, and its session), inference,
  histograms (binning activations), weights, search (the entropy search; histograms.npz encoded and the model
  hashed beside it), write (the cache, sidecar and histograms.npz).

`--device cuda` (a GPU host with onnxruntime-gpu and CuPy): `plain` is the same user's pass on onnxruntime's CUDA
provider (default provider options), `calibrate` calibration on CUDA (histograms on the device), and only those
two cases run; the block is printed, not written into RESULTS.md. `--repeat-samples K` calibrates on the
calibration set repeated K times (a real calibration set holds hundreds of samples; the open set's 63 are few
enough that CUDA's per-shape start-up dominates).

Every case reads the data through quantpipe.data, as calibration does. The ratio is calibrate / plain; the
`exposed` row splits calibration's excess into what exposing the tensors costs onnxruntime (fusions and
in-place buffers lost, every activation copied out) and what quantpipe's own work costs. The machine, its load
average before and after, and the library versions are recorded: timings of a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
BEGIN = "<!-- calibration-overhead:begin (benchmarks/calibration_overhead.py writes this block; edit the script) -->"
END = "<!-- calibration-overhead:end -->"
TARGET = 1.2
EXAMPLE = ("examples/digits/digits_cnn.onnx", "calib_data/digits/calib.npz")
CASES = ("plain", "plain_calib_options", "plain_split", "exposed", "exposed_arena", "calibrate")


def models(bench: Path | None, wanted: list[str]) -> dict[str, tuple[Path, Path]]:
    """name -> (model, calibration data) of the models asked for (the open set's from its manifest.json)."""
    found: dict[str, tuple[Path, Path]] = {"digits": (ROOT / EXAMPLE[0], ROOT / EXAMPLE[1])}
    if bench is not None:
        manifest = json.loads((bench / "manifest.json").read_text(encoding="utf-8"))
        for name, entry in manifest["models"].items():
            found[name] = (bench / entry["model"]["path"], bench / entry["calib"]["path"])
    missing = [m for m in wanted if m not in found]
    if missing:
        raise SystemExit(f"unknown model(s) {missing}: have {sorted(found)} (the open set's need --bench DIR).")
    return {m: found[m] for m in wanted}


def _dataset(model: Path, data: Path, max_samples: int | None, repeat: int = 1) -> Any:
    import numpy as np

    from quantpipe.data import open_dataset
    from quantpipe.model import load_model_spec

    spec, _ = load_model_spec(model)
    if repeat > 1:  # the calibration set K times over, in a file of its own
        with np.load(data) as z:
            arrays = {k: np.concatenate([z[k]] * repeat, axis=0) for k in z.files}
        data = Path(tempfile.mkdtemp(prefix="calib-overhead-")) / f"x{repeat}_{data.name}"
        np.savez(data, **arrays)
    return open_dataset(data, spec.inputs, max_samples=max_samples, role="calibration")


def fetched_tensors(model: Path) -> tuple[list[str], list[str]]:
    """The activations calibration runs onnxruntime for (collect.py: Relu outputs and aliases are derived), and
    for each alias the fetched tensor or input it is as large as (calibration sizes its runs with them)."""
    import onnx

    from quantpipe.calibration.collect import plan_tensors, same_value_sources

    proto = onnx.load(str(model))
    plan = plan_tensors(proto)
    aliases = same_value_sources(proto, plan.kinds, plan.relu_from)
    fetch = [n for n in plan.activations if n not in plan.relu_from and n not in aliases]
    return fetch, [plan.relu_from.get(s, s) for s in aliases.values()]


def ort_pass(model: Path, dataset: Any, batch_size: int, *, calibration_options: bool = False,
             expose: list[str] | None = None, sized_as: list[str] | None = None,
             per_run: int | None = None, arena: bool | None = None,
             providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> dict[str, float]:
    """One onnxruntime pass over the data: session created, then every batch run.

    Default: what a user has (default SessionOptions, the model's outputs, whole batches). `calibration_options`:
    calibration's SessionOptions (collect.session_options). `expose`: these tensors added to the graph outputs
    and fetched (then dropped), the batches split as calibration splits them (DEFAULT_MAX_RUN_BYTES, sized from
    the previous run). `per_run`: split the batches into runs of this many samples. `arena`: onnxruntime's CPU
    arena on or off whatever the options say. Also counts the page faults (minor) of the pass.
    """
    import onnx
    import onnxruntime as ort

    from quantpipe.calibration.collect import DEFAULT_MAX_RUN_BYTES, session_options

    t0 = time.perf_counter()
    faults = _faults()
    options = session_options(_cores()) if calibration_options else ort.SessionOptions()
    if arena is not None:
        options.enable_cpu_mem_arena = arena
    if expose:
        proto = onnx.load(str(model))
        present = {o.name for o in proto.graph.output}
        proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in expose if n not in present)
        session = ort.InferenceSession(proto.SerializeToString(), sess_options=options, providers=list(providers))
    else:
        session = ort.InferenceSession(str(model), sess_options=options, providers=list(providers))
    names = [i.name for i in session.get_inputs()]
    fetch = expose or None
    t1 = time.perf_counter()
    size = 1 if expose else per_run or batch_size
    runs = 0
    for batch in dataset.batches(batch_size):
        lo = 0
        while lo < batch.size:
            hi = min(lo + size, batch.size)
            feeds = {n: batch.feeds[n][lo:hi] for n in names}
            outs = session.run(fetch, feeds)
            if expose:
                nbytes = {**{n: int(a.nbytes) for n, a in feeds.items()},
                          **{n: int(a.nbytes) for n, a in zip(expose, outs, strict=True)}}
                per_sample = max(1, (sum(nbytes[n] for n in expose) + sum(nbytes[n] for n in sized_as or ())) // (hi - lo))
                size = max(1, min(batch_size, DEFAULT_MAX_RUN_BYTES // per_sample))
            del outs, feeds
            lo, runs = hi, runs + 1
    return {"total": time.perf_counter() - t0, "session": t1 - t0, "runs": float(runs), "per_run": float(size),
            "page_faults": float(_faults() - faults)}


def _faults() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)


def calibrate_stage(model: Path, dataset: Any, batch_size: int,
                    providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> dict[str, float]:
    """quantpipe's calibration (entropy, one worker), files written to a temporary folder; its parts."""
    from quantpipe.calibration import calibrate

    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="calib-overhead-") as tmp:
        t0, faults = time.perf_counter(), _faults()
        calibrate(model, dataset, methods=["entropy"], out_dir=tmp, batch_size=batch_size, timings=timings,
                  providers=providers)
        timings["wall"] = time.perf_counter() - t0
        timings["page_faults"] = float(_faults() - faults)
    return timings


def measure(name: str, model: Path, data: Path, *, repeats: int, batch_size: int,
            max_samples: int | None = None, device: str = "cpu", repeat_samples: int = 1) -> dict[str, Any]:
    """Every case `repeats` times, interleaved; the per-case lists and their medians."""
    dataset = _dataset(model, data, max_samples, repeat_samples)
    fetch, sized_as = fetched_tensors(model)
    cuda = ("CUDAExecutionProvider", "CPUExecutionProvider")
    if device == "cuda":
        split = 0
        runs: dict[str, Callable[[], dict[str, float]]] = {
            "plain": lambda: ort_pass(model, dataset, batch_size, providers=cuda),
            "calibrate": lambda: calibrate_stage(model, dataset, batch_size, providers=cuda),
        }
        ort_pass(model, dataset, batch_size, providers=cuda)  # the CUDA context, once, before any timing
    else:
        split = int(ort_pass(model, dataset, batch_size, calibration_options=True, expose=fetch,
                             sized_as=sized_as)["per_run"])
        runs = _cpu_cases(model, dataset, batch_size, fetch, sized_as, split)
    load_before = os.getloadavg()
    samples: dict[str, list[dict[str, float]]] = {c: [] for c in CASES if c in runs}
    for _ in range(repeats):
        for case in samples:
            samples[case].append(runs[case]())
    medians = {case: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for case, rows in samples.items()}
    plain = medians["plain"]["total"]
    return {
        "model": name,
        "device": device,
        "samples": dataset.num_samples,
        "batch_size": batch_size,
        "exposed_tensors": len(fetch),
        "samples_per_run": split,
        "repeats": repeats,
        "median": medians,
        "ratio": medians["calibrate"]["wall"] / plain,
        "ratios": [c["wall"] / p["total"] for c, p in zip(samples["calibrate"], samples["plain"], strict=True)],
        "runs": samples,
        "load_before": load_before,
        "load_after": os.getloadavg(),
    }


def _cpu_cases(model: Path, dataset: Any, batch_size: int, fetch: list[str], sized_as: list[str],
               split: int) -> dict[str, Callable[[], dict[str, float]]]:
    return {
        "plain": lambda: ort_pass(model, dataset, batch_size),
        "plain_calib_options": lambda: ort_pass(model, dataset, batch_size, calibration_options=True),
        "plain_split": lambda: ort_pass(model, dataset, batch_size, calibration_options=True, per_run=split),
        "exposed": lambda: ort_pass(model, dataset, batch_size, calibration_options=True, expose=fetch, sized_as=sized_as),
        "exposed_arena": lambda: ort_pass(model, dataset, batch_size, calibration_options=True, expose=fetch,
                                          sized_as=sized_as, arena=True),
        "calibrate": lambda: calibrate_stage(model, dataset, batch_size),
    }


def _gpu_name() -> str:
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout.strip()
        return out.splitlines()[0] if out else "GPU ?"
    except (OSError, subprocess.SubprocessError):
        return "GPU ?"


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine() -> dict[str, Any]:
    import numpy
    import onnx
    import onnxruntime

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": _cores(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


PART_ROWS = (("plan", "plan (shape inference)"), ("session", "session (tensors exposed, session created)"),
             ("inference", "onnxruntime runs"), ("histograms", "binning activations"), ("weights", "binning weights"),
             ("search", "entropy search (histograms.npz encoded, model hashed beside it)"), ("write", "writing the files"))


def render_cuda(results: dict[str, Any]) -> str:
    """The CUDA table (plain pass and calibration on onnxruntime's CUDA provider): one column per model."""
    rows = results["models"]
    m = results["machine"]

    def cells(fn: Callable[[dict[str, Any]], str]) -> str:
        return " | ".join(fn(r) for r in rows)

    def share(key: str) -> Callable[[dict[str, Any]], str]:
        return lambda r: f"{r['median']['calibrate'].get(key, 0.0):.2f} s ({r['median']['calibrate'].get(key, 0.0) / r['median']['plain']['total']:.2f}x)"

    lines = [
        f"Machine: {m.get('gpu', 'GPU ?')}; host {m['cpu']}, {m['cores']} cores, Python {m['python']}, numpy "
        f"{m['numpy']}, onnxruntime {m['onnxruntime']}; {m['date']}. {results['note']}",
        f"Median of {rows[0]['repeats']} interleaved repeats (after one untimed CUDA pass); batch size "
        f"{rows[0]['batch_size']}; calibration: entropy, one worker, CUDA. In brackets: seconds as a multiple of the "
        "plain pass.",
        "",
        "| | " + " | ".join(f"{r['model']} ({r['samples']} samples)" for r in rows) + " |",
        "|---|" + "---|" * len(rows),
        "| plain onnxruntime CUDA pass (default options, session included) | " + cells(
            lambda r: f"{r['median']['plain']['total']:.2f} s (session {r['median']['plain']['session']:.2f} s)") + " |",
        "| **calibrate** on CUDA (end to end) | " + cells(
            lambda r: f"**{r['median']['calibrate']['wall']:.2f} s ({r['ratio']:.2f}x)**") + " |",
    ]
    lines += [f"| - {label} | " + cells(share(key)) + " |" for key, label in PART_ROWS]
    lines += ["", f"Target (issue 18): calibrate <= {TARGET}x the plain pass: " + ", ".join(
        f"{r['model']} {r['ratio']:.2f}x ({'met' if r['ratio'] <= TARGET else 'not met'})" for r in rows) + "."]
    return "\n".join(lines) + "\n"


def render(results: dict[str, Any]) -> str:
    """The Markdown block: one column per model."""
    rows = results["models"]
    m = results["machine"]

    def cells(fn: Callable[[dict[str, Any]], str]) -> str:
        return " | ".join(fn(r) for r in rows)

    def sec(case: str, key: str) -> Callable[[dict[str, Any]], str]:
        return lambda r: f"{r['median'][case][key]:.2f} s"

    def ratio(case: str) -> Callable[[dict[str, Any]], str]:
        return lambda r: f"{r['median'][case]['total']:.2f} s ({r['median'][case]['total'] / r['median']['plain']['total']:.2f}x)"

    def share(key: str) -> Callable[[dict[str, Any]], str]:
        return lambda r: f"{r['median']['calibrate'][key]:.2f} s ({r['median']['calibrate'][key] / r['median']['plain']['total']:.2f}x)"

    lines = [
        BEGIN,
        f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, numpy {m['numpy']}, onnxruntime "
        f"{m['onnxruntime']}; {m['date']}. {results['note']}",
        f"Median of {rows[0]['repeats']} interleaved repeats; batch size {rows[0]['batch_size']}; calibration: "
        "entropy, one worker, CPU. In brackets: seconds as a multiple of the plain pass.",
        "",
        "| | " + " | ".join(f"{r['model']} ({r['samples']} samples)" for r in rows) + " |",
        "|---|" + "---|" * len(rows),
        "| plain onnxruntime pass (default options, session included) | " + cells(sec("plain", "total")) + " |",
        "| same, calibration's session options | " + cells(ratio("plain_calib_options")) + " |",
        "| same, batches split into calibration's runs (samples per run) | " + cells(
            lambda r: ratio("plain_split")(r) + f" ({r['samples_per_run']})") + " |",
        "| same, calibration's tensors exposed and fetched, no histograms (tensors) | " + cells(
            lambda r: ratio("exposed")(r) + f" ({r['exposed_tensors']})") + " |",
        "| same, with onnxruntime's CPU arena (calibration turns it off to save memory) | " + cells(ratio("exposed_arena")) + " |",
        "| page faults: plain / exposed / exposed with arena / calibrate | " + cells(
            lambda r: " / ".join(f"{r['median'][c]['page_faults'] / 1000:.0f}k"
                                 for c in ("plain", "exposed", "exposed_arena", "calibrate"))) + " |",
        "| **calibrate** (end to end) | " + cells(
            lambda r: f"**{r['median']['calibrate']['wall']:.2f} s ({r['ratio']:.2f}x)**") + " |",
    ]
    lines += [f"| - {label} | " + cells(share(key)) + " |" for key, label in PART_ROWS]
    lines += [
        "| load average before / after | " + cells(
            lambda r: f"{r['load_before'][0]:.1f} / {r['load_after'][0]:.1f}") + " |",
        "",
        f"Target (issue 18): calibrate <= {TARGET}x the plain pass: " + ", ".join(
            f"{r['model']} {r['ratio']:.2f}x ({'met' if r['ratio'] <= TARGET else 'not met'})" for r in rows) + ".",
        END,
    ]
    return "\n".join(lines) + "\n"


def write_section(block: str) -> None:
    from quantpipe.fsutil import atomic_write_text

    text = RESULTS_MD.read_text(encoding="utf-8") if RESULTS_MD.is_file() else "# Benchmark results\n"
    marker = BEGIN.split(" (")[0]
    if marker in text and END in text:
        head, rest = text.split(marker, 1)
        text = head + block.rstrip("\n") + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## Calibration against a plain onnxruntime pass\n\n" + block
    atomic_write_text(RESULTS_MD, text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", type=Path, help="the open benchmark set (manifest.json); without it: digits only")
    ap.add_argument("--models", default=None, help="comma-separated (default: digits, and the set's models)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-samples", type=int, default=None)
    ap.add_argument("--note", default="", help="said under the table (e.g. whether the machine was shared)")
    ap.add_argument("--json", type=Path, help="write every measurement here")
    ap.add_argument("--write", action="store_true", help="rewrite the block in benchmarks/RESULTS.md")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: the plain pass and calibration on onnxruntime's CUDA provider (the table is printed)")
    ap.add_argument("--repeat-samples", type=int, default=1, help="calibrate on the calibration set repeated K times")
    args = ap.parse_args(argv)
    if args.device == "cuda" and args.write:
        raise SystemExit("--write rewrites the CPU block of RESULTS.md; the CUDA table is printed only.")
    if args.device == "cuda":
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            raise SystemExit("--device cuda needs onnxruntime-gpu with its CUDA provider (this onnxruntime has "
                             f"{onnxruntime.get_available_providers()}); see ../shared/gpu/README.md.")
    wanted = args.models.split(",") if args.models else ["digits"] + (["effnet_lite0", "minilm_l6"] if args.bench else [])
    results: dict[str, Any] = {"machine": machine(), "note": args.note, "models": []}
    for name, (model, data) in models(args.bench, wanted).items():
        row = measure(name, model, data, repeats=args.repeats, batch_size=args.batch_size, max_samples=args.max_samples,
                      device=args.device, repeat_samples=args.repeat_samples)
        results["models"].append(row)
        print(f"{name}: calibrate {row['median']['calibrate']['wall']:.2f} s, plain {row['median']['plain']['total']:.2f} s,"
              f" ratio {row['ratio']:.2f}x", flush=True)
    if args.device == "cuda":
        results["machine"]["gpu"] = _gpu_name()
    block = render_cuda(results) if args.device == "cuda" else render(results)
    print(block)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1), encoding="utf-8")
    if args.write:
        write_section(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
