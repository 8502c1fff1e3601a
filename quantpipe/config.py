"""pipeline.yaml as typed, validated objects. Defaults live here and nowhere else.

Every model forbids unknown keys; a typo gets a "did you mean" hint. Paths resolve relative to the
YAML file's folder. Errors name the key path, what was found and what is expected (ConfigError,
exit code 2), and nothing is written before the configuration is valid.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BeforeValidator, Field, ValidationError, model_validator

from quantpipe.configbase import StrictModel, did_you_mean, format_validation_errors
from quantpipe.errors import ConfigError
from quantpipe.evalconfig import (
    BUILTIN_METRICS,
    LATENCY_RULE_METRICS,
    TASK_METRICS,
    TASK_SCORES,
    CollapseConfig,
    CtcConfig,
    DenseConfig,
    EvaluateConfig,
    LatencyConfig,
    SegmentationConfig,
    SensitivityConfig,
)
from quantpipe.gateconfig import (
    CLASS_SCORE_METRICS,
    GATE_METRICS,
    NEEDS_LABELS,
    TASK_OF_METRIC,
    GateConfig,
    GateRule,
)

__all__ = [
    "DEFAULT_FLOAT_OPS",
    "DEFAULT_FP16_BLOCKLIST",
    "CALIBRATION_METHODS",
    "GATE_METRICS",
    "NEEDS_LABELS",
    "TASK_OF_METRIC",
    "PRECISIONS",
    "BACKEND_SHORT",
    "InputSpec",
    "ModelConfig",
    "DataSource",
    "DataConfig",
    "CalibrationConfig",
    "OrtBackendConfig",
    "TrtBackendConfig",
    "BackendsConfig",
    "MODELOPT_VARIANTS",
    "ModeloptBackendConfig",
    "QuantizeConfig",
    "Fp16Config",
    "FallbackConfig",
    "BuildConfig",
    "LatencyConfig",
    "SensitivityConfig",
    "EvaluateConfig",
    "CtcConfig",
    "DenseConfig",
    "SegmentationConfig",
    "CollapseConfig",
    "FALLBACK_METRICS",
    "FallbackMetric",
    "GateRule",
    "GateConfig",
    "ReportConfig",
    "ExecutionConfig",
    "PipelineConfig",
    "load_config",
    "parse_config",
    "variant_name",
]

#: Op types kept in float: numerically sensitive (normalisation, exponentials, divisions), or where an
#: INT8 grid is wrong by construction (Resize coordinates). Q/DQ is never placed on their inputs.
DEFAULT_FLOAT_OPS: frozenset[str] = frozenset({
    "LayerNormalization", "GroupNormalization", "InstanceNormalization", "LpNormalization",
    "MeanVarianceNormalization", "RMSNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
    "Softmax", "LogSoftmax", "Hardmax",
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
    "ReduceProd", "Resize", "Upsample", "Pow", "Sqrt", "Reciprocal", "Exp", "Log", "Erf", "Gelu", "Div",
    "TopK", "NonMaxSuppression", "RoiAlign", "GridSample",
})

#: Op types kept in FP32 by the FP16 converter: coordinate / index arithmetic that FP16 cannot hold
#: exactly (Resize, Range), ops whose output type comes from an attribute (random generators,
#: EyeLike), and squaring / exponentials that overflow FP16 at moderate inputs (Pow(x, 2) overflows
#: for |x| > 256, which is why a decomposed LayerNorm is also kept in FP32 by pattern).
DEFAULT_FP16_BLOCKLIST: frozenset[str] = frozenset({
    "Resize", "Upsample", "Range", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
    "Multinomial", "Bernoulli", "EyeLike", "NonMaxSuppression", "RoiAlign", "GridSample", "Pow",
    "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp", "ReduceProd", "Einsum", "STFT", "DFT",
})


CALIBRATION_METHODS = ("entropy", "minmax", "percentile", "mse")
"""Methods a cache can be written for; `best` is also accepted for `calibration.use`."""

PRECISIONS: tuple[Literal["fp32", "fp16", "int8"], ...] = ("fp32", "fp16", "int8")
BACKEND_SHORT = {"onnxruntime": "ort", "tensorrt": "trt", "modelopt": "modelopt"}


_KEY_HINT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _path_text(value: Any) -> Any:
    """Refuse what no file system can name: an empty path or one holding a NUL byte (resolve() would crash)."""
    if isinstance(value, str) and (not value.strip() or "\x00" in value):
        raise ValueError("a path must be non-empty and cannot contain a NUL byte (write '.' for the pipeline's folder)")
    return value


ConfigPath = Annotated[Path, BeforeValidator(_path_text)]
"""A path in pipeline.yaml (relative to its folder)."""


_Model = StrictModel


#: Gate metrics computed from another one evaluate.metrics must hold.
_MEASURED_FROM = {"top1_drop": "top1", "top5_drop": "top5", "line_accuracy_drop": "line_accuracy",
                  "label_mae_increase": "label_mae"}

class InputSpec(_Model):
    """Shape of one model input; -1 (or a name) marks a dynamic axis. Optional: read from the model."""

    shape: list[int | str] | None = None
    dtype: str | None = None
    min_shape: list[int] | None = None
    """TensorRT optimization profile: smallest shape (defaults from `shape` and the batch sizes)."""
    opt_shape: list[int] | None = None
    max_shape: list[int] | None = None
    batch_axis: int | None = Field(default=None, ge=0)
    """The axis this input's samples are stacked on (default: model.batch_axis), e.g. 1 for an RNN state
    [layers, N, hidden]."""


class ModelConfig(_Model):
    path: ConfigPath
    inputs: dict[str, InputSpec] = Field(default_factory=dict)
    output: str | None = None
    """The output compared against the reference and labels (default: the first graph output)."""
    output_batch_axis: int = Field(default=0, ge=0)
    """The axis of `output` that holds the samples (1 for a time-major RNN output [T, N, C])."""
    batch_axis: int = Field(default=0, ge=0)
    """The axis every input's samples are stacked on, unless model.inputs.<name>.batch_axis says otherwise."""


