"""Per-layer sensitivity of ModelOpt's INT8 variants (`modelopt-int8`, `modelopt-int8-qpscales`), judged on the
models ModelOpt wrote (`quantpipe.qdq_sensitivity`: per quantized node, its own Q/DQ pairs), with the settings of
`evaluate.sensitivity`. The rows go into the variant's `details["sensitivity"]` (results.json)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

from quantpipe.artifacts import Variant
from quantpipe.config import PipelineConfig
from quantpipe.inputs import LoadedInputs
from quantpipe.workspace import Progress

__all__ = ["with_modelopt_sensitivity"]

log = logging.getLogger(__name__)


def with_modelopt_sensitivity(cfg: PipelineConfig, li: LoadedInputs, variants: Sequence[Variant],
                              progress: Progress) -> list[Variant]:
    """`variants`, each ModelOpt INT8 variant that ran given its per-layer sensitivity (worst first) in
    `details["sensitivity"]`; unchanged when `evaluate.sensitivity` is disabled."""
    s = cfg.evaluate.sensitivity
    if not s.enabled:
        return list(variants)
    from quantpipe.qdq_sensitivity import qdq_layer_sensitivity
    from quantpipe.taskmetrics import TaskSpec

    out = []
    for v in variants:
        if v.backend == "modelopt" and v.precision == "int8" and v.ran and v.artifact:
            with progress.task(f"per-layer sensitivity of {v.name}", None):
                rows = qdq_layer_sensitivity(li.spec.path, v.artifact, li.eval, output=li.output,
                                             max_samples=s.max_samples, one_at_a_time=s.one_at_a_time,
                                             metric=s.metric, batch_size=cfg.data.batch_size,
                                             task=TaskSpec.from_config(cfg.evaluate),
                                             output_axis=cfg.model.output_batch_axis)
            log.info("%s: per-layer sensitivity of %d quantized nodes", v.name, len(rows))
            v = dataclasses.replace(v, details={**v.details, "sensitivity": [dataclasses.asdict(r) for r in rows]})
        out.append(v)
    return out
