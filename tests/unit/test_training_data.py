"""Training data without Ray: COCO sets to records, augmentation, processor inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from platescope import samples
from platescope.training import data


@pytest.fixture
def coco_dir(tmp_path):
    path = samples.write_image_dataset(str(tmp_path / "set"), 4, seed=2, size=(320, 240))
    coco = json.loads(path.read_text())
    # Two categories with non-contiguous ids, one crowd box: the head must see 0..K-1 and no crowd.
    coco["categories"] = [{"id": 1, "name": "licence_plate"}, {"id": 7, "name": "car"}]
    coco["annotations"][0]["category_id"] = 7
    coco["annotations"][1]["iscrowd"] = 1
    path.write_text(json.dumps(coco))
    return path, coco


def test_records_use_contiguous_class_indices_and_leave_crowds_out(coco_dir):
    path, coco = coco_dir
    labelled = data.read_coco_set(str(path), None)
    assert labelled.id2label == {0: "licence_plate", 1: "car"}
    assert sum(len(r["labels"]) for r in labelled.records) == len(coco["annotations"]) - 1
    first = next(r for r in labelled.records if r["image_id"] == coco["annotations"][0]["image_id"])
    assert 1 in first["labels"].tolist()
    assert all(r["uri"].startswith(str(path.parent)) for r in labelled.records)


def test_val_follows_the_training_head_order(coco_dir, tmp_path):
    path, coco = coco_dir
    coco["categories"] = [{"id": 3, "name": "car"}, {"id": 4, "name": "licence_plate"}]
    for a in coco["annotations"]:
        a["category_id"] = 3
    val_path = path.parent / "val.json"
    val_path.write_text(json.dumps(coco))
    val = data.read_coco_set(str(val_path), None, id2label={0: "licence_plate", 1: "car"})
    assert {int(x) for r in val.records for x in r["labels"]} == {1}  # "car" is index 1 of the head


def test_augmentation_keeps_boxes_on_the_image_and_drops_thin_ones():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, size=(240, 320, 3), dtype=np.uint8)
    boxes = np.array([[300.0, 100.0, 40.0, 30.0], [10.0, 10.0, 1.0, 50.0]], np.float32)  # overhanging; 1 px wide
    transform = data.augmentation(min_box_size=2.0)
    transform.set_random_seed(0)
    thin_kept = 0
    for _ in range(20):
        out = transform(image=image, bboxes=boxes, labels=np.array([0, 1]))
        kept = np.asarray(out["bboxes"]).reshape(-1, 4)
        assert out["image"].shape == image.shape
        assert np.all(kept[:, :2] >= 0) and np.all(kept[:, 0] + kept[:, 2] <= 320 + 1e-3)
        assert np.all(kept[:, 2] >= 2.0) and np.all(kept[:, 3] >= 2.0)  # nothing thinner is ever kept
        thin_kept += 1 in list(out["labels"])
    # The 1 px box only survives when a perspective warp has widened it past 2 px (p=0.3).
    assert thin_kept <= 10


def test_load_image_without_augmentation_returns_the_labels_as_given(coco_dir):
    path, _ = coco_dir
    record = data.read_coco_set(str(path), None).records[0]
    row = {"uri": record["uri"], "image_id": record["image_id"], "boxes": record["boxes"].reshape(-1).tolist(),
           "labels": record["labels"].tolist()}
    out = data.load_image(row, s3=None, augment=False, min_box_size=2.0)
    assert out["image"].shape == (240, 320, 3)
    np.testing.assert_allclose(np.array(out["boxes"]).reshape(-1, 4), record["boxes"])
    images, annotations = data.processor_inputs({k: np.array([v], dtype=object) for k, v in out.items()})
    assert len(images) == 1 and annotations[0]["image_id"] == record["image_id"]
    assert [a["category_id"] for a in annotations[0]["annotations"]] == record["labels"].tolist()
