#!/usr/bin/env python3
"""Quantizes the real-model set's models with `quantpipe quantize` and scores each INT8 model with its task metric.

    PYTHONPATH=. python benchmarks/realset/score.py --set .realbench [--out DIR] [--jobs N] [--models ...]

For each model and method (entropy, minmax, percentile, mse, best, auto, and best with GPTQ weight rounding) it runs
`python -m quantpipe quantize --model M --data calib.npz --method X --out ...`, then runs FP32 and INT8 on
eval.npz in onnxruntime CPU. INT8 runs with the exact Q/DQ arithmetic: `quantpipe.ortsession.ORT_INT8_SESSION_CONFIG`
and graph optimizations disabled. Metrics are against FP32 (FP32 scores 1.0):
  ppocr_rec  CTC greedy decode (blank 0, rapidocr's dictionary): exact-line agreement (also with leading and
             trailing spaces ignored), CER;
  ppocr_det  IoU of the probability map thresholded at 0.3 (DBNet), summed over pages; box agreement: connected
             components (8-connected, >= 16 px) matched one-to-one at box IoU >= 0.5, F1 over all pages;
  ppocr_cls  top-1 agreement;
  yolo_det   `quantpipe.detection.decode` (layout auto, score > 0.25, class-wise NMS at 0.45) of both outputs,
             `detection_agreement` with FP32's detections (F1 of same-class matches at IoU >= 0.5), the number of
             FP32's detections, and the SQNR of the class rows (4:) and of the box rows (0:4) apart;
and the output SQNR for every model. The row "fp32+noise" is FP32 on the eval inputs plus Gaussian noise of half a
grey level (NOISE_GREY): how much of a metric an imperceptible input change already costs. Writes OUT/results.json
and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import onnx

from quantpipe import metrics as M
from quantpipe.ortsession import ort_session

VARIANTS = {  # name -> extra `quantpipe quantize` flags
    "entropy": ["--method", "entropy"],
    "minmax": ["--method", "minmax"],
    "percentile": ["--method", "percentile"],
    "mse": ["--method", "mse"],
    "best": ["--method", "best"],
    "auto": ["--method", "auto"],
    "best+gptq": ["--method", "best", "--weight-rounding", "gptq"],
    "auto+eq": ["--method", "auto", "--equalize-depthwise"],
    "auto+gptq": ["--method", "auto", "--weight-rounding", "gptq"],
}
MODELS = ("ppocr_rec", "ppocr_det", "ppocr_cls", "ppocr3_rec", "yolo_det")
#: Variant "fp32+noise": FP32 itself on the eval inputs plus Gaussian noise of this many grey levels (of 255), seed 0.
#: Not a quantization: the metric's resolution, what an imperceptible change of the input already costs.
NOISE_GREY = 0.5
#: One grey level in input units: the OCR models' inputs are (p/255 - 0.5)/0.5, yolo_det's p/255 (nudenet).
GREY_LEVEL = {"yolo_det": 1 / 255}
DEFAULT_GREY_LEVEL = 2 / 255
DET_THRESH = 0.3   # DBNet / rapidocr Det.thresh
MIN_AREA = 16      # components smaller than this are noise, not text
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(set_dir: str) -> dict:
    """The manifest, after checking every model and npz file against its sha256."""
    with open(os.path.join(set_dir, "manifest.json")) as f:
        manifest = json.load(f)
    for _name, entry in manifest["models"].items():
        for item in [entry["model"], *entry["splits"].values()]:
            if sha256(os.path.join(set_dir, item["file"])) != item["sha256"]:
                raise SystemExit(f"{item['file']}: sha256 differs from manifest.json; rebuild the set")
    return manifest


def run(sess, x: np.ndarray, batch: int = 8) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def components(mask: np.ndarray) -> np.ndarray:
    """Bounding boxes [x0, y0, x1, y1) of the 8-connected components of `mask` with at least MIN_AREA pixels."""
    import cv2

    n, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[1:, cv2.CC_STAT_AREA] >= MIN_AREA
    s = stats[1:][keep]
    return np.stack([s[:, 0], s[:, 1], s[:, 0] + s[:, 2], s[:, 1] + s[:, 3]], axis=1) if len(s) else np.zeros((0, 4))


def box_matches(a: np.ndarray, b: np.ndarray, thresh: float = 0.5) -> int:
    """Greedy one-to-one matches between two box sets at IoU >= thresh."""
    if not len(a) or not len(b):
        return 0
    ix = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = ix * iy
    area = lambda z: (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1])  # noqa: E731
    iou = inter / (area(a)[:, None] + area(b)[None, :] - inter)
    matched = 0
    while iou.size and iou.max() >= thresh:
        i, j = np.unravel_index(np.argmax(iou), iou.shape)
        matched += 1
        iou[i, :] = -1
        iou[:, j] = -1
    return matched


def input_name(model_path: str) -> str:
    """The model's (first) input, which is also its key in calib.npz / eval.npz."""
    return onnx.load(model_path, load_external_data=False).graph.input[0].name


