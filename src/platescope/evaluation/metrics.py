"""From the accumulated COCO tables to metrics.json's numbers and the report's curves."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from platescope.evaluation.cocoeval import MAX_DETECTIONS, RECALL_THRESHOLDS, CocoTables, StreamingCocoEval
from platescope.evaluation.result import (
    ALL_CLASSES,
    COCO_METRIC_NAMES,
    PrecisionRecallCurve,
    ThresholdCurve,
)

CURVE_THRESHOLDS = np.linspace(0.0, 1.0, 101)
_LAST_M = len(MAX_DETECTIONS) - 1


def _mean_defined(s: np.ndarray) -> float:
    s = s[s > -1]
    return float(np.mean(s)) if s.size else -1.0


def _prf(tp: int, fp: int, num_gt: int) -> tuple[float, float, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / num_gt if num_gt else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def coco_metrics(tables: CocoTables, names: dict[int, str]) -> dict[str, Any]:
    """The twelve numbers under torchmetrics' names, then map_<class> and mar_100_<class>.

    A class named like one of the twelve's suffixes ("small", "50", ...) would overwrite that number
    with its own AP: its map_<class> is left out, and its AP is in per_class like every class's.
    """
    out: dict[str, Any] = dict(zip(COCO_METRIC_NAMES, tables.stats()))
    for k, cat in enumerate(tables.category_ids):
        if f"map_{names[cat]}" not in COCO_METRIC_NAMES:
            out[f"map_{names[cat]}"] = _mean_defined(tables.precision[:, :, k, 0, _LAST_M])
        out[f"mar_100_{names[cat]}"] = _mean_defined(tables.recall[:, k, 0, _LAST_M])
    return out


def per_class(tables: CocoTables, evaluator: StreamingCocoEval, names: dict[int, str],
              counts: dict[int, tuple[int, int]]) -> dict[str, dict[str, Any]]:
    """Per class: AP at the three IoU settings, AR100, box counts and P/R/F1 at the score threshold."""
    threshold = np.array([evaluator.score_threshold])
    result = {}
    for k, cat in enumerate(tables.category_ids):
        p = tables.precision[:, :, k, 0, _LAST_M]
        tp, fp, num_gt = evaluator.counts_at_thresholds([cat], threshold)
        precision, recall, f1 = _prf(int(tp[0]), int(fp[0]), num_gt)
        boxes, detections = counts.get(cat, (0, 0))
        result[names[cat]] = {
            "map": _mean_defined(p), "map_50": _mean_defined(p[0]), "map_75": _mean_defined(p[5]),
            "mar_100": _mean_defined(tables.recall[:, k, 0, _LAST_M]),
            "boxes": boxes, "detections": detections,
            "precision": precision, "recall": recall, "f1": f1,
        }
    return result


def at_threshold(evaluator: StreamingCocoEval) -> dict[str, Any]:
    """Precision, recall and F1 over all classes of the boxes kept at the score threshold (IoU 0.5)."""
    tp, fp, num_gt = evaluator.counts_at_thresholds(evaluator.category_ids, np.array([evaluator.score_threshold]))
    tp0, fp0 = int(tp[0]), int(fp[0])
    precision, recall, f1 = _prf(tp0, fp0, num_gt)
    return {"score_threshold": evaluator.score_threshold, "iou_threshold": 0.5, "precision": precision,
            "recall": recall, "f1": f1, "true_positives": tp0, "false_positives": fp0,
            "false_negatives": num_gt - tp0}


def pr_curves(tables: CocoTables, names: dict[int, str]) -> dict[str, PrecisionRecallCurve]:
    recall = RECALL_THRESHOLDS.tolist()
    curves = {names[cat]: PrecisionRecallCurve(recall, tables.precision[0, :, k, 0, _LAST_M].tolist())
              for k, cat in enumerate(tables.category_ids)}
    if len(tables.category_ids) > 1:
        p = tables.precision[0, :, :, 0, _LAST_M]
        defined = p[:, (p > -1).all(axis=0)]
        if defined.size:  # classes averaged, as COCO's AP averages them
            curves[ALL_CLASSES] = PrecisionRecallCurve(recall, defined.mean(axis=1).tolist())
    return curves


def threshold_curves(evaluator: StreamingCocoEval, names: dict[int, str]) -> dict[str, ThresholdCurve]:
    groups = {names[c]: [c] for c in evaluator.category_ids}
    if len(evaluator.category_ids) > 1:
        groups[ALL_CLASSES] = list(evaluator.category_ids)
    curves = {}
    for name, cats in groups.items():
        tp, fp, num_gt = evaluator.counts_at_thresholds(cats, CURVE_THRESHOLDS)
        prf = [_prf(int(a), int(b), num_gt) for a, b in zip(tp, fp)]
        # Where no box is kept precision is undefined, not 0: NaN leaves a gap in the plot where 0
        # would draw a cliff the model does not have.
        precision = [x[0] if a + b else math.nan for x, a, b in zip(prf, tp, fp)]
        curves[name] = ThresholdCurve(CURVE_THRESHOLDS.tolist(), precision, [x[1] for x in prf],
                                      [x[2] for x in prf])
    return curves
