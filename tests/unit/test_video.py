from __future__ import annotations

import inspect
import io
from pathlib import Path

import av
import numpy as np
import pytest

from platescope import samples
from platescope.sources import InputError
from platescope.sources.video import VideoFrame, iter_video_frames, probe_video

NUM_FRAMES = 30  # at 10 fps: 3 seconds


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[float]]]:
    path = tmp_path_factory.mktemp("video") / "plate.mp4"
    boxes = samples.write_video(path, num_frames=NUM_FRAMES, fps=10, size=(160, 120), seed=7)
    return path, boxes


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("bad_inputs")
    return folder, samples.write_bad_inputs(folder)


def _sample(source, fps: float, max_pixels: int = 10**7) -> list[VideoFrame]:
    return list(iter_video_frames(source, name="test.mp4", fps=fps, max_pixels=max_pixels))


def test_fps_2_on_10fps_video_takes_every_fifth_frame(video):
    frames = _sample(video[0], fps=2)
    assert [f.frame_index for f in frames] == [0, 5, 10, 15, 20, 25]
    assert [f.timestamp_s for f in frames] == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5])


def test_fps_3_takes_first_frame_at_or_after_each_third_of_a_second(video):
    frames = _sample(video[0], fps=3)
    assert [f.frame_index for f in frames] == [0, 4, 7, 10, 14, 17, 20, 24, 27]


@pytest.mark.parametrize("fps", [0, -1, 10, 100, float("inf")])
def test_zero_negative_or_high_fps_gives_every_frame(video, fps):
    frames = _sample(video[0], fps=fps)
    assert [f.frame_index for f in frames] == list(range(NUM_FRAMES))
    assert [f.timestamp_s for f in frames] == pytest.approx([i / 10 for i in range(NUM_FRAMES)])


def test_frames_are_rgb_and_show_the_moving_plate(video):
    path, boxes = video
    frames = _sample(path, fps=0)
    first, last = frames[0].image, frames[-1].image
    assert first.shape == (120, 160, 3) and first.dtype == np.uint8
    x0, y0, x1, y1 = (int(v) for v in boxes[0])
    # The plate has left its first position by the last frame, so that region changed a lot.
    assert np.abs(first[y0:y1, x0:x1].astype(int) - last[y0:y1, x0:x1].astype(int)).mean() > 20


def test_file_objects_work_like_paths(video):
    path = video[0]
    from_path = _sample(path, fps=2)
    with open(path, "rb") as handle:
        from_file = _sample(handle, fps=2)
    from_bytes = _sample(io.BytesIO(path.read_bytes()), fps=2)
    for other in (from_file, from_bytes):
        assert [f.frame_index for f in other] == [f.frame_index for f in from_path]
        assert all(np.array_equal(a.image, b.image) for a, b in zip(other, from_path))


def test_frames_stream_lazily_and_stop_cleanly(video):
    frames = iter_video_frames(video[0], name="plate.mp4", fps=0, max_pixels=10**7)
    assert inspect.isgenerator(frames)
    assert next(frames).frame_index == 0
    frames.close()  # closes the container; no error, nothing else decoded


@pytest.mark.parametrize(
    ("case", "kind"),
    [("corrupt_video", "corrupt_video"), ("audio_only_video", "no_video_stream")],
)
def test_unusable_videos_raise_their_kind(bad, case, kind):
    folder, cases = bad
    with pytest.raises(InputError) as info:
        _sample(folder / cases[case], fps=1)
    assert info.value.kind == kind


def test_truncated_video_keeps_good_frames_then_raises(bad):
    folder, cases = bad
    got = []
    with pytest.raises(InputError) as info:
        for frame in iter_video_frames(
            folder / cases["truncated_video"], name="t.mp4", fps=0, max_pixels=10**7
        ):
            got.append(frame.frame_index)
    assert info.value.kind == "corrupt_video"
    assert got == list(range(len(got))) and 0 < len(got) < 20
    assert f"{len(got)} frames decoded" in info.value.message


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(InputError) as info:
        _sample(tmp_path / "empty.mp4", fps=1)
    assert info.value.kind == "empty_file"
    with pytest.raises(InputError) as info:
        _sample(io.BytesIO(b""), fps=1)
    assert info.value.kind == "empty_file"
    with pytest.raises(InputError) as info:
        _sample(tmp_path / "missing.mp4", fps=1)
    assert info.value.kind == "read_failed"


def test_too_many_pixels_before_any_frame(video):
    with pytest.raises(InputError) as info:
        _sample(video[0], fps=1, max_pixels=160 * 120 - 1)
    assert info.value.kind == "too_many_pixels"
    assert "160x120" in info.value.message


def test_display_rotation_is_applied(tmp_path):
    path = tmp_path / "portrait.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        stream.set_display_rotation(-90)  # phones: "turn 90 degrees clockwise to show"
        stored = np.zeros((32, 64, 3), dtype=np.uint8)
        stored[:8, :8] = 255
        for packet in stream.encode(av.VideoFrame.from_ndarray(stored, format="rgb24")):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    (frame,) = _sample(path, fps=0)
    assert frame.image.shape == (64, 32, 3)
    assert frame.image[:6, -6:].mean() > 200 and frame.image[:6, :6].mean() < 50


def test_probe_video(video):
    info = probe_video(video[0])
    assert info["fps"] == pytest.approx(10)
    assert info["num_frames"] == NUM_FRAMES
    assert info["duration_s"] == pytest.approx(3.0, abs=0.11)
    assert (info["width"], info["height"]) == (160, 120)


def test_probe_reports_bad_inputs(bad):
    folder, cases = bad
    with pytest.raises(InputError) as info:
        probe_video(folder / cases["audio_only_video"])
    assert info.value.kind == "no_video_stream"


_PEAK_RSS_SCRIPT = """
import resource, sys
from platescope.sources.video import iter_video_frames
n = 0
for frame in iter_video_frames(sys.argv[1], name="v.mp4", fps=1000, max_pixels=10**8):
    n += 1
    if n == int(sys.argv[2]):
        break
print(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def _peak_rss(path: Path, num_frames: int) -> tuple[int, int]:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _PEAK_RSS_SCRIPT, str(path), str(num_frames)], check=True,
                         capture_output=True, text=True, timeout=120).stdout.split()
    return int(out[0]), int(out[1])


def test_memory_stays_at_a_few_frames_however_long_the_video(tmp_path):
    """Streaming decode: decoding 400 frames peaks no higher than decoding 20, give or take a few frames.

    Measured as a fresh process's peak RSS (the frames are allocated in C, out of tracemalloc's sight);
    holding the frames would add 400 x 0.7 MB.
    """
    path = tmp_path / "long.mp4"
    samples.write_video(path, num_frames=400, fps=25, size=(640, 360), seed=3)
    frame_bytes = 640 * 360 * 3
    short_n, short_peak = _peak_rss(path, 20)
    long_n, long_peak = _peak_rss(path, 400)
    assert (short_n, long_n) == (20, 400)
    growth = long_peak - short_peak
    assert growth < 30 * frame_bytes, f"peak grew {growth / 1e6:.1f} MB from 20 to 400 frames"