class DataSource(_Model):
    path: ConfigPath
    labels: str | None = None
    """Name of the labels array (evaluation, validation): integer class per sample."""
    max_samples: int | None = Field(default=None, ge=1)


class DataConfig(_Model):
    calibration: DataSource
    evaluation: DataSource
    validation: DataSource | None = None
    """Optional split the build's choices (the accuracy fallback) are made on instead of the calibration data;
    labels allowed (top1_drop needs them). Never the evaluation data: the gate judges there."""
    batch_size: int = Field(default=32, ge=1)
    """Batch size for calibration and accuracy evaluation (results do not depend on it)."""


# Typed defaults: Field's default_factory (a union of two callable types) gives a lambda no type context, so a
# list literal in one is list[str]; list() of a typed tuple is the field's own list type.
_DEFAULT_METHODS: tuple[Literal["entropy", "minmax", "percentile", "mse"], ...] = ("entropy", "minmax")


class CalibrationConfig(_Model):
    methods: list[Literal["entropy", "minmax", "percentile", "mse"]] = Field(default_factory=lambda: list(_DEFAULT_METHODS))
    use: Literal["auto", "entropy", "minmax", "percentile", "mse", "best"] = "auto"
    """Which scales build the INT8 variants. `auto`: per tensor, the candidate (entropy, minmax, percentile,
    mse; computed from the histograms whatever `methods` holds) with the least measured effect on the model
    output, checked against each single method on the whole INT8 model (`quantize.range_search`); `best`:
    per tensor the lowest quantization-MSE method; `entropy`: TensorRT's scales, exactly."""
    percentile: float = Field(default=99.99, gt=0.0, le=100.0)
    num_bins: int = Field(default=2048, ge=128)
    trt_version: str = "10.13.0"
    """TensorRT version written in the cache header (`TRT-<version>-EntropyCalibration2`)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    from_cache: ConfigPath | None = None
    """A calibration cache written by TensorRT <= 10, trtexec, Polygraphy or TAO: the INT8 variants take its
    scales exactly (migration to TensorRT 11, `quantpipe.migrate`); tensors it lacks take the calibrated ranges
    of the method closest to its calibrator. `use` is then not consulted."""

    @model_validator(mode="after")
    def _use_is_computed(self) -> CalibrationConfig:
        if self.use not in ("best", "auto") and self.use not in self.methods:
            raise ValueError(f"calibration.use is '{self.use}' but calibration.methods {self.methods} does not compute it; add it to methods")
        return self


class OrtBackendConfig(_Model):
    enabled: bool = True
    precisions: list[Literal["fp32", "fp16", "int8"]] = Field(default_factory=lambda: list(PRECISIONS))
    device: Literal["auto", "cpu", "cuda"] = "cpu"
    """`auto` uses the CUDA execution provider when onnxruntime-gpu sees a GPU, else CPU."""
    threads: int | None = Field(default=None, ge=1)


class TrtBackendConfig(_Model):
    enabled: bool = True
    precisions: list[Literal["fp32", "fp16", "int8"]] = Field(default_factory=lambda: list(PRECISIONS))
    required: bool = False
    """When true, a machine without TensorRT or a GPU fails the run with exit code 3 instead of skipping."""
    int8_mode: Literal["auto", "qdq", "calibrator"] = "auto"
    """`qdq` builds from the explicit Q/DQ model (TensorRT >= 11 needs it); `calibrator` uses implicit
    calibration with quantpipe's cache (TensorRT <= 10); `auto` picks by installed version."""
    workspace_mib: int = Field(default=2048, ge=64)
    timing_cache: ConfigPath | None = None


