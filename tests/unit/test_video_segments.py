"""A video decoded in time segments gives exactly the frames of one sequential decode: the same
sampled frames, frame indices and timestamps, none twice at a join and none missing, whatever the
container, GOP, B-frames or frame timing."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from platescope.sources import InputError
from platescope.sources.video import iter_video_frames, probe_video, segment_bounds


def _encoder() -> str:
    for name in ("libx264", "mpeg4"):
        try:
            av.codec.Codec(name, "w")
            return name
        except ValueError:
            continue
    raise RuntimeError("no encoder")


def write(path: Path, *, seconds: float, rate: int = 10, gop: int = 12, bframes: int = 2,
          vfr: bool = False, options: dict | None = None) -> Path:
    """A moving gradient, every frame different, so a frame out of place shows in the pixels."""
    encoder = _encoder()
    num = int(seconds * rate)
    with av.open(str(path), mode="w", options=options or {}) as container:
        stream = container.add_stream(encoder, rate=rate)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.gop_size = gop
        if encoder == "libx264":
            stream.codec_context.options = {"bf": str(bframes), "sc_threshold": "0", "keyint_min": str(gop)}
        if vfr:
            stream.codec_context.time_base = Fraction(1, 1000)
        pts_ms = 0
        rng = np.random.default_rng(0)
        for i in range(num):
            image = np.zeros((48, 64, 3), np.uint8)
            image[:, :, 0] = (np.arange(64)[None, :] * 4 + i * 7) % 256
            image[:, :, 1] = (i * 11) % 256
            image[(i % 48), :, 2] = 255
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if vfr:
                frame.pts = pts_ms
                frame.time_base = Fraction(1, 1000)
                pts_ms += int(rng.choice([40, 70, 100, 150]))
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def rows(path: Path, fps: float, start: float | None = None, end: float | None = None) -> list[tuple]:
    return [(f.frame_index, round(f.timestamp_s, 6), f.image.tobytes())
            for f in iter_video_frames(str(path), name="v", fps=fps, start_s=start, end_s=end)]


def segmented(path: Path, fps: float, segment_s: float) -> tuple[list[tuple], int]:
    duration = probe_video(str(path))["duration_s"]
    bounds = segment_bounds(duration, fps, segment_s)
    out = []
    for start, end in bounds:
        out.extend(rows(path, fps, start or None, end))
    return out, len(bounds)


CASES = {
    "constant-rate, B-frames, GOP 12": dict(seconds=12),
    "long GOP (one keyframe)": dict(seconds=12, gop=300),
    "short GOP, no B-frames": dict(seconds=12, gop=3, bframes=0),
    "variable rate": dict(seconds=12, vfr=True),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("fps,segment_s", [(2, 3.0), (1, 2.5), (3, 1.0), (0, 4.0)])
def test_segments_equal_the_sequential_decode(tmp_path, case, fps, segment_s):
    path = write(tmp_path / "v.mp4", **CASES[case])
    whole = rows(path, fps)
    parts, num_segments = segmented(path, fps, segment_s)
    assert num_segments >= 3
    assert [r[:2] for r in parts] == [r[:2] for r in whole]
    assert parts == whole


@pytest.mark.parametrize("container,options", [("mkv", {}), ("mp4", {"movflags": "frag_keyframe+empty_moov"})],
                         ids=["mkv", "fragmented-mp4"])
def test_containers_without_a_keyframe_index_still_split_exactly(tmp_path, container, options):
    path = write(tmp_path / f"v.{container}", seconds=12, gop=25, options=options)
    assert segmented(path, 2, 3.0)[0] == rows(path, 2)


def test_sampling_takes_the_first_frame_at_or_after_each_sample_time(tmp_path):
    path = write(tmp_path / "v.mp4", seconds=6)
    frames = rows(path, 3)
    assert [r[0] for r in frames] == [0, 4, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40, 44, 47, 50, 54, 57]
    assert [r[1] for r in frames[:4]] == [0.0, 0.4, 0.7, 1.0]


def test_segment_bounds_are_multiples_of_the_sample_period_and_the_last_is_open():
    assert segment_bounds(10.0, 2, 3.0) == [(0.0, 3.0), (3.0, 6.0), (6.0, 9.0), (9.0, None)]
    assert segment_bounds(10.0, 3, 1.0) == [(i / 1.0, (i + 1) / 1.0 if i < 9 else None) for i in range(10)]
    (only,) = segment_bounds(2.0, 1, 60.0)
    assert only == (0.0, None)
    # 0.3 fps: a sample every 3.33 s, so 60 s segments hold 18 samples each
    start, end = segment_bounds(200.0, 0.3, 60.0)[1]
    assert round(start * 0.3) == 18 and round(end * 0.3) == 36


def test_a_video_damaged_in_the_middle(tmp_path):
    path = write(tmp_path / "v.mp4", seconds=12, gop=10)
    good = rows(path, 2)
    data = bytearray(path.read_bytes())
    # Overwrite packets in the middle of the file with noise (the index at its end stays intact).
    with av.open(str(path)) as c:
        packets = sorted((p.pos, p.size, float(p.pts * p.time_base)) for p in c.demux(video=0) if p.size)
    hit = [p for p in packets if 5.5 <= p[2] < 6.5]
    noise = np.random.default_rng(0)
    for pos, size, _ in hit:
        data[pos: pos + size] = noise.integers(0, 256, size, dtype=np.uint8).tobytes()
    damaged = tmp_path / "damaged.mp4"
    damaged.write_bytes(bytes(data))

    outcomes = []
    for start, end in segment_bounds(12.0, 2, 3.0):
        got = []
        try:
            for f in iter_video_frames(str(damaged), name="v", fps=2, start_s=start or None, end_s=end):
                got.append((f.frame_index, round(f.timestamp_s, 6), f.image.tobytes()))
            error = None
        except InputError as e:
            error = e.kind
        outcomes.append((got, error))
    # Segments away from the damage are untouched; the two it spans keep every frame that decoded
    # (exactly the sequential decode's in their ranges) and each says it was damaged.
    in_range = lambda lo, hi: [r for r in good if lo <= r[1] < hi]  # noqa: E731
    assert outcomes[0] == (in_range(0, 3), None)
    assert outcomes[3] == (in_range(9, 99), None)
    sequential = []
    with pytest.raises(InputError):
        for f in iter_video_frames(str(damaged), name="v", fps=2):
            sequential.append((f.frame_index, round(f.timestamp_s, 6), f.image.tobytes()))
    assert [outcome[1] for outcome in outcomes[1:3]] == ["corrupt_video", "corrupt_video"]
    assert outcomes[1][0] == [r for r in sequential if 3 <= r[1] < 6]
    assert outcomes[2][0] == [r for r in sequential if 6 <= r[1] < 9]
    assert len(sequential) < len(good)  # the damage did cost frames


@pytest.mark.shared_data
@pytest.mark.parametrize("name", ["uk_roundabout.mp4", "vn_traffic_cam.mp4"])
@pytest.mark.parametrize("fps", [2, 5])
def test_real_footage_splits_exactly(shared_data_dir, name, fps):
    path = shared_data_dir / "footage" / name
    parts, num_segments = segmented(path, fps, 1.0)
    assert num_segments >= 4
    assert parts == rows(path, fps)
