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
    """One sampled frame. `frame_index` is the frame's number from the start of the stream, derived
    from its presentation time and the stream's average rate, so it is the same whether the video is
    decoded whole or in time segments, and stays true across damage; `timestamp_s` is the
    presentation time from the stream's start. (A variable-rate stream's index is the nearest
    frame of its average rate.)"""

    frame_index: int
    timestamp_s: float
    image: np.ndarray


def iter_video_frames(
    source: VideoSource, *, name: str, fps: float, max_pixels: int = DEFAULT_MAX_PIXELS,
    start_s: float | None = None, end_s: float | None = None, thread_type: str = "AUTO",
    skip_frame: str = "DEFAULT",
) -> Iterator[VideoFrame]:
    """Yield the first frame at or after each k/fps seconds (k = 0, 1, ...), as upright RGB.

    `fps <= 0`, or at least the stream's own rate, yields every frame. `start_s` and `end_s` limit
    it to one time segment: the decoder seeks to the keyframe at or before `start_s` and stops at
    `end_s`. Segments whose bounds are multiples of 1/fps (`segment_bounds`) split the samples of a
    whole decode exactly: the sampling rule only compares a frame with the one before it, and a
    segment's first frame is always a sample. Damaged data (a truncated upload, a broken packet)
    ends in `InputError("corrupt_video")` raised after the last frame that could be decoded: frames
    already yielded are good and the caller keeps them, and the damage is never a silent gap. `name`
    is accepted for symmetry with `decode_image`; messages leave it out because the caller prefixes
    the input's URI. Errors of a file object's own `read` (network, credentials) propagate as they
    are, for the storage layer to report.

    `thread_type` and `skip_frame` are FFmpeg's decoder settings. `platescope bench video
    --decode-options` measures them on real footage and checks that the sampled frames stay
    identical. The defaults are what that measurement kept: every threading mode gives the same
    frames (auto: 1.1-1.45x faster than one thread, for more CPU), and skipping frames does not.
    """
    if math.isnan(fps):
        raise ValueError("fps must be a number (<= 0 or inf for every frame)")
    with _open(source) as container:
        stream = _video_stream(container)
        codec = stream.codec_context
        codec.thread_type = thread_type
        codec.skip_frame = skip_frame
        _check_pixels(codec.width, codec.height, max_pixels)

        rate = _stream_rate(stream)
        every_frame = fps <= 0 or math.isinf(fps) or (rate is not None and fps >= float(rate))
        window = _Window(start_s, end_s, None if every_frame else fps)
        start_pts = stream.start_time or 0
        damage = _Damage(until_s=end_s)
        last_sample = window.first_sample - 1
        num_decoded = 0
        for t, frame in _frames_from(container, stream, damage, start_s, start_pts, rate):
            num_decoded += 1
            where = window.where(t)
            if where < 0:
                continue
            if where > 0:
                break  # past the segment: nothing after it is ours (damage there is not counted)
            if not every_frame and not math.isnan(t):
                sample = window.sample_of(t)
                if sample <= last_sample:
                    continue
                # One frame stands in for every sample a gap in the stream skipped, not a burst.
                last_sample = sample
            index = round(t * float(rate)) if rate is not None and not math.isnan(t) else num_decoded - 1
            _check_pixels(frame.width, frame.height, max_pixels, index=index)
            yield VideoFrame(frame_index=index, timestamp_s=t, image=_to_rgb(frame))
        if damage.packets:
            raise InputError("corrupt_video", damage.describe(num_decoded=num_decoded))


