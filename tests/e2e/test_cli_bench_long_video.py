"""`platescope bench video --long` on a small size: both runs cover the same frames, and the figures
hang together. Its timings are what it is for, and are never asserted here."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_long_video_runs_segments_and_the_whole_file(tmp_path, tiny_model):
    out = tmp_path / "figures.json"
    proc = subprocess.run([sys.executable, "-m", "platescope", "bench", "video", "--long", "--seconds", "40",
                           "--size", "320x240", "--video-fps", "1", "--segment-s", "10", "--model", tiny_model,
                           "--json", str(out)], check=False, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    f = json.loads(out.read_text())
    assert all(f"{key} " in proc.stdout for key in f)  # printed as well as written
    assert (f["segments_shards"], f["whole_shards"], f["frames"]) == (4, 1, 40)
    assert f["segments_footage_hours_per_hour"] == round(40 / f["segments_wall_s"], 2)
    assert f["speedup"] == round(f["whole_wall_s"] / f["segments_wall_s"], 3)
