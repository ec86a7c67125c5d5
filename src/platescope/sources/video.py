"""Sample RGB frames from a video at a fixed rate, streaming: one decoded frame in memory at a time.

An hour of 1080p is ~100k frames and ~600 GB as RGB, so nothing here ever holds more than the frame
being yielded (plus the few the decoder keeps for its own threading). Frames that are not sampled
are decoded (inter-frame codecs need them) but never converted to RGB, which is most of the cost.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import IO, Any, Union

import av
import numpy as np

from platescope.sources import InputError
from platescope.sources.images import DEFAULT_MAX_PIXELS

VideoSource = Union[str, "os.PathLike[str]", IO[bytes]]

# Timestamps are exact rationals turned into floats; without slack a frame at exactly k/fps could
# round to just below it and the sample would slip one frame late.
_EPS = 1e-6
# A stream that is garbage from some point on would otherwise be "decoded" packet by packet to its
# end for nothing. A glitch fails a packet or two: frames that reference it are concealed, not failed.
_MAX_CONSECUTIVE_FAILURES = 50


@dataclass(eq=False)
class VideoFrame:
    """One sampled frame. `frame_index` counts decoded frames from 0, so it is stable whatever fps
    a run samples at (after damaged packets it counts only what decoded); `timestamp_s` is the
    presentation time from the stream's start, and stays true across damage."""

    frame_index: int
    timestamp_s: float
    image: np.ndarray


