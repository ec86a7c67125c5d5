"""Plate sightings: one video's detection rows linked across its sampled frames into tracks.

The rows of a whole video (all its time segments, in frame order) go through ByteTrack (the `trackers`
package) one sampled frame at a time: boxes and scores only, no pixels, so a video of an hour at 2 fps
links in well under a second, and segment joins are invisible to it.

What sampled footage needs beyond ByteTrack's defaults, each measured on real clips at 1-5 fps:
- Near-duplicate boxes: a detector may give two or three overlapping boxes for one plate in a frame,
  and ByteTrack would start a second track from the spare and keep both alive for as long as the
  plate is seen. Boxes of one label overlapping a higher-scored one above `duplicate_iou` are
  suppressed first (the NMS of `detect --nms-iou`).
- Far moves: at 1-2 fps an approaching car's plate moves more than its own size between samples, so
  consecutive boxes often do not overlap and plain IoU (which ByteTrack associates by) is 0. Boxes
  are widened by `buffer` of their size on each side before association (the buffered IoU of
  C-BIoU, Yang et al. 2023), and the table keeps the boxes as detected.
- ByteTrack hands a track its id on its second detection, so the detection that started a track
  comes back untracked; it is given back to its track here (`_Spawns`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from platescope.schema import TRACKS_SCHEMA

if TYPE_CHECKING:
    from platescope.config import TrackOptions


@dataclass(frozen=True)
class Sighting:
    """One detection of a track: where the plate was in one sampled frame."""

    frame_index: int
    timestamp_s: float
    box: tuple[float, float, float, float]
    score: float

    @property
    def quality(self) -> float:
        """How good a view for reading: the detector's confidence times the box's linear size (a plate
        read from twice the pixels is far easier), so a near, clear view beats a far one of equal score."""
        x0, y0, x1, y1 = self.box
        return self.score * float(np.sqrt(max(x1 - x0, 0.0) * max(y1 - y0, 0.0)))


@dataclass
class Track:
    label: str
    label_id: int
    path: list[Sighting] = field(default_factory=list)

    @property
    def best(self) -> Sighting:
        return max(self.path, key=lambda s: (s.quality, s.score))

    @property
    def mean_score(self) -> float:
        return float(np.mean([s.score for s in self.path]))


def link_tracks(rows: list[dict[str, Any]], options: TrackOptions, video_fps: float) -> list[Track]:
    """Tracks of one video from its rows (frame_index, timestamp_s, boxes, scores, label_ids, labels),
    in the order they first appear (ties: leftmost first), shorter than `options.min_frames` left out.

    Rows without a frame (error rows) are passed by; every sampled frame, with boxes or without, is
    one step of the trackers, so a plate missed in a frame or two keeps its track for
    `options.lost_track_s` seconds."""
    frames = sorted((r for r in rows if r.get("frame_index") is not None), key=lambda r: r["frame_index"])
    labels = sorted({(label, label_id) for r in frames for label, label_id in
                     zip(r["labels"] or [], r["label_ids"] or [])})
    tracks: list[Track] = []
    for label, label_id in labels:  # one tracker per label: a plate never continues a car's track
        tracks += _link_label(frames, label, label_id, options, video_fps)
    tracks = [t for t in tracks if len(t.path) >= options.min_frames]
    tracks.sort(key=lambda t: (t.path[0].frame_index, t.path[0].box[0], t.path[0].box[1], t.label))
    return tracks


def _link_label(frames: list[dict[str, Any]], label: str, label_id: int, options: TrackOptions,
                video_fps: float) -> list[Track]:
    import supervision as sv
    from trackers import ByteTrackTracker

    # ByteTrack counts its lost-track buffer in frames of a 30 fps video: give it 30 fps and the
    # number of sampled frames that `lost_track_s` spans, so a track outlives that many misses.
    num_missed = int(np.floor(options.lost_track_s * video_fps + 1e-9))
    tracker = ByteTrackTracker(
        lost_track_buffer=num_missed + 1, frame_rate=30.0,
        # Any box at or above high_score that no track takes starts one (the two thresholds equal:
        # a box that is confident enough for the first association is confident enough to start).
        track_activation_threshold=options.high_score, high_conf_det_threshold=options.high_score,
        # Every track gets its id at its second detection; short tracks are left out afterwards by
        # min_frames instead, which also counts the detection that started the track.
        minimum_consecutive_frames=1,
        minimum_iou_threshold=options.iou,
    )
    spawns = _Spawns()
    by_id: dict[int, list[Sighting]] = {}
    for frame in frames:
        sightings = _sightings(frame, label, options.duplicate_iou)
        boxes = np.array([s.box for s in sightings], np.float32).reshape(-1, 4)
        detections = sv.Detections(
            xyxy=_widen(boxes, options.buffer), confidence=np.array([s.score for s in sightings], np.float32),
            class_id=np.zeros(len(sightings), int), data={"sighting": np.arange(len(sightings))})
        known = spawns.known(tracker)
        tracked = tracker.update(detections)
        ids = np.asarray(tracked.tracker_id, float).astype(int) if len(tracked) else np.zeros(0, int)
        which = tracked.data.get("sighting", np.zeros(0, int)) if len(tracked) else np.zeros(0, int)
        for track_id, i in zip(ids, which):
            if track_id >= 0:
                by_id.setdefault(int(track_id), []).append(sightings[int(i)])
        spawns.note(tracker, known, tracked.xyxy[ids < 0] if len(tracked) else np.zeros((0, 4)),
                    [sightings[int(i)] for i in which[ids < 0]])
    for track_id, first in spawns.confirmed():
        by_id.setdefault(track_id, []).insert(0, first)
    return [Track(label=label, label_id=label_id, path=sorted(path, key=lambda s: s.frame_index))
            for path in by_id.values()]


def _sightings(frame: dict[str, Any], label: str, duplicate_iou: float) -> list[Sighting]:
    """The frame's boxes of `label`, near-duplicates of a higher-scored box suppressed."""
    from platescope.detectors.nms import class_wise_nms

    found = [Sighting(frame_index=int(frame["frame_index"]), timestamp_s=float(frame["timestamp_s"]),
                      box=tuple(float(v) for v in box), score=float(score))
             for box, score, name in zip(frame["boxes"] or [], frame["scores"] or [], frame["labels"] or [])
             if name == label]
    if len(found) < 2:
        return found
    keep = class_wise_nms(np.array([s.box for s in found]), np.array([s.score for s in found]),
                          np.zeros(len(found), int), duplicate_iou)
    return [found[i] for i in keep]


