"""Earlier runs under an output root, as `--incremental` sees them: which inputs they finished."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc

from platescope import storage
from platescope.parquet_read import read_parquet
from platescope.pipeline.summary import SUMMARY_FILE
from platescope.sources.manifest import MANIFEST_FILE, done_shard_ids
from platescope.storage import S3Options


def finished_inputs(output_root: str, current_run_id: str, s3: S3Options | None,
                    among: set[str]) -> set[tuple[str, str]]:
    """(uri, version) of the inputs in `among` that an earlier run under `output_root` finished.

    An input counts as seen only once its shard's completion marker exists, and a video split into
    time segments only once every segment's marker does, so an input of a run that died before
    finishing it is still picked up (whole) by the next incremental run. A nightly job reads every
    earlier run here, so each costs a few requests and one manifest in memory at a time: three
    columns of it, kept only where they meet this listing; a complete run needs no marker listing.
    """
    fs, root = storage.filesystem(output_root, s3)
    if not fs.exists(root) or not among:
        return set()
    wanted = pa.array(sorted(among), pa.string())
    seen: set[tuple[str, str]] = set()
    for path in fs.ls(root, detail=False):
        run_dir = storage.to_uri(fs, path)
        if run_dir.rstrip("/").rsplit("/", 1)[-1] == current_run_id:
            continue
        try:  # one request per earlier run, not an existence check and then the read
            with storage.open_read(storage.join(run_dir, MANIFEST_FILE), s3) as f:
                table = read_parquet(f, columns=["uri", "version", "shard"])
        except (FileNotFoundError, NotADirectoryError):
            continue  # a stray file or folder beside the runs, or a run that died before listing
        table = table.filter(pc.is_in(table["uri"], value_set=wanted))
        unfinished: set[tuple[str, str]] = set()
        if not _run_complete(run_dir, s3):
            done = pa.array(sorted(done_shard_ids(run_dir, s3)), pa.string())
            is_done = pc.is_in(table["shard"], value_set=done)
            rest = table.filter(pc.invert(is_done))
            unfinished = set(zip(rest["uri"].to_pylist(), rest["version"].to_pylist()))
            table = table.filter(is_done)
        finished = zip(table["uri"].to_pylist(), table["version"].to_pylist())
        seen.update(p for p in finished if p not in unfinished)
    return seen


def _run_complete(run_dir: str, s3: S3Options | None) -> bool:
    """Whether the run's own summary says every shard was done (its last attempt finished)."""
    uri = storage.join(run_dir, SUMMARY_FILE)
    try:
        return bool(json.loads(storage.read_bytes(uri, s3)).get("complete"))
    except FileNotFoundError:
        return False
