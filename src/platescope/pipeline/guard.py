"""The run's reads and writes, with storage failures told apart from bad inputs.

- decode_shard_guarded wraps `decode.decode_shard` (its options passed on) for the Ray Data graph: it opens escaped manifest
  URIs (non-UTF-8 local names, see sources.manifest) and gives rows the manifest's URI back; and
  when an input on S3 becomes an error row, it asks the storage whether it is reachable at all:
  an outage fails the run as a StorageFailure (a rerun does the shard again) instead of recording
  every input it hit as a bad input.
- GuardedSink is the shard sink whose failed writes name the object and the cause.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from platescope import storage
from platescope.pipeline.decode import decode_shard
from platescope.pipeline.errors import StorageFailure, is_storage_error, is_unreachable
from platescope.pipeline.sink import DATA_DIR, ShardSink
from platescope.sources.manifest import DONE_DIR, open_uri
from platescope.storage import S3Options


def _printable(text: str) -> str:
    """Text that encodes as UTF-8: a surrogate (from a non-UTF-8 path in a message) as \\udcXX."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def check_reachable(uri: str, s3: S3Options | None) -> None:
    """Raise StorageFailure when the storage holding `uri` cannot be reached now."""
    fs, path = storage.filesystem(uri, s3)
    try:
        fs.info(path)
    except Exception as e:  # noqa: BLE001 - only an unreachable storage matters here
        if is_unreachable(e):
            raise StorageFailure.of("reading input", uri, e) from None


def decode_shard_guarded(item: dict[str, Any], *, s3: S3Options | None, video_fps: float,
                         max_pixels: int, **options: Any) -> Iterator[dict[str, Any]]:
    """Ray Data flat_map: decode_shard on the paths behind the manifest's URIs; rows carry the
    manifest's URIs, and an input error on S3 while S3 is unreachable fails the task."""
    shown: dict[str, str] = {}
    entries = []
    for entry in item["entries"]:
        path = open_uri(entry["uri"])
        if path != entry["uri"]:
            shown[path] = entry["uri"]
        entries.append({**entry, "uri": path})
    for row in decode_shard({**item, "entries": entries}, s3=s3, video_fps=video_fps, max_pixels=max_pixels,
                            **options):
        source = row["source_uri"]
        if source in shown:
            row["source_uri"] = shown[source]
            if row["error"] is not None:
                row["error"] = row["error"].replace(source, shown[source])
        if row["error"] is not None:
            row["error"] = _printable(row["error"])
            if storage.is_s3(source):
                check_reachable(source, s3)
        yield row


class GuardedSink(ShardSink):
    """ShardSink whose storage errors are StorageFailures naming the shard's part and marker."""

    def _write(self, shard: str, rows: pa.Table) -> None:
        try:
            super()._write(shard, rows)
        except Exception as e:
            if not is_storage_error(e):
                raise
            part = storage.join(self.run_dir, DATA_DIR, f"part-{shard}.parquet")
            marker = storage.join(self.run_dir, DONE_DIR, f"{shard}.json")
            raise StorageFailure.of("writing", f"{part} (then {marker})", e) from None
