"""Fetch + decode one shard on a CPU task: manifest entries in, one row per image or sampled frame out.

Every row carries its shard id and its sequence number in the shard; the shard's last row also carries
the shard's row count. That is how the sink knows a shard is complete however Ray splits, reorders or
retries blocks, which a video (whose frame count is unknown until it is decoded) needs.
A bad input becomes a row with `error` set and a 1x1 placeholder image that the detector skips.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from platescope import storage
from platescope.sources import InputError
from platescope.storage import S3Options

PLACEHOLDER = np.zeros((1, 1, 3), np.uint8)

# Objects are fetched a few at a time ahead of decoding: object storage latency, not bandwidth,
# bounds a single sequential reader.
NUM_FETCH_THREADS = 8


def _row(shard: str, uri: str, *, image: np.ndarray | None = None, frame_index: int | None = None,
         timestamp_s: float | None = None, error: str | None = None) -> dict[str, Any]:
    img = PLACEHOLDER if image is None else image
    return {
        "shard": shard,
        "source_uri": uri,
        "frame_index": frame_index,
        "timestamp_s": timestamp_s,
        "width": None if image is None else int(img.shape[1]),
        "height": None if image is None else int(img.shape[0]),
        "image": img,
        "error": error,
    }


def _error_text(uri: str, err: Exception) -> str:
    if isinstance(err, InputError):
        return f"{err.kind}: {err.message}"
    if isinstance(err, FileNotFoundError):
        return f"read_failed: {uri} no longer exists"
    return f"read_failed: {type(err).__name__}: {err}"


def _image_rows(shard: str, entries: list[dict], s3: S3Options | None, max_pixels: int) -> Iterator[dict]:
    from platescope.sources.images import decode_image

    def fetch(uri: str) -> bytes | Exception:
        try:
            return storage.read_bytes(uri, s3)
        except Exception as e:  # noqa: BLE001 - becomes the input's error row
            return e

    with ThreadPoolExecutor(NUM_FETCH_THREADS) as pool:
        for entry, data in zip(entries, pool.map(fetch, [e["uri"] for e in entries])):
            uri = entry["uri"]
            if entry["kind"] == "unsupported":
                yield _row(shard, uri, error="unsupported_type: not an image or video extension")
                continue
            try:
                if isinstance(data, Exception):
                    raise data
                yield _row(shard, uri, image=decode_image(data, name=uri, max_pixels=max_pixels))
            except Exception as e:  # noqa: BLE001
                yield _row(shard, uri, error=_error_text(uri, e))


def _video_rows(shard: str, entry: dict, s3: S3Options | None, fps: float, max_pixels: int) -> Iterator[dict]:
    from platescope.sources.video import iter_video_frames

    uri = entry["uri"]
    emitted = 0
    try:
        with storage.open_read(uri, s3) as f:
            for frame in iter_video_frames(f, name=uri, fps=fps, max_pixels=max_pixels):
                emitted += 1
                yield _row(shard, uri, image=frame.image, frame_index=frame.frame_index,
                           timestamp_s=frame.timestamp_s)
    except Exception as e:  # noqa: BLE001
        # Frames before the damage stay; one error row (no frame index) says where it stopped.
        yield _row(shard, uri, error=_error_text(uri, e) + (f" (after {emitted} frames)" if emitted else ""))
        return
    if emitted == 0:
        yield _row(shard, uri, error="no_frames: the video decoded to no frames")


def decode_shard(item: dict[str, Any], *, s3: S3Options | None, video_fps: float,
                 max_pixels: int) -> Iterator[dict[str, Any]]:
    """Ray Data flat_map: one shard -> its rows, numbered, the last one carrying the count.

    Rows are yielded one behind, so the last one can be marked without holding more than two frames.
    """
    shard = item["shard"]
    entries = item["entries"]
    if entries[0]["kind"] == "video":
        rows = _video_rows(shard, entries[0], s3, video_fps, max_pixels)
    else:
        rows = _image_rows(shard, entries, s3, max_pixels)
    previous = None
    seq = 0
    for row in rows:
        if previous is not None:
            yield previous
        row["seq"] = seq
        row["shard_rows"] = -1
        previous = row
        seq += 1
    assert previous is not None, "every shard yields at least one row"
    previous["shard_rows"] = seq
    yield previous
