"""Calibration benchmark: quantpipe's entropy/minmax against onnxruntime's quantize_static, time and memory.

    python benchmarks/calibration.py            # full run (~10 min on 2 cores), rewrites benchmarks/RESULTS.md
    python benchmarks/calibration.py --quick    # smoke run (32-128 images, no onnxruntime Entropy), prints only

It builds (once, cached in .bench/calib-bench/) a ResNet-18-shaped model (BasicBlocks [2, 2, 2, 2], BatchNorm
statistics made realistic by forward passes in train mode on the data, ONNX opset 17, dynamic batch; torch
is needed only for this) and 1024 smooth-noise images at 3x224x224 (bilinearly upsampled 56x56 Gaussian
noise, fixed seed) stored uncompressed in one stacked .npz. Then it measures, each case in its own
process: the calibration call's wall time and the process's peak RSS (its own getrusage maximum), for

- quantpipe `calibrate(..., methods=[entropy | minmax])` (histograms, caches, JSON and histograms.npz
  written), and onnxruntime `quantize_static` (QDQ, CalibrationMethod.MinMax / Entropy, defaults
  otherwise; the call includes writing the quantized model), on 512 images, both reading the same
  images batch by batch through quantpipe.data;
- quantpipe entropy on 128, 512 and 1024 images (memory must not grow with the data).

onnxruntime Entropy keeps every activation of every sample: it runs once, last, under a guard that stops it
when its RSS passes --ort-entropy-limit-gb or the machine's available memory falls below 2 GB, and is then
recorded as "did not finish". Its 1024-image case is not run (it needs more memory than this machine has).

The machine is shared: timings are noisy. The load average before and after each case is recorded.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
BEGIN = "<!-- calibration:begin (benchmarks/calibration.py writes this block; edit the script, not the block) -->"
END = "<!-- calibration:end -->"
DEFAULT_DIR = ROOT / ".bench" / "calib-bench"
INPUT = "input"
SIZE = 224
MAX_IMAGES = 1024


# ----------------------------------------------------------------------------------------------- build


def build(bench_dir: Path, num_images: int) -> tuple[Path, Path]:
    """The model and the images (built once; torch only here)."""
    import numpy as np

    bench_dir.mkdir(parents=True, exist_ok=True)
    model_path = bench_dir / "resnet18.onnx"
    data_path = bench_dir / f"images_{num_images}.npz"
    if model_path.is_file() and data_path.is_file():
        return model_path, data_path
    import torch
    from torch import nn

    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU()
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return self.relu(y + (x if self.down is None else self.down(x)))

    class ResNet18(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                      nn.MaxPool2d(3, 2, 1))
            blocks, cin = [], 64
            for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):  # BasicBlocks [2, 2, 2, 2]
                blocks += [Block(cin, cout, stride), Block(cout, cout, 1)]
                cin = cout
            self.layers = nn.Sequential(*blocks)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(512, 1000)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))

    rng = np.random.default_rng(2024)
    images = np.empty((num_images, 3, SIZE, SIZE), dtype=np.float32)
    for start in range(0, num_images, 64):  # smooth noise: 56x56 Gaussian noise, bilinearly upsampled
        n = min(64, num_images - start)
        noise = torch.from_numpy(rng.standard_normal((n, 3, SIZE // 4, SIZE // 4)).astype(np.float32))
        images[start:start + n] = nn.functional.interpolate(noise, size=SIZE, mode="bilinear", align_corners=False).numpy()
    model = ResNet18()
    model.train()  # BatchNorm running statistics from the data, so activations have realistic ranges
    with torch.no_grad():
        for start in range(0, min(256, num_images), 32):
            model(torch.from_numpy(images[start:start + 32]))
    model.eval()
    tmp = model_path.with_suffix(".tmp.onnx")
    torch.onnx.export(model, (torch.from_numpy(images[:1]),), str(tmp), opset_version=17, input_names=[INPUT],
                      output_names=["logits"], dynamic_axes={INPUT: {0: "N"}, "logits": {0: "N"}}, dynamo=False)
    os.replace(tmp, model_path)
    tmp_data = data_path.with_suffix(".tmp.npz")
    with open(tmp_data, "wb") as fh:
        np.savez(fh, input=images)  # uncompressed: quantpipe.data reads it batch by batch
    os.replace(tmp_data, data_path)
    return model_path, data_path


# ----------------------------------------------------------------------------------------------- child


def _dataset(data_path: Path, n: int) -> Any:
    from quantpipe.artifacts import TensorInfo
    from quantpipe.data import open_dataset

    return open_dataset(data_path, (TensorInfo(INPUT, "float32", ("N", 3, SIZE, SIZE)),), max_samples=n)


def child(args: argparse.Namespace) -> None:
    """One measurement in this process; prints one JSON line."""
    t_start = time.perf_counter()
    ds = _dataset(args.data, args.n)
    with tempfile.TemporaryDirectory(prefix="calib-bench-") as tmp:
        if args.case.startswith("quantpipe-"):
            from quantpipe.calibration import calibrate

            method = args.case.split("-", 1)[1]
            t0 = time.perf_counter()
            [summary] = calibrate(args.model, ds, methods=[method], out_dir=tmp, batch_size=args.batch_size)
            seconds = time.perf_counter() - t0
            extra: dict[str, Any] = {"num_tensors": summary.num_tensors}
            side = json.loads(Path(summary.json_path).read_text())
            extra["amax_sample"] = {k: v["amax"] for k, v in list(side["tensors"].items())[:3]}
        else:
            from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, quantize_static

            batches = iter(ds.batches(args.batch_size))

            class Reader(CalibrationDataReader):
                def get_next(self) -> dict[str, Any] | None:
                    batch = next(batches, None)
                    return None if batch is None else {INPUT: batch.feeds[INPUT]}

            method = {"ort-minmax": CalibrationMethod.MinMax, "ort-entropy": CalibrationMethod.Entropy}[args.case]
            t0 = time.perf_counter()
            quantize_static(str(args.model), str(Path(tmp) / "q.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                            calibrate_method=method)
            seconds = time.perf_counter() - t0
            extra = {}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"seconds": seconds, "peak_rss_bytes": usage.ru_maxrss * 1024,
                      "cpu_seconds": usage.ru_utime + usage.ru_stime,
                      "process_seconds": time.perf_counter() - t_start, **extra}))


# ---------------------------------------------------------------------------------------------- parent


def _mem_available() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def run_case(case: str, n: int, args: argparse.Namespace, model: Path, data: Path, *, limit_gb: float | None = None,
             timeout: float = 1800.0) -> dict[str, Any]:
    """Run one case in a child process, guarding memory and time; return its measurements."""
    import psutil

    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--case", case, "--n", str(n),
           "--model", str(model), "--data", str(data), "--batch-size", str(args.batch_size)]
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    ps = psutil.Process(proc.pid)
    polled_peak, reason = 0, None
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss
        except psutil.Error:
            rss = 0
        polled_peak = max(polled_peak, rss)
        elapsed = time.perf_counter() - started
        if limit_gb is not None and rss > limit_gb * 2**30:
            reason = f"stopped at {rss / 2**30:.1f} GB RSS (limit {limit_gb:g} GB) after {elapsed:.0f} s"
        elif limit_gb is not None and _mem_available() < 2 * 2**30:
            reason = f"stopped after {elapsed:.0f} s at {rss / 2**30:.1f} GB RSS: the machine had < 2 GB available"
        elif elapsed > timeout:
            reason = f"stopped after {elapsed:.0f} s (time limit) at {rss / 2**30:.1f} GB RSS"
        if reason:
            proc.kill()
            break
        time.sleep(0.1)
    out, err = proc.communicate()
    result: dict[str, Any] = {"case": case, "images": n, "load_before": load_before, "load_after": os.getloadavg()[0],
                              "polled_peak_rss_bytes": polled_peak}
    if reason:
        result["did_not_finish"] = reason
    elif proc.returncode != 0:
        result["did_not_finish"] = f"failed (exit {proc.returncode}): {err.strip().splitlines()[-1] if err.strip() else ''}"
    else:
        result.update(json.loads(out.strip().splitlines()[-1]))
    print(f"  {case:18s} {n:5d} images: " + (
        result.get("did_not_finish") or
        f"{result['seconds']:.1f} s, peak RSS {result['peak_rss_bytes'] / 1e9:.2f} GB (load {load_before:.1f})"),
        flush=True)
    return result


def machine() -> dict[str, Any]:
    import numpy
    import onnx
    import onnxruntime

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import torch

        torch_version = str(torch.__version__)
    except ImportError:
        torch_version = "not installed"
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "torch": torch_version,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _fmt(r: dict[str, Any] | None) -> tuple[str, str]:
    if r is None:
        return "not run", ""
    if "did_not_finish" in r:
        return "did not finish", r["did_not_finish"]
    return f"{r['seconds']:.1f} s", f"{r['peak_rss_bytes'] / 1e9:.2f} GB"


def render(results: dict[str, Any]) -> str:
    m, runs, n = results["machine"], results["runs"], results["images"]
    by = {(r["case"], r["images"]): r for r in runs}
    lines = [
        BEGIN,
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; Python {m['python']}, numpy {m['numpy']}, "
        f"onnx {m['onnx']}, onnxruntime {m['onnxruntime']}, torch {m['torch']} (model building only). {m['date']}. "
        f"Command: `python benchmarks/calibration.py{' --quick' if results['quick'] else ''}`, batch size "
        f"{results['batch_size']}.",
        "",
        "The machine is shared with other engineers' work: wall times are noisy (the load average before each case "
        "is listed; 2.0 means both cores busy with something else).",
        "",
        f"ResNet-18-shaped model, {n} smooth-noise images at 3x224x224, each case in its own process:",
        "",
        "| case | calibration call | peak RSS | CPU time | load before |",
        "|---|---|---|---|---|",
    ]
    for case, label in (("quantpipe-entropy", "quantpipe entropy"), ("quantpipe-minmax", "quantpipe minmax"),
                        ("ort-minmax", "onnxruntime quantize_static MinMax"),
                        ("ort-entropy", "onnxruntime quantize_static Entropy")):
        r = by.get((case, n))
        wall, rss = _fmt(r)
        cpu = f"{r['cpu_seconds']:.0f} s" if r and "cpu_seconds" in r else ""
        load = f"{r['load_before']:.1f}" if r else ""
        lines.append(f"| {label} | {wall} | {rss} | {cpu} | {load} |")
    lines += ["", "quantpipe entropy, memory against the amount of data:", "",
              "| images | calibration call | peak RSS | load before |", "|---|---|---|---|"]
    for k in results["scaling"]:
        r = by.get(("quantpipe-entropy", k))
        wall, rss = _fmt(r)
        lines.append(f"| {k} | {wall} | {rss} | {r['load_before']:.1f} |" if r else f"| {k} | not run | | |")
    if results.get("notes"):
        lines += [""] + [f"- {note}" for note in results["notes"]]
    lines.append(END)
    return "\n".join(lines) + "\n"


def write_section(block: str) -> None:
    text = RESULTS_MD.read_text(encoding="utf-8") if RESULTS_MD.is_file() else "# Benchmark results\n"
    if BEGIN.split(" (")[0] in text and END in text:
        head, rest = text.split(BEGIN.split(" (")[0], 1)
        tail = rest.split(END, 1)[1]
        text = head + block.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n## Calibration\n\n" + block
    from quantpipe.fsutil import atomic_write_text

    atomic_write_text(RESULTS_MD, text)


def targets(results: dict[str, Any]) -> list[str]:
    """The issue's "done when" checks, stated with the numbers."""
    by = {(r["case"], r["images"]): r for r in results["runs"] if "did_not_finish" not in r}
    n, notes = results["images"], []
    qp, ort_mm = by.get(("quantpipe-entropy", n)), by.get(("ort-minmax", n))
    if qp:
        gb = qp["peak_rss_bytes"] / 1e9
        notes.append(f"Target peak RSS <= 1.0 GB for quantpipe entropy on {n} images: {gb:.2f} GB "
                     f"({'met' if gb <= 1.0 else f'missed by {gb - 1.0:.2f} GB'}).")
    if qp and ort_mm:
        ratio = qp["seconds"] / ort_mm["seconds"]
        notes.append(f"Target wall time <= onnxruntime MinMax's in the same run: {qp['seconds']:.1f} s vs "
                     f"{ort_mm['seconds']:.1f} s ({ratio:.2f}x, {'met' if ratio <= 1.0 else 'missed'}).")
    small, large = (by.get(("quantpipe-entropy", k)) for k in (min(results["scaling"]), max(results["scaling"])))
    if small and large:
        growth = large["peak_rss_bytes"] / small["peak_rss_bytes"] - 1
        notes.append(f"Target peak RSS growth < 10% from {min(results['scaling'])} to {max(results['scaling'])} "
                     f"images: {growth * 100:+.1f}% ({'met' if growth < 0.10 else 'missed'}).")
    return notes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="64/128 images, no onnxruntime Entropy")
    p.add_argument("--bench-dir", type=Path, default=DEFAULT_DIR)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--skip-ort-entropy", action="store_true")
    p.add_argument("--ort-entropy-limit-gb", type=float, default=18.0)
    p.add_argument("--only", nargs="*", help="run only these of: quantpipe-entropy quantpipe-minmax ort-minmax "
                                               "scaling ort-entropy")
    p.add_argument("--no-write", action="store_true", help="do not rewrite benchmarks/RESULTS.md")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    images, scaling = (64, (32, 128)) if args.quick else (512, (128, 512, 1024))
    print(f"building the model and {MAX_IMAGES} images in {args.bench_dir} (once) ...", flush=True)
    model, data = build(args.bench_dir, MAX_IMAGES)
    wanted = set(args.only) if args.only else None

    def want(case: str) -> bool:
        return wanted is None or case in wanted

    runs: list[dict[str, Any]] = []
    notes: list[str] = []
    for case in ("quantpipe-entropy", "quantpipe-minmax", "ort-minmax"):
        if want(case):
            runs.append(run_case(case, images, args, model, data))
    if want("scaling"):
        for k in scaling:
            if k != images:
                runs.append(run_case("quantpipe-entropy", k, args, model, data))
    if want("ort-entropy") and not (args.quick or args.skip_ort_entropy):
        runs.append(run_case("ort-entropy", images, args, model, data, limit_gb=args.ort_entropy_limit_gb))
        notes.append(f"onnxruntime Entropy on {max(scaling)} images was not run: it keeps every activation of every "
                     f"sample (>15 GB at {images} images on this model) and would exhaust this shared machine.")
    else:
        notes.append("onnxruntime Entropy was not run in this invocation.")
    results = {"machine": machine(), "images": images, "scaling": list(scaling), "quick": args.quick,
               "batch_size": args.batch_size, "runs": runs, "notes": notes}
    results["notes"] = targets(results) + notes
    args.bench_dir.mkdir(parents=True, exist_ok=True)
    (args.bench_dir / "results.json").write_text(json.dumps(results, indent=2))
    block = render(results)
    print(block)
    if args.quick:
        print("(--quick: benchmarks/RESULTS.md left as it is)")
    elif not args.no_write:
        write_section(block)
        print(f"wrote the Calibration section of {RESULTS_MD}")


if __name__ == "__main__":
    main()
