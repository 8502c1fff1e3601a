"""`quantize.decisions`: what the calibration data decided round-trips through its .npz exactly (values, dtypes,
shapes), and a file of another format is not read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from quantpipe.quantize.decisions import load_decisions, save_decisions
from quantpipe.quantize.options import QuantizeOptions
from quantpipe.quantize.types import ChannelStats
from quantpipe.quantize.weights import WeightCodes

RNG = np.random.default_rng(3)


def _filled() -> QuantizeOptions:
    return QuantizeOptions(
        channel_stats={"conv/1": ChannelStats("x/1", 1, RNG.random(8).astype(np.float32), RNG.standard_normal(8),
                                              200)},
        split_activations={"relu_out": 2, "relu2": 4},
        weight_codes={"w": WeightCodes("w", "conv/1", 0, RNG.integers(-127, 128, (8, 3, 3, 3)).astype(np.int8),
                                       RNG.random(8).astype(np.float32), "abc123"),
                      "w2": WeightCodes("w2", "gemm", None, RNG.integers(-127, 128, (4, 5)).astype(np.int8),
                                        np.float32(0.01), "def456")},
        output_bias={"head": RNG.standard_normal(10).astype(np.float32)},
        output_bias_keep=frozenset({"conv/1"}),
        equalize_depthwise=True,
    )


def _same(a: object, b: object) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray) or isinstance(a, np.generic):
        a, b = np.asarray(a), np.asarray(b)
        return a.dtype == b.dtype and a.shape == b.shape and bool(np.array_equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if hasattr(a, "__dataclass_fields__"):
        return type(a) is type(b) and all(_same(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    return a == b


def test_decisions_round_trip_exactly(tmp_path: Path) -> None:
    opts = _filled()
    save_decisions(tmp_path / "d.npz", opts)
    back = load_decisions(tmp_path / "d.npz", QuantizeOptions())
    assert back is not None and _same(back, opts)
    # Nothing decided (no statistics, 'off', no codes, no bias, not equalized): the same back.
    plain = QuantizeOptions(split_activations="off", equalize_depthwise=False)
    save_decisions(tmp_path / "p.npz", plain)
    assert load_decisions(tmp_path / "p.npz", QuantizeOptions()) == plain


def test_another_format_is_not_read(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", header=np.array(json.dumps({"format": 99})))
    assert load_decisions(tmp_path / "d.npz", QuantizeOptions()) is None