def read_frame(source: VideoSource, *, frame_index: int, timestamp_s: float,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The upright RGB frame a sampled row came from (its `frame_index` and `timestamp_s`), decoded
    again by seeking to the keyframe before it: what a crop of a row's box needs, without keeping
    frames while the video is sampled. InputError("frame_not_found") when the video has no such frame
    (it changed since it was sampled)."""
    # Every frame of a window narrower than any frame interval: just the one at timestamp_s.
    for frame in iter_video_frames(source, name="", fps=0, max_pixels=max_pixels, start_s=timestamp_s,
                                   end_s=timestamp_s + _ONE_FRAME_S):
        if frame.frame_index == frame_index:
            return frame.image
    raise InputError("frame_not_found", f"no frame {frame_index} at {timestamp_s:.6f}s")


# Narrower than the interval between frames of any video (a 1000 fps camera's is 1 ms).
_ONE_FRAME_S = 5e-4


def segment_bounds(duration_s: float, fps: float, segment_s: float) -> list[tuple[float, float | None]]:
    """[start, end) time segments of about `segment_s` covering a video of `duration_s`, each bound a
    multiple of 1/fps so that segments split its samples exactly; the last is open-ended, so frames
    past a header's duration are never lost. One segment for a short video (or every-frame sampling
    with fps <= 0, where bounds on whole seconds do the same job)."""
    step = 1.0 / fps if fps > 0 and not math.isinf(fps) else 1.0
    samples_per_segment = max(1, round(segment_s / step))
    num = max(1, math.ceil(duration_s / (samples_per_segment * step) - _EPS))
    bounds: list[tuple[float, float | None]] = []
    for i in range(num):
        start = i * samples_per_segment * step
        end = (i + 1) * samples_per_segment * step if i < num - 1 else None
        bounds.append((start, end))
    return bounds


@dataclass
class _Window:
    """Which frames a segment owns. With sampling, by sample number floor((t + eps) * fps), the same
    numbering the sampling rule uses, so no frame can fall between two segments or into both."""

    start_s: float | None
    end_s: float | None
    fps: float | None  # None: every frame, bounds compared in seconds

    @property
    def first_sample(self) -> int:
        return 0 if self.start_s is None or self.fps is None else round(self.start_s * self.fps)

    def sample_of(self, t: float) -> int:
        assert self.fps is not None
        return math.floor((t + _EPS) * self.fps)

    def where(self, t: float) -> int:
        """-1 before the segment, 0 in it, 1 after it."""
        if math.isnan(t):
            return 0
        if self.fps is not None:
            sample = self.sample_of(t)
            if self.start_s is not None and sample < round(self.start_s * self.fps):
                return -1
            if self.end_s is not None and sample >= round(self.end_s * self.fps):
                return 1
            return 0
        if self.start_s is not None and t + _EPS < self.start_s:
            return -1
        if self.end_s is not None and t + _EPS >= self.end_s:
            return 1
        return 0


# How far before a segment's start a seek retries when the container landed after it (no keyframe
# index, as in an mkv without cues or a fragmented mp4); past the last, it decodes from the start.
_SEEK_MARGINS_S = (0.0, 2.0, 10.0, 60.0)


def _frames_from(container: av.container.InputContainer, stream: av.video.stream.VideoStream, damage: _Damage,
                 start_s: float | None, start_pts: int, rate: Fraction | None) -> Iterator[tuple[float, av.VideoFrame]]:
    """(presentation time, frame) in order from the keyframe at or before `start_s`.

    A seek is trusted only if its first frame is at or before `start_s`: a container without a
    keyframe index may land later, which would lose frames silently, so the seek is retried earlier
    and finally replaced by decoding from the start, which is slow but always right.
    """
    time_base = stream.time_base

    def timed(frames: Iterator[av.VideoFrame]) -> Iterator[tuple[float, av.VideoFrame]]:
        for count, frame in enumerate(frames):
            yield _timestamp(frame, count, start_pts, time_base, rate), frame

    if not start_s or time_base is None:
        yield from timed(_decoded_frames(container, stream, damage))
        return
    for margin in _SEEK_MARGINS_S:
        target = start_s - margin
        if target <= 0:
            break
        try:
            container.seek(start_pts + int(target / time_base), stream=stream, backward=True, any_frame=False)
        except av.FFmpegError:
            break
        stream.codec_context.flush_buffers()
        frames = timed(_decoded_frames(container, stream, damage))
        first = next(frames, None)
        if first is None:
            return
        if not math.isnan(first[0]) and first[0] <= start_s + _EPS:
            yield first
            yield from frames
            return
    container.seek(start_pts, stream=stream, backward=True, any_frame=False)
    stream.codec_context.flush_buffers()
    yield from timed(_decoded_frames(container, stream, damage))


@dataclass
class _Damage:
    """What went wrong while decoding, kept so the error can be raised after the good frames."""

    until_s: float | None = None  # a segment's end: damage from there on is the next segment's
    packets: int = 0
    first_at_s: float | None = None
    first_error: str = ""
    gave_up: str = ""

    def note(self, packet: av.Packet | None, error: str) -> None:
        at_s = None
        if packet is not None and packet.pts is not None and packet.time_base is not None:
            at_s = float(packet.pts * packet.time_base)
        if self.until_s is not None and at_s is not None and at_s >= self.until_s:
            return
        self.packets += 1
        if self.packets == 1:
            self.first_error = error
            self.first_at_s = at_s

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
