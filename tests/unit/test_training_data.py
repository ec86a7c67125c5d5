"""Training data without Ray: COCO sets to records, augmentation, processor inputs."""

from __future__ import annotations

import json
import random
import subprocess
import sys

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
    out = data.load_image(row, s3=None)
    assert out["image"].shape == (240, 320, 3)
    np.testing.assert_allclose(np.array(out["boxes"]).reshape(-1, 4), record["boxes"])
    images, annotations = data.processor_inputs({k: np.array([v], dtype=object) for k, v in out.items()})
    assert len(images) == 1 and annotations[0]["image_id"] == record["image_id"]
    assert [a["category_id"] for a in annotations[0]["annotations"]] == record["labels"].tolist()


def scenes_batch(n: int = 6) -> dict[str, np.ndarray]:
    """A numpy batch as Ray Data hands the loop one: same-sized images stacked into one array, and
    (one box each) the boxes as one float array."""
    rng = np.random.default_rng(5)
    images = rng.integers(0, 255, size=(n, 240, 320, 3), dtype=np.uint8)
    boxes = np.array([[20.0 + 30 * i, 40.0 + 10 * i, 80.0, 30.0] for i in range(n)], np.float32)
    return {"image": images, "boxes": boxes, "labels": np.zeros((n, 1), np.int64),
            "image_id": np.arange(10, 10 + n)}


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for key in ("image", "boxes", "labels")
               for x, y in zip(a[key], b[key]))


def test_the_augmentation_is_built_once_per_recipe_and_box_size(monkeypatch):
    built = []
    real = data.augmentation

    def counting(min_box_size, seed=None, recipe="cameras", aspect_jitter=0.0):
        built.append((recipe, min_box_size, aspect_jitter))
        return real(min_box_size, seed, recipe, aspect_jitter)

    monkeypatch.setattr(data, "augmentation", counting)
    monkeypatch.setattr(data, "_TRANSFORMS", {})
    batch = scenes_batch()
    for epoch in range(3):
        data.augment_batch(batch, seed=0, epoch=epoch, min_box_size=2.0)
    data.augment_batch(batch, seed=0, epoch=0, min_box_size=4.0)
    data.augment_batch(batch, seed=0, epoch=0, min_box_size=2.0, recipe="basic")
    data.augment_batch(batch, seed=0, epoch=1, min_box_size=2.0, recipe="basic", aspect_jitter=0.5)
    # 3 epochs x 6 images at 2 px, 6 at 4 px, 6 with the basic recipe, 6 jittered: one Compose each
    keys = [("cameras", 2.0, 0.0), ("cameras", 4.0, 0.0), ("basic", 2.0, 0.0), ("basic", 2.0, 0.5)]
    assert built == keys
    assert data.transform_for(2.0) is data.transform_for(2.0) is data._TRANSFORMS[("cameras", 2.0, 0.0)]
    assert set(data._TRANSFORMS) == set(keys)


def test_the_cameras_recipe_moves_scales_and_darkens_where_basic_does_not():
    """Over many draws the cameras recipe changes where boxes are and how big (scale and translation
    jitter) and makes some images much darker; basic only flips and tints, so box sizes stay put."""
    batch = scenes_batch()
    widths = {"basic": set(), "cameras": set()}
    darkest = {"basic": 1.0, "cameras": 1.0}
    for recipe in widths:
        for epoch in range(12):
            out = data.augment_batch(batch, seed=1, epoch=epoch, min_box_size=2.0, recipe=recipe)
            for image, before, boxes in zip(out["image"], batch["image"], out["boxes"]):
                boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
                widths[recipe].update(np.round(boxes[:, 2]).astype(int).tolist())
                darkest[recipe] = min(darkest[recipe], float(np.mean(image)) / max(float(np.mean(before)), 1.0))
    original = {int(round(w)) for b in batch["boxes"] for w in np.asarray(b, np.float32).reshape(-1, 4)[:, 2]}
    assert len(widths["cameras"] - original) > len(widths["basic"] - original) + 5
    assert darkest["cameras"] < darkest["basic"] - 0.15, darkest


def test_aspect_jitter_stretches_and_squeezes_the_width_and_the_boxes_with_it():
    """Each image's width changes by up to 1 + a either way, its height does not, and each box's
    width follows its image's; a batch of same-sized images comes back as separate arrays."""
    batch = scenes_batch()
    widths, ratios = [], []
    for epoch in range(10):
        out = data.augment_batch(batch, seed=3, epoch=epoch, min_box_size=2.0, recipe="basic",
                                 aspect_jitter=1.0)
        assert out["image"].dtype == object
        for image, boxes in zip(out["image"], out["boxes"]):
            boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
            assert 240 <= image.shape[0] <= 242
            assert 160 - 2 <= image.shape[1] <= 640 + 2
            if len(boxes):
                stretch = image.shape[1] / 320
                widths.append(stretch)
                ratios.append(boxes[0, 2] / 80.0 / stretch)
    widths = np.array(widths)
    assert widths.min() < 0.75 and widths.max() > 1.5  # both ways, and far
    # Box width over image width is kept, but for the basic recipe's own perspective warp (p=0.3).
    assert abs(np.median(ratios) - 1.0) < 0.05
    unjittered = data.augment_batch(batch, seed=3, epoch=0, min_box_size=2.0, recipe="basic")
    assert unjittered["image"].shape == batch["image"].shape


