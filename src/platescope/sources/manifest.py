"""A run's inputs, listed once and fixed: the manifest, split into shards (the unit of resume).

The manifest is written to `<run>/manifest.parquet` before any work; a rerun of the same run id reads
it back instead of listing again, so a resumed run processes exactly the inputs the first attempt saw.
Images are grouped `num_inputs_per_shard` to a shard. A video is a shard of its own, or, when its
container says it is longer than `video_segment_s`, one shard per time segment `[start_s, end_s)`
(`sources.video.segment_bounds`): the segments decode in parallel and resume one by one. Its duration
is read from the container's header while listing, in small range reads (`probe_duration`); a video
whose header cannot be read stays one shard, and decoding it makes its error row as for any video.

URIs in the manifest (and so in the table) are UTF-8 strings. A local file name that is not valid
UTF-8 (bytes from another encoding, which Python carries as lone surrogates) is stored losslessly as
a `file://` URI with those bytes, and '%', percent-escaped (`file:///in/bad%FF.jpg`); `open_uri`
gives back the path to read. Every other URI is stored as listed.
"""

from __future__ import annotations

import io
import json
import os
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from platescope import storage
from platescope.parquet_read import read_parquet
from platescope.sources import media_kind
from platescope.storage import S3Options

MANIFEST_FILE = "manifest.parquet"
DONE_DIR = "_done"
VIDEO_SHARD_PREFIX = "v"
IMAGE_SHARD_PREFIX = "i"


SEGMENT_INFIX = "-s"
# Range reads of a probe: a container's header (and an mp4's index, at either end) is read in blocks
# this size, instead of s3fs's default 50 MiB readahead, which would fetch most of a short video.
PROBE_BLOCK_BYTES = 256 * 1024
# Videos probed at once while listing: each probe waits on a few small range reads.
NUM_PROBE_THREADS = 16


def is_video_shard(shard: str) -> bool:
    return shard.startswith(VIDEO_SHARD_PREFIX)


def video_id(shard: str) -> str:
    """The video a video shard belongs to: its shard id, less a segment's `-sNNNN` (v000003-s0002 ->
    v000003); what a video's derived outputs (its tracks) are named by."""
    return shard.split(SEGMENT_INFIX, 1)[0]


def is_first_segment(entry: dict) -> bool:
    """Whether a manifest entry starts its input: an image, a whole video, or a video's first segment.
    Counting these counts inputs, whatever the segmentation."""
    return not entry.get("start_s")


ESCAPED_PREFIX = "file://"


def _undecodable(text: str) -> bool:
    return any("\udc80" <= c <= "\udcff" for c in text)


def manifest_uri(uri: str) -> str:
    """How a listed URI is stored: as it is, or, for a local path holding bytes that are not UTF-8,
    a file:// URI with those bytes and '%' percent-escaped (the rest stays readable)."""
    if not _undecodable(uri):
        return uri
    escaped = "".join(f"%{ord(c) - 0xDC00:02X}" if "\udc80" <= c <= "\udcff" else "%25" if c == "%" else c
                      for c in uri)
    return ESCAPED_PREFIX + escaped


def open_uri(uri: str) -> str:
    """The URI or path storage reads for a manifest URI (the inverse of manifest_uri)."""
    if uri.startswith(ESCAPED_PREFIX):
        return os.fsdecode(urllib.parse.unquote_to_bytes(uri[len(ESCAPED_PREFIX):]))
    return uri

MANIFEST_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("kind", pa.string()),  # image | video | unsupported (only kept with --strict)
        ("size", pa.int64()),
        ("version", pa.string()),
        ("input_root", pa.string()),
        ("shard", pa.string()),
        # A video's time segment [start_s, end_s) in seconds; null for images and whole videos, and
        # end_s null for a video's last segment (it runs to the end, whatever the header said).
        ("start_s", pa.float64()),
        ("end_s", pa.float64()),
    ]
)