def iter_video_frames(
    source: VideoSource, *, name: str, fps: float, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Iterator[VideoFrame]:
    """Yield the first frame at or after each k/fps seconds (k = 0, 1, ...), as upright RGB.

    `fps <= 0`, or at least the stream's own rate, yields every frame. Damaged data (a truncated
    upload, a broken packet) ends in `InputError("corrupt_video")` raised after the last frame
    that could be decoded: frames already yielded are good and the caller keeps them, and the
    damage is never a silent gap. `name` is accepted for symmetry with `decode_image`; messages
    leave it out because the caller prefixes the input's URI. Errors of a file object's own
    `read` (network, credentials) propagate as they are, for the storage layer to report.
    """
    if math.isnan(fps):
        raise ValueError("fps must be a number (<= 0 or inf for every frame)")
    with _open(source) as container:
        stream = _video_stream(container)
        codec = stream.codec_context
        codec.thread_type = "AUTO"
        _check_pixels(codec.width, codec.height, max_pixels)

        rate = _stream_rate(stream)
        every_frame = fps <= 0 or math.isinf(fps) or (rate is not None and fps >= float(rate))
        start_pts = stream.start_time or 0
        damage = _Damage()
        next_k = 0
        index = -1
        for frame in _decoded_frames(container, stream, damage):
            index += 1
            t = _timestamp(frame, index, start_pts, stream.time_base, rate)
            if not every_frame and not math.isnan(t):
                if t < next_k / fps - _EPS:
                    continue
                # Jump past t, not just to k + 1: after a gap in the stream one frame stands in for
                # every missed sample instead of a burst of the same frame.
                next_k = math.floor(t * fps + _EPS) + 1
            _check_pixels(frame.width, frame.height, max_pixels, index=index)
            yield VideoFrame(frame_index=index, timestamp_s=t, image=_to_rgb(frame))
        if damage.packets:
            raise InputError("corrupt_video", damage.describe(num_decoded=index + 1))


@dataclass
class _Damage:
    """What went wrong while decoding, kept so the error can be raised after the good frames."""

    packets: int = 0
    first_at_s: float | None = None
    first_error: str = ""
    gave_up: str = ""

    def note(self, packet: av.Packet | None, error: str) -> None:
        self.packets += 1
        if self.packets == 1:
            self.first_error = error
            if packet is not None and packet.pts is not None and packet.time_base is not None:
                self.first_at_s = float(packet.pts * packet.time_base)

    def describe(self, num_decoded: int) -> str:
        where = f" at {self.first_at_s:.3f}s" if self.first_at_s is not None else ""
        text = f"{self.packets} damaged packet(s), first{where}: {self.first_error}; {num_decoded} frames decoded"
        return f"{text}; stopped: {self.gave_up}" if self.gave_up else text


def _decoded_frames(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, damage: _Damage
) -> Iterator[av.VideoFrame]:
    """Frames in presentation order, decoding past damaged packets the way players do (the decoder
    resynchronises at the next keyframe), and recording the damage instead of raising."""
    packets = container.demux(stream)
    consecutive_failures = 0
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            return
        except av.FFmpegError as exc:
            # The container cannot be read past here; frames the decoder still holds are good.
            damage.note(None, f"demuxing failed: {exc}")
            damage.gave_up = "container unreadable from here"
            try:
                yield from stream.codec_context.decode(None)
            except av.FFmpegError:
                pass
            return
        if packet.is_corrupt:  # e.g. the last packet of a truncated mp4, cut part way
            damage.note(packet, "truncated or damaged packet")
        try:
            frames = packet.decode()
        except av.FFmpegError as exc:
            damage.note(packet, str(exc))
            consecutive_failures += 1
            if consecutive_failures >= _MAX_CONSECUTIVE_FAILURES:
                damage.gave_up = f"{consecutive_failures} packets in a row failed to decode"
                return
            continue
        consecutive_failures = 0
        yield from frames


def probe_video(source: VideoSource) -> dict[str, Any]:
    """Container metadata without decoding: fps, num_frames (an estimate), duration_s, width and
    height (as stored, before any display rotation), codec. For planning and progress bars, never
    for correctness: containers lie (mkv stores no frame count, variable-rate video has no one fps)."""
    with _open(source) as container:
        stream = _video_stream(container)
        rate = _stream_rate(stream)
        duration_s: float | None = None
        if stream.duration is not None and stream.time_base is not None:
            duration_s = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration_s = container.duration / av.time_base
        num_frames = stream.frames or None
        if num_frames is None and duration_s is not None and rate is not None:
            num_frames = round(duration_s * float(rate))
        return {
            "fps": float(rate) if rate is not None else None,
            "num_frames": num_frames,
            "duration_s": duration_s,
            "width": stream.codec_context.width,
            "height": stream.codec_context.height,
            "codec": stream.codec_context.name,
        }


def _open(source: VideoSource) -> av.container.InputContainer:
    try:
        # Non-UTF-8 metadata (old cameras, hand-edited tags) must not make a playable video fail.
        return av.open(source, mode="r", metadata_errors="replace")
    except av.FFmpegError as exc:
        if isinstance(exc, OSError):  # missing file, permissions: the object, not its content
            raise InputError("read_failed", f"cannot open video: {exc}") from exc
        if _is_empty(source):
            raise InputError("empty_file", "the file is empty (0 bytes)") from exc
        raise InputError("corrupt_video", f"not a readable video container: {exc}") from exc


def _video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream:
    if not container.streams.video:
        kinds = ", ".join(
            f"{s.type}/{s.codec_context.name if s.codec_context else '?'}" for s in container.streams
        )
        raise InputError("no_video_stream", f"container has no video stream (streams: {kinds or 'none'})")
    return container.streams.video[0]


def _stream_rate(stream: av.video.stream.VideoStream) -> Fraction | None:
    rate = stream.average_rate or stream.guessed_rate
    return rate if rate else None


def _timestamp(
    frame: av.VideoFrame, index: int, start_pts: int, time_base: Fraction | None, rate: Fraction | None
) -> float:
    if frame.pts is not None and time_base is not None:
        return float((frame.pts - start_pts) * time_base)
    if rate is not None:
        return index / float(rate)
    # No timing at all (raw elementary streams can be like this): sampling by time is impossible,
    # so the caller gets every frame, honestly stamped as unknown.
    return math.nan


def _check_pixels(width: int, height: int, max_pixels: int, *, index: int | None = None) -> None:
    if width * height > max_pixels:
        where = "video" if index is None else f"frame {index}"
        raise InputError(
            "too_many_pixels", f"{where} is {width}x{height} = {width * height} pixels, limit {max_pixels}"
        )


def _to_rgb(frame: av.VideoFrame) -> np.ndarray:
    image = frame.to_ndarray(format="rgb24")
    # Phones record portrait video as landscape pixels plus a display matrix; players (and the
    # people who label the footage) rotate it, so the detector should too, like EXIF for stills.
    quarter_turns = round((frame.rotation or 0) / 90) % 4
    if quarter_turns:
        image = np.rot90(image, k=quarter_turns)
    return np.ascontiguousarray(image)


def _is_empty(source: VideoSource) -> bool:
    try:
        if isinstance(source, (str, os.PathLike)):
            return os.path.getsize(source) == 0
        position = source.tell()
        source.seek(0, os.SEEK_END)
        size = source.tell()
        source.seek(position)
        return size == 0
    except (OSError, ValueError, AttributeError):
        return False
