"""The load stage: the model and the data sets (calibration, evaluation, optional validation), checked against
each other before anything runs."""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from quantpipe.artifacts import ModelSpec, TensorInfo
from quantpipe.config import PipelineConfig
from quantpipe.data import Dataset, check_disjoint, open_dataset, varying_output
from quantpipe.errors import DataError
from quantpipe.gateconfig import CLASS_SCORE_METRICS
from quantpipe.model import apply_input_overrides, load_model_spec
from quantpipe.onnxgraph import tensor_outputs

__all__ = ["BATCH_CHECK_MAX_BYTES", "LoadedInputs", "batch_axes", "check_first_run", "check_output_shape", "load_inputs",
           "state_pairs", "warn_if_fed_back"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LoadedInputs:
    """The load stage's output: the model spec and the validated data sets."""

    spec: ModelSpec
    inputs: tuple[TensorInfo, ...]
    output: str
    calib: Dataset
    eval: Dataset
    validation: Dataset | None = None

    @property
    def selection(self) -> Dataset:
        """The data the build's choices are made on: the validation split when given, else the calibration
        data; never the evaluation data, which the gate judges."""
        return self.validation if self.validation is not None else self.calib


def state_pairs(spec: ModelSpec) -> list[tuple[str, str]]:
    """(input, output) pairs that look like a state the deployed model feeds back to itself: the same type and rank,
    no fixed dimension that differs (exporters often leave the output's unnamed), and the output named as the input
    with a suffix ('state' -> 'stateN', 'h0' -> 'hn') or a cache's past -> present."""
    def stem(name: str) -> str:
        return re.sub(r"(_?in(put)?)?_?\d*$", "", name, flags=re.IGNORECASE)

    pairs = []
    for i in spec.inputs:
        for o in spec.outputs:
            if (len(o.shape) != len(i.shape) or o.dtype != i.dtype or not i.shape or o.name == i.name
                    or any(isinstance(a, int) and isinstance(b, int) and a != b
                           for a, b in zip(i.shape, o.shape, strict=True))):
                continue
            s = stem(i.name)
            if (s and o.name.startswith(s)) or (i.name.startswith("past") and o.name.startswith("present")):
                pairs.append((i.name, o.name))
    return pairs


def warn_if_fed_back(spec: ModelSpec) -> bool:
    """Warn (and return True) where the model looks stateful (`state_pairs`): every number is measured open loop."""
    pairs = state_pairs(spec)
    if pairs:
        # silero VAD: 25.8 dB and 26 flipped decisions with FP32's states as data; 20.8 dB and 59 flips with the INT8
        # model's own state fed back, as it runs deployed (found probing).
        log.warning("%s look like a state the deployed model feeds back to itself. quantpipe measures open loop: each "
                    "sample's state comes from the data, so the INT8 error does not compound over a stream as it "
                    "does deployed (silero VAD: 25.8 dB open loop, 20.8 dB with its own state fed back). Judge the "
                    "stream with a hook that runs it, and the state itself by other_outputs_sqnr_db.",
                    ", ".join(f"input '{i}' and output '{o}'" for i, o in pairs))
    return bool(pairs)


def load_inputs(cfg: PipelineConfig) -> LoadedInputs:
    """Load and check the model and the data sets (exit 2 on any mismatch)."""
    spec, proto = load_model_spec(cfg.model.path)
    inputs = apply_input_overrides(spec.inputs, cfg.model.inputs)
    out_names = [o.name for o in spec.outputs]
    output = cfg.model.output or out_names[0]
    if output not in out_names:
        raise DataError(f"pipeline.yaml model.output is '{output}', but the model's outputs are {out_names}.")
    if cfg.model.output is None and len(out_names) > 1:
        # MTCNN's O-Net (found probing): its first output is [N, 4] box offsets, judged as class scores ("top-1
        # agreement 97.69 %" of an argmax over offsets), and nothing said the other two outputs were not judged.
        log.warning("the model has %d outputs (%s) and pipeline.yaml sets no model.output: the run judges the first, "
                    "'%s' (accuracy, the gate, sensitivity, fallback); the others are only compared with FP32's "
                    "(other_outputs_sqnr_db). Set model.output to the one the task reads.", len(out_names),
                    ", ".join(out_names), output)
    warn_if_fed_back(spec)
    tensors = tensor_outputs(proto)
    if output not in tensors:
        raise DataError(f"model.output '{output}' is a sequence or map, not a tensor (skl2onnx's ZipMap probabilities "
                        f"are one), and quantpipe compares tensors. Set model.output in pipeline.yaml to one of "
                        f"{tensors}, or convert with skl2onnx's options={{id(model): {{'zipmap': False}}}} to get the "
                        f"probabilities as a tensor.")
    d = cfg.data
    axes = batch_axes(cfg, inputs)
    # One quiet FP32 session for every check at load, made when the first one needs it.
    session = functools.cache(functools.partial(_check_session, cfg.model.path, spec))
    calib = open_dataset(d.calibration.path, inputs, max_samples=d.calibration.max_samples, role="calibration",
                         batch_axes=axes)
    fixed = check_first_run(cfg.model.path, spec, inputs, calib, axes, output=output,
                            output_axis=cfg.model.output_batch_axis, session=session)
    if fixed != inputs:
        inputs = fixed
        calib = open_dataset(d.calibration.path, inputs, max_samples=d.calibration.max_samples, role="calibration",
                             batch_axes=axes)
    seq = cfg.evaluate.task == "ctc"
    per_position = cfg.evaluate.valid_mask is not None and cfg.evaluate.task == "classification"
    targets = cfg.evaluate.task == "regression"
    ev = open_dataset(d.evaluation.path, inputs, labels_key=d.evaluation.labels, max_samples=d.evaluation.max_samples,
                      role="evaluation", sequence_labels=seq, batch_axes=axes, position_labels=per_position,
                      target_labels=targets)
    classes = _static_classes(spec, output) if cfg.evaluate.task == "classification" else None
    if classes is not None:
        ev.check_label_range(classes, output)  # else: evaluate checks once the first batch shows the class count
    _warn_overlap(calib, ev)
    _warn_ranges(calib, ev)
    check_output_shape(cfg.model.path, spec, ev, output, cfg.model.output_batch_axis, session=session)
    # FP32's output on the first evaluation sample, run once for the checks that read it.
    first = functools.cache(lambda: _first_output(session(), ev, output))
    if cfg.evaluate.task == "detection":
        _check_detection_head(cfg, output, first(), spec)
    elif cfg.evaluate.task != "classification":
        _check_task_output(cfg, first())
        _check_target_labels(cfg, ev, output, first())
    else:
        _check_top1_rules(cfg, output, first())
    if cfg.evaluate.valid_mask is not None:
        _check_valid_mask(cfg, inputs, ev, output, first())
        _check_position_labels(cfg, ev, output, first())
    val = None
    if d.validation is not None:
        val = open_dataset(d.validation.path, inputs, labels_key=d.validation.labels,
                           max_samples=d.validation.max_samples, role="validation", sequence_labels=seq,
                           batch_axes=axes, position_labels=per_position, target_labels=targets)
        if classes is not None:
            val.check_label_range(classes, output)
        if per_position:
            _check_position_labels(cfg, val, output, first())
        _warn_overlap(val, ev)
        check_output_shape(cfg.model.path, spec, val, output, cfg.model.output_batch_axis, session=session)
    elif cfg.build.fallback is not None:
        _check_fallback_shapes(cfg, spec, calib, output, session)
    if cfg.build.fallback is not None and cfg.build.fallback.metric in ("top1_agreement", "top1_drop"):
        _check_top1_budget(cfg, calib, output, session())
    return LoadedInputs(spec, inputs, output, calib, ev, val)


def _check_top1_budget(cfg: PipelineConfig, calib: Dataset, output: str, session: Any) -> None:
    """ConfigError (exit 2) at load where a top-1 fallback budget would read one value per sample: an argmax over one
    column is always 0 (found probing: 'met, 0 of 26 layers kept'; `fallback` refuses it too, after calibration)."""
    from quantpipe.errors import ConfigError

    out = _first_output(session, calib, output)
    if out is not None and out.size <= 1:
        raise ConfigError(f"build.fallback.metric is {cfg.build.fallback.metric}, which needs class scores of 2 classes "  # type: ignore[union-attr]
                          f"or more per sample, but model.output '{output}' has shape {list(out.shape)} for one sample. "
                          f"Use a metric of its task (evaluate.task and its metrics, or a hook's), or cosine.")


def _check_top1_rules(cfg: PipelineConfig, output: str, out: np.ndarray | None) -> None:
    """ConfigError (exit 2) at load where a gate rule reads top-1 / top-5 from an output of one value per sample:
    it could never be measured, and said so only after calibration, build and evaluation (found probing)."""
    from quantpipe.errors import ConfigError

    rules = [f"{r.variant} {r.metric}" for r in cfg.gate.rules if r.metric in CLASS_SCORE_METRICS]
    masked = cfg.evaluate.valid_mask is not None  # each position is scored: its values are out[0, t, ...]
    if not rules or out is None or (out[0, 0].size if masked and out.ndim >= 2 else out.size) > 1:
        return
    raise ConfigError(f"gate rule(s) {', '.join(rules)} read class scores, but model.output '{output}' has shape "
                      f"{list(out.shape)} for one sample: one value per {'position' if masked else 'sample'}, which "
                      f"top-1 cannot be read from. For a score or an estimate set evaluate.task: regression and gate "
                      f"on mae (in the output's units) or centered_sqnr_db; or gate on a hook metric of its task (a "
                      f"threshold's accuracy).")


def _check_fallback_shapes(cfg: PipelineConfig, spec: ModelSpec, calib: Dataset, output: str, session: Any) -> None:
    """DataError (exit 2) at load where the fallback would choose on calibration samples whose outputs differ in
    shape: it compares them as one array (found probing: exit 4 in the middle of the build on a folder of
    variable-length samples, which calibration itself takes)."""
    try:
        check_output_shape(cfg.model.path, spec, calib, output, cfg.model.output_batch_axis, session=session)
    except DataError as err:
        raise DataError(f"build.fallback chooses on the calibration data and compares the model's outputs there as one "
                        f"array, but model.output '{output}' changes shape with the calibration samples (its smallest and largest "
                        f"sample, run once at load, give outputs of two shapes). Give "
                        f"the fallback samples of one shape as data.validation (padded; for a per-token output with "
                        f"evaluate.valid_mask), or leave build.fallback out: calibration itself takes samples of any "
                        f"shape.") from err


def batch_axes(cfg: PipelineConfig, inputs: Sequence[TensorInfo]) -> dict[str, int]:
    """Each input's batch axis: `model.inputs.<name>.batch_axis`, else `model.batch_axis`."""
    out = {}
    for t in inputs:
        spec = cfg.model.inputs.get(t.name)
        out[t.name] = spec.batch_axis if spec is not None and spec.batch_axis is not None else cfg.model.batch_axis
    return out


#: Samples of each split whose float inputs' ranges `_warn_ranges` compares, and the ratio it warns at.
RANGE_CHECK_SAMPLES = 64
RANGE_CHECK_RATIO = 8.0


def _input_ranges(data: Dataset, samples: int = RANGE_CHECK_SAMPLES) -> dict[str, float]:
    """The largest |value| of each float input over the first `samples` samples."""
    out: dict[str, float] = {}
    for feeds in data.head_feeds(8, samples):  # 8 at a time: a large input's 64 samples need not be held at once
        for k, v in feeds.items():
            if np.issubdtype(np.asarray(v).dtype, np.floating) and np.size(v):
                out[k] = max(out.get(k, 0.0), float(np.max(np.abs(v))))
    return out


def _warn_ranges(calib: Dataset, ev: Dataset) -> None:
    """Warn when a float input spans very different ranges in the calibration and the evaluation data: one of them
    was preprocessed differently (0-255 pixels against [-1, 1]), and scales calibrated on the one do not fit the
    other (found probing: a recognizer calibrated on unnormalised pixels read 0 of 160 evaluation lines)."""
    a, b = _input_ranges(calib), _input_ranges(ev)
    for name in sorted(set(a) & set(b)):
        lo, hi = sorted((a[name], b[name]))
        if hi > 0 and (lo == 0 or hi / lo >= RANGE_CHECK_RATIO):
            log.warning("input '%s' reaches |x| = %.4g in the calibration data but %.4g in the evaluation data (first "
                        "%d samples of each): were both preprocessed the same way (scaled, normalised)? Scales "
                        "calibrated on the one do not fit the other.", name, a[name], b[name], RANGE_CHECK_SAMPLES)


def _warn_overlap(chooser: Dataset, ev: Dataset) -> None:
    """Warn when evaluation samples also appear in a split the build chooses or calibrates on."""
    overlap = check_disjoint(chooser, ev)
    if overlap:
        log.warning(
            "%d evaluation sample(s) also appear in the %s data; accuracy on them is optimistic. "
            "Use disjoint splits.", overlap, chooser.role
        )


def _static_classes(spec: ModelSpec, output: str) -> int | None:
    """The class count of a classifier output [N, classes] when the model declares it (None if dynamic or not one)."""
    info = next(o for o in spec.outputs if o.name == output)
    if len(info.shape) != 2:
        return None
    last = info.shape[-1]
    return last if isinstance(last, int) and last > 1 else None


#: Models up to this size (file and external data) get `check_first_run`'s check; above it, the check's
#: onnxruntime session would cost seconds and memory before anything else runs.
BATCH_CHECK_MAX_BYTES = 1 << 30


def check_first_run(model: str | Path, spec: ModelSpec, inputs: Sequence[TensorInfo], data: Dataset,
                    axes: Mapping[str, int] | None = None, *, output: str | None = None,
                    output_axis: int = 0, session: Callable[[], Any] | None = None) -> tuple[TensorInfo, ...]:
    """One FP32 run of the first calibration samples before anything else runs (models up to BATCH_CHECK_MAX_BYTES;
    where it cannot run, the stage that runs the model says why):

    - `inputs` come back with their batch dimension fixed to 1 where the model declares a dynamic batch but
      onnxruntime fails on 2 samples at once and runs 1 (a node holds the exported batch: a torch export whose traced
      Reshape shapes kept batch 1; torchvision's ViT, found probing, ran calibration and then died with "internal
      error", exit 4). The data then runs one sample at a time, as for a batch-1 export, and the log says so;
    - `output` (model.output), when given, must hold the samples on `output_axis`: DataError (exit 2) otherwise, with
      the fix (a detector whose graph ends in NonMaxSuppression returns [K, 4] boxes: SSDlite was refused only at
      evaluation, after 9 minutes of calibration and build).

    `session`: gives the FP32 session to run (`_check_session`'s, made here when not given)."""
    inputs = tuple(inputs)
    sess = (session or functools.partial(_check_session, model, spec))() if data.num_samples >= 1 else None
    if sess is None:
        return inputs

    def run(n: int) -> tuple[dict[str, Any] | None, int, str]:
        batch = data.first_batch(n)
        feeds, size = dict(batch.feeds), batch.size
        try:
            if size < n:  # a folder whose second sample has another shape: the first one twice (a Khmer segmenter's
                # runs of text differ in length; its Reshape held batch 1, and calibration died on the first batch of
                # 3 runs of one length, exit 4: found probing)
                feeds = {k: np.concatenate([v] * n, axis=batch.feeds.axes.get(k, 0)) for k, v in feeds.items()}
                size = n
            return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True)), size, ""
        except Exception as err:
            return None, size, _gist(str(err))

    outs, n, why = run(2 if data.max_batch is None and data.num_samples >= 2 else 1)
    if outs is None and n == 2:
        outs, n, _ = run(1)
        if outs is not None:
            inputs = _batch_held_at_one(model, inputs, axes or {}, why)
    if outs is not None and output is not None and output in outs:
        _check_output_batch(spec, output, np.asarray(outs[output]), n, output_axis)
    return inputs


