"""The INT8 Q/DQ model, built in one fixed order: opset upgrade, split activations, smoothing, placement,
the non-negative shift, bias correction (and the output heads' measured mean error), then the Q/DQ nodes.
Models below opset 13 (where DequantizeLinear has no `axis`) are upgraded or fall back to per-tensor weights,
never written invalid.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

from quantpipe.errors import BuildError, ModelError
from quantpipe.externaldata import has_external_data
from quantpipe.onnxgraph import QUANTIZED_OPS, Graph, load_onnx, name_nodes, named_copy, opset_of, save_onnx
from quantpipe.quantize.emit import apply_plan
from quantpipe.quantize.options import QuantizeOptions
from quantpipe.quantize.placement import QUANTIZABLE_OPS, plan_qdq, sentinel_tensors
from quantpipe.quantize.rewrites.bias_correction import correct_biases
from quantpipe.quantize.rewrites.output_bias import apply_output_bias
from quantpipe.quantize.rewrites.shift import shift_nonnegative
from quantpipe.quantize.rewrites.smooth import smooth_inputs
from quantpipe.quantize.rewrites.split import split_activations
from quantpipe.quantize.types import QuantizeReport

__all__ = ["build_qdq_model", "prepare_opset", "qdq_ready", "quantize_model"]

log = logging.getLogger(__name__)


def qdq_ready(model: Any, per_channel: bool = True) -> Any:
    """A copy of `model` as `build_qdq_model` sees it (nodes named, at the opset it writes: `prepare_opset`), for the
    searches that simulate quantization on the FP32 graph: on an opset-9 model (CenterFace) `auto`'s rounded parts
    held QuantizeLinear nodes opset 9 does not have, and `quantize` ended with exit 4 (found probing)."""
    m = named_copy(model)
    if opset_of(m) < 13:
        m = prepare_opset(m, per_channel, quiet=True)[0]
        name_nodes(m.graph)
    return m


def prepare_opset(model: Any, per_channel: bool, *, quiet: bool = False) -> tuple[Any, int, bool, list[str]]:
    """Bring the model to opset >= 13 where possible; returns (model, opset, per_channel, warnings). `quiet`: the
    upgrade is logged at debug level (a search's copy; the writer says it)."""
    import onnx
    from onnx import version_converter

    warnings: list[str] = []
    opset = opset_of(model)
    if opset >= 13:
        return model, opset, per_channel, warnings
    try:
        converted = version_converter.convert_version(model, 13)
        if not has_external_data(converted):  # an in-memory proto cannot be checked with external references
            onnx.checker.check_model(converted)
        log.log(logging.DEBUG if quiet else logging.INFO, "upgraded the model from opset %d to 13 for per-channel "
                "DequantizeLinear", opset)
        warnings.append(f"model upgraded from opset {opset} to 13 (per-channel DequantizeLinear needs opset 13)")
        return converted, 13, per_channel, warnings
    except Exception as err:  # the converter raises plain RuntimeError / ValidationError for unsupported ops
        if opset < 10:
            raise ModelError(
                f"the model has opset {opset}: QuantizeLinear/DequantizeLinear need opset 10 or newer, and onnx's "
                f"version converter could not upgrade it ({type(err).__name__}: {err}). Re-export the model with "
                f"opset >= 13."
            ) from err
        warnings.append(
            f"opset {opset} could not be upgraded to 13 ({type(err).__name__}: {str(err)[:160]}); weights are "
            f"quantized per tensor, which opset {opset} supports (expect lower accuracy than per channel)"
        )
        return model, opset, False, warnings


def build_qdq_model(model: Any, amax: Mapping[str, float], options: QuantizeOptions = QuantizeOptions(),
                    *, copy: bool = True) -> tuple[Any, QuantizeReport]:
    """Return the Q/DQ INT8 version of an FP32 ModelProto (in memory) and its report.

    Args:
        model: the FP32 model (not modified when `copy`).
        amax: calibrated absolute range per activation / graph input, by original tensor name.
        options: placement options.
        copy: work on a copy of `model` (False saves memory for large models the caller drops).
    """
    import onnx

    if copy:
        m = onnx.ModelProto()
        m.CopyFrom(model)
    else:
        m = model
    present = sorted({n.op_type for n in m.graph.node} & QUANTIZED_OPS)
    if present:
        raise ModelError(f"the model already contains quantized ops ({', '.join(present)}); quantpipe quantizes "
                         f"FP32 models. Pass the original FP32 export.")
    name_nodes(m.graph)
    opset_before = opset_of(m)
    m, opset_after, per_channel, warnings = prepare_opset(m, options.per_channel)
    name_nodes(m.graph)
    g = Graph(m.graph)
    amax_all = dict(amax)
    stats = dict(options.channel_stats or {})
    split: dict[str, str] = {}
    if isinstance(options.split_activations, Mapping):
        codes = dict(options.weight_codes or {})
        split = split_activations(m, g, options, options.split_activations, amax_all, stats, codes)
        if split:
            g = Graph(m.graph)
            options = dataclasses.replace(options, weight_codes=codes or None)
    elif options.split_activations not in ("auto", "off"):
        raise BuildError(f"split_activations must be 'auto', 'off' or a mapping tensor -> pieces, "
                         f"not {options.split_activations!r}.")
    smoothed: list[str] = []
    if stats and (options.smooth_alpha or options.equalize_depthwise is True):
        smoothed = smooth_inputs(m, g, options, stats, amax_all, sentinel_tensors(g), per_channel)
        if smoothed:
            g = Graph(m.graph)
    plan = plan_qdq(g, amax_all, options, per_channel)
    shifted: list[str] = []
    if options.shift_nonnegative and opset_after >= 11:
        shifted = shift_nonnegative(m, g, plan, stats, options)
        if shifted:
            g = Graph(m.graph)
    corrected: list[str] = []
    if stats and options.bias_correction:
        corrected = correct_biases(m, g, plan, options, stats)
        if corrected:
            g = Graph(m.graph)
    if options.output_bias and options.only_nodes is None and options.keep_float_nodes == options.output_bias_keep:
        corrected += [n for n in apply_output_bias(m, g, options.output_bias) if n not in corrected]
        g = Graph(m.graph)
    gptq_used = apply_plan(m, g, plan, options)
    skipped_amax = [f for f in plan.floats if f.op_type in QUANTIZABLE_OPS | {"Add"} and "amax" in f.reason]
    if skipped_amax:
        warnings.append(f"{len(skipped_amax)} quantizable node(s) left float for want of a usable amax, e.g. "
                        f"{skipped_amax[0].name}: {skipped_amax[0].reason}")
    sentinel = [f for f in plan.floats if "sentinel" in f.reason]
    if sentinel:
        warnings.append(f"{len(sentinel)} node(s) left float because their input carries a sentinel (mask) constant")
    report = QuantizeReport(
        model_path=None, output_path=None, opset_before=opset_before, opset_after=opset_after,
        per_channel=per_channel, quantized_nodes=tuple(plan.quantized), kept_float=tuple(plan.floats),
        num_quantizable=plan.eligible, warnings=tuple(warnings), smoothed_tensors=tuple(smoothed),
        bias_corrected=tuple(corrected), gptq_rounded=tuple(gptq_used), shifted_tensors=tuple(shifted),
        split_tensors=tuple((t, int(options.split_activations[t])) for t in split)  # type: ignore[index]
    )
    return m, report


def quantize_model(model_path: str | os.PathLike[str], amax: Mapping[str, float], out_path: str | os.PathLike[str],
                   options: QuantizeOptions = QuantizeOptions()) -> QuantizeReport:
    """`quantpipe quantize`'s entry point: FP32 model + amax -> checked Q/DQ model on disk, and its report."""
    src = load_onnx(model_path)
    qdq, report = build_qdq_model(src, amax, options)
    warnings = save_onnx(qdq, out_path, reference=src)
    for w in report.warnings + tuple(warnings):
        log.warning("%s", w)
    return dataclasses.replace(report, model_path=os.fspath(model_path), output_path=os.fspath(out_path),
                               warnings=report.warnings + tuple(warnings))
