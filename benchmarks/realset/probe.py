#!/usr/bin/env python3
"""Where a model's INT8 error comes from: per-layer sensitivity, then the worst k layers kept in float.

    PYTHONPATH=. python benchmarks/realset/probe.py --model .realbench/ppocr_det/model.onnx \
        --calib .realbench/ppocr_det/calib.npz --eval .realbench/ppocr_det/eval.npz [--method best] [--top 12]

Calibrates with quantpipe (the method given), writes the Q/DQ model with quantize's defaults, ranks the quantized
layers with `quantpipe.sensitivity.layer_sensitivity` (output SQNR with that one layer quantized alone, for the
`--top` layers of lowest local SQNR), then rebuilds with the worst 1, 2, 4, ... of them in float
(`keep_float_nodes`, what `accuracy_fallback` does) and scores each build on the eval data in exact Q/DQ
arithmetic: output SQNR, and for a probability map (det) the IoU of the 0.3-thresholded masks.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from score import MODELS, charset_of, run, task_metrics  # noqa: E402

from quantpipe import metrics as M  # noqa: E402
from quantpipe.ortsession import ort_session  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--eval", required=True)
    ap.add_argument("--method", default="best")
    ap.add_argument("--top", type=int, default=12, help="layers measured one at a time")
    ap.add_argument("--max-samples", type=int, default=16, help="eval samples the sensitivity uses")
    ap.add_argument("--task", choices=MODELS, default=None, help="also score with this model's task metric (score.py)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import onnx

    from quantpipe.calibration import calibrate_in_memory
    from quantpipe.data import open_dataset
    from quantpipe.model import tensor_info
    from quantpipe.quantize import QuantizeOptions, write_qdq_model
    from quantpipe.sensitivity import layer_sensitivity

    tmp = tempfile.mkdtemp(prefix="qp-probe-")
    charset = charset_of(args.model) if args.task == "ppocr_rec" else None
    model = onnx.load(args.model)
    if max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) < 13:
        # quantize upgrades such a model itself (per-channel DequantizeLinear needs opset 13); the sensitivity
        # analysis does not (it fails with "Unrecognized attribute: axis"), so hand both the upgraded model.
        from onnx import version_converter

        args.model = os.path.join(tmp, "fp32_opset13.onnx")
        onnx.save(version_converter.convert_version(model, 13), args.model)
    infos = [tensor_info(i) for i in model.graph.input]
    calib = open_dataset(args.calib, infos, role="calibration")
    ev = open_dataset(args.eval, infos, role="evaluation")
    z = dict(np.load(args.eval))
    x = z[infos[0].name]
    charset = charset_of(args.model) if args.task == "ppocr_rec" else None
    amax = calibrate_in_memory(args.model, calib, method=args.method, batch_size=8)
    ref = run(ort_session(onnx.load(args.model)), x, 4)
    is_map = ref.ndim == 4 and ref.shape[1] == 1

    def build(keep: frozenset[str], name: str) -> tuple[str, dict]:
        path = os.path.join(tmp, name + ".onnx")
        opts = dataclasses.replace(QuantizeOptions(), keep_float_nodes=keep)
        rep = write_qdq_model(args.model, amax, path, opts, calibration_data=calib)
        out = run(ort_session(onnx.load(path), int8=True, optimize=False), x, 4)
        m = {"float_layers": len(keep), "quantized": len(rep.quantized_nodes), "sqnr_db": round(M.sqnr_db(out, ref), 2)}
        if is_map:
            a, b = ref > 0.3, out > 0.3
            m["mask_iou"] = round(float((a & b).sum() / max(1, (a | b).sum())), 4)
        if args.task:
            t = task_metrics(args.task, ref, out, z, charset)
            m.update({k: (round(v, 4) if isinstance(v, float) else v) for k, v in t.items()
                      if k in ("exact", "n", "cer", "agree", "boxes_matched", "boxes_fp32", "box_f1")})
        return path, m

    full_path, full = build(frozenset(), "full")
    print(f"[probe] all quantized: {full}", flush=True)
    rows = layer_sensitivity(args.model, full_path, amax, ev, max_samples=args.max_samples,
                             one_at_a_time=args.top, metric="sqnr_db", calibration_data=calib)
    measured = [r for r in rows if r.output_metric is not None]
    print(f"[probe] {len(rows)} quantized layers; alone (output SQNR with only that layer in INT8):")
    for r in measured:
        print(f"  {r.node:32s} {r.op_type:14s} out {r.output_metric:6.1f} dB  accumulated at layer "
              f"{r.sqnr_db if r.sqnr_db is None else round(r.sqnr_db, 1)} dB  ({r.tensor})")
    steps = []
    k = 1
    while k <= len(measured):
        _, m = build(frozenset(r.node for r in measured[:k]), f"keep{k}")
        m["kept"] = [r.node for r in measured[:k]]
        steps.append(m)
        print(f"[probe] worst {k} in float: {m}", flush=True)
        k *= 2
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"full": full, "layers": [dataclasses.asdict(r) for r in rows], "fallback": steps}, f, indent=1)


if __name__ == "__main__":
    main()