def check_output_shape(model: str | Path, spec: ModelSpec, data: Dataset, output: str, output_axis: int = 0, *,
                       session: Callable[[], Any] | None = None) -> None:
    """DataError (exit 2) at load where `data` (a folder whose samples differ in shape) makes model.output change shape
    with the input: its smallest and its largest sample run through FP32 once each. Evaluation compares outputs as
    one array and refused such data only after calibration and the build (found probing: a segmentation model
    evaluated on photos of two sizes). `session`: as for `check_first_run`."""
    pair = data.extreme_shapes()
    sess = None if pair is None else (session or functools.partial(_check_session, model, spec))()
    if pair is None or sess is None:
        return
    try:
        shapes = [np.asarray(sess.run([output], dict(data.subset(i, i + 1).first_batch(1).feeds))[0]).shape
                  for i in pair]
    except Exception:  # the stage that runs the model says why
        return
    kept = [s[:output_axis] + s[output_axis + 1:] for s in shapes]
    if kept[0] != kept[1]:
        raise varying_output(output, kept, "the FP32 model (found on a first run of its smallest and largest "
                             "sample, before calibrating)", data.role)


def _check_detection_head(cfg: PipelineConfig, output: str, out: np.ndarray | None, spec: ModelSpec) -> None:
    """ConfigError (exit 2) at load where evaluate.detection does not fit the FP32 head on the first evaluation
    sample (`detection.head_problem`), or where the head is split over several outputs, not exit 4 after calibration
    and the build, nor a number that means nothing. `out`: model.output on that sample (`_first_output`; None: no
    check)."""
    from quantpipe.detection import features_last, head_problem
    from quantpipe.errors import ConfigError

    if out is None:
        return
    d = cfg.evaluate.detection
    head = np.moveaxis(out, cfg.model.output_batch_axis, 0)
    problem = head_problem(head, layout=d.layout, objectness=d.objectness, logits=d.logits)
    anchors = features_last(head, d.layout).shape[1] if head.ndim == 3 else 0
    split = [o.name for o in spec.outputs if o.name != output and anchors > 1 and anchors in o.shape]
    if split:
        # PP-PicoDet's layout model: 4 class-score heads [1, A, 10] beside 4 box-distribution heads [1, A, 32]; class
        # scores read as boxes 0.01 px wide gave "detection_agreement 0.092" for an F1 of 0.737 (found probing).
        raise ConfigError(f"evaluate.task is detection, but model.output '{output}' ({anchors} anchors) shares its "
                          f"anchors with {', '.join(split)}: the detector splits scores and boxes over several "
                          f"outputs (PicoDet, NanoDet, SSD), and task detection reads one raw head that holds both "
                          f"(YOLO's [N, 4 + classes, anchors]). Judge it with a hook metric that decodes it as your "
                          f"post-processing does (a hook declaring the keyword all_outputs is given every output by "
                          f"name), and leave evaluate.task at classification with sqnr_db / cosine.")
    if problem is not None:
        raise ConfigError(f"evaluate.task is detection, but model.output '{output}' (FP32, shape {list(out.shape)} on "
                          f"the first evaluation sample) does not fit evaluate.detection: {problem}. Point "
                          f"model.output at the detector's raw head before NMS, and set evaluate.detection (layout, "
                          f"objectness, logits) as README's 'Task metrics' describes.")


