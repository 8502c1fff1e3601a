"""What `quantpipe quantize` says last about the INT8 file it wrote: how much of its weights are stored in int8, and
its output SQNR against FP32 on the first calibration samples, with a warning below evaluate.collapse's limits.
Nothing else judges a standalone `quantize`'s file."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from quantpipe.console import console

__all__ = ["say_written", "OUTPUT_SQNR_SAMPLES"]

log = logging.getLogger(__name__)


def say_written(spec: Any, out: Path, rep: Any, ds: Any, batch_size: int) -> None:
    """The closing lines of `quantpipe quantize` on the INT8 model it wrote to `out` from the model `spec` and the
    calibration data `ds` (`rep`: the writer's QuantizeReport)."""
    import onnx

    from quantpipe.modelinfo import mostly_float_warning, weight_share

    share = weight_share(onnx.load(str(out), load_external_data=False))
    console().print(f"wrote {out} ({len(getattr(rep, 'quantized_nodes', ()) or ())} node(s) quantized"
                    + (f", {100 * share.fraction:.0f} % of the weight values" if share.fraction is not None else "") + ")")
    if (warning := mostly_float_warning(share, out.name)) is not None:
        log.warning("%s", warning)
    _say_output_sqnr(spec, out, ds, batch_size)


def _said_offsets(said: str, sqnr: float, each: dict[str, float], offsets: dict[str, float]) -> tuple[str, float]:
    """The closing SQNR line with each output that sits around an offset said against its own variation, and the
    lowest SQNR the limits then judge: a speech-quality score read 46.2 dB against FP32, 29.7 dB against its
    variation (found probing; `evaluate.task: regression` measures the same as `centered_sqnr_db`)."""
    from quantpipe.metrics import OFFSET_WARN_DB

    for o, off in offsets.items():
        own = each.get(o, sqnr)
        if OFFSET_WARN_DB <= off < math.inf and math.isfinite(own):
            said += (f"; {o} sits around an offset: {own - off:.1f} dB against its variation over these samples "
                     f"({off:.1f} dB lower; `quantpipe run` with evaluate.task: regression measures it)")
            sqnr = min(sqnr, own - off)
    return said, sqnr


#: Calibration samples `quantize`'s closing SQNR is measured on.
OUTPUT_SQNR_SAMPLES = 64


def _say_output_sqnr(spec: Any, out: Path, ds: Any, batch_size: int) -> None:
    """The written model's output SQNR on the first calibration samples, and a warning below evaluate.collapse's
    limits: nothing else judges a standalone `quantize`'s file (a recognizer whose INT8 model read 0.27 of its
    lines as FP32 did was written with exit 0 and no word, found probing)."""
    from quantpipe.evalconfig import CollapseConfig
    from quantpipe.inputs import BATCH_CHECK_MAX_BYTES
    from quantpipe.quantize.write import written_sqnr

    if spec.size_bytes > BATCH_CHECK_MAX_BYTES:
        return
    sqnr, n, where, each, offsets = written_sqnr(spec.path, out, ds, batch_size=batch_size,
                                                 max_samples=OUTPUT_SQNR_SAMPLES)
    limits = CollapseConfig()
    # The first in file order: per-character samples sorted by sentence are one sentence's (found probing).
    said = (f"INT8 output SQNR{where} {sqnr:.1f} dB against FP32 on the first {n}"
            + (f" of {ds.num_samples} calibration samples (in file order)" if n < ds.num_samples else
               " calibration samples"))
    if each:
        said += " (each output: " + ", ".join(f"{o} {v:.1f} dB" for o, v in each.items()) + ")"
        worst = min(each, key=lambda o: each[o])
        # The pooled SQNR is the largest output's: CenterFace's 26.4 dB hid its heatmap at 14.9 dB (found probing).
        sqnr = min(sqnr, each[worst])
        if each[worst] < limits.warn_sqnr_db:
            said += f"; output {worst} is the lowest"
    said, sqnr = _said_offsets(said, sqnr, each, offsets)
    if sqnr < limits.min_sqnr_db:
        log.warning("%s: below %g dB, the INT8 output is far from FP32's. Judge the model with its task's own metric "
                    "before shipping it (`quantpipe run` with evaluate.task), and see README's 'Loud on collapse' "
                    "for the causes and the fallback.", said, limits.min_sqnr_db)
    elif sqnr < limits.warn_sqnr_db:
        # Output SQNR alone does not tell there: PP-OCRv3 recognizers at 15-17 dB read 0.39 to 0.98 of their lines
        # as FP32 does, and a text detector at 16.8 dB matched every box (found probing).
        log.warning("%s: below %g dB, output SQNR alone cannot tell a usable model from a broken one; judge it with "
                    "its task's own metric (`quantpipe run` with evaluate.task: ctc / dense / segmentation / "
                    "detection / regression / classification).", said, limits.warn_sqnr_db)
    else:
        console().print(said)
