"""Fetch + decode one shard on a CPU task: manifest entries in, one row per image or sampled frame out.

Every row carries its shard id and its sequence number in the shard; the shard's last row also carries
the shard's row count. That is how the sink knows a shard is complete however Ray splits, reorders or
retries blocks, which a video (whose frame count is unknown until it is decoded) needs. A shard with no
rows at all (a video's time segment past the last frame, where the header overstated the duration)
yields one completion row instead: `shard_rows` 0, an `error` so the detector passes it by, never
written (see pipeline.sink).

A bad input becomes a row with `error` set and a 1x1 placeholder image that the detector skips. Bad
means the input or its storage failed (`is_input_failure`): an `InputError` from the decoders, or an
object that could not be read (OSError, which is what s3fs makes of S3's error answers; botocore's
and aiohttp's own connection errors). Anything else is a bug or a broken worker (TypeError,
MemoryError, PIL's LOAD_TRUNCATED_IMAGES switch turned on) and propagates: the Ray task fails and
the run with it, instead of the bug being written into the table as one error row per input.
"""

from __future__ import annotations

import functools
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from platescope import storage
from platescope.sources import InputError
from platescope.storage import S3Options

if TYPE_CHECKING:
    from platescope.detectors.geometry import InputGeometry

PLACEHOLDER = np.zeros((1, 1, 3), np.uint8)

# Objects are fetched a few at a time ahead of decoding: object storage latency, not bandwidth,
# bounds a single sequential reader. At most FETCH_WINDOW objects are being fetched or are fetched
# and not yet decoded, so a shard of large objects is never held in memory whole.
NUM_FETCH_THREADS = 8
FETCH_WINDOW = 2 * NUM_FETCH_THREADS

# Row columns of CPU milliseconds by phase start with CPU_PREFIX (the sink adds them up and never
# writes them); CPU_DECODE is what the decode task spent on the row (see _timed).
CPU_PREFIX = "cpu_ms_"
CPU_DECODE = CPU_PREFIX + "decode"

# How an image is fetched: (uri, s3 options) -> its bytes. storage.read_bytes unless a caller says.
Reader = Callable[[str, "S3Options | None"], bytes]
T = TypeVar("T")
R = TypeVar("R")


@functools.cache
def _storage_errors() -> tuple[type[BaseException], ...]:
    """What reading an object raises when storage, not our code, failed.

    OSError covers local files (FileNotFoundError, PermissionError, IsADirectoryError) and what s3fs
    makes of S3's error answers (NoSuchKey -> FileNotFoundError, AccessDenied -> PermissionError,
    any other -> OSError(EIO)) and of timeouts (TimeoutError). A refused or dropped connection, once
    s3fs's retries are spent, arrives as botocore's own classes (EndpointConnectionError,
    ConnectionClosedError: BotoCoreError, not OSError), aiohttp's (ClientPayloadError,
    ServerDisconnectedError) or an http.client / urllib3 IncompleteRead, which s3fs passes on as
    they are.
    """
    import http.client

    errors: list[type[BaseException]] = [OSError, http.client.HTTPException]
    try:
        import botocore.exceptions
        import botocore.parsers

        errors += [botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError,
                   botocore.parsers.ResponseParserError]
    except ImportError:
        pass
    try:
        import aiohttp

        errors.append(aiohttp.ClientError)
    except ImportError:
        pass
    try:
        import urllib3.exceptions

        errors.append(urllib3.exceptions.HTTPError)
    except ImportError:
        pass
    return tuple(errors)


def is_input_failure(err: BaseException) -> bool:
    """True for what becomes an error row (a bad input, a failed read); False for a bug, which propagates."""
    return isinstance(err, InputError) or isinstance(err, _storage_errors())


def prefetch(items: Iterable[T], fetch: Callable[[T], R], *, window: int = FETCH_WINDOW,
             num_threads: int = NUM_FETCH_THREADS) -> Iterator[tuple[T, Future]]:
    """(item, future of fetch(item)) in the order of `items`, fetched on `num_threads` threads, with at
    most `window` items submitted and not yet taken by the consumer: the next fetch starts when the
    consumer comes back for another item. Whatever fetch raises comes out of that item's
    `future.result()`. Closing the generator cancels what has not started and waits for what has."""
    if window < 1:
        raise ValueError(f"window must be at least 1, not {window}")
    done = object()
    it = iter(items)
    with ThreadPoolExecutor(num_threads) as pool:
        pending: deque[tuple[T, Future]] = deque()
        try:
            while True:
                while len(pending) < window and (item := next(it, done)) is not done:
                    pending.append((item, pool.submit(fetch, item)))
                if not pending:
                    return
                yield pending.popleft()  # not kept here: once the consumer drops it, it is freed
        finally:
            for _, future in pending:
                future.cancel()


