"""What the calibration data decided for a Q/DQ build, saved beside the model and read back exactly.

`with_calibration_data` fills `QuantizeOptions` with per-channel statistics, the activations to split, GPTQ
weight codes and the output heads' bias; the build stage writes them next to the INT8 model
(`models/model.int8.decisions.npz`, listed with its sha256 in the stage's manifest), so a later stage that rebuilds
the model's layers (the per-layer sensitivity) takes them as they were, also when the build is reused, instead of
measuring them again. One `.npz` without pickles: the arrays as they are, and a JSON header naming them.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from quantpipe.fsutil import atomic_write_bytes
from quantpipe.quantize.options import QuantizeOptions, SplitActivations
from quantpipe.quantize.types import ChannelStats
from quantpipe.quantize.weights import WeightCodes

__all__ = ["FORMAT", "load_decisions", "save_decisions"]

FORMAT = 1
"""The header's `format`; a file of another format is not read (the caller measures again)."""


def save_decisions(path: str | os.PathLike[str], options: QuantizeOptions) -> None:
    """Write what `options` holds of the calibration data's decisions to `path` (atomically)."""
    arrays: dict[str, Any] = {}

    def put(a: Any) -> str:
        key = f"a{len(arrays)}"
        arrays[key] = np.asarray(a)
        return key

    split = options.split_activations
    header = {
        "format": FORMAT,
        "channel_stats": None if options.channel_stats is None else [
            {"key": k, "tensor": s.tensor, "axis": s.axis, "absmax": put(s.absmax), "mean": put(s.mean),
             "num_samples": s.num_samples} for k, s in options.channel_stats.items()],
        "split_activations": split if isinstance(split, str) else {k: int(v) for k, v in split.items()},
        "weight_codes": None if options.weight_codes is None else [
            {"key": k, "weight": c.weight, "node": c.node, "axis": c.axis, "q": put(c.q), "scale": put(c.scale),
             "fingerprint": c.fingerprint} for k, c in options.weight_codes.items()],
        "output_bias": None if options.output_bias is None else [
            {"key": k, "value": put(v)} for k, v in options.output_bias.items()],
        "output_bias_keep": sorted(options.output_bias_keep),
    }
    if options.equalize_depthwise is True:  # (absent: False, the files written before it could be chosen)
        header["equalize_depthwise"] = True
    buf = io.BytesIO()
    np.savez(buf, header=np.array(json.dumps(header)), **arrays)
    atomic_write_bytes(path, buf.getvalue())


def load_decisions(path: str | os.PathLike[str], options: QuantizeOptions) -> QuantizeOptions | None:
    """`options` with the decisions saved at `path` filled in, or None when the file is of another format."""
    with np.load(path, allow_pickle=False) as z:
        header = json.loads(str(z["header"]))
        if header.get("format") != FORMAT:
            return None
        arrays = {k: z[k] for k in z.files if k != "header"}
    stats = header["channel_stats"]
    codes = header["weight_codes"]
    bias = header["output_bias"]
    split = header["split_activations"]
    return dataclasses.replace(
        options,
        channel_stats=None if stats is None else {
            s["key"]: ChannelStats(s["tensor"], int(s["axis"]), arrays[s["absmax"]], arrays[s["mean"]],
                                   int(s["num_samples"])) for s in stats},
        split_activations=_split(split),
        weight_codes=None if codes is None else {
            c["key"]: WeightCodes(c["weight"], c["node"], c["axis"], arrays[c["q"]], arrays[c["scale"]],
                                  c["fingerprint"]) for c in codes},
        output_bias=None if bias is None else {b["key"]: arrays[b["value"]] for b in bias},
        output_bias_keep=frozenset(header["output_bias_keep"]),
        equalize_depthwise=header.get("equalize_depthwise",
                                      False if options.equalize_depthwise == "auto" else options.equalize_depthwise),
    )


def _split(split: str | Mapping[str, Any]) -> SplitActivations:
    if split == "auto":
        return "auto"
    if split == "off":
        return "off"
    if isinstance(split, str):
        raise ValueError(f"unknown split_activations {split!r} in the decisions file")
    return {str(k): int(v) for k, v in split.items()}
