"""Binning activations on the GPU: the fused kernel (`calibration/gpu_bins.py`) against CuPy's array functions.

    python benchmarks/gpu_bins.py [--batches 16] [--json out.json]      # on a GPU host with CuPy

Feeds `StreamingHistogram` and `SignedHistogram` the activations of one EfficientNet-Lite0-shaped pass per batch
(batch 32: the 95 calibrated tensors' shapes below, about 420M values a batch; conv outputs signed, their Relu
outputs with half zeros), once with `histogram.GPU_KERNEL = False` (CuPy's abs / multiply / cast / bincount, the
counts copied to the host every update: the path before the kernel) and once with the kernel, synchronised
before the clock stops and with every histogram's counts read at the end (the device counts copied over). Prints
seconds, values per second and whether both paths' histograms are identical (they must be).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# (channels, height, width, count): EfficientNet-Lite0's activation shapes at 224 x 224, roughly as calibrated.
SHAPES = [(32, 112, 112, 3), (16, 112, 112, 2), (96, 112, 112, 2), (96, 56, 56, 2), (24, 56, 56, 4),
          (144, 56, 56, 4), (144, 28, 28, 2), (40, 28, 28, 4), (240, 28, 28, 4), (240, 14, 14, 2),
          (80, 14, 14, 6), (480, 14, 14, 10), (112, 14, 14, 6), (672, 14, 14, 6), (672, 7, 7, 2),
          (192, 7, 7, 8), (1152, 7, 7, 14), (320, 7, 7, 2), (1280, 7, 7, 2), (1000, 1, 1, 1)]


def _tensors(cp: Any, batch: int) -> list[tuple[str, Any]]:
    rng = cp.random.default_rng(7)
    out: list[tuple[str, Any]] = []
    for c, h, w, k in SHAPES:
        for j in range(k):
            x = rng.standard_normal((batch, c, h, w), dtype=cp.float32) * (1.0 + j)
            out.append(("signed" if j % 2 == 0 else "relu", x if j % 2 == 0 else cp.maximum(x, 0)))
    return out


def _run(cp: Any, tensors: list[tuple[str, Any]], batches: int, kernel: bool) -> tuple[float, list[Any]]:
    from quantpipe.calibration import histogram
    from quantpipe.calibration.histogram import SignedHistogram, StreamingHistogram

    histogram.GPU_KERNEL = kernel
    hists = [SignedHistogram() if kind == "signed" else StreamingHistogram() for kind, _ in tensors]
    cp.cuda.Device().synchronize()
    t0 = time.perf_counter()
    for _ in range(batches):
        for h, (_, x) in zip(hists, tensors, strict=True):
            h.update(x)
    for h in hists:  # read every count (the kernel's wait on the device until then)
        _ = h.pos.counts if isinstance(h, SignedHistogram) else h.counts
        if isinstance(h, SignedHistogram):
            _ = h.neg.counts
    cp.cuda.Device().synchronize()
    return time.perf_counter() - t0, hists


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=16, help="passes over the tensors (16: 512 images at batch 32)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    import cupy as cp

    tensors = _tensors(cp, args.batch)
    values = sum(int(x.size) for _, x in tensors) * args.batches
    _run(cp, tensors, 1, True)  # compile the kernels and warm CuPy's own
    _run(cp, tensors, 1, False)
    rows = {}
    for name, kernel in (("cupy functions (before)", False), ("fused kernel", True)):
        seconds, hists = _run(cp, tensors, args.batches, kernel)
        rows[name] = {"seconds": round(seconds, 3), "values_per_s": values / seconds, "hists": hists}
    same = all(a == b for a, b in zip(rows["cupy functions (before)"]["hists"], rows["fused kernel"]["hists"], strict=True))
    props = cp.cuda.runtime.getDeviceProperties(0)
    gpu = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    print(f"{gpu}; {len(tensors)} tensors, {values / 1e9:.2f}G values ({args.batches} batches of {args.batch})")
    print("| path | s | values / s |\n|---|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['seconds']:.3f} | {r['values_per_s'] / 1e9:.1f}G |")
    print(f"identical histograms: {same}")
    if args.json:
        args.json.write_text(json.dumps({"gpu": gpu, "tensors": len(tensors), "values": values, "identical": same,
                                         **{k: {kk: vv for kk, vv in v.items() if kk != "hists"}
                                            for k, v in rows.items()}}, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
