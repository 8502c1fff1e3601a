"""`write_qdq_model`, the standalone entry point, and `with_calibration_data`: what the calibration data
decides (per-channel statistics, the activations to split, GPTQ codes), computed once so the writer, the
fallback and the sensitivity analysis share it."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from quantpipe.errors import BuildError
from quantpipe.execution import Executor
from quantpipe.onnxgraph import load_onnx, tensor_outputs
from quantpipe.quantize.build import build_qdq_model, qdq_ready, quantize_model
from quantpipe.quantize.gptq import collect_weight_codes
from quantpipe.quantize.options import QuantizeOptions
from quantpipe.quantize.rewrites.output_bias import find_output_heads, measure_output_bias
from quantpipe.quantize.split_search import choose_splits
from quantpipe.quantize.stats import collect_channel_stats
from quantpipe.quantize.types import QuantizeReport

__all__ = ["written_sqnr", "choose_equalize", "output_bias", "with_calibration_data", "write_qdq_model"]

EQUALIZE_SAMPLES = 32
"""Calibration samples `choose_equalize` runs both INT8 models on (as `auto`'s range search)."""
OUTPUT_BIAS_SAMPLES = 64
"""Calibration samples the output bias correction is measured and verified on."""

log = logging.getLogger(__name__)


def write_qdq_model(
    model_path: str | os.PathLike[str],
    amax: Mapping[str, float],
    out_path: str | os.PathLike[str],
    options: QuantizeOptions = QuantizeOptions(),
    *,
    calibration_data: Any | None = None,
    batch_size: int = 8,
    executor: Executor | None = None,
) -> QuantizeReport:
    """Write the explicit-quantization (Q/DQ) INT8 model of an FP32 ONNX model, checked, atomically.

    Args:
        model_path: FP32 ONNX model (external data beside it is loaded).
        amax: calibrated amax per activation / graph input (original tensor names).
        out_path: where to write the Q/DQ model (external data `<name>.data` when > ~1.8 GB).
        options: how to quantize (`QuantizeOptions`).
        calibration_data: the calibration `Dataset`; with it, what the data decides is filled in first
            (`with_calibration_data`: per-channel statistics for smoothing and bias correction, the split of
            `split_activations='auto'`, GPTQ codes). Without it (and without `options.channel_stats`) no
            smoothing or bias correction runs, 'auto' splits nothing and GPTQ rounds to nearest.
        batch_size: batch size of the passes over `calibration_data`.
        executor: the split choice's trials run on its workers (`with_calibration_data`; the same model).

    Raises:
        ModelError: unreadable or already quantized model. BuildError: the result fails the checker.
    """
    if calibration_data is not None:
        options = with_calibration_data(load_onnx(model_path), options, calibration_data, batch_size=batch_size,
                                        amax=amax, executor=executor)
    return quantize_model(model_path, amax, out_path, options)


def with_calibration_data(model: Any, options: QuantizeOptions, calibration_data: Any, *,
                          batch_size: int = 8, amax: Mapping[str, float] | None = None,
                          executor: Executor | None = None) -> QuantizeOptions:
    """`options` with what the calibration data decides filled in, each computed once here so the writer,
    the fallback and the sensitivity analysis share it: per-channel statistics (smoothing, bias correction),
    the activations to split (`split_activations='auto'`; its trials on `executor`'s workers) and GPTQ weight
    codes (`weight_rounding='gptq'`; given the activations' `amax`, fitted to the quantized inputs). Fields
    already set are kept."""
    if options.weight_rounding not in ("gptq", "nearest"):
        raise BuildError(f"weight_rounding must be 'gptq' or 'nearest', not {options.weight_rounding!r}.")
    copies: list[Any] = []

    def m() -> Any:  # the named copy, made once and only when something is measured (none when all is filled)
        if not copies:
            copies.append(qdq_ready(model, options.per_channel))
        return copies[0]

    if options.channel_stats is None and (options.smooth_alpha or options.bias_correction):
        log.info("collecting per-channel statistics on the calibration data")
        options = dataclasses.replace(options, channel_stats=collect_channel_stats(m(), calibration_data,
                                                                                   batch_size=batch_size))
    if options.equalize_depthwise == "auto":
        options = dataclasses.replace(options, equalize_depthwise=amax is not None and choose_equalize(
            m(), amax, options, calibration_data, batch_size=batch_size))
    if options.split_activations == "auto":
        if amax is None:
            raise BuildError("split_activations='auto' needs the calibrated amax.")
        log.info("looking for activations whose rounding noise dominates the output")
        options = dataclasses.replace(options, split_activations=choose_splits(m(), amax, options, calibration_data,
                                                                               batch_size=batch_size,
                                                                               executor=executor))
    if options.weight_codes is None and options.weight_rounding == "gptq":
        log.info("fitting GPTQ weight codes on the calibration data")
        # On the unsplit graph: a split activation's weights take these codes repeated (`split_activations`).
        options = dataclasses.replace(options, weight_codes=collect_weight_codes(
            m(), calibration_data, per_channel=options.per_channel, batch_size=batch_size, input_amax=amax))
    if options.output_bias is None and options.bias_correction and amax is not None:
        options = dataclasses.replace(options, output_bias=output_bias(m(), amax, options, calibration_data,
                                                                       batch_size=batch_size),
                                      output_bias_keep=options.keep_float_nodes)
    return options


def choose_equalize(model: Any, amax: Mapping[str, float], options: QuantizeOptions, calibration_data: Any, *,
                    batch_size: int = 8) -> bool:
    """`equalize_depthwise: auto`: the INT8 model with and without the depthwise equalization (the splits off, no
    output bias: what those decide comes after), each run on the first EQUALIZE_SAMPLES calibration samples; True
    when it lowers the output noise against FP32 (every float output pooled, as `auto`'s ranges judge). False
    without a difference to measure (no depthwise Conv it applies to)."""
    base = dataclasses.replace(options, split_activations="off", output_bias=None)
    on, _ = build_qdq_model(model, amax, dataclasses.replace(base, equalize_depthwise=True))
    off, _ = build_qdq_model(model, amax, dataclasses.replace(base, equalize_depthwise=False))
    if on.SerializeToString() == off.SerializeToString():
        return False
    (with_, without), count, where, *_ = _output_sqnr(model, (on, off), calibration_data, batch_size=batch_size,
                                                   max_samples=EQUALIZE_SAMPLES)
    log.info("equalize_depthwise auto: INT8 output SQNR%s %.1f dB with, %.1f dB without (%d calibration samples): %s",
             where, with_, without, count, "equalized" if with_ > without else "not equalized")
    return with_ > without


def written_sqnr(model_path: str | os.PathLike[str], int8_path: str | os.PathLike[str], calibration_data: Any, *,
                 batch_size: int = 8, max_samples: int = EQUALIZE_SAMPLES
                 ) -> tuple[float, int, str, dict[str, float], dict[str, float]]:
    """The written INT8 model's output SQNR against FP32 on the first `max_samples` calibration samples (every float
    output pooled, each channel against its own signal where `fake_quant.output_weights` says so), the samples, and
    what the SQNR covers (`fake_quant.pooled`): what `quantpipe quantize` says last, since nothing else evaluates
    its file. Then each float output's own SQNR where there are several: pooled, CenterFace's 26.4 dB hid its
    heatmap at 14.9 dB (found probing). Last, `metrics.offset_db` of each float output read as one scale (a score or
    coordinates around an offset: its SQNR reads that much high)."""
    (sqnr,), count, where, (each,), offsets = _output_sqnr(load_onnx(model_path), (load_onnx(int8_path),),
                                                           calibration_data, batch_size=batch_size,
                                                           max_samples=max_samples)
    return sqnr, count, where, each, offsets


def _output_sqnr(model: Any, candidates: Sequence[Any], calibration_data: Any, *, batch_size: int,
                 max_samples: int) -> tuple[list[float], int, str, list[dict[str, float]], dict[str, float]]:
    """Each INT8 candidate's output SQNR against the FP32 `model` on the first `max_samples` calibration samples
    (every float output pooled, as `auto`'s ranges judge; the Q/DQ arithmetic exact); the samples; which outputs;
    with several float outputs, each one's own SQNR per candidate (empty with one); and the FP32 outputs' offsets
    (`written_sqnr`)."""
    from quantpipe.metrics import OffsetSums, SquaredSums, sqnr_from_sums
    from quantpipe.ortsession import fp32_batches, ort_session
    from quantpipe.quantize.fake_quant import output_error, output_signal, output_weights, pooled

    outputs = tensor_outputs(model)
    ref = ort_session(model, optimize=False)
    sessions = [ort_session(m, int8=True, optimize=False) for m in candidates]
    sums, signal, noise, count = SquaredSums(), 0.0, [0.0] * len(sessions), 0
    weights: list[Any] | None = None
    each_signal: dict[str, float] = {}
    each_noise: list[dict[str, float]] = [{} for _ in sessions]
    offsets: dict[str, OffsetSums] = {}
    for res, n in fp32_batches(ref, calibration_data, batch_size=batch_size, max_samples=max_samples):
        r, f = [res[o] for o in outputs], {k: res[k] for k in calibration_data.input_names}
        weights = output_weights(r) if weights is None else weights
        for o, x, w in zip(outputs, r, weights, strict=True):
            if x.dtype.kind == "f" and w is None and np.ndim(x) > 0:
                offsets.setdefault(o, OffsetSums()).add(x)
        signal += output_signal(r, sums, weights)
        floats = [i for i, x in enumerate(r) if x.dtype.kind == "f"]
        each_of = floats if len(floats) > 1 else []  # one float output: the pooled SQNR is its own
        for i in each_of:
            each_signal[outputs[i]] = each_signal.get(outputs[i], 0.0) + sums.signal(r[i])
        for k, s in enumerate(sessions):
            got = s.run(outputs, f)
            noise[k] += output_error(got, r, sums, weights)
            for i in each_of:
                each_noise[k][outputs[i]] = each_noise[k].get(outputs[i], 0.0) + sums.error(got[i], r[i])
        count += n
    each = [{o: sqnr_from_sums(each_signal[o], e) for o, e in per.items()} for per in each_noise]
    return ([sqnr_from_sums(signal, e) for e in noise], count, pooled(outputs, weights), each,
            {o: s.db() for o, s in offsets.items() if s.count >= 2})


def output_bias(model: Any, amax: Mapping[str, float], options: QuantizeOptions, calibration_data: Any, *,
                batch_size: int = 8) -> dict[str, Any]:
    """The INT8 model's mean error per channel at each output head (`rewrites.output_bias`), measured on the
    calibration data with everything else `options` decides: what `QuantizeOptions.output_bias` takes back.

    Verified before it is kept: the INT8 model with the correction must have a higher output SQNR against FP32 on
    the samples it was measured on than without it, else nothing is taken back ({}). A mean over every position
    can hurt: on two PP-OCR text recognizers (found probing) it raised the CTC blank's logit by 2.4-3.9 at every
    timestep, and the output SQNR fell from 17.5 to 8.0 dB, 0.88 of the lines read as FP32 reads them to 0.27."""
    from quantpipe.onnxgraph import Graph

    heads = find_output_heads(Graph(model.graph))
    if not heads:
        return {}
    log.info("measuring the INT8 output's mean error at %s", ", ".join(h.node for h in heads))
    qdq, _ = build_qdq_model(model, amax, options)
    shifts = measure_output_bias(model, qdq, heads, calibration_data, batch_size=batch_size,
                                 max_samples=OUTPUT_BIAS_SAMPLES)
    if not shifts:
        return {}
    corrected, _ = build_qdq_model(model, amax, dataclasses.replace(
        options, output_bias=shifts, output_bias_keep=options.keep_float_nodes))
    (with_, without), count, where, *_ = _output_sqnr(model, (corrected, qdq), calibration_data,
                                                   batch_size=batch_size, max_samples=OUTPUT_BIAS_SAMPLES)
    keep = with_ > without
    log.info("output bias correction at %s: INT8 output SQNR%s %.2f dB with, %.2f dB without (%d calibration "
             "samples): %s", ", ".join(shifts), where, with_, without, count, "applied" if keep else "not applied")
    return shifts if keep else {}
