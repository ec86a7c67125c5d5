"""scripts/nms_sweep.py: each line it prints is what `detect --ground-truth` reports with that setting."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from platescope import samples
from platescope.evaluation.result import COCO_METRIC_NAMES

CLI = [sys.executable, "-m", "platescope.cli"]
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "nms_sweep.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*map(str, args)], check=False, capture_output=True, text=True, timeout=300)


def sweep_rows(stdout: str) -> dict[str, list[float]]:
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == len(COCO_METRIC_NAMES) + 2 and cells[1][:1].isdigit():
            rows[cells[0]] = [float(c) for c in cells[1:-1]]
    return rows


def test_the_sweep_gives_what_detect_gives_with_each_setting(tmp_path):
    images = tmp_path / "images"
    labels = samples.write_image_dataset(str(images), 6, seed=5, size=(640, 360))
    moved = tmp_path / "labels.json"  # beside, not among, the images
    labels.rename(moved)
    out = tmp_path / "out"
    common = ["detect", "--input", images, "--output", out, "--threshold", "0.0", "--ground-truth", moved,
              "--no-progress"]
    every_box = run(*CLI, *common, "--run-id", "every-box", "nms_merge=false")
    assert every_box.returncode == 0, every_box.stderr[-3000:]
    merged = run(*CLI, *common, "--run-id", "merged")  # the bundled model's own NMS: merging at IoU 0.4
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert json.loads((out / "merged" / "config.json").read_text())["nms_merge"] is True

    swept = run(sys.executable, SCRIPT, out / "every-box", moved, "--iou", "0.4,0.6")
    assert swept.returncode == 0, swept.stderr[-3000:]
    rows = sweep_rows(swept.stdout)
    assert set(rows) == {"no NMS", "nms_iou=0.4", "nms_iou=0.4 nms_merge=true", "nms_iou=0.6",
                         "nms_iou=0.6 nms_merge=true"}
    for run_id, row in (("every-box", "no NMS"), ("merged", "nms_iou=0.4 nms_merge=true")):
        metrics = json.loads((out / run_id / "evaluation" / "metrics.json").read_text())
        assert rows[row] == [round(metrics[n], 3) for n in COCO_METRIC_NAMES], run_id
    assert rows["nms_iou=0.4 nms_merge=true"][1] > 0.5  # the bundled model finds these plates: a real check

    refused = run(sys.executable, SCRIPT, out / "merged", moved)
    assert refused.returncode != 0 and "nms_iou 0.4" in refused.stderr
