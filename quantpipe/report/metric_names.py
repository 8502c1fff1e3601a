"""What the reports call each metric: the column labels, the accuracy columns of the variants' table, and the accuracy
a summary leads with."""

from __future__ import annotations

__all__ = ["METRIC_LABELS", "TABLE_METRICS", "KEY_ACCURACY", "KEY_LABELS"]

METRIC_LABELS = {
    "top1": "Top-1", "top5": "Top-5", "top1_drop": "Top-1 drop", "top5_drop": "Top-5 drop",
    "top1_agreement": "Top-1 agreement", "cosine": "Cosine", "sqnr_db": "SQNR", "max_abs_error": "Max abs error",
    "latency_ms": "Median latency", "latency_p99_ms": "p99 latency", "throughput": "Throughput",
    "speedup": "Speedup", "size_mb": "Size",
    "line_agreement": "Line agreement", "cer": "CER", "line_accuracy": "Line accuracy", "label_cer": "CER vs labels",
    "line_accuracy_drop": "Line accuracy drop", "map_iou": "Map IoU", "map_iou_min": "Map IoU, worst",
    "box_agreement": "Box agreement", "pixel_agreement": "Pixel agreement", "miou": "Mean IoU",
    "detection_agreement": "Detection agreement",
    "mae": "Mean abs error", "centered_sqnr_db": "SQNR vs spread", "rank_correlation": "Rank correlation",
    "label_mae": "MAE vs labels", "label_mae_increase": "MAE vs labels increase",
    "other_outputs_sqnr_db": "Other outputs' SQNR, worst",
}
TABLE_METRICS = ("top1", "top5", "top1_drop", "top1_agreement", "line_accuracy", "line_agreement", "cer", "label_cer",
                 "map_iou", "map_iou_min", "box_agreement", "pixel_agreement", "miou", "detection_agreement",
                 "label_mae", "mae", "centered_sqnr_db", "rank_correlation", "cosine", "sqnr_db", "max_abs_error",
                 "other_outputs_sqnr_db")
"""The accuracy columns of the variants' table, in order (measured ones only; hooks' metrics after them)."""
KEY_ACCURACY = ("top1", "line_accuracy", "top1_agreement", "line_agreement", "box_agreement", "map_iou",
                "pixel_agreement", "detection_agreement", "centered_sqnr_db", "cosine")
"""The accuracy a summary leads with, the first one measured: the task's own (against labels, else against the
reference) before the output's cosine."""
KEY_LABELS = {"top1": "top-1 accuracy", "line_accuracy": "exact-line accuracy",
              "top1_agreement": "top-1 agreement with the reference",
              "line_agreement": "exact-line agreement with the reference",
              "box_agreement": "box agreement with the reference", "map_iou": "map IoU with the reference",
              "pixel_agreement": "pixel agreement with the reference",
              "detection_agreement": "detection agreement with the reference",
              "centered_sqnr_db": "SQNR against the reference's spread",
              "cosine": "cosine"}
"""How a summary sentence names each KEY_ACCURACY metric."""