MODELOPT_VARIANTS: tuple[Literal["int8", "int8-qpscales", "fp16"], ...] = ("int8", "int8-qpscales", "fp16")
"""NVIDIA ModelOpt's variants: its own INT8 calibration, quantpipe's scales through its Q/DQ placement, AutoCast FP16."""


class ModeloptBackendConfig(_Model):
    """NVIDIA ModelOpt's INT8 / AutoCast FP16 beside quantpipe's, run out of process (README, "NVIDIA ModelOpt")."""

    enabled: bool = False
    variants: list[Literal["int8", "int8-qpscales", "fp16"]] = Field(default_factory=lambda: list(MODELOPT_VARIANTS))
    calibration_method: Literal["entropy", "max"] = "entropy"
    """ModelOpt's own calibration for `modelopt-int8` (its ONNX `entropy` is onnxruntime's histogram code)."""
    python: ConfigPath | None = None
    """An interpreter with nvidia-modelopt[onnx] of the user's own; default: the venv `quantpipe setup modelopt` made."""
    required: bool = False
    """When true, a machine where ModelOpt is not set up fails the run with exit code 3 instead of skipping."""


class BackendsConfig(_Model):
    onnxruntime: OrtBackendConfig = Field(default_factory=OrtBackendConfig)
    tensorrt: TrtBackendConfig = Field(default_factory=lambda: TrtBackendConfig(enabled=False))
    modelopt: ModeloptBackendConfig = Field(default_factory=ModeloptBackendConfig)


