"""Class-wise NMS (`nms_iou`): near-duplicates of one label go, other labels and separate boxes stay;
merging NMS (`nms_merge`) moves each kept box to the score-weighted mean of those it suppresses."""

from __future__ import annotations

import os

import numpy as np
import pytest

from platescope.detectors.nms import class_wise_nms, merge_duplicates


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


def test_merging_keeps_nms_s_boxes_moved_to_the_score_weighted_mean_of_their_duplicates():
    boxes = np.array([[10, 10, 50, 30], [14, 10, 54, 34], [100, 100, 140, 120], [10, 10, 50, 30],
                      [12, 10, 52, 30]], np.float32)
    scores = np.array([0.6, 0.2, 0.8, 0.7, 0.2], np.float32)
    labels = np.array([0, 0, 0, 1, 0])
    merged, kept_scores, kept_labels = merge_duplicates(boxes, scores, labels, 0.5)
    # kept: 0 (with 1 and 4, same label, IoU > 0.5), 2 (alone), 3 (another label): in input order
    assert kept_scores.tolist() == pytest.approx([0.6, 0.8, 0.7]) and kept_labels.tolist() == [0, 0, 1]
    np.testing.assert_allclose(merged[0], (0.6 * boxes[0] + 0.2 * boxes[1] + 0.2 * boxes[4]) / 1.0, atol=1e-4)
    np.testing.assert_array_equal(merged[1:], boxes[[2, 3]])
    assert merged.dtype == np.float32
    assert class_wise_nms(boxes, scores, labels, 0.5).tolist() == [0, 2, 3]  # the same boxes kept
    high, high_scores, _ = merge_duplicates(boxes, scores, labels, 0.5, min_score=0.65)  # only 2 and 3 lead
    assert high_scores.tolist() == pytest.approx([0.8, 0.7])
    np.testing.assert_array_equal(high, boxes[[2, 3]])
    empty = merge_duplicates(boxes[:0], scores[:0], labels[:0], 0.5)
    assert [len(a) for a in empty] == [0, 0, 0]


def test_finish_merges_boxes_under_the_threshold_into_those_above_it_and_drops_the_rest():
    from platescope.detectors.postprocess import candidate_threshold, finish

    boxes = np.array([[10, 10, 50, 30], [14, 10, 54, 34], [200, 10, 240, 30]], np.float32)
    scores = np.array([0.6, 0.2, 0.25], np.float32)
    labels = np.zeros(3, np.int64)
    assert candidate_threshold(0.3, nms_merge=True) == 0.0 and candidate_threshold(0.3, nms_merge=False) == 0.3
    kwargs = {"image_size": (100, 300), "padded": False, "threshold": 0.3, "nms_iou": 0.5, "id2label": {0: "plate"}}
    merged = finish(boxes, scores, labels, nms_merge=True, **kwargs)
    np.testing.assert_allclose(merged.boxes, [(0.6 * boxes[0] + 0.2 * boxes[1]) / 0.8], atol=1e-4)
    assert merged.scores.tolist() == pytest.approx([0.6]) and merged.labels == ["plate"]
    plain = finish(boxes, scores, labels, nms_merge=False, **kwargs)  # NMS alone: the box as it was
    np.testing.assert_array_equal(plain.boxes, boxes[:1])


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

    # Merging, with a threshold: every box found feeds the merge; only merged boxes above it are kept.
    threshold = float(np.median(plain.scores))
    (merged,) = HFDetector(model_dir, threshold=threshold, device="cpu", num_threads=1, nms_iou=iou,
                           nms_merge=True).detect([image])
    boxes, scores, labels = merge_duplicates(plain.boxes, plain.scores, plain.label_ids, iou)
    above = scores > threshold
    assert 0 < len(merged.scores) == int(above.sum())
    np.testing.assert_allclose(merged.boxes, boxes[above], atol=1e-3)
    np.testing.assert_allclose(merged.scores, scores[above])
    np.testing.assert_array_equal(merged.label_ids, labels[above])


@pytest.mark.parametrize("values, message", [
    ({"nms_iou": 0.0}, "nms_iou"),
    ({"nms_iou": 1.5}, "nms_iou"),
    ({"nms_iou": 0.5, "detector": "florence2", "prompt": "<OD>"}, "nms_iou: only hf detectors"),
    ({"nms_merge": True}, "nms_merge: .*set nms_iou as well"),
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


def test_nms_merge_is_part_of_what_the_rows_depend_on_and_old_runs_still_resume():
    from platescope.config import DetectConfig, build_config
    from platescope.pipeline import fingerprint

    def fields(**values):
        cfg = build_config(DetectConfig, values={"input": ["x"], "output": "y", "nms_iou": 0.5, **values})
        return {"nms_iou": cfg.nms_iou, **{k: v for k, v in fingerprint.compute(cfg).items() if k == "nms_merge"}}

    before = {"nms_iou": 0.5}  # recorded before nms_merge existed
    assert fingerprint.differences(before, fields()) == []
    assert fingerprint.differences(before, fields(nms_merge=True)) == ["nms_merge null -> true"]


def test_the_cli_switch_sets_nms_merge():
    from platescope.cli import build_parser, detect_config_from_args

    args = build_parser().parse_args(["detect", "--input", "x", "--output", "y", "--nms-iou", "0.4", "--nms-merge"])
    cfg = detect_config_from_args(args)
    assert cfg.nms_iou == 0.4 and cfg.nms_merge is True


@pytest.mark.parametrize("values, expected", [
    ({}, (0.4, True)),  # the bundled model: merging NMS
    ({"nms_merge": False}, (None, False)),  # turned off
    ({"nms_iou": 0.7}, (0.7, False)),  # plain NMS, as asked
    ({"model": "/models/other"}, (None, False)),  # any other model: off unless asked
    ({"model": "s3://bucket/plates-rtdetr-slim"}, (None, False)),
    ({"model": "/models/other", "nms_iou": 0.5, "nms_merge": True}, (0.5, True)),
])
def test_the_bundled_model_merges_duplicates_unless_told_otherwise(values, expected):
    from platescope.config import DetectConfig, build_config

    cfg = build_config(DetectConfig, values={"input": ["x"], "output": "y", **values})
    assert (cfg.nms_iou, cfg.nms_merge) == expected


def test_the_bundled_model_named_by_a_relative_path_merges_duplicates_too(monkeypatch):
    from platescope.config import DetectConfig, build_config
    from platescope.models import default_model_dir

    monkeypatch.chdir(os.path.dirname(default_model_dir()))
    for written in ("plates-rtdetr-slim", "./plates-rtdetr-slim/"):
        cfg = build_config(DetectConfig, values={"input": ["x"], "output": "y", "model": written})
        assert (cfg.nms_iou, cfg.nms_merge) == (0.4, True), written