def _row(shard: str, uri: str, *, image: np.ndarray | None = None, size: tuple[int, int] | None = None,
         frame_index: int | None = None, timestamp_s: float | None = None, error: str | None = None) -> dict[str, Any]:
    """`size` is the decoded image's (width, height) when `image` was resized to the model's input."""
    img = PLACEHOLDER if image is None else image
    width, height = size if size is not None else (img.shape[1], img.shape[0])
    return {
        "shard": shard,
        "source_uri": uri,
        "frame_index": frame_index,
        "timestamp_s": timestamp_s,
        "width": None if image is None else int(width),
        "height": None if image is None else int(height),
        "image": img,
        "error": error,
    }


def _error_text(uri: str, err: Exception) -> str:
    if isinstance(err, InputError):
        return f"{err.kind}: {err.message}"
    if isinstance(err, FileNotFoundError):
        return f"read_failed: {uri} no longer exists"
    return f"read_failed: {type(err).__name__}: {err}"


def _image_rows(shard: str, entries: list[dict], s3: S3Options | None, max_pixels: int,
                read: Reader, geometry: InputGeometry | None, draft: bool) -> Iterator[dict]:
    from platescope.sources.images import decode_image, decode_image_for_model

    def fetch(entry: dict) -> bytes | None:
        if entry["kind"] == "unsupported":
            return None  # never read: it becomes an error row by its name alone
        return read(entry["uri"], s3)

    for entry, fetched in prefetch(entries, fetch):
        uri = entry["uri"]
        if entry["kind"] == "unsupported":
            yield _row(shard, uri, error="unsupported_type: not an image or video extension")
            continue
        try:
            if geometry is None:
                image, size = decode_image(fetched.result(), name=uri, max_pixels=max_pixels), None
            else:
                image, *size = decode_image_for_model(fetched.result(), geometry, name=uri, max_pixels=max_pixels,
                                                      draft=draft)
        except Exception as e:
            if not is_input_failure(e):
                raise  # a bug, not a bad input: the task fails and says so
            yield _row(shard, uri, error=_error_text(uri, e))
            continue
        yield _row(shard, uri, image=image, size=size)


# What one S3 range read of a video fetches. s3fs's default (50 MiB, read ahead of every miss) would
# fetch 50 MiB for the header at the start of each time segment and 50 MiB past its end: 8x a 35 MB
# video split in 8. At 2 MiB a segment costs a few MiB beyond its own bytes, and one reader still
# streams tens of MB/s, well ahead of decoding.
VIDEO_READ_BLOCK_BYTES = 2 * 1024 * 1024

# What the completion row of a shard with no rows says (pipeline.sink drops it by its shard_rows 0).
NO_ROWS = "no_rows: this shard has no rows; the row only completes it"


def _where_it_stopped(entry: dict, emitted: int) -> str:
    """What an error row adds: frames decoded before it, and the segment of a split video."""
    start, end = entry.get("start_s"), entry.get("end_s")
    notes = [f"after {emitted} frames"] if emitted else []
    if start is not None:
        notes.append(f"in segment {start:g}s-{end:g}s" if end is not None else f"in segment {start:g}s-end")
    return f" ({', '.join(notes)})" if notes else ""


