"""The INT8 Q/DQ model (explicit quantization, the way TensorRT wants it) and the FP16 model.

Each job has its own module; this package re-exports the entry points callers use:

- `options`: `QuantizeOptions`, the one object that says how to quantize (defaults from `config`);
- `build`: `build_qdq_model` / `quantize_model`, the fixed order split -> smooth -> plan -> shift -> bias (and output bias) -> emit;
- `placement`: where Q/DQ goes (TensorRT's placement rules, residual Adds, sentinel masks);
- `emit`: the Q/DQ nodes and int8 weights; `weights`: the int8 weight codes (nearest or GPTQ);
- `rewrites/`: `smooth`, `shift`, `split`, `bias_correction`, each exact in float;
- `stats`: per-channel statistics of the calibration data; `gptq`: GPTQ weight codes;
- `split_search`: which activations `split_activations: auto` splits;
- `write`: `write_qdq_model` and `with_calibration_data` (what the calibration data decides);
- `fp16`: the FP16 model.

Graph helpers live in `quantpipe.onnxgraph`, ONNX Runtime sessions in `quantpipe.ortsession`. On ONNX Runtime
CPU run the INT8 model with `ortsession.ORT_INT8_SESSION_CONFIG` (see `ortsession.ort_session` for why).
"""

from __future__ import annotations

from quantpipe.quantize.build import build_qdq_model, quantize_model
from quantpipe.quantize.fp16 import FP16_MAX, Fp16Report, OutOfRangeValue, build_fp16_model, write_fp16_model
from quantpipe.quantize.options import QuantizeOptions
from quantpipe.quantize.placement import QUANTIZABLE_OPS
from quantpipe.quantize.rewrites.shift import OFFSETS_METADATA_KEY, tensor_offsets
from quantpipe.quantize.split_search import choose_splits
from quantpipe.quantize.stats import collect_channel_stats
from quantpipe.quantize.types import ChannelStats, FloatNode, QuantizedNode, QuantizeReport
from quantpipe.quantize.write import with_calibration_data, write_qdq_model

__all__ = [
    "FP16_MAX",
    "OFFSETS_METADATA_KEY",
    "QUANTIZABLE_OPS",
    "ChannelStats",
    "FloatNode",
    "Fp16Report",
    "OutOfRangeValue",
    "QuantizeOptions",
    "QuantizeReport",
    "QuantizedNode",
    "build_fp16_model",
    "build_qdq_model",
    "choose_splits",
    "collect_channel_stats",
    "quantize_model",
    "tensor_offsets",
    "with_calibration_data",
    "write_fp16_model",
    "write_qdq_model",
]