def test_an_unknown_recipe_is_refused_by_name():
    with pytest.raises(ValueError, match="augment_recipe: 'sunny'"):
        data.augmentation(2.0, recipe="sunny")


def test_the_same_seed_augments_identically_and_another_seed_differently(monkeypatch):
    batch = scenes_batch()
    first = data.augment_batch(batch, seed=0, epoch=0, min_box_size=2.0)
    # Another process's state: a fresh Compose, other draws in between, global generators moved.
    monkeypatch.setattr(data, "_TRANSFORMS", {})
    data.augment_batch(batch, seed=9, epoch=4, min_box_size=2.0)
    np.random.seed(123)
    random.seed(123)
    again = data.augment_batch(batch, seed=0, epoch=0, min_box_size=2.0)
    assert same(first, again)
    # One image drawn alone, or in another order, is drawn as it was in the batch.
    reordered = {k: v[::-1] for k, v in batch.items()}
    assert same(data.augment_batch(reordered, seed=0, epoch=0, min_box_size=2.0),
                {k: v[::-1] for k, v in first.items()})
    # Another seed, or the next epoch, draws other augmentations (6 images: not all alike by chance).
    assert not same(first, data.augment_batch(batch, seed=1, epoch=0, min_box_size=2.0))
    assert not same(first, data.augment_batch(batch, seed=0, epoch=1, min_box_size=2.0))
    # Something was drawn at all, and boxes stayed valid.
    assert not np.array_equal(np.stack(list(first["image"])), batch["image"])
    for boxes in first["boxes"]:
        kept = np.asarray(boxes).reshape(-1, 4)
        assert np.all(kept[:, :2] >= 0) and np.all(kept[:, 0] + kept[:, 2] <= 320 + 1e-3)


def test_a_fresh_process_draws_the_same_augmentation(tmp_path):
    """Ray runs the training loop in other processes: the draw must come from the arguments alone."""
    batch = scenes_batch(3)
    np.savez(tmp_path / "batch.npz", **batch)
    code = (
        "import sys, numpy as np\n"
        "from platescope.training import data\n"
        "batch = dict(np.load(sys.argv[1]))\n"
        "out = data.augment_batch(batch, seed=7, epoch=2, min_box_size=2.0)\n"
        "np.savez(sys.argv[2], image=np.stack(list(out['image'])),\n"
        "         boxes=np.concatenate([np.asarray(b).reshape(-1) for b in out['boxes']]))\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "batch.npz"), str(tmp_path / "out.npz")],
                   check=True, timeout=120)
    there = np.load(tmp_path / "out.npz")
    here = data.augment_batch(batch, seed=7, epoch=2, min_box_size=2.0)
    np.testing.assert_array_equal(there["image"], np.stack(list(here["image"])))
    here_boxes = np.concatenate([np.asarray(b).reshape(-1) for b in here["boxes"]])
    np.testing.assert_array_equal(there["boxes"], here_boxes)


def test_an_augmented_batch_feeds_the_processor(coco_dir):
    path, _ = coco_dir
    records = data.read_coco_set(str(path), None).records
    rows = [data.load_image({"uri": r["uri"], "image_id": r["image_id"], "labels": r["labels"].tolist(),
                             "boxes": r["boxes"].reshape(-1).tolist()}, s3=None) for r in records]
    batch = {k: data._objects([row[k] for row in rows]) for k in rows[0]}
    out = data.augment_batch(batch, seed=0, epoch=0, min_box_size=2.0)
    images, annotations = data.processor_inputs(out)
    assert [im.shape for im in images] == [(240, 320, 3)] * len(rows)
    jittered = data.augment_batch(batch, seed=0, epoch=0, min_box_size=2.0, aspect_jitter=1.0)
    assert {im.shape[1] for im in data.processor_inputs(jittered)[0]} != {320}
    assert [a["image_id"] for a in annotations] == [r["image_id"] for r in records]
    for ann, boxes, labels in zip(annotations, out["boxes"], out["labels"]):
        assert [a["category_id"] for a in ann["annotations"]] == list(labels)
        assert len(ann["annotations"]) == len(np.asarray(boxes).reshape(-1, 4))
