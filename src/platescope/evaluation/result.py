"""What an evaluation produces, handed from the metrics to the reports.

`metrics` is exactly what metrics.json holds. The curves and the worst images feed the HTML report;
they are small (a few hundred numbers per class, a dozen images) whatever the size of the table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The twelve COCO numbers, in the order pycocotools prints them, under torchmetrics' names.
COCO_METRIC_NAMES = (
    "map", "map_50", "map_75", "map_small", "map_medium", "map_large",
    "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large",
)

# Curves over all classes together are stored under this name beside the per-class ones.
ALL_CLASSES = "all"


@dataclass
class ImageExample:
    """One image of the gallery of worst images, with what was expected and what was found."""

    source_uri: str
    key: str  # path relative to the ground truth's root, as the labels name it
    width: int
    height: int
    gt_boxes: list[list[float]]  # x_min, y_min, x_max, y_max in pixels
    gt_labels: list[str]
    pred_boxes: list[list[float]]  # predictions with score >= the report's threshold
    pred_scores: list[float]
    pred_labels: list[str]
    missed: int  # ground-truth boxes no such prediction matched at IoU 0.5
    false_alarms: int  # such predictions that matched no ground-truth box at IoU 0.5


@dataclass
class ThresholdCurve:
    """Precision, recall and F1 (IoU 0.5) of the boxes kept at each score threshold."""

    score: list[float]
    precision: list[float]
    recall: list[float]
    f1: list[float]


@dataclass
class PrecisionRecallCurve:
    """COCO's interpolated precision at 101 recall points (IoU 0.5, all areas, 100 detections).

    precision[i] is -1 where COCO leaves it undefined (the class has no ground truth).
    """

    recall: list[float]
    precision: list[float]


@dataclass
class EvaluationResult:
    metrics: dict[str, Any]
    pr_curves: dict[str, PrecisionRecallCurve] = field(default_factory=dict)  # class name or ALL_CLASSES
    threshold_curves: dict[str, ThresholdCurve] = field(default_factory=dict)  # class name or ALL_CLASSES
    worst_images: list[ImageExample] = field(default_factory=list)