class QuantizeConfig(_Model):
    per_channel: bool = True
    quantize_residual_add: bool = True
    quantize_activation_matmul: bool = True
    """Q/DQ on attention's activation x activation MatMuls (TensorRT's INT8 MHA fusion needs them)."""
    keep_float_ops: list[str] | None = None
    """Op types left in float (default: DEFAULT_FLOAT_OPS)."""
    keep_float_nodes: list[str] = Field(default_factory=list)
    bias_correction: bool = True
    """Fold the quantized weights' mean output error into the float bias (calibration data, one FP32 pass)."""
    smooth_alpha: float | None = Field(default=0.7, ge=0.0, le=1.0)
    """SmoothQuant strength for MatMul / Gemm inputs with outlier channels; null turns smoothing off."""
    smooth_min_spread: float = Field(default=4.0, gt=0.0)
    """Smooth an activation only when its largest channel range exceeds the median one by this factor."""
    equalize_depthwise: bool | Literal["auto"] = "auto"
    """Equalize depthwise Conv inputs: true, false, or auto (the INT8 model with and without, each run on the
    calibration data: the lower output noise wins)."""
    """Give each input channel of a depthwise Conv the tensor's largest range (x / s before the Q/DQ, filter c times
    s_c: exact, and free with per-channel weights) where the channel ranges differ by smooth_min_spread or more.
    Relu / Clip(>= 0) outputs are left to the non-negative shift. Opt-in: a MobileNetV3 classifier 10.8 -> 21.8 dB,
    PP-OCRv4 rec 165 -> 155 of 200 lines (README)."""
    shift_nonnegative: bool = True
    """Quantize post-ReLU / ReLU6 activations around the middle of their range (exact bias folding; README)."""
    weight_rounding: Literal["nearest", "gptq"] = "nearest"
    """nearest, or gptq: int8 weight codes fitted to each layer's calibration inputs (quantpipe.quantize.gptq)."""
    split_activations: Literal["auto", "off"] | dict[str, int] = "auto"
    """auto: an activation whose int8 rounding dominates the output error is quantized in pieces where that
    measurably helps (README); off; or {tensor: pieces}."""



class Fp16Config(_Model):
    keep_io_types: bool = True
    """Graph inputs and outputs stay FP32 (Casts at the boundary)."""
    keep_fp32_ops: list[str] | None = None
    """Op types kept in FP32 (default: DEFAULT_FP16_BLOCKLIST)."""
    keep_fp32_nodes: list[str] = Field(default_factory=list)
    """Node names kept in FP32."""


FallbackMetric = Literal["top1_agreement", "cosine", "top1_drop", "line_agreement", "map_iou", "box_agreement",
                         "pixel_agreement", "miou", "detection_agreement", "mae", "centered_sqnr_db"]
FALLBACK_METRICS: tuple[str, ...] = get_args(FallbackMetric)
"""What the accuracy fallback can hold a budget on (all against FP32 but top1_drop, which needs labels)."""
FALLBACK_UPPER_BOUNDED = ("top1_drop", "mae")
"""The built-in fallback metrics where lower is better: their budget is `max`."""


class FallbackConfig(_Model):
    metric: str
    """A built-in metric (FALLBACK_METRICS): line_agreement needs evaluate.task ctc; map_iou and box_agreement need
    evaluate.task dense; pixel_agreement and miou need evaluate.task segmentation; detection_agreement needs
    evaluate.task detection; mae and centered_sqnr_db need evaluate.task regression. Or a name an evaluate.metrics
    hook returns (the task's own metric)."""
    min: float | None = None
    """Lower bound for every built-in metric but top1_drop and mae; for a hook's, higher is better."""
    max: float | None = None
    """Upper bound for top1_drop and mae (in the output's units); for a hook's, lower is better."""
    keep_in: Literal["fp16", "fp32"] = "fp16"
    max_layers: int | None = Field(default=None, ge=1)
    max_evaluations: int = Field(default=400, ge=1)
    """Keep-sets built and measured at most; the search then stops and keeps its best step (budget NOT met)."""

    @model_validator(mode="after")
    def _bound(self) -> FallbackConfig:
        if self.metric not in FALLBACK_METRICS:
            if not re.match(r"^[A-Za-z_]\w*$", self.metric):
                raise ValueError(f"build.fallback.metric: unknown metric '{self.metric}'"
                                 f"{did_you_mean(self.metric, FALLBACK_METRICS)}; known: "
                                 f"{', '.join(FALLBACK_METRICS)}, or a name an evaluate.metrics hook returns")
            if (self.min is None) == (self.max is None):
                raise ValueError(f"build.fallback on the hook metric {self.metric} needs `min` (higher is better) or "
                                 f"`max` (lower is better), one of the two")
            return self
        if self.metric in FALLBACK_UPPER_BOUNDED and (self.max is None or self.min is not None):
            raise ValueError(f"build.fallback with metric {self.metric} needs `max` alone, lower is better (e.g. "
                             f"max: 0.01{' in the output units' if self.metric == 'mae' else ''})")
        if self.metric not in FALLBACK_UPPER_BOUNDED and (self.min is None or self.max is not None):
            raise ValueError(f"build.fallback with metric {self.metric} needs `min` alone, higher is better (e.g. "
                             f"min: {30 if self.metric == 'centered_sqnr_db' else 0.99})")
        return self


