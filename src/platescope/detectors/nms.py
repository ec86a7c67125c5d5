"""Class-wise non-maximum suppression for set-prediction detectors.

DETR-family models are trained to give one query per object, but a briefly trained one often lets two
queries find the same plate with boxes that overlap almost entirely. Greedy NMS per class removes the
lower-scored of such pairs. It runs on the few hundred boxes of one image after post-processing, in
numpy (no torchvision here), so it costs microseconds.
"""

from __future__ import annotations

import numpy as np


def class_wise_nms(boxes: np.ndarray, scores: np.ndarray, label_ids: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices of the boxes kept (in their input order): within each class, a box whose IoU with a
    higher-scored kept box exceeds `iou_threshold` is dropped. Boxes are x_min, y_min, x_max, y_max."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    scores = np.asarray(scores, np.float64).reshape(-1)
    label_ids = np.asarray(label_ids).reshape(-1)
    if len(boxes) < 2:
        return np.arange(len(boxes))
    # Boxes of different classes never overlap in this computation: shift each class to its own region.
    span = float(np.max(boxes) - np.min(boxes)) + 1.0
    _, class_index = np.unique(label_ids, return_inverse=True)
    shifted = boxes + (class_index * 2 * span)[:, None]
    order = np.argsort(-scores, kind="stable")
    shifted = shifted[order]
    x0, y0, x1, y1 = shifted.T
    areas = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    w = np.clip(np.minimum(x1[:, None], x1[None]) - np.maximum(x0[:, None], x0[None]), 0, None)
    h = np.clip(np.minimum(y1[:, None], y1[None]) - np.maximum(y0[:, None], y0[None]), 0, None)
    inter = w * h
    union = areas[:, None] + areas[None] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / union, 0.0)
    keep = np.ones(len(order), dtype=bool)
    for i in range(len(order)):
        if keep[i]:
            keep[i + 1:] &= iou[i, i + 1:] <= iou_threshold
    return np.sort(order[keep])
