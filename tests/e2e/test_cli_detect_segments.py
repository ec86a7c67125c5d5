"""`platescope detect` killed part-way through one long video resumes by segment: the segments
finished before the kill are kept as they are, the rest is done, and no frame is there twice."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq

from platescope import samples

CLI = [sys.executable, "-m", "platescope.cli"]
NUM_SEGMENTS = 12


def test_a_killed_run_keeps_its_finished_segments_and_does_the_rest(tmp_path, tiny_model):
    inputs = tmp_path / "inputs"
    samples.write_long_video(inputs / "cam.mp4", seconds=180, size=(1280, 720), fps=5)
    out = tmp_path / "out"
    args = [*CLI, "detect", "--input", str(inputs), "--model", tiny_model, "--output", str(out), "--run-id", "cam",
            "--video-fps", "2", "--batch-size", "4", "--no-progress", "video_segment_s=15", "num_actors_max=1"]
    done_dir = out / "cam" / "_done"
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 300  # Ray start-up and model load on a loaded machine
        while time.monotonic() < deadline and proc.poll() is None:
            if done_dir.exists() and len(list(done_dir.glob("*.json"))) >= 2:
                break
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
        proc.wait(timeout=30)
    kept = {p.stem: os.stat(out / "cam" / "data" / f"part-{p.stem}.parquet").st_mtime_ns
            for p in done_dir.glob("*.json")}
    print(f"{len(kept)} of {NUM_SEGMENTS} segments done at the kill")
    assert 2 <= len(kept) < NUM_SEGMENTS, f"the kill should land mid-video, found {len(kept)} segments done"
    assert not (out / "cam" / "summary.json").exists()

    again = subprocess.run(args, check=False, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((out / "cam" / "summary.json").read_text())
    assert summary["complete"] and summary["inputs"] == 1 and summary["shards"] == NUM_SEGMENTS
    assert summary["shards_resumed"] == len(kept)
    for shard, mtime in kept.items():  # finished segments were not redone
        assert os.stat(out / "cam" / "data" / f"part-{shard}.parquet").st_mtime_ns == mtime, shard
    frames = pq.read_table(out / "cam" / "data").column("frame_index").to_pylist()
    assert sorted(frames) == [math.ceil(k * 2.5) for k in range(360)]  # each sample once, none missing
