"""From a DETR-family model's outputs to Detections, in numpy.

`post_process` is transformers' `post_process_object_detection` for the processor families whose
recipe is written out here, so a detector that runs an ONNX export needs neither torch nor
transformers (tests hold each recipe to transformers' own). `finish` is what every HF detector does
after that: clip boxes that reach into padding, the optional class-wise NMS, and label names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from platescope.detectors.geometry import InputGeometry, canvas_target_sizes, clip_boxes
from platescope.detectors.nms import class_wise_nms, merge_duplicates
from platescope.schema import Detections

# image processor (as InputGeometry.processor names it) -> (how scores are made, how many to keep).
# softmax: over the classes and "no object", each query's best class (DETR, YOLOS). sigmoid_topk:
# each (query, class) pair scored on its own, the top k pairs kept, None meaning k = the queries
# (RT-DETR; Conditional and Deformable DETR keep 100).
RECIPES: dict[str, tuple[str, int | None]] = {
    "DetrImageProcessor": ("softmax", None),
    "YolosImageProcessor": ("softmax", None),
    "RTDetrImageProcessor": ("sigmoid_topk", None),
    "ConditionalDetrImageProcessor": ("sigmoid_topk", 100),
    "DeformableDetrImageProcessor": ("sigmoid_topk", 100),
}


def box_frames(image_sizes: Sequence[tuple[int, int]], geometry: InputGeometry | None,
               canvas: tuple[int, int]) -> tuple[list[tuple[float, float]], bool]:
    """The (height, width) each image's relative boxes scale by, and whether any image was padded (its
    boxes then need clipping to the image). See geometry.canvas_target_sizes."""
    frames = canvas_target_sizes(list(image_sizes), geometry, canvas)
    padded = any(tuple(map(float, f)) != tuple(map(float, s)) for f, s in zip(frames, image_sizes))
    return (frames if padded else [tuple(s) for s in image_sizes]), padded


def post_process(logits: np.ndarray, pred_boxes: np.ndarray, *, recipe: tuple[str, int | None], threshold: float,
                 frames: Sequence[tuple[float, float]]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(boxes x_min, y_min, x_max, y_max in pixels, scores, label ids) per image, scores above
    `threshold`: logits (batch, queries, classes) and pred_boxes (batch, queries, 4) relative
    centre-size boxes, as the model gives them; `frames` the (height, width) to scale each image by."""
    kind, top_k = recipe
    centre, size = pred_boxes[..., :2], pred_boxes[..., 2:]
    corners = np.concatenate([centre - np.float32(0.5) * size, centre + np.float32(0.5) * size], axis=-1)
    scale = np.asarray([(w, h, w, h) for h, w in frames], dtype=np.float32)
    corners = corners * scale[:, None, :]
    if kind == "softmax":
        shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
        prob = shifted / shifted.sum(axis=-1, keepdims=True)
        label_ids = prob[..., :-1].argmax(axis=-1)
        scores = np.take_along_axis(prob, label_ids[..., None], axis=-1)[..., 0]
        boxes = corners
    elif kind == "sigmoid_topk":
        num_classes = logits.shape[2]
        prob = (np.float32(1.0) / (np.float32(1.0) + np.exp(-logits))).reshape(len(logits), -1)
        k = min(top_k or logits.shape[1], prob.shape[1])
        order = np.argsort(-prob, axis=1, kind="stable")[:, :k]
        scores = np.take_along_axis(prob, order, axis=1)
        label_ids = order % num_classes
        boxes = np.take_along_axis(corners, (order // num_classes)[..., None], axis=1)
    else:
        raise ValueError(f"unknown post-processing recipe {kind!r}")
    out = []
    for s, b, lab in zip(scores, boxes, label_ids):
        keep = s > threshold
        out.append((b[keep].astype(np.float32), s[keep].astype(np.float32), lab[keep].astype(np.int64)))
    return out


def candidate_threshold(threshold: float, nms_merge: bool) -> float:
    """The score above which post-processing keeps a box for `finish`. Merging NMS averages a kept box
    with every box it suppresses, including those under the threshold (most of its gain comes from them:
    see nms), so it sees all of them; plain NMS keeps the same boxes either way, so the threshold
    applies first."""
    return 0.0 if nms_merge else threshold


def finish(boxes: np.ndarray, scores: np.ndarray, label_ids: np.ndarray, *, image_size: tuple[int, int],
           padded: bool, threshold: float, nms_iou: float | None, nms_merge: bool,
           id2label: Mapping[int, str]) -> Detections:
    """One image's post-processed boxes (those above `candidate_threshold`) as Detections: clipped to
    the image when the batch was padded (a box may reach into the padding; the image ends where it
    ends), then class-wise NMS if asked (merging with `nms_merge`), then those above `threshold`."""
    if padded:
        boxes = clip_boxes(boxes, image_size)
    if nms_iou is not None and nms_merge:
        boxes, scores, label_ids = merge_duplicates(boxes, scores, label_ids, nms_iou, min_score=threshold)
    elif nms_iou is not None:
        keep = class_wise_nms(boxes, scores, label_ids, nms_iou)
        boxes, scores, label_ids = boxes[keep], scores[keep], label_ids[keep]
    above = scores > threshold
    boxes, scores, label_ids = boxes[above], scores[above], label_ids[above]
    return Detections(boxes=boxes, scores=scores, label_ids=label_ids,
                      labels=[id2label.get(int(i), str(int(i))) for i in label_ids])