@dataclass
class Manifest:
    entries: list[dict] = field(default_factory=list)
    num_skipped: int = 0  # unsupported files left out (not error rows because --strict was off)

    def shards(self) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        for e in self.entries:
            out.setdefault(e["shard"], []).append(e)
        return out

    @property
    def num_inputs(self) -> int:
        """Inputs listed: a video split into segments counts once."""
        return sum(1 for e in self.entries if is_first_segment(e))

    def to_parquet_bytes(self) -> bytes:
        table = pa.Table.from_pylist(self.entries, schema=MANIFEST_SCHEMA)
        table = table.replace_schema_metadata({"num_skipped": str(self.num_skipped)})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        return buf.getvalue()

    @classmethod
    def from_parquet_bytes(cls, data: bytes) -> Manifest:
        table = read_parquet(data)
        meta = table.schema.metadata or {}
        for name in ("start_s", "end_s"):  # a manifest from before segments: its videos are whole
            if name not in table.schema.names:
                table = table.append_column(name, pa.nulls(table.num_rows, pa.float64()))
        return cls(entries=table.to_pylist(), num_skipped=int(meta.get(b"num_skipped", b"0")))


def list_inputs(
    inputs: list[str],
    *,
    s3: S3Options | None,
    strict: bool,
    num_inputs_per_shard: int,
    exclude: Callable[[set[str]], set[tuple[str, str]]] | None = None,
    video_segment_s: float | None = None,
    video_fps: float = 1.0,
) -> Manifest:
    """List every input recursively and assign shards.

    Raises ValueError naming the input when one cannot be listed or holds no file at all.
    `exclude`, given the listed URIs, answers the (uri, version) pairs to leave out (for --incremental:
    those an earlier run finished); asking with this listing keeps its answer as small as the listing.
    With `video_segment_s`, each video longer than that is split into segments whose bounds are
    multiples of 1/`video_fps` (the run's sampling rate), so they split its samples exactly.
    """
    manifest = Manifest()
    seen: set[str] = set()
    for root in inputs:
        shown = manifest_uri(root)
        try:
            objects = storage.list_objects(root, s3)
        except FileNotFoundError:
            raise ValueError(f"input {shown}: does not exist") from None
        except Exception as e:  # noqa: BLE001 - credentials, DNS, permissions: all one clear line
            # The cause stays chained: the caller tells unreachable storage from a bad input by it.
            raise ValueError(f"input {shown}: cannot be listed ({type(e).__name__}: {e})") from e
        if not objects:
            raise ValueError(f"input {shown}: is empty")
        for obj in objects:
            uri = manifest_uri(obj.uri)
            if uri in seen:  # overlapping inputs must not give two rows for one object
                continue
            seen.add(uri)
            kind = media_kind(uri)
            if kind is None:
                if not strict:
                    manifest.num_skipped += 1
                    continue
                kind = "unsupported"
            manifest.entries.append(
                {"uri": uri, "kind": kind, "size": obj.size, "version": obj.version,
                 "input_root": shown, "shard": "", "start_s": None, "end_s": None}
            )
    if exclude is not None:
        finished = exclude({e["uri"] for e in manifest.entries})
        manifest.entries = [e for e in manifest.entries if (e["uri"], e["version"]) not in finished]
    if video_segment_s is not None:
        manifest.entries = _split_videos(manifest.entries, s3, video_segment_s, video_fps)
    _assign_shards(manifest.entries, num_inputs_per_shard)
    return manifest


def probe_duration(uri: str, s3: S3Options | None) -> float | None:
    """A video's duration as its container's header states it, from a few small range reads; None
    when the header cannot be read or states none. Only for planning: the last segment is open-ended,
    so a header that understates the duration loses no frame."""
    from platescope.sources.video import probe_video

    try:
        with _open_for_probe(open_uri(uri), s3) as f:
            duration = probe_video(f)["duration_s"]
    except Exception:  # noqa: BLE001 - corrupt, unreadable, no video stream: decoding reports it
        return None
    return duration if duration is not None and duration > 0 else None