def _check_task_output(cfg: PipelineConfig, out: np.ndarray | None) -> None:
    """ConfigError (exit 2) at load where evaluate.task cannot read model.output on the first evaluation sample (a
    CTC decode, a dense map, a segmentation's classes), not exit 4 after calibration, the build and the FP32
    evaluation (found probing: task dense on a [N, L] output). `out`: model.output there (None skips it)."""
    from quantpipe.errors import ConfigError, EvaluationError
    from quantpipe.taskmetrics import TaskSpec

    task = TaskSpec.from_config(cfg.evaluate)
    read = {"ctc": task.decode, "dense": task.mask, "segmentation": task.classes}.get(task.task)
    if out is None or read is None:  # a regression reads any output as its numbers
        return
    out = np.moveaxis(out, cfg.model.output_batch_axis, 0)
    try:
        read(out)
    except EvaluationError as err:
        raise ConfigError(f"{err} (found at load, on the first evaluation sample)") from err
    side = task.maps(out).shape[-2:] if task.task == "dense" else ()
    if side and min(side) <= THIN_MAP:
        log.warning("evaluate.task dense reads model.output %s as maps of %s pixels (evaluate.dense.channels: %s): "
                    "map_iou and box_agreement judge such strips poorly. A channels-last map [N, H, W, C]: set "
                    "evaluate.dense.channels: last.", list(out.shape), " x ".join(map(str, side)), task.channels)