class BuildConfig(_Model):
    backends: BackendsConfig = Field(default_factory=BackendsConfig)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    fp16: Fp16Config = Field(default_factory=Fp16Config)
    fallback: FallbackConfig | None = None


_REPORT_FORMATS: tuple[Literal["md", "html", "json", "csv", "junit"], ...] = ("md", "html", "json", "csv", "junit")


class ReportConfig(_Model):
    dir: ConfigPath = Path("reports")
    formats: list[Literal["md", "html", "json", "csv", "junit"]] = Field(default_factory=lambda: list(_REPORT_FORMATS))
    baseline: ConfigPath | None = None
    """A previous run directory (reports/<run-id>) to compare with."""
    run_id: str | None = None
    """Default: a UTC timestamp."""


class ExecutionConfig(_Model):
    engine: Literal["local", "ray"] = "local"
    """`local`: worker processes on this machine; `ray`: Ray tasks (pip install 'quantpipe[ray]')."""
    workers: int | None = Field(default=None, ge=1)
    """Workers the stages shard their work over; None: this machine's cores (its GPUs when calibration runs on
    CUDA), or with engine ray the cluster's CPUs (GPUs). 1: everything in this process, no pool."""
    address: str | None = None
    """engine ray: the cluster (`auto`, `ray://host:port`); None starts a local Ray instance for the run."""
    retries: int = Field(default=2, ge=0)
    """Times a shard is run again after the worker running it died."""
    min_shard_mb: float = Field(default=256.0, ge=0.0)
    """The least work a worker is given, counted as samples x the model's size in MB (per candidate for the
    searches): smaller work is cut into fewer shards, and runs in this process, starting no pool, when it makes
    one. 0: always use every worker."""

    @model_validator(mode="after")
    def _address_needs_ray(self) -> ExecutionConfig:
        if self.address is not None and self.engine != "ray":
            raise ValueError(f"execution.address '{self.address}' names a Ray cluster, but execution.engine is "
                             f"'{self.engine}'; set engine: ray, or remove address")
        return self


