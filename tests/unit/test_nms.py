"""Class-wise NMS (`nms_iou`): near-duplicates of one label go, other labels and separate boxes stay."""

from __future__ import annotations

import numpy as np
import pytest

from platescope.detectors.nms import class_wise_nms


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_the_lower_scored_near_duplicate_of_a_label_is_dropped():
    boxes = np.array([[10, 10, 50, 30], [11, 10, 51, 31], [100, 100, 140, 120], [10, 10, 50, 30]], np.float32)
    scores = np.array([0.6, 0.9, 0.8, 0.7], np.float32)
    labels = np.array([0, 0, 0, 1])
    keep = class_wise_nms(boxes, scores, labels, 0.5)
    # box 0 overlaps the higher-scored box 1 of its label; box 3 has the same place but another label
    assert keep.tolist() == [1, 2, 3]


def test_the_threshold_is_on_iou_and_kept_boxes_are_in_input_order():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 14], [0, 0, 10, 20]], np.float32)  # IoU 0.71, 0.5, 0.7
    scores = np.array([0.5, 0.6, 0.9], np.float32)
    labels = np.zeros(3, np.int64)
    assert class_wise_nms(boxes, scores, labels, 0.8).tolist() == [0, 1, 2]
    assert class_wise_nms(boxes, scores, labels, 0.6).tolist() == [0, 2]  # 1 overlaps 2 by 0.7
    assert class_wise_nms(boxes, scores, labels, 0.4).tolist() == [2]
    assert class_wise_nms(boxes[:0], scores[:0], labels[:0], 0.5).tolist() == []


def test_random_boxes_leave_no_same_label_pair_above_the_threshold_and_drop_only_covered_ones():
    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 200, (300, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 60, (300, 2))], axis=1).astype(np.float32)
    scores = rng.uniform(0, 1, 300).astype(np.float32)
    labels = rng.integers(0, 3, 300)
    keep = class_wise_nms(boxes, scores, labels, 0.5)
    kept = set(keep.tolist())
    for i in keep:
        for j in keep:
            if i < j and labels[i] == labels[j]:
                assert _iou(boxes[i], boxes[j]) <= 0.5
    for d in set(range(300)) - kept:  # each dropped box overlaps a kept, higher-scored box of its label
        assert any(labels[k] == labels[d] and scores[k] >= scores[d] and _iou(boxes[k], boxes[d]) > 0.5
                   for k in kept)


def test_the_detector_suppresses_what_it_finds(tmp_path):
    from platescope.detectors.hf import HFDetector
    from platescope.detectors.presets import build_model_dir
    from platescope.samples import make_scene

    model_dir = build_model_dir("rtdetr-tiny-test", str(tmp_path / "m"))
    image = make_scene(np.random.default_rng(1), 320, 180)[0]
    (plain,) = HFDetector(model_dir, threshold=0.0, device="cpu", num_threads=1).detect([image])
    # A threshold under the largest overlap this random model gives, so that something is suppressed.
    iou = max(_iou(a, b) for i, a in enumerate(plain.boxes) for b in plain.boxes[i + 1:]) / 2
    assert iou > 0
    (suppressed,) = HFDetector(model_dir, threshold=0.0, device="cpu", num_threads=1, nms_iou=iou).detect([image])
    expected = class_wise_nms(plain.boxes, plain.scores, plain.label_ids, iou)
    assert 0 < len(suppressed.scores) == len(expected) < len(plain.scores)
    np.testing.assert_allclose(suppressed.boxes, plain.boxes[expected])
    assert suppressed.labels == [plain.labels[i] for i in expected]


@pytest.mark.parametrize("values, message", [
    ({"nms_iou": 0.0}, "nms_iou"),
    ({"nms_iou": 1.5}, "nms_iou"),
    ({"nms_iou": 0.5, "detector": "florence2", "prompt": "<OD>"}, "nms_iou: only hf detectors"),
])
def test_a_bad_nms_iou_fails_before_any_work(values, message):
    from platescope.config import ConfigError, DetectConfig, build_config

    with pytest.raises(ConfigError, match=message):
        build_config(DetectConfig, values={"input": ["x"], "output": "y", **values})


def test_nms_iou_is_part_of_what_the_rows_depend_on():
    from platescope.pipeline import fingerprint

    assert "nms_iou" in fingerprint.ROW_FIELDS
    assert fingerprint.differences({"nms_iou": None}, {"nms_iou": 0.7}) == ["nms_iou null -> 0.7"]
    assert fingerprint.differences({}, {"nms_iou": None}) == []  # a run recorded before the field resumes
