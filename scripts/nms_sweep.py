"""Score one detect run's boxes under several NMS settings, without running the model again.

    platescope detect --input DIR --output OUT --run-id all-boxes --threshold 0.0 nms_merge=false
    python scripts/nms_sweep.py OUT/all-boxes GROUND_TRUTH [--iou 0.4,0.5,0.6,0.7] [--threshold 0.0]

The run must keep every box the model gives (threshold 0, no NMS). For each setting its rows are
post-processed as `detect` would (`detectors.postprocess.finish`: plain NMS on the boxes above the
threshold, merging NMS on all of them) and scored by `evaluate`, so each line is what
`detect --threshold T --nms-iou X [--nms-merge] --ground-truth GROUND_TRUTH` reports.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from platescope.config import EvaluateConfig
from platescope.detectors.postprocess import candidate_threshold, finish
from platescope.evaluation.result import COCO_METRIC_NAMES
from platescope.evaluation.run import run_evaluate


def rescore(table: pa.Table, *, threshold: float, nms_iou: float | None, nms_merge: bool,
            candidates: float = 0.0) -> pa.Table:
    rows = table.to_pylist()
    for row in rows:
        if row["error"]:
            continue
        boxes = np.asarray(row["boxes"], np.float32).reshape(-1, 4)
        scores = np.asarray(row["scores"], np.float32)
        label_ids = np.asarray(row["label_ids"], np.int64)
        names = dict(zip(row["label_ids"], row["labels"]))
        keep = scores > max(candidates, candidate_threshold(threshold, nms_merge))
        found = finish(boxes[keep], scores[keep], label_ids[keep], image_size=(row["height"], row["width"]),
                       padded=False, threshold=threshold, nms_iou=nms_iou, nms_merge=nms_merge, id2label=names)
        row.update(boxes=found.boxes.tolist(), scores=found.scores.tolist(),
                   label_ids=found.label_ids.tolist(), labels=found.labels)
    return pa.Table.from_pylist(rows, schema=table.schema)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a detect run folder made with --threshold 0.0 nms_merge=false")
    parser.add_argument("ground_truth")
    parser.add_argument("--iou", default="0.4,0.5,0.6,0.7", help="NMS IoU thresholds, comma-separated")
    parser.add_argument("--threshold", type=float, default=0.0, help="score threshold applied as detect would")
    parser.add_argument("--candidates", type=float, default=0.0,
                        help="what-if: NMS sees only boxes scoring above this (detect's merge sees all)")
    args = parser.parse_args()

    with open(os.path.join(args.run, "config.json"), encoding="utf-8") as f:
        made_with = json.load(f)
    if made_with["threshold"] != 0.0 or made_with.get("nms_iou") is not None:
        raise SystemExit(f"{args.run}: made with threshold {made_with['threshold']} and nms_iou "
                         f"{made_with.get('nms_iou')}; rerun detect with --threshold 0.0 nms_merge=false")
    table = pq.read_table(os.path.join(args.run, "data"))
    settings = [(None, False)] + [(float(x), merge) for x in args.iou.split(",") for merge in (False, True)]
    print("| setting | " + " | ".join(COCO_METRIC_NAMES) + " | precision / recall at 0.5 |")
    print("| --- " * (len(COCO_METRIC_NAMES) + 2) + "|")
    with tempfile.TemporaryDirectory() as tmp:
        for nms_iou, merge in settings:
            out = os.path.join(tmp, f"{nms_iou}-{merge}")  # a run folder: its config names the inputs
            os.makedirs(os.path.join(out, "data"))
            shutil.copy(os.path.join(args.run, "config.json"), out)
            pq.write_table(rescore(table, threshold=args.threshold, nms_iou=nms_iou, nms_merge=merge,
                                   candidates=args.candidates),
                           os.path.join(out, "data", "part.parquet"))
            metrics = run_evaluate(EvaluateConfig(detections=out, ground_truth=args.ground_truth)).metrics
            name = "no NMS" if nms_iou is None else f"nms_iou={nms_iou}" + (" nms_merge=true" if merge else "")
            print(f"| {name} | " + " | ".join(f"{metrics[c]:.3f}" for c in COCO_METRIC_NAMES)
                  + f" | {metrics['precision']:.3f} / {metrics['recall']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
