"""Fault injection, as a new user would: the bundled example with bad evaluation labels, through `quantpipe run`.

Float labels and labels outside the model's classes are bad input (exit 2, one message, nothing written);
integer labels that do not index the output (here shifted by one class) leave an FP32 reference below chance,
which fails the gate instead of passing every rule against nonsense (issue 14).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from quantpipe.cli import main
from tests.conftest import EXAMPLE_EVAL
from tests.e2e.test_pipeline import example_config, write_config


def _run_with_labels(tmp_path: Path, capsys: pytest.CaptureFixture, labels: Callable[[np.ndarray], np.ndarray]) -> tuple[int, str]:
    with np.load(EXAMPLE_EVAL) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["label"] = labels(arrays["label"])
    bad = tmp_path / "eval.npz"
    np.savez(bad, **arrays)
    cfg = example_config(tmp_path)
    cfg["data"]["evaluation"]["path"] = str(bad)
    code = main(["run", str(write_config(tmp_path, cfg)), "--run-id", "bad-labels", "-q"])
    captured = capsys.readouterr()
    text = " ".join((captured.out + captured.err).split())
    assert "Traceback" not in text
    return code, text


def _with(values: dict[int, int]) -> Callable[[np.ndarray], np.ndarray]:
    def edit(labels: np.ndarray) -> np.ndarray:
        out = labels.copy()
        for i, v in values.items():
            out[i] = v
        return out
    return edit


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        (lambda y: y + 0.5, "labels array 'label' holds 400 invalid label(s) (e.g. 0.5, 1.5, 2.5, 3.5, 4.5); labels are "
                            "float64 and these are not whole numbers. Store the class index per sample as integers"),
        (_with({3: 57, 10: 57, 20: 12}), "labels array 'label' holds 3 invalid label(s) (e.g. 12, 57); class indices must "
                                         "be in [0, 10): output 'logits' has 10 classes. Store each sample's class index "
                                         "in 0..9, or set model.output"),
        (_with({0: -1, 5: -1}), "labels array 'label' holds 2 invalid label(s) (e.g. -1); class indices cannot be negative"),
    ],
    ids=["float", "above-classes", "negative"],
)
def test_bad_labels_exit_2_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture,
                                           labels: Callable[[np.ndarray], np.ndarray], expected: str) -> None:
    code, text = _run_with_labels(tmp_path, capsys, labels)
    assert code == 2, text
    assert expected in text
    assert str(tmp_path / "eval.npz") in text  # names the file
    assert not (tmp_path / "reports").exists(), "bad labels are refused before calibration writes anything"


def test_labels_that_do_not_index_the_output_fail_the_gate(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, text = _run_with_labels(tmp_path, capsys, lambda y: (y + 1) % 10)
    assert code == 1, text
    assert "reference ort-fp32 top1 = 0.00% on 400 labelled samples, below chance (10.00% for 10 classes)" in text
    assert "ort-int8 top1_drop cannot be judged" in text
    assert "gate FAILED" in text
