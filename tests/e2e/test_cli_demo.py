"""The README's main command, `platescope demo`, and the bundled model it runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from platescope.models import default_model_dir


def test_the_bundled_model_is_small_and_records_how_it_was_trained():
    model = Path(default_model_dir())
    size = sum(p.stat().st_size for p in model.iterdir())
    assert size <= 30 * 2**20, f"{size / 2**20:.1f} MiB"
    info = json.loads((model / "platescope_training.json").read_text())
    runs = [info]  # its own run, then its base's (fine-tuned from a model trained here), back to a preset
    while runs[-1]["training_config"]["preset"] is None and len(runs) < 5:
        runs.append(runs[-1]["base_model"]["training"])
    assert runs[-1]["training_config"]["preset"] == "rtdetr-slim" and info["id2label"] == {"0": "licence_plate"}
    assert 0.0 <= info["val_metrics"]["map_50"] <= 1.0 and len(info["history"]) >= info["val_metrics"]["epoch"]


def test_demo_runs_the_main_job_offline_with_the_bundled_model(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "platescope", "demo", "--workdir", str(tmp_path / "demo")],
                          check=False, capture_output=True, text=True, timeout=400, cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert default_model_dir() in proc.stdout and "val AP50" in proc.stdout
    runs = list((tmp_path / "demo" / "output").iterdir())
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["images"] >= 24 and summary["frames"] > 0 and summary["errors"] > 0  # bad files count too
    config = json.loads((runs[0] / "config.json").read_text())
    assert config["model"] == default_model_dir()


@pytest.mark.shared_data
def test_the_bundled_model_finds_real_plates_where_an_untrained_one_does_not(shared_data_dir, tmp_path):
    """On real val images its boxes overlap the labelled plates; the same architecture untrained does
    not (a check that the shipped weights are trained, not a measure of accuracy)."""
    from PIL import Image

    from platescope.detectors.hf import HFDetector
    from platescope.detectors.presets import build_model_dir
    from platescope.evaluation.cocoeval import box_iou

    val = json.loads((shared_data_dir / "plates" / "val.json").read_text())
    images = val["images"][:12]
    pixels = [np.asarray(Image.open(shared_data_dir / "plates" / im["file_name"]).convert("RGB")) for im in images]

    def images_with_a_plate_found(model_dir: str) -> int:
        found = HFDetector(model_dir, threshold=0.3).detect(pixels)
        hits = 0
        for image, det in zip(images, found):
            gt = np.array([a["bbox"] for a in val["annotations"] if a["image_id"] == image["id"]], float)
            if len(det) and len(gt):
                xywh = np.column_stack([det.boxes[:, :2], det.boxes[:, 2:] - det.boxes[:, :2]]).astype(float)
                hits += int((box_iou(xywh, gt, np.zeros(len(gt), bool)) >= 0.5).any())
        return hits

    trained = images_with_a_plate_found(default_model_dir())
    untrained = images_with_a_plate_found(build_model_dir("rtdetr-slim", str(tmp_path / "untrained")))
    assert trained >= 4 and trained >= untrained + 3, (trained, untrained)