def _video_rows(shard: str, entry: dict, s3: S3Options | None, fps: float, max_pixels: int,
                geometry: InputGeometry | None) -> Iterator[dict]:
    """The sampled frames of a video, or of its time segment `[start_s, end_s)` when the manifest split
    it: the same rows a whole decode gives for that span (sources.video.iter_video_frames)."""
    from platescope.sources.video import iter_video_frames

    uri = entry["uri"]
    start_s, end_s = entry.get("start_s"), entry.get("end_s")
    emitted = 0
    try:
        with storage.open_read(uri, s3, block_size=VIDEO_READ_BLOCK_BYTES) as f:
            for frame in iter_video_frames(f, name=uri, fps=fps, max_pixels=max_pixels,
                                           start_s=start_s or None, end_s=end_s):
                emitted += 1
                image, size = frame.image, None
                if geometry is not None:
                    image, size = _frame_for_model(image, geometry), (image.shape[1], image.shape[0])
                yield _row(shard, uri, image=image, size=size, frame_index=frame.frame_index,
                           timestamp_s=frame.timestamp_s)
    except Exception as e:
        if is_ffmpeg_error(e):
            # video.py makes InputErrors of FFmpeg's errors where it expects them; one from elsewhere
            # (converting a frame's pixel format, say) is still about the file, not our code.
            e = InputError("corrupt_video", f"{type(e).__name__}: {e}")
        if not is_input_failure(e):
            raise
        # Frames before the damage stay; one error row (no frame index) says where it stopped.
        yield _row(shard, uri, error=_error_text(uri, e) + _where_it_stopped(entry, emitted))
        return
    if emitted == 0 and not start_s and not _has_frames_after(uri, s3, fps, max_pixels, end_s):
        # Said once per video, by its first segment: a later segment with no frames is only a header
        # that overstated the duration, and yields no row at all.
        yield _row(shard, uri, error="no_frames: the video decoded to no frames")


def _has_frames_after(uri: str, s3: S3Options | None, fps: float, max_pixels: int,
                      end_s: float | None) -> bool:
    """Whether a video whose first segment (ending at `end_s`) had no frame has one later: then the
    later segments give its rows, and the video is not empty. A whole video (`end_s` None) has none."""
    if end_s is None:
        return False
    from platescope.sources.video import iter_video_frames

    try:
        with storage.open_read(uri, s3, block_size=VIDEO_READ_BLOCK_BYTES) as f:
            return next(iter(iter_video_frames(f, name=uri, fps=fps, max_pixels=max_pixels, start_s=end_s)),
                        None) is not None
    except Exception as e:
        if not is_input_failure(e) and not is_ffmpeg_error(e):
            raise
        return True  # damaged or unreadable further on: the segment that holds it makes the error row


def is_ffmpeg_error(e: Exception) -> bool:
    import av

    return isinstance(e, av.FFmpegError) and not isinstance(e, OSError)


def _frame_for_model(image: np.ndarray, geometry: InputGeometry) -> np.ndarray:
    try:
        return geometry.resize(image)
    except ValueError as e:  # a frame too small for the model's input (the only way resize refuses)
        raise InputError("too_small", str(e)) from e


def _timed(rows: Generator[dict[str, Any], None, None]) -> Iterator[dict[str, Any]]:
    """Each row with `cpu_ms_decode`: this thread's CPU time making it (decoding, skipped video frames
    and resizing; not the fetch threads' waits). The detector actor passes it on to the sink."""
    try:
        while True:
            started = time.thread_time()
            row = next(rows, None)
            if row is None:
                return
            row[CPU_DECODE] = (time.thread_time() - started) * 1000.0
            yield row
    finally:
        rows.close()  # a consumer that stops early stops the fetches now, not when collected


def decode_shard(item: dict[str, Any], *, s3: S3Options | None, video_fps: float,
                 max_pixels: int, read: Reader | None = None, geometry: InputGeometry | None = None,
                 draft: bool = False) -> Iterator[dict[str, Any]]:
    """Ray Data flat_map: one shard -> its rows, numbered, the last one carrying the count.

    Rows are yielded one behind, so the last one can be marked without holding more than two frames.
    `read(uri, s3) -> bytes` fetches an image (default storage.read_bytes); a failure it raises is an
    error row only if `is_input_failure` says so. With the model's `geometry`, images and frames are
    resized to its input here (and JPEGs decoded at a reduced scale where `draft` allows), so only
    model-size pixels cross the object store; the rows keep the decoded size in width and height.
    """
    shard = item["shard"]
    entries = item["entries"]
    if entries[0]["kind"] == "video":
        rows = _video_rows(shard, entries[0], s3, video_fps, max_pixels, geometry)
    else:
        rows = _image_rows(shard, entries, s3, max_pixels, read or storage.read_bytes, geometry, draft)
    previous = None
    seq = 0
    for row in _timed(rows):
        if previous is not None:
            yield previous
        row["seq"] = seq
        row["shard_rows"] = -1
        previous = row
        seq += 1
    if previous is None:  # only a video's segment can have no rows (see the module's docstring)
        yield {**_row(shard, entries[0]["uri"], error=NO_ROWS), "seq": 0, "shard_rows": 0, CPU_DECODE: 0.0}
        return
    previous["shard_rows"] = seq
    yield previous
