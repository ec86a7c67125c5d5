"""Detections tables that look like a real detector's output on labelled images, for tests and the
evaluation benchmark: most boxes found a little off, some missed, some false alarms, scores that
mostly rank hits above misses. Same rows for the same seed; written in Parquet parts as `detect` does.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from platescope.schema import DETECTIONS_SCHEMA


def synthetic_coco(num_images: int, *, seed: int = 0, categories=("licence_plate",), size=(1280, 720),
                   max_boxes: int = 4) -> dict:
    """COCO ground truth for images that need not exist (the evaluation never opens them)."""
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "file_name": f"cam{image_id % 7}/frame_{image_id:07d}.jpg",
                       "width": size[0], "height": size[1]})
        for _ in range(int(rng.integers(0, max_boxes + 1))):
            w, h = float(rng.uniform(12, 300)), float(rng.uniform(6, 120))
            x, y = float(rng.uniform(0, size[0] - w)), float(rng.uniform(0, size[1] - h))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": int(rng.integers(1, len(categories) + 1)), "bbox": [x, y, w, h],
                                "area": w * h, "iscrowd": 0})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(categories)]}


def simulate_rows(coco: dict, *, root: str, seed: int = 0, miss_rate: float = 0.15, jitter: float = 0.08,
                  false_alarms: float = 0.6, error_rate: float = 0.0, run_id: str = "simulated"):
    """One row dict per image (in the detections table's columns), yielded lazily."""
    rng = np.random.default_rng(seed)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    by_image = defaultdict(list)
    for ann in coco["annotations"]:
        by_image[ann["image_id"]].append(ann)
    for image in coco["images"]:
        uri = f"{root.rstrip('/')}/{image['file_name']}"
        row = {"run_id": run_id, "source_uri": uri, "frame_index": None, "timestamp_s": None,
               "width": image["width"], "height": image["height"], "boxes": [], "scores": [], "label_ids": [],
               "labels": [], "model": "simulated", "prompt": None, "error": None}
        if rng.random() < error_rate:
            row.update(width=1, height=1, error="corrupt_image: simulated")
            yield row
            continue
        for ann in by_image[image["id"]]:
            if rng.random() < miss_rate:
                continue
            x, y, w, h = ann["bbox"]
            dx, dy = rng.normal(0, jitter * w), rng.normal(0, jitter * h)
            sw, sh = rng.uniform(1 - jitter, 1 + jitter, size=2)
            box = [x + dx, y + dy, x + dx + w * sw, y + dy + h * sh]
            _add(row, box, float(rng.beta(5, 2)), ann["category_id"], names)
        for _ in range(int(rng.poisson(false_alarms))):
            w, h = rng.uniform(10, 200), rng.uniform(5, 80)
            x, y = rng.uniform(0, image["width"] - w), rng.uniform(0, image["height"] - h)
            _add(row, [x, y, x + w, y + h], float(rng.beta(2, 5)), int(rng.choice(list(names))), names)
        yield row


def _add(row: dict, box: list[float], score: float, category_id: int, names: dict[int, str]) -> None:
    row["boxes"].append([float(v) for v in box])
    row["scores"].append(score)
    row["label_ids"].append(category_id)
    row["labels"].append(names[category_id])


def write_detections(rows, folder: str | Path, *, rows_per_part: int = 10_000) -> list[Path]:
    """Parquet parts under folder/data/, written as rows arrive (memory: one part at a time)."""
    data = Path(folder) / "data"
    data.mkdir(parents=True, exist_ok=True)
    parts, chunk = [], []

    def flush() -> None:
        path = data / f"part-{len(parts):05d}.parquet"
        pq.write_table(pa.Table.from_pylist(chunk, schema=DETECTIONS_SCHEMA), path)
        parts.append(path)
        chunk.clear()

    for row in rows:
        chunk.append(row)
        if len(chunk) >= rows_per_part:
            flush()
    if chunk or not parts:
        flush()
    return parts


def write_coco(coco: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(coco))
    return path
