"""Frozen types passed between stages, and their JSON form.

Each stage reads the previous stage's artifacts from the run directory; these dataclasses are what
those artifacts mean. `to_jsonable` / `from_jsonable` round-trip them through pydantic, so
`results.json` is validated when a later stage (report, gate) reads it back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

__all__ = [
    "IDENTICAL_KEY",
    "ORT_OPTIMIZATION_KEY",
    "RESULTS_SCHEMA_VERSION",
    "Precision",
    "TensorInfo",
    "ModelSpec",
    "TensorCalibration",
    "CalibrationSummary",
    "Variant",
    "LatencyStats",
    "EvalResult",
    "LayerSensitivity",
    "FallbackStep",
    "FallbackReport",
    "Collapse",
    "RuleOutcome",
    "GateDecision",
    "RunResults",
    "to_jsonable",
    "from_jsonable",
]

RESULTS_SCHEMA_VERSION = 1

Precision = Literal["fp32", "fp16", "int8"]
Dim = int | str | None

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One graph input or output: name, numpy dtype name, shape (str or None for symbolic dims)."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the load stage learned about the FP32 model."""

    path: str
    sha256: str
    opset: int
    ir_version: int
    producer: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    op_counts: Mapping[str, int]
    num_parameters: int
    size_bytes: int
    subgraph_op_counts: Mapping[str, int] = dataclasses.field(default_factory=dict)
    """Nodes inside If / Loop / Scan subgraphs (every branch and body, nested ones too), by op type: quantpipe leaves
    them in float."""


@dataclasses.dataclass(frozen=True)
class TensorCalibration:
    """One tensor's calibration outcome under one method."""

    name: str
    amax: float
    absmax: float
    """Largest |x| seen (the minmax amax)."""
    num_values: int
    """How many elements went into the histogram."""


@dataclasses.dataclass(frozen=True)
class CalibrationSummary:
    """The calibrate stage's result for one method (details live in the JSON beside the cache)."""

    method: str
    num_samples: int
    num_tensors: int
    seconds: float
    cache_path: str
    json_path: str
    fingerprint: Mapping[str, str]
    """model_sha256, data_sha256, method (+ its parameters), tool version."""


@dataclasses.dataclass(frozen=True)
class Variant:
    """One backend x precision. `skipped` holds the reason when it could not be built or run here."""

    name: str
    backend: str
    precision: Precision
    device: str
    artifact: str | None = None
    size_bytes: int | None = None
    skipped: str | None = None
    details: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def ran(self) -> bool:
        return self.skipped is None

    def quantize_detail(self, key: str) -> Any:
        """What the Q/DQ writer recorded for this variant under `key` (details["quantize"]); None where not recorded
        (another backend, or results written before the key existed)."""
        return ((self.details or {}).get("quantize") or {}).get(key)


@dataclasses.dataclass(frozen=True)
class LatencyStats:
    """Latency of one variant at one batch size (milliseconds per batch)."""

    batch_size: int
    warmup: int
    iterations: int
    median_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    throughput: float
    """Samples per second at the median latency."""
    timer: str
    """'perf_counter' or 'cuda_events'."""
    samples_ms: tuple[float, ...] = ()
    """Every timed iteration, for distribution plots."""
    compute_median_ms: float | None = None
    """Median of the compute alone where the backend can time it apart from host<->device copies."""
    h2d_median_ms: float | None = None
    d2h_median_ms: float | None = None


#: EvalResult.metrics key set (1.0) where a variant's float model.output equals the reference's bit for bit
#: (`evaluate.evaluate_variant`, whatever metrics were asked for; `collapse` then says the INT8 one is not measured).
IDENTICAL_KEY = "identical_to_fp32"

#: Variant.details key of an onnxruntime variant run below onnxruntime's default optimization level (its session
#: crashed onnxruntime at the default; `evaluate.with_sessions_checked`).
ORT_OPTIMIZATION_KEY = "onnxruntime_optimization"


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """Raw measurements of one variant on the evaluation set (judged later by the gate)."""

    variant: str
    num_samples: int
    metrics: Mapping[str, float | None]
    """None where a value is not finite (e.g. SQNR of the reference against itself). top1, top5 (with labels); top1_agreement, cosine, sqnr_db, max_abs_error (vs reference);
    top1_drop (reference top1 - this top1, with labels)."""
    latency: tuple[LatencyStats, ...] = ()
    skipped: str | None = None
    num_classes: int | None = None
    """Classes of a classifier output [N, classes] (what chance-level accuracy is 1 over); None otherwise."""
    other_outputs: Mapping[str, Mapping[str, float | None]] = dataclasses.field(default_factory=dict)
    """The model's outputs besides model.output, each against the reference's (`quantpipe.other_outputs`): sqnr_db,
    centered_sqnr_db and max_abs_error for numbers, identical (fraction of samples) for integers and booleans."""
    other_outputs_skipped: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Other outputs not compared, and why (no batch axis, too large, not a tensor)."""


@dataclasses.dataclass(frozen=True)
class LayerSensitivity:
    """How much quantizing one layer costs, for the sensitivity table."""

    node: str
    op_type: str
    tensor: str
    sqnr_db: float | None
    """SQNR of the layer's output, FP32 vs Q/DQ run (higher is better)."""
    output_metric: float | None
    """The model-output metric (e.g. cosine or top-1 agreement) when only this layer is quantized."""
    metric_name: str
    output_sqnr_db: float | None = None
    """The model output's SQNR with only this layer quantized, where it orders the layers an agreement count ties
    (the metric is one); None otherwise."""
    num_samples: int | None = None
    """The evaluation samples the layer was measured on (None in results written before it was kept)."""
    depthwise: bool = False
    """A depthwise (grouped, one input channel per group) Conv: the collapse verdict's hint for those."""
    reaches_output: bool = True
    """False for a layer whose result never reaches the judged output (another head's): not measured one at a
    time, since nothing the run judges can see it (MTCNN's box head ranked harmless at "136 dB", found probing)."""


