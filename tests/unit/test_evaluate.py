"""`evaluate` end to end without Ray: detections tables against labels, checked against pycocotools."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from pycocotools.cocoeval import COCOeval
from test_cocoeval import pycocotools_eval

from platescope import storage
from platescope.config import EvaluateConfig
from platescope.evaluation.detections import DetectionsError
from platescope.evaluation.groundtruth import GroundTruthError
from platescope.evaluation.matching import ImageMatcher
from platescope.evaluation.result import COCO_METRIC_NAMES
from platescope.evaluation.run import LabelMismatchError, run_evaluate
from platescope.evaluation.simulate import simulate_rows, synthetic_coco, write_coco, write_detections


def pycocotools_on_table(coco: dict, table_dir, root: str, label_map=None) -> COCOeval:
    """The reference: every row's boxes handed to COCOeval as pycocotools users do it."""
    by_name = {c["name"]: c["id"] for c in coco["categories"]}
    by_uri = {f"{root.rstrip('/')}/{im['file_name']}": im["id"] for im in coco["images"]}
    dets = []
    for part in sorted((table_dir / "data").glob("*.parquet")):
        for row in pq.read_table(part).to_pylist():
            if row["error"] or row["source_uri"] not in by_uri:
                continue
            for box, score, label in zip(row["boxes"], row["scores"], row["labels"]):
                label = (label_map or {}).get(label, label)
                if label not in by_name:
                    continue
                x0, y0, x1, y1 = (float(v) for v in box)
                dets.append({"image_id": by_uri[row["source_uri"]], "category_id": by_name[label],
                             "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(score)})
    return pycocotools_eval(coco, dets)


def assert_matches_pycocotools(metrics: dict, ev: COCOeval, coco: dict) -> None:
    np.testing.assert_allclose([metrics[n] for n in COCO_METRIC_NAMES], ev.stats, atol=1e-6, rtol=0)
    for k, cat in enumerate(sorted(c["id"] for c in coco["categories"])):
        name = next(c["name"] for c in coco["categories"] if c["id"] == cat)
        p = ev.eval["precision"][:, :, k, 0, -1]
        r = ev.eval["recall"][:, k, 0, -1]
        ap = np.mean(p[p > -1]) if (p > -1).any() else -1
        assert metrics["per_class"][name]["map"] == pytest.approx(ap, abs=1e-6)
        if f"map_{name}" not in COCO_METRIC_NAMES:  # a class named "small" must not shadow map_small
            assert metrics[f"map_{name}"] == pytest.approx(ap, abs=1e-6)
        assert metrics[f"mar_100_{name}"] == pytest.approx(np.mean(r[r > -1]) if (r > -1).any() else -1, abs=1e-6)


@pytest.fixture
def dataset(tmp_path):
    coco = synthetic_coco(300, seed=11, categories=("licence_plate", "car", "bus"))
    coco["annotations"][3]["iscrowd"] = 1
    gt = write_coco(coco, tmp_path / "labels" / "gt.json")
    rows = list(simulate_rows(coco, root="/data/footage", seed=12, error_rate=0.03))
    rows.append({**rows[0], "source_uri": "/data/footage/unlabelled/extra.jpg"})  # no ground truth
    write_detections(rows[5:], tmp_path / "run", rows_per_part=64)  # first 5 images: no row at all
    return coco, gt, tmp_path / "run"


def test_metrics_equal_pycocotools_on_a_table_in_several_parts(dataset):
    coco, gt, run = dataset
    result = run_evaluate(EvaluateConfig(detections=str(run), ground_truth=str(gt)))
    assert_matches_pycocotools(result.metrics, pycocotools_on_table(coco, run, "/data/footage"), coco)
    counts = result.metrics["counts"]
    assert counts["images"] == 300 and counts["images_missed"] == 5 + counts["errors"]
    assert counts["errors"] > 0 and set(counts["errors_by_kind"]) == {"corrupt_image"}
    assert counts["rows_without_ground_truth"] == 1
    assert result.metrics["rows_without_ground_truth_examples"] == ["/data/footage/unlabelled/extra.jpg"]
    assert counts["boxes"] == len(coco["annotations"])


def test_classes_named_like_coco_sizes_leave_the_twelve_numbers_alone(tmp_path):
    coco = synthetic_coco(60, seed=21, categories=("small", "50", "licence_plate"))
    gt = write_coco(coco, tmp_path / "gt.json")
    write_detections(simulate_rows(coco, root="/data", seed=22), tmp_path / "run")
    metrics = run_evaluate(EvaluateConfig(detections=str(tmp_path / "run"), ground_truth=str(gt))).metrics
    assert_matches_pycocotools(metrics, pycocotools_on_table(coco, tmp_path / "run", "/data"), coco)
    assert "map_licence_plate" in metrics and "mar_100_small" in metrics


def test_a_table_without_a_single_box_equals_pycocotools(tmp_path):
    coco = synthetic_coco(20, seed=23, categories=("licence_plate",))
    gt = write_coco(coco, tmp_path / "gt.json")
    rows = [{**r, "boxes": [], "scores": [], "label_ids": [], "labels": []}
            for r in simulate_rows(coco, root="/data", seed=24)]
    write_detections(rows, tmp_path / "run")
    metrics = run_evaluate(EvaluateConfig(detections=str(tmp_path / "run"), ground_truth=str(gt))).metrics
    assert_matches_pycocotools(metrics, pycocotools_on_table(coco, tmp_path / "run", "/data"), coco)
    assert metrics["counts"]["detections"] == 0 and metrics["recall"] == 0.0


def test_the_table_streams_in_batches_and_is_never_read_whole(dataset, monkeypatch):
    _, gt, run = dataset
    expected = run_evaluate(EvaluateConfig(detections=str(run), ground_truth=str(gt))).metrics

    def whole(*args, **kwargs):
        raise AssertionError("the whole table was read")

    seen = []
    iter_batches = pq.ParquetFile.iter_batches

    def counted(self, *args, **kwargs):
        for batch in iter_batches(self, *args, **kwargs):
            seen.append(batch.num_rows)
            yield batch

    for name in ("read", "read_row_group", "read_row_groups"):
        monkeypatch.setattr(pq.ParquetFile, name, whole)
    monkeypatch.setattr(pq, "read_table", whole)
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counted)
    monkeypatch.setattr("platescope.evaluation.detections.BATCH_ROWS", 16)
    streamed = run_evaluate(EvaluateConfig(detections=str(run), ground_truth=str(gt))).metrics
    assert max(seen) <= 16 and sum(seen) >= 2 * 296  # a labels pass and a boxes pass, 16 rows at a time
    assert {k: streamed[k] for k in COCO_METRIC_NAMES} == {k: expected[k] for k in COCO_METRIC_NAMES}


def test_precision_recall_f1_at_the_threshold_count_boxes_at_iou_half(dataset):
    coco, gt, run = dataset
    m = run_evaluate(EvaluateConfig(detections=str(run), ground_truth=str(gt), score_threshold=0.6)).metrics
    tp, fp, fn = m["true_positives"], m["false_positives"], m["false_negatives"]
    assert tp + fn == len(coco["annotations"]) - 1  # the crowd box is not a plate to find
    assert m["precision"] == pytest.approx(tp / (tp + fp)) and m["recall"] == pytest.approx(tp / (tp + fn))
    assert m["f1"] == pytest.approx(2 * m["precision"] * m["recall"] / (m["precision"] + m["recall"]))
    lower = run_evaluate(EvaluateConfig(detections=str(run), ground_truth=str(gt), score_threshold=0.2)).metrics
    assert lower["recall"] > m["recall"] and lower["false_positives"] > fp


def test_the_gallery_holds_the_worst_images_first(dataset):
    _, gt, run = dataset
    result = run_evaluate(EvaluateConfig(detections=str(run), ground_truth=str(gt), num_worst_images=5))
    worst = result.worst_images
    assert len(worst) == 5
    badness = [(w.missed + w.false_alarms, w.missed) for w in worst]
    assert badness == sorted(badness, reverse=True) and badness[-1][0] > 0
    assert all(s >= 0.5 for w in worst for s in w.pred_scores)


def test_curves_cover_every_class_and_all(dataset):
    _, gt, run = dataset
    result = run_evaluate(EvaluateConfig(detections=str(run), ground_truth=str(gt)))
    assert set(result.pr_curves) == set(result.threshold_curves) == {"licence_plate", "car", "bus", "all"}
    curve = result.threshold_curves["all"]
    assert curve.recall == sorted(curve.recall, reverse=True)  # a higher threshold never finds more
    assert curve.recall[50] == pytest.approx(result.metrics["recall"])
    # At score 1.0 nothing is kept (simulated scores are below 1): precision is undefined there, not 0.
    assert np.isnan(curve.precision[-1]) and curve.recall[-1] == 0.0
    assert not np.isnan(curve.precision[0]) and all(0.0 <= p <= 1.0 for p in curve.precision if not np.isnan(p))


def test_label_mismatch_lists_both_sets_and_a_mapping_resolves_it(tmp_path):
    coco = synthetic_coco(40, seed=3, categories=("licence_plate",))
    gt = write_coco(coco, tmp_path / "gt.json")
    rows = list(simulate_rows(coco, root="/d", seed=4))
    for row in rows:
        row["labels"] = ["license-plate"] * len(row["labels"])
    write_detections(rows, tmp_path / "run")
    with pytest.raises(LabelMismatchError) as e:
        run_evaluate(EvaluateConfig(detections=str(tmp_path / "run"), ground_truth=str(gt)))
    assert "['license-plate']" in str(e.value) and "['licence_plate']" in str(e.value)
    assert "\n" not in str(e.value)
    mapping = {"license-plate": "licence_plate"}
    m = run_evaluate(EvaluateConfig(detections=str(tmp_path / "run"), ground_truth=str(gt), label_map=mapping)).metrics
    assert_matches_pycocotools(m, pycocotools_on_table(coco, tmp_path / "run", "/d", mapping), coco)
    dropped = run_evaluate(EvaluateConfig(detections=str(tmp_path / "run"), ground_truth=str(gt),
                                          label_map={"license-plate": ""})).metrics
    assert dropped["counts"]["detections"] == 0 and dropped["map"] == 0.0
    with pytest.raises(LabelMismatchError, match="not ground-truth categories"):
        run_evaluate(EvaluateConfig(detections=str(tmp_path / "run"), ground_truth=str(gt),
                                    label_map={"license-plate": "plate"}))


def test_bad_inputs_fail_with_one_line_naming_them(tmp_path):
    coco = synthetic_coco(5, seed=3)
    gt = write_coco(coco, tmp_path / "gt.json")
    write_detections([], tmp_path / "empty")
    (tmp_path / "bad.json").write_text("{not json")
    cases = [
        (EvaluateConfig(detections=str(tmp_path / "empty"), ground_truth=str(gt)), DetectionsError, "no rows"),
        (EvaluateConfig(detections=str(tmp_path / "nowhere"), ground_truth=str(gt)), DetectionsError, "not found"),
        (EvaluateConfig(detections=str(tmp_path / "empty"), ground_truth=str(tmp_path / "bad.json")),
         GroundTruthError, "bad.json"),
    ]
    for cfg, kind, text in cases:
        with pytest.raises(kind, match=text) as e:
            run_evaluate(cfg)
        assert "\n" not in str(e.value)


def test_matcher_relates_uris_to_label_paths():
    keys = ["images/a.jpg", "images/b.jpg", "cam1/c.jpg", "cam2/c.jpg", "x/d.jpg"]
    m = ImageMatcher(keys, ["s3://bucket/plates/images/", "/data/plates"])
    assert m.match("s3://bucket/plates/images/a.jpg") == 0  # root deeper than the labels' root
    assert m.match("/data/plates/images/b.jpg") == 1  # same root as the labels
    assert m.match("s3://other/deep/cam2/c.jpg") == 3  # unknown root: the whole path, by suffix
    assert m.match("/data/plates/c.jpg") is None and m.ambiguous == 1  # cam1 or cam2: not guessed
    assert m.match("/data/plates/images/zz.jpg") is None
    assert m.match("/data/plates/y/d.jpg") is None  # same name, other folder


def test_a_row_of_a_non_utf8_file_name_matches_its_label():
    """detect stores such a name as an escaped file:// URI; labels listed from disk (YOLO folders)
    name it as the OS does, with its undecodable bytes as surrogates."""
    import os

    from platescope.sources.manifest import manifest_uri

    uri = manifest_uri(os.fsdecode(b"/in/cam\xff/bad\xfe name%.jpg"))
    assert uri.startswith("file://") and "%FE" in uri
    m = ImageMatcher(["other.jpg", os.fsdecode(b"cam\xff/bad\xfe name%.jpg")], ["/in"])
    assert m.match(uri) == 1


def test_local_and_s3_copies_of_a_dataset_give_the_same_numbers(tmp_path, s3_server, s3_bucket):
    coco = synthetic_coco(60, seed=21, categories=("licence_plate", "car"))
    gt = write_coco(coco, tmp_path / "gt.json")
    write_detections(simulate_rows(coco, root="/mnt/plates", seed=22), tmp_path / "local")
    write_detections(simulate_rows(coco, root=f"{s3_bucket}/plates", seed=22), tmp_path / "s3copy")
    s3 = s3_server.options()
    for part in sorted((tmp_path / "s3copy" / "data").glob("*.parquet")):
        storage.write_bytes_atomic(f"{s3_bucket}/runs/r1/data/{part.name}", part.read_bytes(), s3)
    storage.write_bytes_atomic(f"{s3_bucket}/runs/r1/config.json",
                               json.dumps({"input": [f"{s3_bucket}/plates/"]}).encode(), s3)
    storage.write_bytes_atomic(f"{s3_bucket}/labels/gt.json", gt.read_bytes(), s3)
    local = run_evaluate(EvaluateConfig(detections=str(tmp_path / "local"), ground_truth=str(gt))).metrics
    remote = run_evaluate(EvaluateConfig(detections=f"{s3_bucket}/runs/r1",
                                         ground_truth=f"{s3_bucket}/labels/gt.json",
                                         s3=s3_server.config())).metrics
    assert local["counts"]["rows_without_ground_truth"] == remote["counts"]["rows_without_ground_truth"] == 0
    for name in COCO_METRIC_NAMES:
        assert local[name] == remote[name]


@pytest.mark.shared_data
def test_real_plates_labels_match_pycocotools(shared_data_dir, tmp_path):
    val = json.loads((shared_data_dir / "plates" / "val.json").read_text())
    root = str(shared_data_dir / "plates")
    write_detections(simulate_rows(val, root=root, seed=5, jitter=0.1), tmp_path / "run")
    # detect would have been pointed at plates/images/: the labels say images/<name>, rows say <root>/images/<name>
    result = run_evaluate(EvaluateConfig(detections=str(tmp_path / "run"),
                                         ground_truth=str(shared_data_dir / "plates" / "val.json"),
                                         input_root=[root + "/images"]))
    assert result.metrics["counts"]["rows_without_ground_truth"] == 0
    assert result.metrics["counts"]["images_missed"] == 0
    assert_matches_pycocotools(result.metrics, pycocotools_on_table(val, tmp_path / "run", root), val)
