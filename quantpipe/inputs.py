"""The load stage: the model and the data sets (calibration, evaluation, optional validation), checked against
each other before anything runs."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

from quantpipe.artifacts import ModelSpec, TensorInfo
from quantpipe.config import PipelineConfig
from quantpipe.data import Dataset, check_disjoint, open_dataset
from quantpipe.errors import DataError
from quantpipe.model import apply_input_overrides, load_model_spec

__all__ = ["LoadedInputs", "batch_axes", "load_inputs"]

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


def load_inputs(cfg: PipelineConfig) -> LoadedInputs:
    """Load and check the model and the data sets (exit 2 on any mismatch)."""
    spec, _ = load_model_spec(cfg.model.path)
    inputs = apply_input_overrides(spec.inputs, cfg.model.inputs)
    out_names = [o.name for o in spec.outputs]
    output = cfg.model.output or out_names[0]
    if output not in out_names:
        raise DataError(f"pipeline.yaml model.output is '{output}', but the model's outputs are {out_names}.")
    d = cfg.data
    axes = batch_axes(cfg, inputs)
    calib = open_dataset(d.calibration.path, inputs, max_samples=d.calibration.max_samples, role="calibration",
                         batch_axes=axes)
    seq = cfg.evaluate.task == "ctc"
    ev = open_dataset(d.evaluation.path, inputs, labels_key=d.evaluation.labels, max_samples=d.evaluation.max_samples,
                      role="evaluation", sequence_labels=seq, batch_axes=axes)
    classes = _static_classes(spec, output) if cfg.evaluate.task == "classification" else None
    if classes is not None:
        ev.check_label_range(classes, output)  # else: evaluate checks once the first batch shows the class count
    _warn_overlap(calib, ev)
    val = None
    if d.validation is not None:
        val = open_dataset(d.validation.path, inputs, labels_key=d.validation.labels,
                           max_samples=d.validation.max_samples, role="validation", sequence_labels=seq,
                           batch_axes=axes)
        if classes is not None:
            val.check_label_range(classes, output)
        _warn_overlap(val, ev)
    return LoadedInputs(spec, inputs, output, calib, ev, val)


def batch_axes(cfg: PipelineConfig, inputs: Sequence[TensorInfo]) -> dict[str, int]:
    """Each input's batch axis: `model.inputs.<name>.batch_axis`, else `model.batch_axis`."""
    out = {}
    for t in inputs:
        spec = cfg.model.inputs.get(t.name)
        out[t.name] = spec.batch_axis if spec is not None and spec.batch_axis is not None else cfg.model.batch_axis
    return out


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