@dataclasses.dataclass(frozen=True)
class FallbackStep:
    """One layer kept in float by the accuracy-driven fallback and what it bought."""

    node: str
    op_type: str
    kept_in: str
    metric_before: float
    metric_after: float
    same_step: bool = False
    """Kept in the step of the layer above (the linear front end, kept whole); its before / after are that step's."""


@dataclasses.dataclass(frozen=True)
class FallbackReport:
    """What the fallback did to meet the accuracy budget."""

    metric: str
    target: float
    initial: float
    final: float
    met: bool
    num_quantizable: int
    steps: tuple[FallbackStep, ...]
    chosen_on: str | None = None
    """The data the layers were chosen and the budget measured on: 'calibration' or 'validation' (never the
    evaluation data the gate judges); None in results written before it was recorded."""
    chosen_samples: int | None = None
    """How many samples of `chosen_on` the budget was measured on."""
    lower_is_better: bool = False
    """The budget is an upper bound (`max`): top1_drop, or a hook's metric bounded by `max`."""


@dataclasses.dataclass(frozen=True)
class Collapse:
    """An INT8 variant whose output or task metric is catastrophic, or an INT8 / FP16 one whose judged output is
    FP32's (quantpipe.collapse): said first in reports."""

    variant: str
    problems: tuple[str, ...]
    """What is catastrophic, e.g. 'output SQNR 2.80 dB (collapse below 10 dB)'."""
    cause: str
    """The likely cause: the worst layers from the per-layer sensitivity, when it ran."""
    fix: str
    fix_yaml: str
    """The pipeline.yaml lines that apply the fix (build.fallback with a budget)."""
    severity: str = "collapsed"
    """'collapsed' (below evaluate.collapse's min_* limits), 'degraded' (below its warn_* limits: far from a
    healthy INT8 model, not broken) or 'unmeasured' (its judged output equals FP32's bit for bit: no INT8 layer on
    its path, so its numbers say nothing about INT8)."""
    precision: str = "int8"
    """The variant's precision: 'int8', or 'fp16' (only ever 'unmeasured': an FP16 model equal to FP32)."""


@dataclasses.dataclass(frozen=True)
class RuleOutcome:
    """One gate rule, judged."""

    rule: str
    variant: str
    metric: str
    observed: float | None
    allowed: str
    passed: bool
    message: str


@dataclasses.dataclass(frozen=True)
class GateDecision:
    """The gate's verdict: passed only when every rule passed."""

    passed: bool
    outcomes: tuple[RuleOutcome, ...]


@dataclasses.dataclass(frozen=True)
class RunResults:
    """Everything `results.json` holds; report and gate read only this."""

    schema_version: int
    run_id: str
    created: str
    tool_version: str
    config_path: str | None
    model: ModelSpec
    environment: Mapping[str, Any]
    calibration: tuple[CalibrationSummary, ...]
    variants: tuple[Variant, ...]
    evaluations: tuple[EvalResult, ...]
    reference: str
    """Name of the FP32 reference variant."""
    sensitivity: tuple[LayerSensitivity, ...] = ()
    fallback: FallbackReport | None = None
    gate: GateDecision | None = None
    baseline: Mapping[str, Any] | None = None
    """Set by report --baseline: the baseline run id and per-variant deltas."""
    collapse: tuple[Collapse, ...] = ()
    """INT8 variants that collapsed (judged with the gate, by evaluate.collapse's limits)."""
    warnings: tuple[str, ...] = ()
    """What the log said at WARNING level while the run measured (`runlog.warnings_said`), for the report."""
    evaluation_data: str | None = None
    """The evaluation data's fingerprint (its content): a baseline judged on other data is no like-for-like
    comparison, and the comparison says so (None in results written before it was recorded)."""


def to_jsonable(obj: Any) -> Any:
    """Dataclass (or container of them) -> plain JSON types."""
    from pydantic import TypeAdapter

    return TypeAdapter(type(obj)).dump_python(obj, mode="json")


def from_jsonable(cls: type[T], data: Any) -> T:
    """Plain JSON types -> dataclass `cls`, validated (raises pydantic.ValidationError)."""
    from pydantic import TypeAdapter

    return TypeAdapter(cls).validate_python(data)

