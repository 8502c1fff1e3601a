"""QuantizeOptions: how the Q/DQ model is built. One object, passed whole; the defaults of the fields that
pipeline.yaml sets are `quantpipe.config.QuantizeConfig`'s, read from there (written once), and the other
fields are what the calibration data decides (`quantize.write.with_calibration_data`) or what a search sets
(the fallback's keep-list, the sensitivity analysis' single node)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from quantpipe.config import DEFAULT_FLOAT_OPS, QuantizeConfig
from quantpipe.quantize.types import ChannelStats

__all__ = ["QuantizeOptions", "SplitActivations", "WeightRounding"]

WeightRounding = Literal["nearest", "gptq"]
SplitActivations = Literal["auto", "off"] | Mapping[str, int]
_DEFAULTS = QuantizeConfig()


@dataclasses.dataclass(frozen=True)
class QuantizeOptions:
    """How `build_qdq_model` places Q/DQ and which exact-in-float rewrites run first."""

    per_channel: bool = _DEFAULTS.per_channel
    keep_float_nodes: frozenset[str] = frozenset(_DEFAULTS.keep_float_nodes)
    keep_float_ops: frozenset[str] = DEFAULT_FLOAT_OPS
    quantize_residual_add: bool = _DEFAULTS.quantize_residual_add
    quantize_activation_matmul: bool = _DEFAULTS.quantize_activation_matmul
    """Quantize MatMuls whose both inputs are activations (attention Q.K^T and P.V): TensorRT's INT8 MHA
    fusion needs them; turn off to keep attention in float."""
    weight_amax_override: Mapping[str, float | Sequence[float]] | None = None
    """Weight tensor name -> amax (a float: per tensor; a sequence: per channel) instead of max |w|."""
    only_nodes: frozenset[str] | None = None
    """Quantize only these nodes (sensitivity analysis); None: every eligible node."""
    channel_stats: Mapping[str, ChannelStats] | None = None
    """Per-channel statistics of the quantized nodes' inputs on the calibration data (`collect_channel_stats`);
    they enable smoothing and bias correction. None: neither is applied."""
    smooth_alpha: float | None = _DEFAULTS.smooth_alpha
    """SmoothQuant migration strength for MatMul / Gemm inputs with outlier channels (None or 0: off)."""
    smooth_min_spread: float = _DEFAULTS.smooth_min_spread
    """Smooth an activation only when its largest channel range exceeds the median one by this factor."""
    equalize_depthwise: bool | Literal["auto"] = _DEFAULTS.equalize_depthwise
    """True / False; "auto" is decided on the calibration data (`with_calibration_data`), and builds as False until
    then."""
    """Give each input channel of a depthwise Conv the tensor's largest range (`rewrites.smooth`); a Relu /
    Clip(>= 0) output is left to the non-negative shift."""
    bias_correction: bool = _DEFAULTS.bias_correction
    """Fold the mean output error of the quantized weights (E[(Wq - W) x]) into the float bias."""
    shift_nonnegative: bool = _DEFAULTS.shift_nonnegative
    """Post-ReLU / ReLU6 activations of a Conv / Gemm (never negative) are shifted by -amax/2 before their
    symmetric int8 Q/DQ where every reader can take it back: the shift is folded into the producer's and the
    readers' biases (a padded Conv reader reads an explicit Pad with the shifted zero; a residual Add reader is
    balanced through its other branch's conv bias): the same float function, twice the int8 resolution."""
    weight_rounding: WeightRounding = _DEFAULTS.weight_rounding
    """'gptq': weight codes chosen against the layer's inputs on the calibration data (`quantize.gptq`);
    'nearest': round to nearest. GPTQ needs `weight_codes` (filled by `with_calibration_data`); without them
    every weight is rounded to nearest."""
    weight_codes: Mapping[str, Any] | None = None
    """Weight name -> `quantize.weights.WeightCodes` (precomputed GPTQ codes); used where they match the weight."""
    split_activations: SplitActivations = _DEFAULTS.split_activations
    """Activation -> pieces: a post-ReLU / ReLU6 activation of a Conv read by Convs is quantized as K pieces of
    range amax/K (`rewrites.split`; K times the resolution, all INT8). 'auto': `with_calibration_data` picks
    the activations whose rounding noise dominates the output (`split_search.choose_splits`); until then, and
    with 'off', nothing is split."""

    output_bias: Mapping[str, Any] | None = None
    """Head node -> its INT8 output's mean error per channel on the calibration data (`rewrites.output_bias`,
    filled by `with_calibration_data` when bias correction is on), subtracted from the head's bias. Measured on
    the whole INT8 model with `output_bias_keep` in float: builds of one layer alone (`only_nodes`, the
    sensitivity) or with other layers in float (the fallback's) leave it out, since the error it takes back
    changes with them."""
    output_bias_keep: frozenset[str] = frozenset()
    """The `keep_float_nodes` `output_bias` was measured with."""

    @classmethod
    def from_config(cls, section: QuantizeConfig) -> QuantizeOptions:
        """The options pipeline.yaml's `build.quantize` section describes (no data-driven fields yet)."""
        return cls(
            per_channel=section.per_channel, quantize_residual_add=section.quantize_residual_add,
            quantize_activation_matmul=section.quantize_activation_matmul,
            keep_float_ops=frozenset(section.keep_float_ops if section.keep_float_ops is not None else DEFAULT_FLOAT_OPS),
            keep_float_nodes=frozenset(section.keep_float_nodes), bias_correction=section.bias_correction,
            smooth_alpha=section.smooth_alpha or None, smooth_min_spread=section.smooth_min_spread,
            equalize_depthwise=section.equalize_depthwise,
            weight_rounding=section.weight_rounding, shift_nonnegative=section.shift_nonnegative,
            split_activations=section.split_activations,
        )

    @property
    def splits(self) -> Mapping[str, int]:
        """The resolved split (tensor -> pieces); empty for 'auto' (not resolved yet) and 'off'."""
        return self.split_activations if isinstance(self.split_activations, Mapping) else {}
