"""Crops of each track's best view: what downstream plate reading needs.

Frames are not kept while a video is sampled (memory stays at a few frames); a crop's frame is decoded
again by seeking to the keyframe before it (sources.video.read_frame), once per distinct best frame.
A crop reaches `margin` of the box's width and height beyond it on each side (a reader wants the
plate's edges whole, and boxes of a weak detector cut them), clipped to the frame, and is saved as a
high-quality JPEG.
"""

from __future__ import annotations

import io
import logging
import math

import numpy as np

from platescope import storage
from platescope.pipeline.decode import VIDEO_READ_BLOCK_BYTES, is_ffmpeg_error, is_input_failure
from platescope.pipeline.guard import check_reachable
from platescope.pipeline.tracks import Track
from platescope.storage import S3Options

log = logging.getLogger(__name__)

JPEG_QUALITY = 95  # plate characters are a few pixels wide: keep the artefacts below them


def crop_box(box: tuple[float, float, float, float], margin: float, width: int,
             height: int) -> tuple[int, int, int, int]:
    """The pixel rectangle (x0, y0, x1, y1) of a crop around `box`, grown by `margin` of its size on
    each side, rounded outwards and clipped to a width x height frame."""
    x0, y0, x1, y1 = box
    dx, dy = margin * (x1 - x0), margin * (y1 - y0)
    left, top = max(0, math.floor(x0 - dx)), max(0, math.floor(y0 - dy))
    right, bottom = min(width, math.ceil(x1 + dx)), min(height, math.ceil(y1 + dy))
    return left, top, max(right, left + 1), max(bottom, top + 1)


def encode_jpeg(pixels: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def write_crops(tracks: list[Track], *, video: str, uris: list[str], margin: float, max_pixels: int,
                s3: S3Options | None) -> list[str | None]:
    """Cut the best view of each track from `video` (a path or URI to read) and write it to the URI
    beside it in `uris`; returns each track's crop URI, None where its frame could not be decoded
    again (the video changed or was damaged since: logged, the track is kept)."""
    from platescope.sources.video import read_frame

    written: list[str | None] = [None] * len(tracks)
    by_frame: dict[tuple[int, float], list[int]] = {}
    for i, track in enumerate(tracks):
        best = track.best
        by_frame.setdefault((best.frame_index, best.timestamp_s), []).append(i)
    for (frame_index, timestamp_s), which in sorted(by_frame.items()):
        try:
            with storage.open_read(video, s3, block_size=VIDEO_READ_BLOCK_BYTES) as f:
                frame = read_frame(f, frame_index=frame_index, timestamp_s=timestamp_s, max_pixels=max_pixels)
        except Exception as e:
            if not is_input_failure(e) and not is_ffmpeg_error(e):
                raise
            if storage.is_s3(video):
                check_reachable(video, s3)  # an outage fails the task (a rerun cuts the crops), not the crop
            log.warning("%s: no crop of frame %d (%s: %s)", video, frame_index, type(e).__name__, e)
            continue
        height, width = frame.shape[:2]
        for i in which:
            x0, y0, x1, y1 = crop_box(tracks[i].best.box, margin, width, height)
            storage.write_bytes_atomic(uris[i], encode_jpeg(frame[y0:y1, x0:x1]), s3)
            written[i] = uris[i]
    return written
