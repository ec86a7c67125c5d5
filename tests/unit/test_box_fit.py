"""scripts/box_fit.py: the bias and spread it reports are those of the boxes it is given."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from platescope import samples

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "box_fit.py"


def test_boxes_a_quarter_too_tall_and_one_missed_are_reported_as_such(tmp_path):
    images = tmp_path / "images"
    labels = samples.write_image_dataset(str(images), 4, seed=2, size=(640, 360))
    coco = json.loads(labels.read_text())
    rows = []
    for image in coco["images"]:
        boxes, scores = [], []
        for a in (a for a in coco["annotations"] if a["image_id"] == image["id"]):
            x, y, w, h = a["bbox"]
            boxes += [x, y - h / 8, x + w, y + h + h / 8]  # centred, 1.25 times as tall
            scores.append(0.9)
        boxes += [0, 0, 5, 5]  # far from every plate
        scores.append(0.95)
        rows.append({"source_uri": str(images / image["file_name"]), "error": None, "boxes": boxes,
                     "scores": scores})
    rows[0]["scores"] = [0.1] * len(rows[0]["scores"])  # below --min-score: its plates are not matched
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"input": [str(images)]}))
    pq.write_table(pa.Table.from_pylist(rows), run / "data" / "part.parquet")

    done = subprocess.run([sys.executable, str(SCRIPT), str(run), str(labels)], check=False, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    first = coco["images"][0]["id"]
    expected = sum(1 for a in coco["annotations"] if a["image_id"] != first)
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"matched {expected};") and "IoU median 0.80" in lines[0], lines[0]
    assert lines[2] == f"log(height ratio): median {np.log(1.25):+.3f}, quartiles {np.log(1.25):+.3f} .. " \
                       f"{np.log(1.25):+.3f}", lines[2]
    assert lines[1].startswith("log(width ratio): median +0.000") and "offset / height: median +0.000" in lines[4]