#: A dense map this many pixels wide or tall, or fewer, is warned about at load (read along the wrong axes?).
THIN_MAP = 4


def _check_target_labels(cfg: PipelineConfig, data: Dataset, output: str, out: np.ndarray | None) -> None:
    """DataError (exit 2) at load where evaluate.task regression's labels do not hold as many target values per
    sample as model.output holds on the first evaluation sample (`out`; None skips it)."""
    labels = data.labels
    if cfg.evaluate.task != "regression" or labels is None or out is None or cfg.evaluate.valid_mask is not None:
        return
    values = int(np.size(out) // max(np.shape(out)[cfg.model.output_batch_axis], 1))
    if labels.shape[1] != values:
        raise DataError(f"{data.role} data {data.path}: labels array '{data.labels_key}' holds {labels.shape[1]} "
                        f"target value(s) per sample, but model.output '{output}' holds {values} "
                        f"({list(np.shape(out))} for one sample); regression labels are compared value by value. "
                        f"Store each sample's targets in the output's order, or point model.output at the output "
                        f"they are the targets of.")


def _check_position_labels(cfg: PipelineConfig, data: Dataset, output: str, out: np.ndarray | None) -> None:
    """DataError (exit 2) at load where labels per position [N, T] do not fit model.output [N, T, classes] on the
    first evaluation sample (`out`; None skips the check), or index a class it does not have."""
    labels = data.labels
    if labels is None or labels.ndim != 2 or out is None or cfg.model.output_batch_axis != 0:
        return
    if out.ndim != 3 or labels.shape[1] != out.shape[1]:
        raise DataError(f"{data.role} data {data.path}: labels array '{data.labels_key}' has shape {list(labels.shape)}, "
                        f"a label per position, but model.output '{output}' has {list(out.shape)} for one sample: "
                        f"per-position labels score an output [N, T, classes] at its T positions. Give each sample a row "
                        f"of T labels (-100 where a position is not scored), or one label per sample.")
    data.check_label_range(int(out.shape[2]), output)


def _check_valid_mask(cfg: PipelineConfig, inputs: Sequence[TensorInfo], data: Dataset, output: str,
                      out: np.ndarray | None) -> None:
    """ConfigError (exit 2) at load where evaluate.valid_mask is no model input, or does not mark model.output's
    first two axes [N, T] on the first evaluation sample (`out`: model.output there; None skips that check)."""
    from quantpipe.errors import ConfigError

    name = cfg.evaluate.valid_mask
    if name not in [t.name for t in inputs]:
        raise ConfigError(f"evaluate.valid_mask is '{name}', which is not an input of {cfg.model.path} (inputs: "
                          f"{[t.name for t in inputs]}). Name the input that is nonzero where model.output's positions "
                          f"count (an attention mask), or leave valid_mask out.")
    if out is None or cfg.model.output_batch_axis != 0:
        return
    mask = np.asarray(data.first_batch(1).feeds[name])
    if mask.ndim != 2 or out.shape[:2] != mask.shape:
        raise ConfigError(f"evaluate.valid_mask '{name}' has shape {list(mask.shape)} on the first evaluation sample, "
                          f"but model.output '{output}' has {list(out.shape)}: the mask must be [N, T] over an output "
                          f"[N, T, ...]. Name the input that marks the output's positions, or leave valid_mask out.")


def _first_output(session: Any, data: Dataset, output: str) -> np.ndarray | None:
    """model.output of FP32 on the first sample of `data`, for a check at load; None without a session or where the
    run fails (the stage that runs the model says why)."""
    if session is None:
        return None
    try:
        return np.asarray(session.run([output], dict(data.first_batch(1).feeds))[0])
    except Exception:
        return None


def _check_session(model: str | Path, spec: ModelSpec) -> Any:
    """The FP32 model's onnxruntime session for the checks at load, quiet (a failure there is expected: 2 samples on
    a model that takes 1); None above BATCH_CHECK_MAX_BYTES, or where it cannot be created (the stage that runs the
    model says why)."""
    if spec.size_bytes > BATCH_CHECK_MAX_BYTES:
        return None
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4
    try:
        return ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    except Exception:
        return None


def _batch_held_at_one(model: str | Path, inputs: tuple[TensorInfo, ...], axes: Mapping[str, int],
                       why: str) -> tuple[TensorInfo, ...]:
    fixed = tuple(_batch_of_one(t, axes.get(t.name, 0)) for t in inputs)
    log.warning("%s declares a dynamic batch on input(s) %s, but onnxruntime fails on 2 samples at once (%s) and runs "
                "1: a node holds the exported batch (typically a Reshape to a traced shape). quantpipe runs it one "
                "sample at a time, as a batch-1 export (slower; latency at larger batch sizes is skipped); re-export "
                "it with dynamic shapes to batch it.", Path(model).name,
                [t.name for t, f in zip(inputs, fixed, strict=True) if t != f], why)
    return fixed


def _check_output_batch(spec: ModelSpec, output: str, out: np.ndarray, n: int, axis: int) -> None:
    """DataError where model.output does not hold the `n` samples it was run on along `axis`."""
    if out.ndim > axis and out.shape[axis] == n:
        return
    post = [op for op in ("NonMaxSuppression", "TopK", "NonZero") if spec.op_counts.get(op)]
    raise DataError(
        f"model.output '{output}' has shape {list(out.shape)} for {n} sample(s): its axis {axis} does not hold the "
        f"samples, and quantpipe compares outputs sample by sample (found on a first run of the calibration data, "
        f"before calibrating). A detector whose graph ends in post-processing"
        + (f" (this one has {', '.join(post)})" if post else " (NonMaxSuppression, TopK)")
        + " returns [K, ...] boxes for one image: point model.output at a raw head before it (`quantpipe inspect` "
        "lists the outputs), or export the model without the post-processing. An RNN's time-major [T, N, C] output: "
        "set model.output_batch_axis: 1. A batch-1 export whose output has no batch axis ([T] per input): add one "
        "(an Unsqueeze at the output) or re-export with it.")


def _batch_of_one(t: TensorInfo, axis: int) -> TensorInfo:
    """`t` with its dynamic batch dimension (at `axis`) set to 1."""
    if axis >= len(t.shape):
        return t
    dim = t.shape[axis]
    if isinstance(dim, int) and dim > 0:
        return t
    return dataclasses.replace(t, shape=(*t.shape[:axis], 1, *t.shape[axis + 1:]))


def _gist(message: str) -> str:
    """onnxruntime's failure in a few words: the op and its last sentence ("a Reshape node: Input shape:{2,8},
    requested shape:{1,8}")."""
    import re

    op = re.search(r"running (\w+) node", message)
    last = message.strip().rsplit(". ", 1)[-1][:200]
    return f"a {op.group(1)} node: {last}" if op else last