def _open_for_probe(path: str, s3: S3Options | None):
    return storage.open_read(path, s3, block_size=PROBE_BLOCK_BYTES)


def _split_videos(entries: list[dict], s3: S3Options | None, segment_s: float, fps: float) -> list[dict]:
    """Each video longer than `segment_s` becomes one entry per segment (same uri, start_s/end_s);
    images pass untouched and unprobed."""
    from platescope.sources.video import segment_bounds

    videos = [e for e in entries if e["kind"] == "video"]
    if not videos:
        return entries
    with ThreadPoolExecutor(min(NUM_PROBE_THREADS, len(videos))) as pool:
        found = pool.map(lambda e: probe_duration(e["uri"], s3), videos)
        durations = dict(zip((id(e) for e in videos), found))
    out = []
    for e in entries:
        duration = durations.get(id(e))
        if duration is None or duration <= segment_s:
            out.append(e)
            continue
        for start, end in segment_bounds(duration, fps, segment_s):
            out.append({**e, "start_s": start, "end_s": end})
    return out


def _assign_shards(entries: list[dict], num_inputs_per_shard: int) -> None:
    """Image shards `i000000`, a whole video's `v000003`, its segments' `v000003-s0000`, ..."""
    num_videos = 0
    num_images = 0
    segment = 0
    for e in entries:
        if e["kind"] == "video":
            if e.get("start_s") is None:
                e["shard"] = f"{VIDEO_SHARD_PREFIX}{num_videos:06d}"
                num_videos += 1
                continue
            if not e["start_s"]:  # a first segment starts the next video
                segment = 0
                num_videos += 1
            e["shard"] = f"{VIDEO_SHARD_PREFIX}{num_videos - 1:06d}{SEGMENT_INFIX}{segment:04d}"
            segment += 1
        else:
            e["shard"] = f"{IMAGE_SHARD_PREFIX}{num_images // num_inputs_per_shard:06d}"
            num_images += 1


def load(run_dir: str, s3: S3Options | None) -> Manifest | None:
    """The run's manifest, or None when it has none yet (one request either way)."""
    try:
        data = storage.read_bytes(storage.join(run_dir, MANIFEST_FILE), s3)
    except FileNotFoundError:
        return None
    return Manifest.from_parquet_bytes(data)


def write(run_dir: str, manifest: Manifest, s3: S3Options | None) -> None:
    storage.write_bytes_atomic(storage.join(run_dir, MANIFEST_FILE), manifest.to_parquet_bytes(), s3)


def load_or_create(run_dir: str, create, s3: S3Options | None) -> tuple[Manifest, bool]:
    """The run's manifest and whether it already existed (a resumed run). Only for a caller that
    owns the run (pipeline.ownership): two creators would each write their own."""
    manifest = load(run_dir, s3)
    if manifest is not None:
        return manifest, True
    manifest = create()
    write(run_dir, manifest, s3)
    return manifest, False


def done_shard_ids(run_dir: str, s3: S3Options | None) -> set[str]:
    """The shards a run has completion markers for, from the listing alone (no marker is read)."""
    return set(_marker_uris(run_dir, s3))


def done_shards(run_dir: str, s3: S3Options | None) -> dict[str, dict]:
    """Completion markers of a run: shard id -> the counts its marker holds."""
    return {shard: json.loads(storage.read_bytes(uri, s3)) for shard, uri in _marker_uris(run_dir, s3).items()}


def _marker_uris(run_dir: str, s3: S3Options | None) -> dict[str, str]:
    uri = storage.join(run_dir, DONE_DIR)
    if not storage.exists(uri, s3):
        return {}
    out = {}
    for obj in storage.list_objects(uri, s3):
        name = obj.uri.rsplit("/", 1)[-1]
        if name.endswith(".json"):
            out[name[: -len(".json")]] = obj.uri
    return out
