"""A long video split by time into shards gives the table of the same video run as one shard."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest

from platescope import samples
from platescope.config import DetectConfig
from platescope.pipeline.run import run_detect

pytestmark = pytest.mark.usefixtures("local_ray")

COLUMNS = ["source_uri", "frame_index", "timestamp_s", "boxes", "scores"]


@pytest.fixture(scope="module")
def three_minutes(tmp_path_factory):
    """Three minutes of 720p at 5 fps, a keyframe every 2 s, in one folder."""
    folder = tmp_path_factory.mktemp("long-video")
    samples.write_long_video(folder / "cam.mp4", seconds=180, size=(1280, 720), fps=5)
    return folder


def run(tmp_path, inputs, model, run_id, video_segment_s):
    # One image per detector call: torch's CPU kernels round differently by batch size (1e-4 px),
    # and a split video batches its frames differently, so only then are boxes equal bit for bit.
    cfg = DetectConfig(input=[str(inputs)], output=str(tmp_path / "out"), model=model, run_id=run_id,
                       video_fps=2, video_segment_s=video_segment_s, threshold=0.0, batch_size=1,
                       progress=False)
    summary = run_detect(cfg).summary
    table = pq.read_table(tmp_path / "out" / run_id / "data", columns=COLUMNS)
    return summary, table.sort_by([("frame_index", "ascending")]).to_pylist()


def test_segments_give_the_table_of_one_whole_file_shard(tmp_path, tiny_model, three_minutes):
    split, split_rows = run(tmp_path, three_minutes, tiny_model, "split", video_segment_s=30)
    whole, whole_rows = run(tmp_path, three_minutes, tiny_model, "whole", video_segment_s=1000)

    assert (split["shards"], whole["shards"]) == (6, 1)
    assert split["inputs"] == whole["inputs"] == 1
    parts = sorted(p.name for p in (tmp_path / "out" / "split" / "data").iterdir())
    assert parts == [f"part-v000000-s{i:04d}.parquet" for i in range(6)]
    for i in range(6):  # each segment holds its own 30 s: 60 samples at 2 fps
        marker = json.loads((tmp_path / "out" / "split" / "_done" / f"v000000-s{i:04d}.json").read_text())
        assert marker["frames"] == marker["rows"] == 60 and marker["errors"] == 0
    assert split["frames"] == whole["frames"] == 360 and split["errors"] == whole["errors"] == 0
    # Row for row: same frames, timestamps, boxes and scores; none twice at a join, none missing.
    # (the first frame at or after each half second of a 5 fps video: frames 0, 3, 5, 8, ...)
    assert [r["frame_index"] for r in whole_rows] == [math.ceil(k * 2.5) for k in range(360)]
    assert split_rows == whole_rows
    assert any(r["boxes"] for r in whole_rows)