def decode(probs: np.ndarray, charset: list[str]) -> list[str]:
    """rapidocr's CTCLabelDecode (blank 0) as text: quantpipe's greedy CTC decode, mapped through the charset."""
    return ["".join(charset[i] for i in seq) for seq in M.ctc_greedy_decode(probs, blank=0)]


def task_metrics(model: str, ref: np.ndarray, out: np.ndarray, z: dict, charset: list[str] | None) -> dict:
    m: dict = {"sqnr_db": M.sqnr_db(out, ref)}
    if model.endswith("_rec"):
        fp32, q = decode(ref, charset), decode(out, charset)
        m["exact"] = int(sum(a == b for a, b in zip(fp32, q, strict=True)))
        # the same lines with leading / trailing spaces ignored: blank vs space at a line's edges is where FP32
        # itself is unstable (see NOISE_GREY)
        m["exact_stripped"] = int(sum(a.strip() == b.strip() for a, b in zip(fp32, q, strict=True)))
        m["n"] = len(fp32)
        m["exact_rate"] = m["exact"] / m["n"]
        m["cer"] = M.character_error_rate(q, fp32)
        m["exact_vs_rendered"] = float(np.mean([b == t for b, t in zip(q, z["text"], strict=True)]))
        m["diffs"] = [[a, b] for a, b in zip(fp32, q, strict=True) if a != b][:8]
    elif model == "ppocr_det":
        fm, qm = ref[:, 0] > DET_THRESH, out[:, 0] > DET_THRESH
        m["mask_iou"] = float((fm & qm).sum() / max(1, (fm | qm).sum()))
        nf = nq = matched = 0
        for a, b in zip(fm, qm, strict=True):
            ba, bb = components(a), components(b)
            nf, nq, matched = nf + len(ba), nq + len(bb), matched + box_matches(ba, bb)
        m.update(boxes_fp32=nf, boxes_int8=nq, boxes_matched=matched, box_f1=2 * matched / max(1, nf + nq))
        m["n"] = len(ref)
    elif model == "yolo_det":
        from quantpipe import detection as D

        fd, qd = D.decode(ref), D.decode(out)   # layout auto: [N, 4 + 18, 2100] is read as NCA
        m["det_agreement"] = D.detection_agreement(qd, fd)
        m["dets_fp32"] = sum(len(d.scores) for d in fd)
        m["dets_int8"] = sum(len(d.scores) for d in qd)
        m["dets_matched"] = sum(D.matched_detections(q, f) for q, f in zip(qd, fd, strict=True))
        m["sqnr_cls_db"] = M.sqnr_db(out[:, 4:], ref[:, 4:])
        m["sqnr_box_db"] = M.sqnr_db(out[:, :4], ref[:, :4])
        m["n"] = len(ref)
    else:
        m["agree"] = int((ref.argmax(1) == out.argmax(1)).sum())
        m["n"] = len(ref)
        m["top1_agreement"] = m["agree"] / m["n"]
    return m


def charset_of(model_path: str) -> list[str]:
    meta = {p.key: p.value for p in onnx.load(model_path, load_external_data=False).metadata_props}
    return ["blank"] + meta["character"].splitlines() + [" "]


