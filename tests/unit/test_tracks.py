"""Linking a video's rows into tracks (pipeline.tracks) and cutting their crops (pipeline.crops).

The rows here are what a detector reports on a generated traffic video: each plate's true box in
every sampled frame (sampled by the real decoder), with the faults the bundled model shows on real
footage (boxes off by a few pixels, a second overlapping box for the same plate, a plate missed now
and then, scores on both sides of the tracker's start score). Tracking then has to give exactly one
track per plate, from its first sampled frame to its last, with every box its own.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from platescope import samples
from platescope.config import TrackOptions
from platescope.pipeline.crops import crop_box, write_crops
from platescope.pipeline.tracks import Sighting, Track, link_tracks, tracks_table
from platescope.schema import TRACKS_SCHEMA
from platescope.sources.video import iter_video_frames

LABEL = samples.LABEL


@pytest.fixture(scope="module")
def traffic(tmp_path_factory) -> tuple[Path, list[list[tuple[int, float, list[float]]]]]:
    path = tmp_path_factory.mktemp("traffic") / "traffic.mp4"
    return path, samples.write_traffic_video(path)


def detector_rows(path: Path, truth, fps: float, seed: int = 0,
                  miss_rate: float = 0.15) -> tuple[list[dict], dict[int, list[int]]]:
    """Rows as a detector would write them for the sampled frames, and, per plate, the frame indices
    of its sampled frames (what its track must span)."""
    rng = np.random.default_rng(seed)
    boxes_at = {(plate, index): box for plate, frames in enumerate(truth) for index, _, box in frames}
    sampled = [(f.frame_index, f.timestamp_s) for f in iter_video_frames(path, name="t", fps=fps)]
    seen: dict[int, list[int]] = {}
    for index, _ in sampled:
        for plate in range(len(truth)):
            if (plate, index) in boxes_at:
                seen.setdefault(plate, []).append(index)
    rows = []
    missed_last: set[int] = set()
    for index, t in sampled:
        boxes, scores = [], []
        for plate, frames in seen.items():
            if index not in frames:
                continue
            first_or_last = index in (frames[0], frames[-1])
            # A plate missed now and then, never twice running and never at its first or last frame.
            if not first_or_last and plate not in missed_last and rng.random() < miss_rate:
                missed_last.add(plate)
                continue
            missed_last.discard(plate)
            box = np.array(boxes_at[plate, index]) + rng.uniform(-3, 3, 4)
            boxes.append(box.tolist())
            scores.append(float(rng.uniform(0.6, 0.9) if first_or_last else rng.uniform(0.35, 0.9)))
            if rng.random() < 0.4:  # a second, lower-scored box of the same plate
                width, height = box[2] - box[0], box[3] - box[1]
                boxes.append((box + [-0.1 * width, -0.15 * height, 0.05 * width, 0.2 * height]).tolist())
                scores.append(scores[-1] * float(rng.uniform(0.6, 0.95)))
        rows.append({"frame_index": index, "timestamp_s": t, "boxes": boxes, "scores": scores,
                     "labels": [LABEL] * len(boxes), "label_ids": [0] * len(boxes)})
    return rows, seen


def owner(truth, sighting: Sighting) -> int | None:
    """The plate whose true box in that frame the sighting overlaps most (IoU >= 0.5)."""
    def iou(a, b):
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
        return w * h / union

    overlaps = [(iou(box, sighting.box), plate) for plate, frames in enumerate(truth)
                for index, _, box in frames if index == sighting.frame_index]
    best = max(overlaps, default=(0.0, None))
    return best[1] if best[0] >= 0.5 else None


# At 1 fps a plate moves up to twice its width between samples: a miss right after its first sample
# leaves the tracker no motion to predict from, so there the plates are detected in every frame.
@pytest.mark.parametrize(("fps", "miss_rate"), [(1, 0.0), (2, 0.15), (5, 0.15)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_track_per_plate_from_its_first_sampled_frame_to_its_last(traffic, fps, miss_rate, seed):
    path, truth = traffic
    rows, seen = detector_rows(path, truth, fps, seed, miss_rate)
    tracks = link_tracks(rows, TrackOptions(), video_fps=fps)
    owners = [{owner(truth, s) for s in t.path} for t in tracks]
    assert all(len(o) == 1 and None not in o for o in owners), f"a track holds boxes of several plates: {owners}"
    assert [o.pop() for o in owners] == [0, 1, 2, 3]  # one each, numbered by first appearance
    timestamps = {r["frame_index"]: r["timestamp_s"] for r in rows}
    for plate, track in enumerate(tracks):
        assert (track.path[0].frame_index, track.path[-1].frame_index) == (seen[plate][0], seen[plate][-1])
        assert track.path[0].timestamp_s == timestamps[seen[plate][0]]
        # every sampled frame it was detected in, and no frame twice
        assert [s.frame_index for s in track.path] == sorted({s.frame_index for s in track.path})


def test_duplicate_boxes_would_make_second_tracks_without_suppression(traffic):
    """What duplicate_iou is for: unsuppressed, a plate's second box starts a track of its own."""
    path, truth = traffic
    rows, _ = detector_rows(path, truth, 5, seed=0)
    assert len(link_tracks(rows, TrackOptions(), video_fps=5)) == 4
    assert len(link_tracks(rows, TrackOptions(duplicate_iou=1.0), video_fps=5)) > 4


