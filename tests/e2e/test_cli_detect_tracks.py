"""`platescope detect --track --crops` on real footage with the bundled model (skipped without
../shared/data): the car that approaches in uk_roundabout.mp4 is one sighting, not a scatter of short
tracks. The model's raw boxes often find its plate two or three times in one frame: the bundled
model's merging NMS leaves one, and without it (`nms_merge=false`) the tracker's own duplicate
suppression still makes one track."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import supervision as sv
from PIL import Image

CLI = [sys.executable, "-m", "platescope.cli"]


@pytest.mark.shared_data
@pytest.mark.parametrize("merge", [True, False], ids=["bundled-nms", "no-nms"])
def test_the_approaching_cars_plate_is_one_track_over_nearly_every_sampled_frame(tmp_path, shared_data_dir, merge):
    video = shared_data_dir / "footage" / "uk_roundabout.mp4"
    out = tmp_path / "out"
    proc = subprocess.run([*CLI, "detect", "--input", str(video), "--output", str(out), "--run-id", "uk",
                           "--video-fps", "5", "--track", "--crops", "--no-progress",
                           *([] if merge else ["nms_merge=false"])],
                          check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "uk" / "summary.json").read_text())
    assert "tracks" in proc.stdout and summary["tracks"] >= 1

    rows = pq.read_table(out / "uk" / "data").to_pylist()
    frames_with_duplicates = sum(
        1 for r in rows if len(r["boxes"]) > 1
        and (np.triu(sv.box_iou_batch(np.array(r["boxes"]), np.array(r["boxes"])), 1) > 0.3).any())
    print(f"{len(rows)} sampled frames, {frames_with_duplicates} with overlapping boxes")
    if merge:
        assert frames_with_duplicates == 0
    else:
        assert frames_with_duplicates >= 0.25 * len(rows)  # what the tracker has to cope with

    tracks = sorted(pq.read_table(out / "uk" / "tracks").to_pylist(), key=lambda t: -t["num_frames"])
    print("tracks (frames, first s, last s):",
          [(t["num_frames"], t["first_timestamp_s"], t["last_timestamp_s"]) for t in tracks])
    plate = tracks[0]
    assert plate["num_frames"] >= 0.9 * len(rows)  # detected in nearly every sampled frame, one track
    assert plate["first_timestamp_s"] <= 0.4 and plate["last_timestamp_s"] >= 4.2  # the clip is 4.7 s
    assert all(t["num_frames"] <= 0.2 * len(rows) for t in tracks[1:])  # anything else is brief
    assert summary["tracks"] == len(tracks) and summary["complete"]

    crop = Image.open(plate["crop_uri"])
    x0, y0, x1, y1 = plate["best_box"]
    assert crop.format == "JPEG" and crop.width > x1 - x0 and crop.height > y1 - y0
