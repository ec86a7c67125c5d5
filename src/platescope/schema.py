"""The detections table: one row per image or sampled video frame; and the tracks table derived from it.

This module is the single definition of the tables that `detect` writes and `evaluate` reads.
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

# One detection of a track: where its plate was in one sampled frame.
SIGHTING = pa.struct([
    pa.field("frame_index", pa.int64()),
    pa.field("timestamp_s", pa.float64()),
    pa.field("box", BOX),
    pa.field("score", pa.float32()),
])

# The tracks table `detect --track` writes beside the detections (<run>/tracks/): one row per track,
# a plate followed across a video's sampled frames (pipeline.tracks).
TRACKS_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("track_id", pa.int32(), nullable=False),  # 0, 1, ... in order of first appearance
        pa.field("label", pa.string()),
        pa.field("label_id", pa.int32()),
        pa.field("first_frame_index", pa.int64()),
        pa.field("last_frame_index", pa.int64()),
        pa.field("first_timestamp_s", pa.float64()),
        pa.field("last_timestamp_s", pa.float64()),
        pa.field("num_frames", pa.int32()),  # sampled frames the plate was detected in
        pa.field("best_frame_index", pa.int64()),
        pa.field("best_timestamp_s", pa.float64()),
        pa.field("best_box", BOX),
        pa.field("best_score", pa.float32()),
        pa.field("mean_score", pa.float32()),
        pa.field("path", pa.list_(SIGHTING)),  # every detection of the track, in frame order
        pa.field("crop_uri", pa.string()),  # the best view's JPEG (detect --crops), else null
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
