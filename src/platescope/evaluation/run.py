"""The evaluate job: ground truth + a detections table -> metrics.json, report.md, report.html.

    labels file/folder --read once--> GroundTruth (in memory: it is the small side)
    detections table --labels pass--> label check (fails before the real pass)
                     --batches--> match row to image -> StreamingCocoEval.add -> gallery heap
    images with labels but no row --> added with no detections (missed)
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from platescope import storage
from platescope.config import EvaluateConfig
from platescope.detectors.geometry import xywh_to_xyxy, xyxy_to_xywh
from platescope.evaluation import metrics as metrics_mod
from platescope.evaluation.cocoeval import Boxes, StreamingCocoEval
from platescope.evaluation.detections import DetectionsError, DetectionsTable
from platescope.evaluation.groundtruth import (
    GroundTruth,
    GroundTruthError,
    GroundTruthImage,
    read_ground_truth,
)
from platescope.evaluation.matching import ImageMatcher
from platescope.evaluation.result import EvaluationResult, ImageExample

EXAMPLES_KEPT = 10


class LabelMismatchError(ValueError):
    """The detector's labels are not the ground truth's categories and no mapping says how they relate."""


# What bad input raises; each message is one line naming the input and the problem.
EVALUATION_ERRORS = (GroundTruthError, DetectionsError, LabelMismatchError)


def check_labels(found: set[str], categories: set[str], label_map: dict[str, str]) -> None:
    bad_targets = sorted(v for v in label_map.values() if v and v not in categories)
    if bad_targets:
        raise LabelMismatchError(f"label_map maps to {bad_targets}, which are not ground-truth categories "
                                 f"{sorted(categories)}")
    unknown = sorted(found - categories - set(label_map))
    if unknown:
        raise LabelMismatchError(
            f"detection labels {unknown} are not ground-truth categories; detections have {sorted(found)}, "
            f"ground truth has {sorted(categories)}; map them with label_map (e.g. --label-map "
            f"'{unknown[0]}={min(categories)}', or '{unknown[0]}=' to leave that label out)")


def _gt_boxes(image: GroundTruthImage) -> dict[int, Boxes]:
    out = {}
    for cat in np.unique(image.category_ids).tolist():
        sel = image.category_ids == cat
        out[cat] = Boxes(image.boxes_xywh[sel], image.areas[sel], iscrowd=image.iscrowd[sel].astype(bool))
    return out


def _dt_boxes(xyxy: np.ndarray, scores: np.ndarray, cats: np.ndarray) -> dict[int, Boxes]:
    xyxy = xyxy.astype(np.float64)
    xywh = xyxy_to_xywh(xyxy)
    out = {}
    for cat in np.unique(cats).tolist():
        if cat < 0:
            continue  # a label the mapping leaves out
        sel = cats == cat
        out[cat] = Boxes(xywh[sel], xywh[sel, 2] * xywh[sel, 3], scores=scores[sel])
    return out


class _Gallery:
    """The worst images seen so far (most missed plates plus false alarms), bounded in size."""

    def __init__(self, size: int) -> None:
        self.size, self._heap, self._tie = size, [], itertools.count()

    def wants(self, badness: tuple[int, int]) -> bool:
        """Whether an image this bad gets in (so its example is only built when it does)."""
        if self.size == 0 or badness <= (0, 0):
            return False
        return len(self._heap) < self.size or badness > self._heap[0][0]

    def add(self, badness: tuple[int, int], example: ImageExample) -> None:
        # Earlier images win ties: the tie-breaker falls as images arrive.
        entry = (badness, -next(self._tie), example)
        if len(self._heap) < self.size:
            heapq.heappush(self._heap, entry)
        else:
            heapq.heapreplace(self._heap, entry)

    def worst_first(self) -> list[ImageExample]:
        return [entry[2] for entry in sorted(self._heap, reverse=True)]


def run_evaluate(cfg: EvaluateConfig, ground_truth: GroundTruth | None = None) -> EvaluationResult:
    """Raises one of EVALUATION_ERRORS on bad input. `ground_truth`: labels already read (by a preflight)."""
    started = time.perf_counter()
    s3 = cfg.s3.options()
    gt = ground_truth or read_ground_truth(cfg.ground_truth, format=cfg.ground_truth_format, s3=s3)
    table = DetectionsTable.open(cfg.detections, s3)
    found_labels, num_rows = table.distinct_labels()
    if num_rows == 0:
        raise DetectionsError(f"detections {cfg.detections}: the table has no rows")
    names = dict(gt.categories)
    check_labels(found_labels, set(names.values()), cfg.label_map)

    state = _stream(cfg, gt, table, names)
    tables = state["evaluator"].compute()
    out: dict[str, Any] = metrics_mod.coco_metrics(tables, names)
    out["classes"] = [names[c] for c in tables.category_ids]
    out["per_class"] = metrics_mod.per_class(tables, state["evaluator"], names, state["per_class_counts"])
    out.update(metrics_mod.at_threshold(state["evaluator"]))
    out["counts"] = state["counts"]
    out["rows_without_ground_truth_examples"] = state["unmatched_examples"]
    out.update({"detections": cfg.detections, "ground_truth": cfg.ground_truth,
                "ground_truth_format": gt.format, "label_map": dict(cfg.label_map),
                "elapsed_s": round(time.perf_counter() - started, 3)})
    return EvaluationResult(
        metrics=out,
        pr_curves=metrics_mod.pr_curves(tables, names),
        threshold_curves=metrics_mod.threshold_curves(state["evaluator"], names),
        worst_images=state["gallery"].worst_first(),
    )


def _stream(cfg: EvaluateConfig, gt: GroundTruth, table: DetectionsTable, names: dict[int, str]) -> dict:
    evaluator = StreamingCocoEval(list(names), score_threshold=cfg.score_threshold)
    matcher = ImageMatcher([im.key for im in gt.images], cfg.input_root or table.input_roots)
    order = {im.image_id: i for i, im in enumerate(sorted(gt.images, key=lambda im: im.image_id))}
    name_to_cat = {name: cat for cat, name in names.items()}
    label_names = sorted(set(names.values()) | set(cfg.label_map))
    label_cat = np.array([name_to_cat.get(cfg.label_map.get(n, n), -1) for n in label_names] + [-1])
    seen = np.zeros(len(gt.images), dtype=bool)
    gallery = _Gallery(cfg.num_worst_images)
    counts = Counter()
    errors_by_kind: Counter = Counter()
    per_class_dt: Counter = Counter()
    unmatched: list[str] = []

    for batch in table.batches():
        n = batch.num_rows
        counts["rows"] += n
        uris = batch.column("source_uri").to_pylist()
        errs = batch.column("error").to_pylist()
        widths, heights = batch.column("width").to_pylist(), batch.column("height").to_pylist()
        boxes_col, scores_col = batch.column("boxes"), batch.column("scores")
        labels_col = batch.column("labels")
        # Each list column indexes its own flat values (equal lengths per row, offsets may differ).
        box_off, score_off, label_off = (c.offsets.to_numpy() for c in (boxes_col, scores_col, labels_col))
        xyxy = boxes_col.values.flatten().to_numpy(zero_copy_only=False).reshape(-1, 4)
        scores = scores_col.values.to_numpy(zero_copy_only=False)
        label_idx = pc.index_in(labels_col.values, value_set=pa.array(label_names, pa.string()))
        cats = label_cat[pc.fill_null(label_idx, len(label_names)).to_numpy(zero_copy_only=False)]
        frames = batch.column("frame_index").to_pylist()
        for r in range(n):
            if errs[r] is not None:
                errors_by_kind[errs[r].split(":", 1)[0].strip()] += 1
                continue
            i = matcher.match(uris[r]) if frames[r] is None else None
            if i is None:
                counts["rows_without_ground_truth"] += 1
                if len(unmatched) < EXAMPLES_KEPT:
                    unmatched.append(uris[r] if frames[r] is None else f"{uris[r]}#frame={frames[r]}")
                continue
            if seen[i]:
                counts["duplicate_rows"] += 1
                continue
            seen[i] = True
            image = gt.images[i]
            if (widths[r], heights[r]) != (image.width, image.height):
                counts["size_mismatches"] += 1
            row_xyxy = xyxy[box_off[r]:box_off[r + 1]]
            row_scores = scores[score_off[r]:score_off[r + 1]]
            row_cats = cats[label_off[r]:label_off[r + 1]]
            per_class_dt.update(row_cats[row_cats >= 0].tolist())
            counts["detections"] += int(np.count_nonzero(row_cats >= 0))
            outcome = evaluator.add(order[image.image_id], _gt_boxes(image),
                                    _dt_boxes(row_xyxy, row_scores, row_cats))
            badness = (outcome.missed + outcome.false_positives, outcome.missed)
            if gallery.wants(badness):
                gallery.add(badness, _example(uris[r], image, names, row_xyxy, row_scores, row_cats,
                                              cfg.score_threshold, outcome))

    for i in np.flatnonzero(~seen).tolist():  # labelled images no row covers: every box missed
        image = gt.images[i]
        evaluator.add(order[image.image_id], _gt_boxes(image), {})

    per_class_gt = Counter(np.concatenate([im.category_ids for im in gt.images] or [np.zeros(0, int)]).tolist())
    counts_out = {
        "images": len(gt.images), "images_with_rows": int(seen.sum()), "images_missed": int((~seen).sum()),
        "boxes": gt.num_boxes, "detections": counts["detections"], "rows": counts["rows"],
        "errors": sum(errors_by_kind.values()), "errors_by_kind": dict(sorted(errors_by_kind.items())),
        "rows_without_ground_truth": counts["rows_without_ground_truth"],
        "ambiguous_rows": matcher.ambiguous, "duplicate_rows": counts["duplicate_rows"],
        "size_mismatches": counts["size_mismatches"],
    }
    return {"evaluator": evaluator, "gallery": gallery, "counts": counts_out, "unmatched_examples": unmatched,
            "per_class_counts": {c: (per_class_gt.get(c, 0), per_class_dt.get(c, 0)) for c in names}}


def score_predictions(gt: GroundTruth, predictions: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]],
                      score_threshold: float = 0.5) -> dict[str, Any]:
    """COCO metrics of in-memory predictions {image_id: (xyxy, scores, category ids)} against `gt`,
    through the same evaluator as a detections table (training's per-epoch validation uses it).
    Labelled images without an entry count as missed."""
    names = dict(gt.categories)
    evaluator = StreamingCocoEval(list(names), score_threshold=score_threshold)
    for order, image in enumerate(sorted(gt.images, key=lambda im: im.image_id)):
        found = predictions.get(image.image_id)
        evaluator.add(order, _gt_boxes(image), _dt_boxes(*found) if found is not None else {})
    out = metrics_mod.coco_metrics(evaluator.compute(), names)
    out.update(metrics_mod.at_threshold(evaluator))
    return out


def _example(uri, image: GroundTruthImage, names, xyxy, scores, cats, threshold, outcome) -> ImageExample:
    keep = (scores >= threshold) & (cats >= 0)
    gt_xyxy = xywh_to_xyxy(image.boxes_xywh)
    return ImageExample(
        source_uri=uri, key=image.key, width=image.width, height=image.height,
        gt_boxes=gt_xyxy.tolist(), gt_labels=[names[c] for c in image.category_ids.tolist()],
        pred_boxes=xyxy[keep].astype(float).tolist(), pred_scores=scores[keep].astype(float).tolist(),
        pred_labels=[names[c] for c in cats[keep].tolist()],
        missed=outcome.missed, false_alarms=outcome.false_positives,
    )


def evaluate_and_report(cfg: EvaluateConfig, ground_truth: GroundTruth | None = None,
                        ) -> tuple[EvaluationResult, dict[str, str]]:
    """run_evaluate, then metrics.json, report.md and report.html in cfg.output (or beside the table)."""
    from platescope.evaluation.report import write_reports

    result = run_evaluate(cfg, ground_truth)
    s3 = cfg.s3.options()
    output = cfg.output or storage.join(cfg.detections, "evaluation")
    written = write_reports(result, output, read_image=lambda uri: storage.read_bytes(uri, s3), s3=s3)
    return result, written


def format_result(result: EvaluationResult, written: dict[str, str]) -> str:
    """The console summary: pycocotools' table, the threshold line, counts, where the reports are."""
    from platescope.evaluation.report import coco_lines, threshold_line

    c = result.metrics["counts"]
    lines = [*coco_lines(result.metrics), threshold_line(result.metrics) or ""]
    lines.append(f"images {c['images']} ({c['images_missed']} without a row), boxes {c['boxes']}, "
                 f"detections {c['detections']}, rows {c['rows']}, errors {c['errors']}, "
                 f"rows without ground truth {c['rows_without_ground_truth']}")
    lines += [f"{name}: {uri}" for name, uri in written.items()]
    return "\n".join(lines)
