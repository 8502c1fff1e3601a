"""The frozen records the quantizer returns and shares: what it quantized, what it left in float and why,
and the per-channel statistics of the calibration data that its rewrites read."""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["ChannelStats", "FloatNode", "QuantizeReport", "QuantizedNode"]


@dataclasses.dataclass(frozen=True)
class QuantizedNode:
    """A node whose inputs got Q/DQ: which inputs, and the weight's per-channel axis (None: per tensor)."""

    name: str
    op_type: str
    inputs: tuple[str, ...]
    weight_axis: int | None = None


@dataclasses.dataclass(frozen=True)
class FloatNode:
    """A node left in float, and why."""

    name: str
    op_type: str
    reason: str


@dataclasses.dataclass(frozen=True, eq=False)
class ChannelStats:
    """Per-channel absmax and mean of one activation on the calibration data (channel = `axis`)."""

    tensor: str
    axis: int
    absmax: np.ndarray
    mean: np.ndarray
    num_samples: int



@dataclasses.dataclass(frozen=True)
class QuantizeReport:
    """What `write_qdq_model` did: the nodes it quantized, those it left float and why."""

    model_path: str | None
    output_path: str | None
    opset_before: int
    opset_after: int
    per_channel: bool
    quantized_nodes: tuple[QuantizedNode, ...]
    kept_float: tuple[FloatNode, ...]
    """Quantizable nodes left in float (with the reason) and numerically sensitive nodes kept in float."""
    num_quantizable: int
    """Nodes that would be quantized with nothing kept in float on request (the fallback's denominator)."""
    warnings: tuple[str, ...] = ()
    smoothed_tensors: tuple[str, ...] = ()
    """Activations whose per-channel outliers were moved into the weights (SmoothQuant) before quantizing."""
    bias_corrected: tuple[str, ...] = ()
    """Nodes whose float bias absorbs the mean error of their quantized weights (bias correction)."""
    gptq_rounded: tuple[str, ...] = ()
    """Weights whose int8 codes GPTQ chose (the others are rounded to nearest)."""
    shifted_tensors: tuple[str, ...] = ()
    """Non-negative activations quantized around the middle of their range (`QuantizeOptions.shift_nonnegative`)."""
    split_tensors: tuple[tuple[str, int], ...] = ()
    """Activations quantized in pieces (`QuantizeOptions.split_activations`): (tensor, pieces)."""

    @property
    def quantized_names(self) -> tuple[str, ...]:
        return tuple(n.name for n in self.quantized_nodes)