def _widen(boxes: np.ndarray, buffer: float) -> np.ndarray:
    """Boxes grown by `buffer` times their width and height on each side (the buffered IoU's boxes)."""
    if not len(boxes) or not buffer:
        return boxes
    size = np.concatenate([boxes[:, 2:] - boxes[:, :2]] * 2, axis=1)
    return boxes + np.array([-1, -1, 1, 1], np.float32) * buffer * size


class _Spawns:
    """Which detection started which track. ByteTrack starts a track from an unmatched confident box
    with the id -1 and gives it a real id when a second box is matched to it; the first box keeps -1
    in its answer. A track object new after an update was started by the untracked box its state
    equals (a new track's state is its first box, exactly), and that box belongs to the id it gets."""

    def __init__(self) -> None:
        self.started: list[tuple[Any, Sighting]] = []  # (the tracker's track object, its first box)

    @staticmethod
    def known(tracker: Any) -> set[int]:
        return {id(t) for t in tracker.tracks}

    def note(self, tracker: Any, known: set[int], untracked_boxes: np.ndarray,
             untracked: list[Sighting]) -> None:
        for track in tracker.tracks:
            if id(track) in known:
                continue
            state = np.asarray(track.get_state_bbox(), np.float32)
            for box, sighting in zip(untracked_boxes, untracked):
                if np.array_equal(np.asarray(box, np.float32), state):
                    self.started.append((track, sighting))
                    break

    def confirmed(self) -> list[tuple[int, Sighting]]:
        """(track id, first box) of every track that got an id."""
        return [(int(track.tracker_id), first) for track, first in self.started if track.tracker_id >= 0]


def tracks_table(tracks: list[Track], *, run_id: str, source_uri: str,
                 crop_uris: list[str | None] | None = None) -> pa.Table:
    """The tracks table's rows (schema.TRACKS_SCHEMA) of one video's tracks, track_id their position."""
    crop_uris = crop_uris or [None] * len(tracks)
    rows = []
    for track_id, (track, crop_uri) in enumerate(zip(tracks, crop_uris)):
        first, last, best = track.path[0], track.path[-1], track.best
        rows.append({
            "run_id": run_id, "source_uri": source_uri, "track_id": track_id,
            "label": track.label, "label_id": track.label_id,
            "first_frame_index": first.frame_index, "last_frame_index": last.frame_index,
            "first_timestamp_s": first.timestamp_s, "last_timestamp_s": last.timestamp_s,
            "num_frames": len(track.path),
            "best_frame_index": best.frame_index, "best_timestamp_s": best.timestamp_s,
            "best_box": list(best.box), "best_score": best.score, "mean_score": track.mean_score,
            "path": [{"frame_index": s.frame_index, "timestamp_s": s.timestamp_s, "box": list(s.box),
                      "score": s.score} for s in track.path],
            "crop_uri": crop_uri,
        })
    return pa.Table.from_pylist(rows, schema=TRACKS_SCHEMA)