class PipelineConfig(_Model):
    version: Literal[1] = 1
    name: str = "model"
    model: ModelConfig
    data: DataConfig
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    build: BuildConfig = Field(default_factory=BuildConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)
    source: Path | None = Field(default=None, exclude=True)
    """The YAML file this came from (set by load_config)."""

    @model_validator(mode="after")
    def _fallback_has_labels(self) -> PipelineConfig:
        fb = self.build.fallback
        v = self.data.validation
        if fb is not None and fb.metric == "top1_drop" and (v is None or v.labels is None):
            raise ValueError(
                "build.fallback.metric is top1_drop, which needs labels in the data the fallback chooses on, and "
                "the fallback never chooses on data.evaluation (the gate judges that data, so choosing there would "
                "make the gate's number optimistic); add a labelled split disjoint from evaluation as "
                "data.validation (path and labels), or use metric top1_agreement (against FP32, needs no labels)")
        return self

    @model_validator(mode="after")
    def _rules_name_metrics(self) -> PipelineConfig:
        hooks = self.evaluate.hooks()
        for i, rule in enumerate(self.gate.rules):
            if rule.metric in GATE_METRICS:
                self._rule_measurable(i, rule)
                continue
            if not hooks:
                raise ValueError(
                    f"gate.rules[{i}].metric: unknown metric '{rule.metric}'{did_you_mean(rule.metric, GATE_METRICS)}; "
                    f"known: {', '.join(GATE_METRICS)} (or a name returned by a hook in evaluate.metrics)")
        fb = self.build.fallback
        if fb is not None and fb.metric not in FALLBACK_METRICS and not hooks:
            raise ValueError(f"build.fallback.metric '{fb.metric}'{did_you_mean(fb.metric, FALLBACK_METRICS)} is no "
                             f"built-in metric, and evaluate.metrics names "
                             f"no hook that could return it; add the hook (package.module:function), or use one of "
                             f"{', '.join(FALLBACK_METRICS)}")
        need = TASK_SCORES.get(fb.metric) if fb is not None else None
        if need is not None and self.evaluate.task != need:
            raise ValueError(f"build.fallback.metric {fb.metric} needs evaluate.task: {need} "  # type: ignore[union-attr]
                             f"(it is {self.evaluate.task}); set the task or choose another fallback metric")
        sens = self.evaluate.sensitivity
        need = TASK_SCORES.get(sens.metric) if sens.enabled else None
        if need is not None and self.evaluate.task != need:
            raise ValueError(f"evaluate.sensitivity.metric {sens.metric} needs evaluate.task: {need} (it is "
                             f"{self.evaluate.task}); set the task or rank layers by sqnr_db or cosine")
        return self

    def _rule_measurable(self, i: int, rule: GateRule) -> None:
        """A gate rule on a metric this pipeline cannot measure (or at a latency batch size it does not time) is
        refused at load (exit 2), not failed after the whole run (exit 1; a `map_iou` rule on a classifier, found
        probing)."""
        metric, task, lat = rule.metric, self.evaluate.task, self.evaluate.latency
        if metric in LATENCY_RULE_METRICS and lat.enabled and rule.batch_size not in (None, *lat.batch_sizes):
            raise ValueError(f"gate.rules[{i}] judges {metric} at batch size {rule.batch_size}, which "
                             f"evaluate.latency.batch_sizes ({lat.batch_sizes}) does not time: add it there, or "
                             f"judge one of those")
        need = TASK_OF_METRIC.get(metric) or ("classification" if metric in CLASS_SCORE_METRICS else None)
        if need is not None and need != task:
            measured = [*TASK_METRICS[task], "cosine", "sqnr_db", "max_abs_error"]
            raise ValueError(f"gate.rules[{i}].metric {metric} is measured only with evaluate.task: {need} (this "
                             f"pipeline's task is {task}); set the task, or judge a metric it measures: "
                             f"{', '.join(measured)}")
        base = _MEASURED_FROM.get(metric, metric)
        if base in BUILTIN_METRICS and base not in self.evaluate.wanted():
            # A list of hooks alone in evaluate.metrics dropped the default cosine its rule read: the rule failed
            # after the whole run (found probing).
            raise ValueError(f"gate.rules[{i}].metric {metric} is not measured: evaluate.metrics is "
                             f"[{', '.join(self.evaluate.metrics)}], which replaces the default list. Add {base} to it")
        if metric in NEEDS_LABELS and self.data.evaluation.labels is None:
            raise ValueError(f"gate.rules[{i}].metric {metric} is measured against labels, and data.evaluation has "
                             f"none: set data.evaluation.labels to the labels' array name, or judge agreement with "
                             f"FP32 instead (top1_agreement, line_agreement, cosine, sqnr_db: no labels needed)")

    @model_validator(mode="after")
    def _rules_name_variants(self) -> PipelineConfig:
        names = self.variant_names()
        for i, rule in enumerate(self.gate.rules):
            for key, name in (("variant", rule.variant), ("vs", rule.vs)):
                if name is not None and name not in names:
                    raise ValueError(
                        f"gate.rules[{i}].{key}: unknown variant '{name}'{did_you_mean(name, names)}; "
                        f"this pipeline builds: {', '.join(names) or 'nothing'}"
                    )
        return self

    def variant_names(self) -> list[str]:
        """Every variant this configuration asks for, reference first."""
        out = []
        b = self.build.backends
        if b.onnxruntime.enabled:
            out += [variant_name("onnxruntime", p) for p in PRECISIONS if p in b.onnxruntime.precisions]
        if b.tensorrt.enabled:
            out += [variant_name("tensorrt", p) for p in PRECISIONS if p in b.tensorrt.precisions]
        if b.modelopt.enabled:
            mo = [variant_name("modelopt", v) for v in MODELOPT_VARIANTS if v in b.modelopt.variants]
            out += mo + ([variant_name("tensorrt", n) for n in mo] if b.tensorrt.enabled else [])
        return out

    def section_fingerprint(self, section: str) -> dict[str, Any]:
        """A section's settings as plain JSON (for stage fingerprints)."""
        return self.model_dump(mode="json", include={section})