def score_variant(set_dir: str, out_dir: str, model: str, variant: str, threads: int, python: str) -> dict:
    """Quantize one model with one variant (or score FP32 for variant 'fp32'); returns its metrics."""
    src = os.path.join(set_dir, model, "model.onnx")
    z = dict(np.load(os.path.join(set_dir, model, "eval.npz")))
    charset = charset_of(src) if model.endswith("_rec") else None
    x = z[input_name(src)]
    ref = run(ort_session(onnx.load(src), threads=threads), x)
    row: dict = {"model": model, "variant": variant}
    if variant == "fp32":
        row.update(task_metrics(model, ref, ref, z, charset))
        return row
    if variant == "fp32+noise":
        grey = GREY_LEVEL.get(model, DEFAULT_GREY_LEVEL)
        noisy = x + np.random.default_rng(0).normal(0.0, NOISE_GREY * grey, x.shape)
        row.update(task_metrics(model, ref, run(ort_session(onnx.load(src), threads=threads),
                                                noisy.astype(np.float32)), z, charset))
        return row
    dst = os.path.join(out_dir, f"{model}.{variant}.onnx")
    cmd = [python, "-m", "quantpipe", "quantize", "-q", "--model", src,
           "--data", os.path.join(set_dir, model, "calib.npz"), "--out", dst, *VARIANTS[variant]]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")})
    row["quantize_s"] = round(time.perf_counter() - t0, 1)
    row["log"] = (proc.stdout + proc.stderr)[-2000:]
    if proc.returncode:
        row["error"] = f"quantpipe quantize exit {proc.returncode}"
        return row
    # The exact Q/DQ arithmetic: no fusions, int8 kernels allowed (no U8S8 saturation).
    out = run(ort_session(onnx.load(dst), int8=True, optimize=False, threads=threads), x)
    row.update(task_metrics(model, ref, out, z, charset))
    return row


def _db(v: float) -> str:
    return f"{v:.1f} dB" if np.isfinite(v) else "exact"


def fmt(row: dict) -> str:
    if "error" in row:
        return "failed"
    s = _db(row["sqnr_db"])
    if row["model"].endswith("_rec"):
        return (f"{row['exact']}/{row['n']} ({row['exact_rate']:.3f}), edges stripped {row['exact_stripped']}, "
                f"CER {row['cer']:.3f}, {s}")
    if row["model"] == "ppocr_det":
        return f"IoU {row['mask_iou']:.3f}, boxes {row['boxes_matched']}/{row['boxes_fp32']} (F1 {row['box_f1']:.3f}), {s}"
    if row["model"] == "yolo_det":
        return (f"F1 {row['det_agreement']:.3f} ({row['dets_matched']} of {row['dets_fp32']} FP32 dets, "
                f"{row['dets_int8']} found), cls {_db(row['sqnr_cls_db'])}, box {_db(row['sqnr_box_db'])}, {s}")
    return f"{row['agree']}/{row['n']} ({row['top1_agreement']:.3f}), {s}"


def table(rows: list[dict]) -> str:
    cols = ["fp32", "fp32+noise", *VARIANTS]
    by = {(r["model"], r["variant"]): r for r in rows}
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for model in dict.fromkeys(r["model"] for r in rows):
        lines.append(f"| {model} | " + " | ".join(fmt(by[(model, c)]) if (model, c) in by else "—" for c in cols) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default=".realbench")
    ap.add_argument("--out", default=None, help="default: SET/scores")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--variants", nargs="+", default=["fp32+noise", *VARIANTS], choices=["fp32+noise", *VARIANTS])
    ap.add_argument("--jobs", type=int, default=1, help="variants scored in parallel")
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime threads per scoring session (0: its default)")
    ap.add_argument("--python", default=sys.executable, help="the interpreter that runs `-m quantpipe`")
    args = ap.parse_args()
    out_dir = args.out or os.path.join(args.set, "scores")
    os.makedirs(out_dir, exist_ok=True)
    manifest = verify(args.set)
    tasks = [(m, v) for m in args.models for v in ["fp32", *args.variants]]
    # The slow ones first (rec's best/gptq), so the pool finishes together.
    tasks.sort(key=lambda t: (t[1] not in ("best+gptq", "best"), not t[0].endswith("_rec")))
    t0 = time.perf_counter()
    rows = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futs = {pool.submit(score_variant, args.set, out_dir, m, v, args.threads, args.python): (m, v) for m, v in tasks}
        for fut in futs:
            row = fut.result()
            rows.append(row)
            print(f"[score] {row['model']} {row['variant']}: {fmt(row)}"
                  + (f" (quantize {row['quantize_s']} s)" if "quantize_s" in row else ""), flush=True)
    import onnxruntime

    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "wall_s": round(time.perf_counter() - t0),
              "cpu": _cpu(), "cores": os.cpu_count(), "python": sys.version.split()[0],
              "onnxruntime": onnxruntime.__version__, "numpy": np.__version__, "set_tools": manifest["tools"],
              "rows": rows}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
    print(table(rows))


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    main()
