"""`detect` with track and crops on a generated traffic video, through the whole pipeline and the
bundled model: the tracks of a video split into time segments are those of the whole video, and the
tracks table is derived data that reruns remake exactly when it is missing or was made otherwise."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import supervision as sv
from PIL import Image

from platescope import samples, storage
from platescope.config import DetectConfig, TrackOptions
from platescope.pipeline.run import run_detect

pytestmark = pytest.mark.usefixtures("local_ray")


@pytest.fixture(scope="module")
def traffic(tmp_path_factory) -> tuple[Path, list]:
    folder = tmp_path_factory.mktemp("traffic")
    return folder, samples.write_traffic_video(folder / "traffic.mp4")


def detect(out: Path, inputs: Path, run_id: str, fps: float, segment_s: float, **fields) -> dict:
    # One image per detector call: a split video batches its frames differently, and torch's CPU
    # kernels round differently by batch size; only then are the rows, and so the tracks, equal.
    cfg = DetectConfig(input=[str(inputs)], output=str(out), run_id=run_id, video_fps=fps,
                       video_segment_s=segment_s, batch_size=1, track=True, crops=True, progress=False, **fields)
    return run_detect(cfg).summary


def tracks_of(out: Path, run_id: str) -> list[dict]:
    return pq.read_table(out / run_id / "tracks").to_pylist()


def owners(truth, track: dict) -> set[int | None]:
    """The plates whose true boxes a track's boxes overlap (IoU >= 0.5) in their frames."""
    found = set()
    for sighting in track["path"]:
        plates = [(plate, box) for plate, frames in enumerate(truth) for index, _, box in frames
                  if index == sighting["frame_index"]]
        ious = sv.box_iou_batch(np.array([sighting["box"]]), np.array([box for _, box in plates]).reshape(-1, 4))
        found.add(plates[int(ious.argmax())][0] if plates and ious.max() >= 0.5 else None)
    return found


@pytest.mark.parametrize("fps", [2, 5])
def test_the_tracks_of_a_segmented_video_are_those_of_the_whole_one(tmp_path, traffic, fps):
    inputs, truth = traffic
    out = tmp_path / "out"
    split = detect(out, inputs, "split", fps, segment_s=2.0)
    whole = detect(out, inputs, "whole", fps, segment_s=1000.0)
    assert (split["shards"], whole["shards"]) == (5, 1)
    assert os.listdir(out / "split" / "tracks") == ["part-v000000.parquet"]

    split_tracks, whole_tracks = tracks_of(out, "split"), tracks_of(out, "whole")
    assert split["tracks"] == whole["tracks"] == len(whole_tracks) >= len(truth)
    for a, b in zip(split_tracks, whole_tracks, strict=True):
        crops = Path(a.pop("crop_uri")), Path(b.pop("crop_uri"))
        assert crops[0].read_bytes() == crops[1].read_bytes()
        assert crops[0].parent == out / "split" / "crops" / "v000000"
        assert {k: v for k, v in a.items() if k != "run_id"} == {k: v for k, v in b.items() if k != "run_id"}
    # The bundled model misses plates here and there, so a plate may be more than one track; but a
    # track never holds two plates, and every plate has one.
    assert all(len(owners(truth, t)) == 1 for t in whole_tracks), [owners(truth, t) for t in whole_tracks]
    assert {next(iter(owners(truth, t))) for t in whole_tracks} == {0, 1, 2, 3}
    for t in whole_tracks:  # the crop is the best box, and a little more, of its frame
        x0, y0, x1, y1 = t["best_box"]
        width, height = Image.open(out / "whole" / "crops" / "v000000" / f"track-{t['track_id']:04d}.jpg").size
        assert x1 - x0 < width <= 1.5 * (x1 - x0) + 2 and y1 - y0 < height <= 1.5 * (y1 - y0) + 2


def test_tracks_are_remade_when_missing_or_made_with_other_settings_and_kept_otherwise(tmp_path, traffic):
    inputs, _ = traffic
    out = tmp_path / "out"
    first = detect(out, inputs, "r", 2, segment_s=3.0)
    part = out / "r" / "tracks" / "part-v000000.parquet"
    table = tracks_of(out, "r")
    assert first["tracks"] == len(table) > 0 and first["shards"] == 4

    # A rerun with the same settings detects nothing and leaves the tracks as they are.
    mtime = part.stat().st_mtime_ns
    again = detect(out, inputs, "r", 2, segment_s=3.0)
    assert again["shards_resumed"] == 4 and again["tracks"] == first["tracks"]
    assert part.stat().st_mtime_ns == mtime

    # Killed after a segment, before the tracks: the rerun redoes that segment, then the tracks.
    os.remove(part)
    os.remove(out / "r" / "_done" / "v000000-s0002.json")
    resumed = detect(out, inputs, "r", 2, segment_s=3.0)
    assert resumed["shards_resumed"] == 3 and resumed["tracks"] == first["tracks"]
    assert tracks_of(out, "r") == table

    # Other tracker settings: the tracks are remade from the same rows, without detecting again, and
    # crops of tracks that are gone are removed.
    strict = detect(out, inputs, "r", 2, segment_s=3.0, tracker=TrackOptions(min_frames=100))
    assert strict["shards_resumed"] == 4 and strict["tracks"] == 0 and tracks_of(out, "r") == []
    assert not list((out / "r" / "crops" / "v000000").iterdir())
    settings = json.loads(pq.read_metadata(part).metadata[b"platescope.tracks"])
    assert settings["tracker"]["min_frames"] == 100 and settings["crops"] is True


def test_tracks_and_crops_of_a_video_on_s3(traffic, s3_env, s3_bucket):
    inputs, truth = traffic
    storage.write_bytes_atomic(f"{s3_bucket}/in/cam 1.mp4", (inputs / "traffic.mp4").read_bytes())
    cfg = DetectConfig(input=[f"{s3_bucket}/in/"], output=f"{s3_bucket}/out", run_id="s3", video_fps=2,
                       video_segment_s=3.0, track=True, crops=True, progress=False,
                       s3={"endpoint_url": s3_env.endpoint_url, "access_key_id": s3_env.access_key_id,
                           "secret_access_key": s3_env.secret_access_key})
    summary = run_detect(cfg).summary
    fs, path = storage.filesystem(f"{s3_bucket}/out/s3/tracks/part-v000000.parquet")
    tracks = pq.read_table(path, filesystem=fs).to_pylist()
    assert summary["shards"] == 4 and summary["tracks"] == len(tracks) >= len(truth)
    for t in tracks:
        assert t["source_uri"] == f"{s3_bucket}/in/cam 1.mp4"
        assert t["crop_uri"] == f"{s3_bucket}/out/s3/crops/v000000/track-{t['track_id']:04d}.jpg"
        assert Image.open(io.BytesIO(storage.read_bytes(t["crop_uri"]))).format == "JPEG"
