"""report.plots: the accuracy-vs-latency labels never print over each other."""

from __future__ import annotations

import itertools

import pandas as pd
import pytest

from quantpipe.report.plots import accuracy_vs_latency, accuracy_vs_latency_figure

# The bundled example on a 2-core CPU: ort-fp32 and ort-fp16 sit at about the same latency and accuracy.
EXAMPLE = pd.DataFrame({
    "variant": ["ort-fp32", "ort-fp16", "ort-int8"], "backend": ["onnxruntime"] * 3,
    "precision": ["fp32", "fp16", "int8"], "latency_ms": [17.57, 18.38, 64.26], "top1": [0.99, 0.99, 0.9875],
})
CROWDED = pd.DataFrame({
    "variant": ["ort-fp32", "ort-fp16", "ort-int8", "trt-fp32", "trt-fp16", "trt-int8"],
    "backend": ["onnxruntime"] * 3 + ["tensorrt"] * 3, "precision": ["fp32", "fp16", "int8"] * 2,
    "latency_ms": [1.00, 1.01, 1.02, 1.00, 1.01, 1.03], "top1": [0.99, 0.99, 0.9899, 0.99, 0.9901, 0.9898],
})


def _label_boxes(points: pd.DataFrame) -> dict[str, object]:
    fig = accuracy_vs_latency_figure(points, accuracy="top1", batch_size=32, accuracy_label="top-1 accuracy")
    fig.canvas.draw()  # the final layout, as savefig draws it
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    names = set(points["variant"])
    return {t.get_text(): t.get_window_extent(renderer) for t in ax.texts if t.get_text() in names}


@pytest.mark.parametrize("points", [EXAMPLE, CROWDED], ids=["example", "crowded"])
def test_variant_labels_do_not_overlap(points: pd.DataFrame) -> None:
    boxes = _label_boxes(points)
    assert sorted(boxes) == sorted(points["variant"])  # each variant labelled once
    for (a, box_a), (b, box_b) in itertools.combinations(boxes.items(), 2):
        assert not box_a.overlaps(box_b), f"labels {a} and {b} overlap"


def test_svg_has_each_label_once() -> None:
    svg = accuracy_vs_latency(EXAMPLE, accuracy="top1", batch_size=32, accuracy_label="top-1 accuracy")
    for name in EXAMPLE["variant"]:
        assert svg.count(f">{name}</text>") == 1