def variant_name(backend: str, precision: str) -> str:
    """'onnxruntime', 'int8' -> 'ort-int8'."""
    return f"{BACKEND_SHORT[backend]}-{precision}"


def _resolve_paths(cfg: PipelineConfig, base: Path) -> PipelineConfig:
    def r(p: Path | None) -> Path | None:
        return None if p is None else (p if p.is_absolute() else (base / p)).resolve()

    data = cfg.data.model_copy(
        update={
            "calibration": cfg.data.calibration.model_copy(update={"path": r(cfg.data.calibration.path)}),
            "evaluation": cfg.data.evaluation.model_copy(update={"path": r(cfg.data.evaluation.path)}),
            "validation": None if cfg.data.validation is None
            else cfg.data.validation.model_copy(update={"path": r(cfg.data.validation.path)}),
        }
    )
    calibration = cfg.calibration.model_copy(update={"from_cache": r(cfg.calibration.from_cache)})
    trt = cfg.build.backends.tensorrt
    mo = cfg.build.backends.modelopt
    # An interpreter path is made absolute but never resolved: a venv's python is a symlink to the base interpreter,
    # and the resolved path would run outside the venv.
    mo_python = None if mo.python is None else Path(os.path.abspath(base / mo.python))
    backends = cfg.build.backends.model_copy(update={"tensorrt": trt.model_copy(update={"timing_cache": r(trt.timing_cache)}),
                                                     "modelopt": mo.model_copy(update={"python": mo_python})})
    return cfg.model_copy(
        update={
            "model": cfg.model.model_copy(update={"path": r(cfg.model.path)}),
            "data": data,
            "calibration": calibration,
            "build": cfg.build.model_copy(update={"backends": backends}),
            "report": cfg.report.model_copy(update={"dir": r(cfg.report.dir), "baseline": r(cfg.report.baseline)}),
        }
    )


def parse_config(raw: Any, *, source: str = "pipeline.yaml", base_dir: Path | None = None) -> PipelineConfig:
    """Validate an already-parsed YAML document; resolve relative paths against `base_dir`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections (model, data, ...), got {type(raw).__name__}.")
    try:
        cfg = PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_errors(err, source, PipelineConfig)) from None
    return _resolve_paths(cfg, base_dir or Path.cwd())


def load_config(path: str | Path, *, check_files: bool = True) -> PipelineConfig:
    """Read and validate pipeline.yaml; paths in it resolve relative to its folder.

    Raises ConfigError (exit 2) with the line of a YAML syntax error, or the key path of each
    invalid or unknown key (with a "did you mean" hint), or a missing model/data file.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist. Pass the pipeline file (quantpipe run path/to/pipeline.yaml) or run from its folder.") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} cannot be read as UTF-8 text: {err}.") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{path} is not valid YAML{where}: {problem}. Fix the syntax there (indentation, a missing ':' or quote).") from None
    if raw is None:
        raise ConfigError(f"{path} is empty. Start from the pipeline.yaml in quantpipe's repository.")
    cfg = parse_config(raw, source=str(path), base_dir=path.resolve().parent)
    cfg = cfg.model_copy(update={"source": path.resolve()})
    if check_files:
        missing = [
            (key, p)
            for key, p in (
                ("model.path", cfg.model.path),
                ("data.calibration.path", cfg.data.calibration.path),
                ("data.evaluation.path", cfg.data.evaluation.path),
                ("data.validation.path", cfg.data.validation.path if cfg.data.validation else None),
                ("calibration.from_cache", cfg.calibration.from_cache),
            )
            if p is not None and not p.exists()
        ]
        if missing:
            lines = "\n".join(f"  {key}: {p} does not exist." for key, p in missing)
            raise ConfigError(f"{path} names files that are not there:\n{lines}\nRelative paths resolve from {path.resolve().parent}.")
    return cfg
