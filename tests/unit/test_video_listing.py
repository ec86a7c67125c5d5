"""Long videos split by time into shards (no Ray): listing probes only videos, cheaply, and splits the
long ones; each segment decodes to its part of the whole decode's rows; an empty segment completes
its shard with no row; summaries count a video once; --incremental waits for every segment."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from platescope import samples, storage
from platescope.pipeline.actor import OUTPUT_SCHEMA
from platescope.pipeline.decode import VIDEO_READ_BLOCK_BYTES, decode_shard
from platescope.pipeline.history import finished_inputs
from platescope.pipeline.sink import ShardSink
from platescope.pipeline.summary import build_summary
from platescope.sources import manifest as m


@pytest.fixture(scope="module")
def long_video(tmp_path_factory) -> Path:
    """25 s at 10 fps, a keyframe every 2 s."""
    path = tmp_path_factory.mktemp("long") / "cam.mp4"
    samples.write_long_video(path, seconds=25, size=(96, 64), fps=10, chunk_s=5)
    return path


@pytest.fixture(scope="module")
def empty_video(tmp_path_factory) -> Path:
    """A valid avi with a video stream and not one frame."""
    path = tmp_path_factory.mktemp("empty") / "nothing.avi"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()
    return path


def listing(root, **kw) -> m.Manifest:
    kw.setdefault("video_fps", 2.0)
    return m.list_inputs([str(root)], s3=None, strict=False, num_inputs_per_shard=8, **kw)


def test_a_long_video_is_split_into_segment_shards_and_short_or_unreadable_ones_stay_whole(tmp_path, long_video):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a_long.mp4").write_bytes(long_video.read_bytes())
    samples.write_video(tmp_path / "in" / "b_short.mp4", num_frames=20, fps=10)  # 2 s
    (tmp_path / "in" / "c_broken.mp4").write_bytes(b"not a video at all")
    (tmp_path / "in" / "d.jpg").write_bytes(b"x")
    man = listing(tmp_path / "in", video_segment_s=10)
    by_shard = {e["shard"]: e for e in man.entries}
    long_uri = str(tmp_path / "in" / "a_long.mp4")
    assert [(s, e["uri"], e["start_s"], e["end_s"]) for s, e in by_shard.items() if e["uri"] == long_uri] == [
        ("v000000-s0000", long_uri, 0.0, 10.0), ("v000000-s0001", long_uri, 10.0, 20.0),
        ("v000000-s0002", long_uri, 20.0, None)]
    assert by_shard["v000001"]["uri"].endswith("b_short.mp4") and by_shard["v000001"].get("start_s") is None
    assert by_shard["v000002"]["uri"].endswith("c_broken.mp4") and by_shard["v000002"].get("start_s") is None
    assert by_shard["i000000"]["uri"].endswith("d.jpg")
    assert all(m.is_video_shard(s) for s in by_shard if s != "i000000")
    assert man.num_inputs == 4 and len(man.shards()) == 6
    # The manifest keeps the segments; one written before segments existed reads as whole videos.
    again = m.Manifest.from_parquet_bytes(man.to_parquet_bytes())
    assert again.entries == man.entries
    before_segments = pa.Table.from_pylist([{k: v for k, v in e.items() if k not in ("start_s", "end_s")}
                                            for e in man.entries if not e["start_s"]])
    buf = io.BytesIO()
    pq.write_table(before_segments, buf)
    old = m.Manifest.from_parquet_bytes(buf.getvalue())
    assert old.num_inputs == 4 and all(e["start_s"] is None and e["end_s"] is None for e in old.entries)


def test_only_videos_are_probed(tmp_path, long_video, monkeypatch):
    (tmp_path / "in").mkdir()
    for i in range(3):
        (tmp_path / "in" / f"img{i}.jpg").write_bytes(b"x")
    (tmp_path / "in" / "cam.mp4").write_bytes(long_video.read_bytes())
    opened = []
    real_open = m._open_for_probe
    monkeypatch.setattr(m, "_open_for_probe", lambda path, s3: opened.append(path) or real_open(path, s3))
    man = listing(tmp_path / "in", video_segment_s=10)
    assert [Path(p).name for p in opened] == ["cam.mp4"]
    assert len(man.entries) == 3 + 3


def test_segment_bounds_follow_the_runs_sampling_rate(tmp_path, long_video):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "cam.mp4").write_bytes(long_video.read_bytes())
    # 10 s at 3 fps is 30 samples of 1/3 s: bounds fall on multiples of 1/3 s.
    man = listing(tmp_path / "in", video_segment_s=10, video_fps=3.0)
    starts = [e["start_s"] for e in man.entries]
    assert starts == pytest.approx([0.0, 10.0, 20.0])
    man = listing(tmp_path / "in", video_segment_s=7.9, video_fps=0.5)  # 4 samples of 2 s: 8 s
    assert [e["start_s"] for e in man.entries] == pytest.approx([0.0, 8.0, 16.0, 24.0])


def test_probing_a_video_on_s3_reads_a_small_fraction_of_it(tmp_path, s3_server, s3_bucket, monkeypatch):
    video = tmp_path / "big.mp4"
    samples.write_long_video(video, seconds=120, size=(640, 480), fps=10, chunk_s=2, noise_seed=3)
    faststart = tmp_path / "big-faststart.mp4"
    with av.open(str(video)) as src, av.open(str(faststart), "w", options={"movflags": "+faststart"}) as dst:
        out = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = out
                dst.mux(packet)
    s3 = s3_server.options()
    for f in (video, faststart):
        storage.write_bytes_atomic(f"{s3_bucket}/cams/{f.name}", f.read_bytes(), s3)
    fetched = []  # bytes each probe's file fetched from S3, as fsspec's cache counts them
    real_open = m._open_for_probe

    @contextlib.contextmanager
    def counting_open(path, s3):
        with real_open(path, s3) as f:
            yield f
            fetched.append(f.cache.total_requested_bytes)

    monkeypatch.setattr(m, "_open_for_probe", counting_open)
    man = m.list_inputs([f"{s3_bucket}/cams/"], s3=s3, strict=False, num_inputs_per_shard=8,
                        video_segment_s=40, video_fps=1.0)
    assert sorted((e["uri"].rsplit("/", 1)[1], e["start_s"]) for e in man.entries) == [
        (name, start) for name in ("big-faststart.mp4", "big.mp4") for start in (0.0, 40.0, 80.0)]
    size = video.stat().st_size
    assert size > 15_000_000
    fetched.sort()
    print(f"probe read {fetched} bytes of {size}")  # the figure the README quotes
    assert len(fetched) == 2 and all(0 < b < size * 0.1 for b in fetched), (fetched, size)

    # Decoding the segments fetches about the video once: each segment its own bytes, plus a few
    # blocks for the header, the index at the end and the GOP before its start.
    decoded = []
    real_read = storage.open_read

    @contextlib.contextmanager
    def counting_read(uri, s3=None, **kw):
        with real_read(uri, s3, **kw) as f:
            yield f
            decoded.append(f.cache.total_requested_bytes)

    monkeypatch.setattr(storage, "open_read", counting_read)
    segments = [e for e in man.entries if e["uri"].endswith("/big.mp4")]
    rows = [r for e in segments for r in decode_shard({"shard": e["shard"], "entries": [e]}, s3=s3,
                                                      video_fps=1.0, max_pixels=10**8)]
    assert [r["frame_index"] for r in rows] == list(range(0, 1200, 10))
    print(f"decoding {len(segments)} segments fetched {sum(decoded)} bytes of {size}")
    assert len(decoded) == 3 and sum(decoded) < size + 3 * 4 * VIDEO_READ_BLOCK_BYTES, (decoded, size)


def rows_of(entry: dict, fps: float = 2.0) -> list[dict]:
    return list(decode_shard({"shard": entry["shard"], "entries": [entry]}, s3=None, video_fps=fps,
                             max_pixels=10**8))


def test_segments_decode_to_the_rows_of_the_whole_video(tmp_path, long_video):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "cam.mp4").write_bytes(long_video.read_bytes())
    whole = listing(tmp_path / "in", video_segment_s=100).entries
    split = listing(tmp_path / "in", video_segment_s=10).entries
    assert len(whole) == 1 and len(split) == 3
    def key(r):
        return r["source_uri"], r["frame_index"], r["timestamp_s"], r["image"].tobytes(), r["error"]

    expected = [key(r) for r in rows_of(whole[0])]
    got = []
    for entry in split:
        rows = rows_of(entry)
        assert {r["shard"] for r in rows} == {entry["shard"]}
        assert [r["seq"] for r in rows] == list(range(len(rows))) and rows[-1]["shard_rows"] == len(rows)
        got += [key(r) for r in rows]
    assert len(expected) == 50 and got == expected


def test_an_empty_segment_completes_its_shard_with_no_row(tmp_path, long_video, empty_video):
    # A header that overstates the duration leaves a segment past the last frame.
    past_end = {"uri": str(long_video), "kind": "video", "shard": "v000000-s0003", "start_s": 30.0, "end_s": None}
    (completion,) = rows_of(past_end)
    assert completion["shard_rows"] == 0 and completion["error"].startswith("no_rows:")
    # A video with no frame at all has no duration to split by: one shard, one no_frames row.
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "nothing.avi").write_bytes(empty_video.read_bytes())
    (whole,) = listing(tmp_path / "in", video_segment_s=0.001).entries
    assert whole["shard"] == "v000000" and whole.get("start_s") is None
    (no_frames,) = rows_of(whole)
    assert no_frames["error"] == "no_frames: the video decoded to no frames" and no_frames["shard_rows"] == 1
    # A first segment without a sample, of a video that has frames later, is no error either
    # (at 0.5 fps, [0, 0.01) s holds no sample number: the first is [0, 2) s).
    no_sample = {"uri": str(long_video), "kind": "video", "shard": "v000003-s0000", "start_s": 0.0, "end_s": 0.01}
    assert [r["shard_rows"] for r in rows_of(no_sample, fps=0.5)] == [0]

    # The sink writes the shard as an empty part and its marker; summaries and readers see no row.
    sink = ShardSink(str(tmp_path / "run"), "r1", None)
    batch = pa.Table.from_pylist([
        {**{k: completion.get(k) for k in ("shard", "seq", "shard_rows", "source_uri", "error")},
         "boxes": [], "scores": [], "label_ids": [], "labels": [], "model": "m"}], schema=OUTPUT_SCHEMA)
    assert sink.add(batch) == ["v000000-s0003"]
    assert sink.add(batch) == []  # a retried task's completion row: the shard is already written
    part = pq.read_table(tmp_path / "run" / "data" / "part-v000000-s0003.parquet")
    assert part.num_rows == 0 and "source_uri" in part.schema.names
    marker = json.loads((tmp_path / "run" / "_done" / "v000000-s0003.json").read_text())
    assert marker["rows"] == marker["frames"] == marker["errors"] == 0


def test_a_damaged_segment_gives_one_error_row_and_the_others_are_unaffected(tmp_path, long_video):
    damaged = tmp_path / "damaged.mp4"
    data = bytearray(long_video.read_bytes())
    with av.open(str(long_video)) as container:  # garble packets around 13 s (the second segment)
        packets = [(p.pos, p.size) for p in container.demux(video=0)
                   if p.pos is not None and p.size and p.pts is not None
                   and 12.5 <= float(p.pts * p.time_base) <= 13.5]
    noise = np.random.default_rng(0)
    for pos, size in packets:
        data[pos: pos + size] = noise.integers(0, 256, size, dtype=np.uint8).tobytes()
    damaged.write_bytes(bytes(data))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "cam.mp4").write_bytes(long_video.read_bytes())
    clean = {e["shard"]: rows_of(e) for e in listing(tmp_path / "in", video_segment_s=10).entries}
    entries = [{**e, "uri": str(damaged)} for e in listing(tmp_path / "in", video_segment_s=10).entries]
    got = {e["shard"]: rows_of(e) for e in entries}
    errors = {s: [r["error"] for r in rows if r["error"]] for s, rows in got.items()}
    assert errors["v000000-s0000"] == errors["v000000-s0002"] == []
    (error,) = errors["v000000-s0001"]
    assert error.startswith("corrupt_video:") and error.endswith(" in segment 10s-20s)")
    for shard in ("v000000-s0000", "v000000-s0002"):
        assert [(r["frame_index"], r["image"].tobytes()) for r in got[shard]] == \
            [(r["frame_index"], r["image"].tobytes()) for r in clean[shard]]


def test_a_segmented_video_counts_as_one_input():
    entries = [{"uri": "a.jpg", "kind": "image", "shard": "i000000"}] + [
        {"uri": "cam.mp4", "kind": "video", "shard": f"v000000-s{i:04d}", "start_s": 10.0 * i,
         "end_s": 10.0 * (i + 1) if i < 2 else None} for i in range(3)]
    counts = {"rows": 1, "images": 0, "frames": 1, "detections": 0, "errors": 0, "errors_by_kind": {}}
    done = {e["shard"]: counts for e in entries}
    summary = build_summary(run_id="r", run_dir="out/r", manifest=m.Manifest(entries=entries), done=done,
                            num_resumed_shards=0, wall_time_s=1.0, rows_this_attempt=4, max_error_fraction=0.1)
    assert summary["inputs"] == 2 and summary["shards"] == summary["shards_done"] == 4 and summary["complete"]


def _earlier_run(root, run_id, entries, done):
    run_dir = str(root / run_id)
    manifest = m.Manifest(entries=[{"uri": u, "kind": "video", "size": 1, "version": "1", "input_root": "in",
                                    "shard": s, "start_s": start} for u, s, start in entries])
    storage.write_bytes_atomic(f"{run_dir}/{m.MANIFEST_FILE}", manifest.to_parquet_bytes())
    for shard in done:
        storage.write_bytes_atomic(f"{run_dir}/{m.DONE_DIR}/{shard}.json", b"{}")


def test_incremental_counts_a_video_finished_only_when_all_its_segments_are(tmp_path):
    segments = [("cam.mp4", "v000000-s0000", 0.0), ("cam.mp4", "v000000-s0001", 60.0),
                ("other.mp4", "v000001-s0000", 0.0), ("other.mp4", "v000001-s0001", 60.0)]
    _earlier_run(tmp_path, "night-1", segments, done=["v000000-s0000", "v000001-s0000", "v000001-s0001"])
    assert finished_inputs(str(tmp_path), "night-2", None, among={"cam.mp4", "other.mp4"}) == {("other.mp4", "1")}


@pytest.mark.parametrize("value", ["0", "-5", "long"])
def test_a_bad_segment_length_fails_naming_the_field(value):
    from platescope.config import ConfigError, DetectConfig, build_config

    with pytest.raises(ConfigError) as e:
        build_config(DetectConfig, values={"input": ["a"], "output": "o", "model": "m"},
                     overrides=[f"video_segment_s={value}"])
    assert str(e.value).split("): ", 1)[1].startswith("video_segment_s:")


def test_the_segment_length_is_no_row_setting():
    """It changes which shards exist, never the rows: a resume may give another (the manifest keeps
    the first start's segments), and the fingerprint leaves it out."""
    from platescope.pipeline.fingerprint import ROW_FIELDS
    from platescope.pipeline.run import MANIFEST_FIELDS

    assert "video_segment_s" not in ROW_FIELDS and "video_segment_s" in MANIFEST_FIELDS
