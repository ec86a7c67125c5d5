"""How one detect run's boxes sit on the labelled plates: are loose boxes biased (a correction would help)
or scattered (only a better model would)?

    platescope detect --input DIR --output OUT --run-id r --threshold 0.0 [--ground-truth GT]
    python scripts/box_fit.py OUT/r GT [--min-score 0.3] [--min-iou 0.3]

For each labelled box, the detection (scoring at least --min-score) that overlaps it most, if the
overlap reaches --min-iou; rows and labels are matched as `evaluate` matches them. Printed: how many
matched, their IoU (median, share at 0.75 or more), and the median and quartiles of log(width ratio),
log(height ratio) and the centre's offset in box widths / heights (detection minus label).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pyarrow.parquet as pq

from platescope.detectors.geometry import xyxy_to_xywh
from platescope.evaluation.cocoeval import box_iou
from platescope.evaluation.groundtruth import read_ground_truth
from platescope.evaluation.matching import ImageMatcher


def matched_pairs(run: str, ground_truth: str, min_score: float, min_iou: float):
    """(iou, detection xywh, label xywh) for each labelled box whose best detection is close enough."""
    with open(os.path.join(run, "config.json"), encoding="utf-8") as f:
        inputs = json.load(f)["input"]
    gt = read_ground_truth(ground_truth)
    matcher = ImageMatcher([image.key for image in gt.images], inputs)
    pairs = []
    for row in pq.read_table(os.path.join(run, "data")).to_pylist():
        index = matcher.match(row["source_uri"])
        if row["error"] or index is None:
            continue
        image = gt.images[index]
        boxes = np.asarray(row["boxes"], np.float64).reshape(-1, 4)[np.asarray(row["scores"]) >= min_score]
        if not len(boxes) or not len(image.boxes_xywh):
            continue
        xywh = xyxy_to_xywh(boxes)
        iou = box_iou(xywh, image.boxes_xywh, np.zeros(len(image.boxes_xywh), bool))
        for label in range(len(image.boxes_xywh)):
            best = int(iou[:, label].argmax())
            if iou[best, label] >= min_iou:
                pairs.append((iou[best, label], xywh[best], image.boxes_xywh[label]))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a detect run folder")
    parser.add_argument("ground_truth")
    parser.add_argument("--min-score", type=float, default=0.3)
    parser.add_argument("--min-iou", type=float, default=0.3)
    args = parser.parse_args()

    pairs = matched_pairs(args.run, args.ground_truth, args.min_score, args.min_iou)
    if not pairs:
        raise SystemExit(f"{args.run}: no detection overlaps a label by IoU {args.min_iou}")
    iou = np.array([p[0] for p in pairs])
    det, lab = np.array([p[1] for p in pairs]), np.array([p[2] for p in pairs])
    print(f"matched {len(pairs)}; IoU median {np.median(iou):.2f}, at 0.75 or more {np.mean(iou >= 0.75):.0%}")
    measures = {
        "log(width ratio)": np.log(det[:, 2] / lab[:, 2]),
        "log(height ratio)": np.log(det[:, 3] / lab[:, 3]),
        "centre x offset / width": (det[:, 0] + det[:, 2] / 2 - lab[:, 0] - lab[:, 2] / 2) / lab[:, 2],
        "centre y offset / height": (det[:, 1] + det[:, 3] / 2 - lab[:, 1] - lab[:, 3] / 2) / lab[:, 3],
    }
    for name, values in measures.items():
        q1, median, q3 = np.percentile(values, [25, 50, 75])
        print(f"{name}: median {median:+.3f}, quartiles {q1:+.3f} .. {q3:+.3f}")


if __name__ == "__main__":
    main()
