"""The detections table: one row per image or sampled video frame.

This module is the single definition of the table that `detect` writes and `evaluate` reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

BOX = pa.list_(pa.float32(), 4)

DETECTIONS_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("frame_index", pa.int64()),
        pa.field("timestamp_s", pa.float64()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("boxes", pa.list_(BOX)),
        pa.field("scores", pa.list_(pa.float32())),
        pa.field("label_ids", pa.list_(pa.int32())),
        pa.field("labels", pa.list_(pa.string())),
        pa.field("model", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("error", pa.string()),
    ]
)


@dataclass
class Detections:
    """What a detector found on one image.

    boxes are x_min, y_min, x_max, y_max in pixels of the image the detector was given.
    """

    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    scores: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))
    label_ids: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int32))
    labels: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, np.float32).reshape(-1, 4)
        self.scores = np.asarray(self.scores, np.float32).reshape(-1)
        self.label_ids = np.asarray(self.label_ids, np.int32).reshape(-1)
        self.labels = [str(x) for x in self.labels]
        n = len(self.boxes)
        if not (len(self.scores) == len(self.label_ids) == len(self.labels) == n):
            raise ValueError(
                f"Detections fields disagree in length: {n} boxes, {len(self.scores)} scores, "
                f"{len(self.label_ids)} label_ids, {len(self.labels)} labels"
            )

    def __len__(self) -> int:
        return len(self.boxes)
