"""Training data: COCO sets read with the evaluation's reader, decoded in Ray Data, augmented per epoch.

Each record is one image: its URI (the COCO file_name beside the JSON), its boxes in COCO xywh and
contiguous class indices (0..K-1, the model head's order). Fetching and decoding run in Ray Data's
CPU tasks, so training workers receive ready arrays.

Augmentation (albumentations) runs where the batch is consumed, in the training worker, because only
the worker knows the epoch: each image's draw is seeded from (config seed, epoch, image id), so a
run is reproducible given its seed whichever process, worker or order an image comes through, a
resumed run augments its later epochs as an uninterrupted one would, and every epoch still draws
afresh. Nothing depends on a process's global random state. It costs a few ms per image.
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
from platescope.training.plate_zoom import zoom_to_plate


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


AUGMENT_RECIPES = ("basic", "cameras")


def augmentation(min_box_size: float, seed: int | None = None, recipe: str = "cameras",
                 aspect_jitter: float = 0.0):
    """An albumentations Compose; boxes are clipped to the image and boxes left thinner than
    min_box_size are dropped. `seed` seeds its random draws (`augment` reseeds per image).

    basic: mild perspective, horizontal flip, brightness/contrast and hue/saturation (the recipe the
    first default model was trained with).
    cameras: aimed at cameras the training set never saw. Scale and translation jitter (plates from
    half to 1.3x their size, anywhere in the frame), blur (motion, focus), JPEG re-compression,
    sensor noise, greyscale, and dark or flat exposures like night footage, on top of basic.

    aspect_jitter a (either recipe): first stretch or squeeze the whole image's width, by a factor
    between 1 and 1 + a or between 1 / (1 + a) and 1 (half the draws each), the canvas growing or
    shrinking with it so nothing is cut off."""
    import albumentations as A
    import cv2

    if recipe not in AUGMENT_RECIPES:
        raise ValueError(f"augment_recipe: {recipe!r} is not one of {', '.join(AUGMENT_RECIPES)}")
    basic = [
        A.Perspective(scale=(0.02, 0.06), p=0.3),
        A.HorizontalFlip(p=0.5),
        A.RandomBrightnessContrast(p=0.5),
        A.HueSaturationValue(hue_shift_limit=10, sat_shift_limit=20, val_shift_limit=15, p=0.3),
    ]
    cameras = [
        A.Affine(scale=(0.5, 1.3), translate_percent=(-0.15, 0.15), rotate=(-5, 5), shear=(-4, 4),
                 keep_ratio=True, border_mode=cv2.BORDER_CONSTANT, fill=0, p=0.6),
        *basic,
        A.OneOf([A.MotionBlur(blur_limit=(3, 9)), A.GaussianBlur(blur_limit=(3, 5)),
                 A.Downscale(scale_range=(0.35, 0.7))], p=0.35),
        A.ImageCompression(quality_range=(25, 90), p=0.4),
        A.GaussNoise(std_range=(0.02, 0.08), noise_scale_factor=0.5, p=0.25),
        A.ToGray(p=0.1),
        A.OneOf([A.RandomGamma(gamma_limit=(150, 300)),  # dark, as at night
                 A.RandomBrightnessContrast(brightness_limit=(-0.5, -0.2), contrast_limit=(-0.5, 0.0))], p=0.2),
    ]
    steps = cameras if recipe == "cameras" else basic
    if aspect_jitter > 0:
        # Plates differ in shape (width over height) between regions and cameras, and a source whose
        # frames all have one size shows the model only its own plates' shapes.
        def stretch(low: float, high: float):
            return A.Affine(scale={"x": (low, high), "y": (1.0, 1.0)}, keep_ratio=False, fit_output=True,
                            border_mode=cv2.BORDER_CONSTANT, fill=0, p=1.0)
        wider, narrower = stretch(1.0, 1.0 + aspect_jitter), stretch(1.0 / (1.0 + aspect_jitter), 1.0)
        steps = [A.OneOf([wider, narrower], p=1.0), *steps]
    return A.Compose(
        steps,
        bbox_params=A.BboxParams(format="coco", label_fields=["labels"], clip=True,
                                 min_width=min_box_size, min_height=min_box_size),
        seed=seed,
    )


# One Compose per process, recipe, box size and aspect jitter: not free to build.
_TRANSFORMS: dict[tuple[str, float, float], Any] = {}


def transform_for(min_box_size: float, recipe: str = "cameras", aspect_jitter: float = 0.0):
    """This process's Compose for (`recipe`, `min_box_size`, `aspect_jitter`), built on first use and kept."""
    key = (recipe, min_box_size, aspect_jitter)
    transform = _TRANSFORMS.get(key)
    if transform is None:
        transform = _TRANSFORMS[key] = augmentation(min_box_size, recipe=recipe, aspect_jitter=aspect_jitter)
    return transform


