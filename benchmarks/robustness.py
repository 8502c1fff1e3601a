"""Robustness sweep: quantpipe's INT8 and FP16 writers on many architectures, run and compared with FP32.

Accuracy on the open benchmark set says how good quantpipe is on two models; this says whether it works on
the graphs users bring. Each model is quantized with the defaults `pipeline.yaml` uses (calibration `best`,
per-channel weights, bias correction, smoothing, the non-negative shift, split_activations auto), the INT8
and FP16 models are written through the real writers (checker included), run in onnxruntime on held-out
inputs, and compared with the FP32 model: output SQNR, top-1 agreement of the first output's last axis,
what was split and shifted, and any failure with its message.

Models:
  * torchvision architectures (`--torchvision resnet18 mobilenet_v2 ...`), exported here with torch.onnx
    (opset 18) from *random* weights whose BatchNorm statistics are re-estimated on the real calibration
    photos. Random weights say nothing about a trained model's INT8 accuracy: read their numbers as "runs,
    valid, not absurd", and compare quantpipe with onnxruntime's `quantize_static` on the same model
    (`--ort`), not with the open set.
  * any ONNX model with its data (`--onnx model.onnx:calib.npz:eval.npz`), e.g. the trained models some
    PyPI wheels ship.

Inputs for the torchvision models are the open benchmark set's EfficientNet-Lite0 crops (real photos,
224x224, x/127.5-1): build it first with `bash ../shared/bench/build.sh .bench`.

    python benchmarks/robustness.py --torchvision resnet18 mobilenet_v3_small --onnx yolo.onnx:c.npz:e.npz

Needs torch, torchvision and onnxscript for the torchvision models; nothing beyond quantpipe for --onnx.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def export_torchvision(name: str, calib: np.ndarray, out: Path) -> None:
    """Random-weight torchvision model, BatchNorm statistics from `calib`, exported to ONNX (opset 18)."""
    import torch
    import torchvision.models as tvm

    torch.manual_seed(0)
    if name.startswith(("deeplab", "fcn", "lraspp")):
        import torchvision.models.segmentation as seg

        net = getattr(seg, name)(weights=None, weights_backbone=None)
    elif name == "googlenet":
        net = tvm.googlenet(weights=None, aux_logits=False, init_weights=True)
    else:
        net = getattr(tvm, name)(weights=None)
    net.train()
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.momentum = None  # a plain average over the batches below
                mod.reset_running_stats()
        for i in range(0, len(calib), 16):
            net(torch.from_numpy(calib[i:i + 16]))
    net.eval()

    class FirstOutput(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.inner(x)
            return y["out"] if isinstance(y, dict) else y

    torch.onnx.export(FirstOutput(net).eval(), (torch.from_numpy(calib[:2]),), str(out), input_names=["input"],
                      output_names=["out"], dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, opset_version=18,
                      external_data=False)


def measure(model_path: Path, calib_path: Path, eval_path: Path, tmp: Path, ort_baseline: bool) -> dict[str, Any]:
    import onnx
    import onnxruntime as ort

    from quantpipe import quantize as Q
    from quantpipe.calibration import calibrate_in_memory
    from quantpipe.data import open_dataset
    from quantpipe.model import tensor_info
    from quantpipe.ortsession import ORT_INT8_SESSION_CONFIG

    model = onnx.load(str(model_path))
    infos = [tensor_info(i) for i in model.graph.input]
    calib = open_dataset(calib_path, infos, role="calibration")
    with np.load(eval_path) as z:
        ev = {i.name: z[i.name] for i in infos}
    n = len(next(iter(ev.values())))

    def run(path: Path, int8: bool = False) -> np.ndarray:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if int8:
            for k, v in ORT_INT8_SESSION_CONFIG.items():
                so.add_session_config_entry(k, v)
        s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        first = s.get_outputs()[0].name
        return np.concatenate([s.run([first], {k: v[i:i + 8] for k, v in ev.items()})[0] for i in range(0, n, 8)])

    ref = run(model_path).astype(np.float64)

    def score(out: np.ndarray) -> dict[str, float]:
        err = float(np.sum((out.astype(np.float64) - ref) ** 2))
        sq = 10 * np.log10(float(np.sum(ref**2)) / err) if err > 0 else float("inf")
        return {"sqnr_db": round(float(sq), 1), "agreement": round(float(np.mean(out.argmax(-1) == ref.argmax(-1))), 3)}

    row: dict[str, Any] = {"model": model_path.stem, "nodes": len(model.graph.node),
                           "opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))}
    t = time.perf_counter()
    try:
        amax = calibrate_in_memory(str(model_path), calib, method="best", batch_size=8)
        opts = Q.with_calibration_data(model, Q.QuantizeOptions(split_activations="auto"), calib, batch_size=8,
                                       amax=amax)
        rep = Q.quantize_model(model_path, amax, tmp / "int8.onnx", opts)
        row["int8"] = {**score(run(tmp / "int8.onnx", int8=True)), "quantized": len(rep.quantized_nodes),
                       "shifted": len(rep.shifted_tensors), "split": [f"{a} x{k}" for a, k in rep.split_tensors],
                       "seconds": round(time.perf_counter() - t, 1)}
    except Exception as e:  # noqa: BLE001 - the sweep records failures instead of stopping
        row["int8"] = {"error": f"{type(e).__name__}: {e}"[:400], "trace": traceback.format_exc(limit=3)[-600:]}
    try:
        Q.write_fp16_model(model_path, tmp / "fp16.onnx")
        row["fp16"] = score(run(tmp / "fp16.onnx"))
    except Exception as e:  # noqa: BLE001
        row["fp16"] = {"error": f"{type(e).__name__}: {e}"[:400]}
    if ort_baseline:
        row["ort_quantize_static"] = _ort_static(model_path, calib_path, tmp, infos, score, run)
    return row


def _ort_static(model_path: Path, calib_path: Path, tmp: Path, infos: list[Any], score: Any, run: Any) -> dict[str, Any]:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    with np.load(calib_path) as z:
        arrays = {i.name: z[i.name] for i in infos}
    n = len(next(iter(arrays.values())))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{k: v[i:i + 8] for k, v in arrays.items()} for i in range(0, n, 8)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    try:
        out = tmp / "ort.onnx"
        quantize_static(str(model_path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
        return score(run(out))
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"[:300]}


def _cell(d: dict[str, Any] | None) -> str:
    if not d:
        return "-"
    if "error" in d:
        return "FAILED: " + d["error"].splitlines()[0][:120]
    return f"{d['sqnr_db']} dB / {d['agreement']:.3f}"


def render(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | opset | nodes | INT8 (SQNR / agreement) | split | FP16 | onnxruntime quantize_static |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        i8 = r.get("int8", {})
        split = ", ".join(i8.get("split", [])) or "-"
        lines.append(f"| {r['model']} | {r['opset']} | {r['nodes']} | {_cell(i8)} | {split} | {_cell(r.get('fp16'))} "
                     f"| {_cell(r.get('ort_quantize_static'))} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--torchvision", nargs="*", default=[], help="torchvision model names (random weights)")
    p.add_argument("--onnx", nargs="*", default=[], help="MODEL.onnx:CALIB.npz:EVAL.npz")
    p.add_argument("--bench", default=str(ROOT / ".bench"), help="the open benchmark set (inputs for torchvision)")
    p.add_argument("--ort", action="store_true", help="also run onnxruntime quantize_static on each model")
    p.add_argument("--json", help="write the rows here too")
    args = p.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="qp-robust-") as tmp_s:
        tmp = Path(tmp_s)
        jobs: list[tuple[Path, Path, Path]] = []
        if args.torchvision:
            eff = Path(args.bench) / "effnet_lite0"
            with np.load(eff / "calib.npz") as z:
                calib = z["input"]
            for name in args.torchvision:
                path = tmp / f"{name}.onnx"
                try:
                    export_torchvision(name, calib, path)
                except Exception as e:  # noqa: BLE001
                    rows.append({"model": name, "opset": "-", "nodes": "-", "int8": {"error": f"export: {e}"}})
                    continue
                jobs.append((path, eff / "calib.npz", eff / "eval.npz"))
        for spec in args.onnx:
            m, c, e = spec.split(":")
            jobs.append((Path(m), Path(c), Path(e)))
        for path, c, e in jobs:
            work = tmp / f"{path.stem}-out"
            work.mkdir()
            row = measure(path, c, e, work, args.ort)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "trace"}), flush=True)
    print(render(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if any("error" in r.get("int8", {}) or "error" in r.get("fp16", {}) for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
