"""What --incremental skips: inputs an earlier run under the output root finished (no Ray)."""

from __future__ import annotations

import json

from platescope import storage
from platescope.pipeline.history import finished_inputs
from platescope.sources import manifest as m


def _earlier_run(root, run_id, entries, *, done, complete):
    """A run folder as detect leaves it: manifest, the markers of `done` shards, maybe a summary."""
    run_dir = str(root / run_id)
    manifest = m.Manifest(entries=[{"uri": u, "kind": "image", "size": 1, "version": v, "input_root": "in",
                                    "shard": s} for u, v, s in entries])
    storage.write_bytes_atomic(f"{run_dir}/{m.MANIFEST_FILE}", manifest.to_parquet_bytes())
    for shard in done:
        storage.write_bytes_atomic(f"{run_dir}/{m.DONE_DIR}/{shard}.json", b"{}")
    storage.write_bytes_atomic(f"{run_dir}/summary.json", json.dumps({"complete": complete}).encode())


def test_only_finished_shards_of_an_interrupted_run_count(tmp_path):
    _earlier_run(tmp_path, "night-1", [("a", "1", "i0"), ("b", "1", "i1")], done=["i0"], complete=False)
    assert finished_inputs(str(tmp_path), "night-2", None, among={"a", "b"}) == {("a", "1")}


def test_a_complete_run_counts_whole_and_its_markers_are_not_needed(tmp_path):
    # The summary says complete: even a marker folder lost to a lifecycle rule does not matter.
    _earlier_run(tmp_path, "night-1", [("a", "1", "i0"), ("b", "1", "i1")], done=[], complete=True)
    assert finished_inputs(str(tmp_path), "night-2", None, among={"a", "b"}) == {("a", "1"), ("b", "1")}


def test_answers_only_for_this_listing_and_skips_the_current_run(tmp_path):
    _earlier_run(tmp_path, "night-1", [("a", "1", "i0"), ("old", "1", "i0")], done=["i0"], complete=True)
    _earlier_run(tmp_path, "night-2", [("b", "1", "i0")], done=["i0"], complete=True)
    (tmp_path / "README.txt").write_text("a stray file beside the runs")
    (tmp_path / "reports").mkdir()  # and a folder that is no run
    assert finished_inputs(str(tmp_path), "night-2", None, among={"a", "b", "c"}) == {("a", "1")}
    assert finished_inputs(str(tmp_path), "night-3", None, among=set()) == set()


def test_listing_with_incremental_keeps_new_and_changed_objects(tmp_path):
    for name in ("seen.jpg", "changed.jpg", "new.jpg"):
        (tmp_path / "in").mkdir(exist_ok=True)
        (tmp_path / "in" / name).write_bytes(b"x")
    now = {o.uri: o.version for o in storage.list_objects(str(tmp_path / "in"))}
    seen, changed = (str(tmp_path / "in" / n) for n in ("seen.jpg", "changed.jpg"))
    # The version is the ETag on S3 and the mtime locally: an object rewritten since has another one.
    _earlier_run(tmp_path / "out", "night-1", [(seen, now[seen], "i0"), (changed, "older", "i0")],
                 done=["i0"], complete=True)
    kept = m.list_inputs([str(tmp_path / "in")], s3=None, strict=False, num_inputs_per_shard=8,
                         exclude=lambda uris: finished_inputs(str(tmp_path / "out"), "night-2", None, uris))
    assert sorted(e["uri"].rsplit("/", 1)[1] for e in kept.entries) == ["changed.jpg", "new.jpg"]
    assert {e["shard"] for e in kept.entries} == {"i000000"}
