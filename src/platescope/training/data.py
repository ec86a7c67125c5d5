"""Training data: COCO sets read with the evaluation's reader, decoded and augmented in Ray Data.

Each record is one image: its URI (the COCO file_name beside the JSON), its boxes in COCO xywh and
contiguous class indices (0..K-1, the model head's order). Decoding and albumentations run in Ray
Data's CPU tasks, so training workers receive ready arrays and spend their time in the model.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from typing import Any

import numpy as np

from platescope import storage
from platescope.evaluation.groundtruth import GroundTruth, read_ground_truth
from platescope.storage import S3Options


@dataclass
class LabelledSet:
    ground_truth: GroundTruth
    records: list[dict[str, Any]]
    id2label: dict[int, str]  # contiguous index -> category name


def _folder(uri: str) -> str:
    return posixpath.dirname(uri) if storage.is_s3(uri) else os.path.dirname(os.path.abspath(uri))


def read_coco_set(uri: str, s3: S3Options | None, id2label: dict[int, str] | None = None) -> LabelledSet:
    """A COCO JSON and its images (paths relative to the JSON's folder). Crowd boxes are left out of
    training targets; categories become contiguous indices in category-id order unless `id2label`
    (the training set's) is given, so val uses the same head order."""
    gt = read_ground_truth(uri, format="coco", s3=s3)
    if id2label is None:
        id2label = {i: gt.categories[c] for i, c in enumerate(sorted(gt.categories))}
    index_of = {name: i for i, name in id2label.items()}
    cat_to_index = {c: index_of.get(name, -1) for c, name in gt.categories.items()}
    root = _folder(uri)
    records = []
    for image in gt.images:
        keep = ~image.iscrowd.astype(bool)
        labels = np.array([cat_to_index[c] for c in image.category_ids[keep].tolist()], dtype=np.int64)
        boxes = image.boxes_xywh[keep].astype(np.float32)
        known = labels >= 0
        records.append({"uri": storage.join(root, image.key), "image_id": image.image_id,
                        "boxes": boxes[known].reshape(-1, 4), "labels": labels[known]})
    return LabelledSet(gt, records, id2label)


def augmentation(min_box_size: float):
    """The seed recipe: mild perspective, horizontal flip, brightness/contrast and hue/saturation;
    boxes are clipped to the image and boxes left thinner than min_box_size are dropped."""
    import albumentations as A

    return A.Compose(
        [
            A.Perspective(scale=(0.02, 0.06), p=0.3),
            A.HorizontalFlip(p=0.5),
            A.RandomBrightnessContrast(p=0.5),
            A.HueSaturationValue(hue_shift_limit=10, sat_shift_limit=20, val_shift_limit=15, p=0.3),
        ],
        bbox_params=A.BboxParams(format="coco", label_fields=["labels"], clip=True,
                                 min_width=min_box_size, min_height=min_box_size),
    )


_TRANSFORMS: dict[float, Any] = {}  # one Compose per process and box size: building it is not free


def load_image(row: dict[str, Any], *, s3: S3Options | None, augment: bool, min_box_size: float) -> dict[str, Any]:
    """Ray Data map: fetch + decode (EXIF applied, RGB) and, for training, augment. Augmentation is
    drawn afresh each epoch (the map re-runs per pass), which is the point of it."""
    from platescope.sources.images import decode_image

    image = decode_image(storage.read_bytes(row["uri"], s3), name=row["uri"], max_pixels=100_000_000)
    boxes = np.asarray(row["boxes"], np.float32).reshape(-1, 4)
    labels = np.asarray(row["labels"], np.int64)
    if augment:
        transform = _TRANSFORMS.setdefault(min_box_size, augmentation(min_box_size))
        out = transform(image=image, bboxes=boxes, labels=labels)
        image = out["image"]
        boxes = np.asarray(out["bboxes"], np.float32).reshape(-1, 4)
        labels = np.asarray(out["labels"], np.int64)
    return {"image": image, "boxes": boxes.reshape(-1).tolist(), "labels": labels.tolist(),
            "image_id": int(row["image_id"])}


def dataset(records: list[dict[str, Any]], *, s3: S3Options | None, augment: bool, min_box_size: float):
    import ray

    rows = [{"uri": r["uri"], "image_id": r["image_id"], "boxes": r["boxes"].reshape(-1).tolist(),
             "labels": r["labels"].tolist()} for r in records]
    return ray.data.from_items(rows).map(
        load_image, fn_kwargs={"s3": s3, "augment": augment, "min_box_size": min_box_size})


def processor_inputs(batch: dict[str, np.ndarray]) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    """A Ray Data numpy batch -> images and COCO-style annotations for the HF image processor."""
    images, annotations = [], []
    for image, boxes, labels, image_id in zip(batch["image"], batch["boxes"], batch["labels"], batch["image_id"]):
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        images.append(np.asarray(image))
        annotations.append({"image_id": int(image_id), "annotations": [
            {"bbox": b.tolist(), "category_id": int(c), "area": float(b[2] * b[3]), "iscrowd": 0}
            for b, c in zip(boxes, np.asarray(labels, np.int64).reshape(-1))]})
    return images, annotations
