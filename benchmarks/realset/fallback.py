#!/usr/bin/env python3
"""The default quantization (`auto` ranges) of one real-set model, then the accuracy fallback with a budget.

    PYTHONPATH=. python benchmarks/realset/fallback.py --set .realbench --model ppocr_cls [--target 0.99]

Calibrates on calib.npz (all methods), chooses the ranges as `quantpipe quantize` does by default
(`range_search.choose_ranges`), then runs `quantpipe.fallback.accuracy_fallback` on the calibration lines
(never on eval.npz): top1_agreement for ppocr_cls, line_agreement (CTC, blank 0) for ppocr_rec, map_iou for
ppocr_det (`--metric box_agreement` for its boxes), detection_agreement for yolo_det, each >= --target against FP32. Scores the model it writes on eval.npz with score.py's task metrics
and prints one JSON line: the budget, what the fallback measured on the calibration data, how many of the
quantizable layers stay float, and the eval metrics.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from score import MODELS, charset_of, input_name, run, task_metrics  # noqa: E402

METRIC = {"ppocr_cls": "top1_agreement", "ppocr_rec": "line_agreement", "ppocr3_rec": "line_agreement",
          "ppocr_det": "map_iou", "yolo_det": "detection_agreement"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default=".realbench")
    ap.add_argument("--model", required=True, choices=MODELS)
    ap.add_argument("--target", type=float, default=None, help="default: 0.98 for rec lines, else 0.99")
    ap.add_argument("--max-layers", type=int, default=None)
    ap.add_argument("--metric", default=None, help="the budget's metric (default: METRIC[model]); e.g. box_agreement "
                                                   "for ppocr_det")
    ap.add_argument("--out", default=None, help="where to write the INT8 model (default: a temporary folder)")
    args = ap.parse_args()

    import onnx

    from quantpipe.calibration import calibrate_tables_in_memory
    from quantpipe.data import open_dataset
    from quantpipe.fallback import accuracy_fallback
    from quantpipe.model import load_model_spec
    from quantpipe.onnxgraph import load_onnx
    from quantpipe.ortsession import ort_session
    from quantpipe.quantize.options import QuantizeOptions
    from quantpipe.quantize.range_search import choose_ranges
    from quantpipe.taskmetrics import TaskSpec

    src = os.path.join(args.set, args.model, "model.onnx")
    target = args.target if args.target is not None else (0.98 if args.model.endswith("_rec") else 0.99)
    task = (TaskSpec(task="ctc", blank=0) if args.model.endswith("_rec")
            else TaskSpec(task="dense", threshold=0.3) if args.model == "ppocr_det"
            else TaskSpec(task="detection") if args.model == "yolo_det" else TaskSpec())
    spec, _ = load_model_spec(src)
    calib = open_dataset(os.path.join(args.set, args.model, "calib.npz"), spec.inputs, role="calibration")
    t0 = time.perf_counter()
    tables = calibrate_tables_in_memory(spec.path, calib, methods=["entropy", "minmax", "percentile", "mse", "best"],
                                        batch_size=8)
    choice = choose_ranges(load_onnx(spec.path), tables, QuantizeOptions(), calib, batch_size=8)
    t1 = time.perf_counter()
    out = args.out or os.path.join(tempfile.mkdtemp(), f"{args.model}.fallback.onnx")
    rep, fb = accuracy_fallback(spec.path, choice.amax, calib, metric=args.metric or METRIC[args.model], target=target,  # type: ignore[arg-type]
                                max_layers=args.max_layers, out_path=out, calibration_data=calib, batch_size=8,
                                options=QuantizeOptions(channel_stats=choice.channel_stats), task=task)
    t2 = time.perf_counter()
    z = dict(np.load(os.path.join(args.set, args.model, "eval.npz")))
    x = z[input_name(src)]
    ref = run(ort_session(onnx.load(src)), x)
    got = run(ort_session(onnx.load(out), int8=True, optimize=False), x)
    m = task_metrics(args.model, ref, got, z, charset_of(src) if args.model.endswith("_rec") else None)
    m.pop("diffs", None)
    print(json.dumps({
        "model": args.model, "metric": fb.metric, "target": fb.target, "chosen_on": fb.chosen_on,
        "calib_initial": fb.initial, "calib_final": fb.final, "met": fb.met,
        "float_layers": [s.node for s in fb.steps], "num_quantizable": fb.num_quantizable,
        "float_fraction": len(fb.steps) / max(1, fb.num_quantizable), "auto_winner": choice.winner,
        "auto_s": round(t1 - t0, 1), "fallback_s": round(t2 - t1, 1), "eval": m,
    }, default=float))


if __name__ == "__main__":
    main()