def augment_seed(seed: int, epoch: int, image_id: int) -> int:
    """The seed of one image's augmentation in one epoch: a hash of the three (any ints), 0..2**32-1."""
    entropy = [int(seed) % 2**64, int(epoch) % 2**64, int(image_id) % 2**64]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def augment(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, *, seed: int, epoch: int, image_id: int,
            min_box_size: float, recipe: str = "cameras", aspect_jitter: float = 0.0,
            plate_zoom: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image and its COCO xywh boxes and labels, augmented as (seed, epoch, image_id) draws:
    with probability `plate_zoom` first zoomed to one plate (`plate_zoom.zoom_to_plate`), then the
    recipe's Compose."""
    draw = augment_seed(seed, epoch, image_id)
    if plate_zoom:
        # Its own generator from the image's seed: the Compose's draws stay as they were without it.
        rng = np.random.default_rng([draw, 1])
        if rng.random() < plate_zoom:
            image, boxes, labels = zoom_to_plate(np.asarray(image), boxes, labels, rng, min_box_size=min_box_size)
    transform = transform_for(min_box_size, recipe, aspect_jitter)
    transform.set_random_seed(draw)
    out = transform(image=np.asarray(image), bboxes=np.asarray(boxes, np.float32).reshape(-1, 4),
                    labels=np.asarray(labels, np.int64).reshape(-1))
    return (out["image"], np.asarray(out["bboxes"], np.float32).reshape(-1, 4),
            np.asarray(out["labels"], np.int64).reshape(-1))


def augment_batch(batch: dict[str, np.ndarray], *, seed: int, epoch: int, min_box_size: float,
                  recipe: str = "cameras", aspect_jitter: float = 0.0,
                  plate_zoom: float | None = None) -> dict[str, np.ndarray]:
    """A Ray Data numpy batch (as `dataset` yields) with every image augmented (see the module doc);
    boxes and labels come back one array per image, as augmentation may drop some."""
    images, boxes, labels = [], [], []
    for image, b, lab, image_id in zip(batch["image"], batch["boxes"], batch["labels"], batch["image_id"]):
        image, b, lab = augment(image, b, lab, seed=seed, epoch=epoch, image_id=int(image_id),
                                min_box_size=min_box_size, recipe=recipe, aspect_jitter=aspect_jitter,
                                plate_zoom=plate_zoom)
        images.append(image)
        boxes.append(b.reshape(-1))
        labels.append(lab)
    # One array when the images came as one and still share a shape (aspect jitter changes widths).
    stacked = (isinstance(batch["image"], np.ndarray) and batch["image"].dtype != object
               and len({image.shape for image in images}) == 1)
    return {**batch, "image": np.stack(images) if stacked else _objects(images), "boxes": _objects(boxes),
            "labels": _objects(labels)}


def _objects(values: list[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def load_image(row: dict[str, Any], *, s3: S3Options | None) -> dict[str, Any]:
    """Ray Data map: fetch + decode (EXIF applied, RGB); augmentation comes later (`augment_batch`)."""
    from platescope.sources.images import decode_image

    image = decode_image(storage.read_bytes(row["uri"], s3), name=row["uri"], max_pixels=100_000_000)
    boxes = np.asarray(row["boxes"], np.float32).reshape(-1, 4)
    labels = np.asarray(row["labels"], np.int64)
    return {"image": image, "boxes": boxes.reshape(-1).tolist(), "labels": labels.tolist(),
            "image_id": int(row["image_id"])}


def dataset(records: list[dict[str, Any]], *, s3: S3Options | None):
    """The records as a Ray Data set of decoded images (one pass per epoch)."""
    import ray

    rows = [{"uri": r["uri"], "image_id": r["image_id"], "boxes": r["boxes"].reshape(-1).tolist(),
             "labels": r["labels"].tolist()} for r in records]
    return ray.data.from_items(rows).map(load_image, fn_kwargs={"s3": s3})


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