def test_short_tracks_and_error_rows_are_left_out():
    rows = [{"frame_index": None, "timestamp_s": None, "boxes": None, "scores": None, "labels": None,
             "label_ids": None}]  # an error row (a damaged segment)
    for i in range(6):
        boxes = [[100.0 + 10 * i, 50.0, 200.0 + 10 * i, 80.0]] + ([[400.0, 300.0, 480.0, 330.0]] if i == 2 else [])
        rows.append({"frame_index": i * 6, "timestamp_s": i * 0.2, "boxes": boxes, "scores": [0.8] * len(boxes),
                     "labels": [LABEL] * len(boxes), "label_ids": [0] * len(boxes)})
    tracks = link_tracks(rows, TrackOptions(), video_fps=5)
    assert [len(t.path) for t in tracks] == [6]  # the lone box at frame 12 is no track
    assert link_tracks(rows[:1], TrackOptions(), video_fps=5) == []


def test_labels_are_tracked_apart():
    rows = [{"frame_index": i, "timestamp_s": float(i), "boxes": [[10.0 + i, 10.0, 60.0 + i, 30.0]] * 2,
             "scores": [0.9, 0.8], "labels": ["plate", "car"], "label_ids": [0, 1]} for i in range(3)]
    tracks = link_tracks(rows, TrackOptions(), video_fps=1)
    assert sorted((t.label, len(t.path)) for t in tracks) == [("car", 3), ("plate", 3)]


def test_the_tracks_table():
    near = Sighting(frame_index=9, timestamp_s=0.9, box=(100.0, 100.0, 300.0, 160.0), score=0.7)
    track = Track(label=LABEL, label_id=0, path=[
        Sighting(frame_index=3, timestamp_s=0.3, box=(10.0, 10.0, 50.0, 22.0), score=0.9), near,
        Sighting(frame_index=6, timestamp_s=0.6, box=(50.0, 50.0, 150.0, 80.0), score=0.5)])
    track.path.sort(key=lambda s: s.frame_index)
    table = tracks_table([track], run_id="r", source_uri="s3://b/v.mp4", crop_uris=["s3://b/r/crops/t.jpg"])
    assert table.schema == TRACKS_SCHEMA
    row = table.to_pylist()[0]
    # The best view is the near, large one, though a far one scored higher.
    assert (row["best_frame_index"], row["best_score"]) == (9, pytest.approx(0.7))
    assert row["best_box"] == [100.0, 100.0, 300.0, 160.0]
    assert (row["first_frame_index"], row["last_frame_index"], row["num_frames"]) == (3, 9, 3)
    assert (row["first_timestamp_s"], row["last_timestamp_s"]) == (0.3, 0.9)
    assert row["mean_score"] == pytest.approx(0.7)
    assert [p["frame_index"] for p in row["path"]] == [3, 6, 9]
    assert row["crop_uri"] == "s3://b/r/crops/t.jpg" and row["track_id"] == 0
    assert tracks_table([], run_id="r", source_uri="x").schema == TRACKS_SCHEMA


def test_crop_box_grows_by_the_margin_and_stays_in_the_frame():
    assert crop_box((100.0, 50.0, 200.0, 70.0), 0.25, 640, 360) == (75, 45, 225, 75)
    assert crop_box((10.2, 5.5, 60.0, 20.0), 0.5, 640, 360) == (0, 0, 85, 28)
    assert crop_box((600.0, 340.0, 640.0, 360.0), 1.0, 640, 360) == (560, 320, 640, 360)


def test_a_crop_is_the_best_frame_decoded_again_around_its_box(traffic, tmp_path):
    path, truth = traffic
    frames = {f.frame_index: f.image for f in iter_video_frames(path, name="t", fps=0)}  # every frame
    index, t, box = truth[2][17]  # well into the video: decoded again from the keyframe before it
    track = Track(label=LABEL, label_id=0, path=[Sighting(index, t, tuple(box), 0.8)])
    uris = [str(tmp_path / "crops" / "track-0000.jpg")]
    written = write_crops([track], video=str(path), uris=uris, margin=0.25, max_pixels=10**8, s3=None)
    assert written == uris
    crop = np.asarray(Image.open(io.BytesIO(Path(uris[0]).read_bytes())).convert("RGB"), np.int16)
    x0, y0, x1, y1 = crop_box(tuple(box), 0.25, 640, 360)
    assert crop.shape == (y1 - y0, x1 - x0, 3)
    assert np.abs(crop - frames[index][y0:y1, x0:x1]).mean() < 4  # JPEG, quality 95
    # A frame the video does not have: no crop, and the track is kept.
    gone = Track(label=LABEL, label_id=0, path=[Sighting(index + 1, t, tuple(box), 0.8)])
    assert write_crops([gone], video=str(path), uris=[str(tmp_path / "x.jpg")], margin=0.25, max_pixels=10**8,
                       s3=None) == [None]
