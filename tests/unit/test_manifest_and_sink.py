"""Manifest listing/sharding and the shard sink's exactly-once bookkeeping (no Ray)."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from platescope.pipeline.actor import OUTPUT_SCHEMA
from platescope.pipeline.sink import ShardSink
from platescope.schema import DETECTIONS_SCHEMA
from platescope.sources import manifest as m


def touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_listing_shards_images_and_gives_each_video_its_own(tmp_path):
    for i in range(5):
        touch(tmp_path / "in" / f"img{i}.jpg")
    touch(tmp_path / "in" / "sub" / "a.MP4")
    touch(tmp_path / "in" / "sub" / "b.mkv")
    touch(tmp_path / "in" / "readme.txt")
    man = m.list_inputs([str(tmp_path / "in")], s3=None, strict=False, num_inputs_per_shard=2)
    shards = man.shards()
    assert man.num_skipped == 1
    assert sorted(len(v) for k, v in shards.items() if not m.is_video_shard(k)) == [1, 2, 2]
    videos = [v for k, v in shards.items() if m.is_video_shard(k)]
    assert sorted(v[0]["uri"].rsplit("/", 1)[1] for v in videos) == ["a.MP4", "b.mkv"]
    assert all(len(v) == 1 for v in videos)


def test_strict_keeps_unsupported_and_overlapping_inputs_count_once(tmp_path):
    touch(tmp_path / "in" / "a.jpg")
    touch(tmp_path / "in" / "notes.txt")
    man = m.list_inputs([str(tmp_path / "in"), str(tmp_path / "in" / "a.jpg")], s3=None, strict=True,
                        num_inputs_per_shard=8)
    assert sorted(e["kind"] for e in man.entries) == ["image", "unsupported"]


def test_manifest_round_trips_and_is_reused(tmp_path):
    touch(tmp_path / "in" / "a.jpg")
    run_dir = str(tmp_path / "out" / "r1")
    def make():
        return m.list_inputs([str(tmp_path / "in")], s3=None, strict=False, num_inputs_per_shard=8)

    first, resumed = m.load_or_create(run_dir, make, None)
    assert not resumed
    touch(tmp_path / "in" / "b.jpg")  # appears after the run started: not part of it
    again, resumed = m.load_or_create(run_dir, make, None)
    assert resumed and again.entries == first.entries


def test_unlistable_inputs_raise_naming_them(tmp_path):
    with pytest.raises(ValueError, match="input .*nope: does not exist"):
        m.list_inputs([str(tmp_path / "nope")], s3=None, strict=False, num_inputs_per_shard=8)


def _batch(shard, seqs, total=None, uri="u"):
    n = len(seqs)
    return pa.Table.from_pydict({
        "shard": [shard] * n, "seq": seqs,
        "shard_rows": [total if (total is not None and s == total - 1) else -1 for s in seqs],
        "source_uri": [f"{uri}{s}" for s in seqs], "frame_index": [None] * n, "timestamp_s": [None] * n,
        "width": [4] * n, "height": [3] * n, "boxes": [[[0, 0, 1, 1]]] * n, "scores": [[0.5]] * n,
        "label_ids": [[0]] * n, "labels": [["plate"]] * n, "model": ["m"] * n, "prompt": [None] * n,
        "error": [None] * (n - 1) + ["empty_file: zero bytes"],
    }, schema=OUTPUT_SCHEMA)


def test_sink_writes_a_shard_only_when_whole_and_ignores_retried_rows(tmp_path):
    sink = ShardSink(str(tmp_path), "r1", None)
    assert sink.add(_batch("i000000", [2], total=3)) == []
    assert sink.add(_batch("i000000", [0, 2])) == []  # seq 2 again: a retried task
    assert not (tmp_path / "_done").exists()
    assert sink.add(_batch("i000000", [1])) == ["i000000"]
    table = pq.read_table(tmp_path / "data" / "part-i000000.parquet")
    assert table.schema.equals(DETECTIONS_SCHEMA, check_metadata=False)
    assert table.column("source_uri").to_pylist() == ["u0", "u1", "u2"]
    assert set(table.column("run_id").to_pylist()) == {"r1"}
    marker = json.loads((tmp_path / "_done" / "i000000.json").read_text())
    assert marker["rows"] == 3 and marker["detections"] == 3 and marker["images"] == 3
    assert marker["errors"] == 2 and marker["errors_by_kind"] == {"empty_file": 2}
    assert m.done_shards(str(tmp_path), None) == {"i000000": marker}


def test_sink_adds_up_the_rows_cpu_columns_once_per_row_and_never_writes_them(tmp_path):
    sink = ShardSink(str(tmp_path), "r1", None)
    batch = _batch("i000000", [0, 1], total=2)
    batch = batch.append_column("cpu_ms_decode", pa.array([3.0, 5.0], pa.float32()))
    batch = batch.append_column("cpu_ms_model", pa.array([10.0, 10.0], pa.float32()))
    assert sink.add(batch.slice(0, 1)) == []
    assert sink.add(batch) == ["i000000"]  # row 0 again (a retried task): counted once
    assert sink.cpu_ms_per_row() == {"decode": 4.0, "model": 10.0}
    table = pq.read_table(tmp_path / "data" / "part-i000000.parquet")
    assert table.num_rows == 2 and not [n for n in table.column_names if n.startswith("cpu_ms")]


def test_a_name_that_is_not_utf8_is_listed_escaped_and_opens_again(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    raw = os.path.join(os.fsencode(folder), b"caf\xe9 100%.jpg")  # Latin-1 bytes, not UTF-8
    with open(raw, "wb") as f:
        f.write(b"x")
    touch(folder / "ümlaut 車.jpg")
    man = m.list_inputs([str(folder)], s3=None, strict=False, num_inputs_per_shard=8)
    uris = sorted(e["uri"] for e in man.entries)
    assert uris == sorted([f"{folder}/ümlaut 車.jpg", f"file://{folder}/caf%E9 100%25.jpg"])
    for uri in uris:
        assert os.path.exists(m.open_uri(uri))
    assert os.fsencode(m.open_uri(f"file://{folder}/caf%E9 100%25.jpg")) == raw
    run_dir = str(tmp_path / "out" / "r")
    m.write(run_dir, man, None)  # UTF-8 throughout: Parquet takes it
    assert m.load(run_dir, None).entries == man.entries


def test_manifest_uri_leaves_every_utf8_uri_as_it_is():
    for uri in ["/a/b c/ümlaut 車.jpg", "/a/100%.jpg", "s3://b/a b#c%20d.jpg", "file:///x"]:
        assert m.manifest_uri(uri) == uri
