"""COCO box evaluation that streams: the numbers of pycocotools' COCOeval, one image at a time.

pycocotools needs every detection as a Python dict in memory before it starts (about a kilobyte per
box); a nightly table of a million frames does not fit that way. This class runs COCOeval's own
per-image matching (`evaluateImg`, same greedy order, same crowd and area rules) as each image
arrives and keeps only what `accumulate` needs: per kept detection its score, its image's place in
the sorted image ids, its rank in that image, and its match and ignore flags packed into bits
(about 25 bytes per detection). `compute()` then does COCOeval's accumulate and summarize.

Equal scores across images are broken as pycocotools breaks them (image id order, then rank), so
the results match to floating-point rounding. One deliberate difference: pycocotools treats a match
to a ground-truth box whose annotation id is 0 as no match; here every match counts.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

import numpy as np

IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
MAX_DETECTIONS = (1, 10, 100)
AREA_RANGES = ((0.0, 1e5**2), (0.0, 32.0**2), (32.0**2, 96.0**2), (96.0**2, 1e5**2))
AREA_NAMES = ("all", "small", "medium", "large")
_T = len(IOU_THRESHOLDS)
_BITS = 1 << np.arange(_T, dtype=np.uint16)


@dataclass
class Boxes:
    """Boxes of one image and one category, in COCO's xywh (float64) as pycocotools reads them."""

    xywh: np.ndarray  # (n, 4)
    areas: np.ndarray  # (n,) ground truth: the annotation's area; detections: w * h
    iscrowd: np.ndarray | None = None  # (n,) bool, ground truth only
    scores: np.ndarray | None = None  # (n,) detections only


@dataclass
class ImageOutcome:
    """Counts at IoU 0.5 for the boxes scored at or above the report threshold."""

    true_positives: int = 0
    false_positives: int = 0
    missed: int = 0  # non-ignored ground-truth boxes left unmatched


def box_iou(dt: np.ndarray, gt: np.ndarray, iscrowd: np.ndarray) -> np.ndarray:
    """IoU (D, G) as pycocotools' maskUtils.iou computes it for boxes; crowd boxes divide by the
    detection's own area. The float operations are the same, in the same order."""
    d, g = dt[:, None, :], gt[None, :, :]
    w = np.minimum(d[..., 2] + d[..., 0], g[..., 2] + g[..., 0]) - np.maximum(d[..., 0], g[..., 0])
    h = np.minimum(d[..., 3] + d[..., 1], g[..., 3] + g[..., 1]) - np.maximum(d[..., 1], g[..., 1])
    inter = w * h
    da, ga = d[..., 2] * d[..., 3], g[..., 2] * g[..., 3]
    union = np.where(iscrowd[None, :], da, da + ga - inter)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / union
    return np.where((w > 0) & (h > 0), iou, 0.0)


def _match(ious: list[list[float]], gt_ignore: list[int], crowd: list[bool]) -> tuple[list[int], list[int]]:
    """COCOeval.evaluateImg's greedy matching for one ground-truth ignore pattern.

    ious is (D, G) with detections by score and ground truth non-ignored first. Returns, per
    detection, bitmasks over IoU thresholds: matched, and matched to an ignored box.
    """
    num_dt, num_gt = len(ious), len(gt_ignore)
    matched = [0] * num_dt
    matched_ignored = [0] * num_dt
    for t, thr in enumerate(IOU_THRESHOLDS.tolist()):
        gt_taken = [False] * num_gt
        bit = 1 << t
        for d in range(num_dt):
            row = ious[d]
            best, m = min(thr, 1 - 1e-10), -1
            for g in range(num_gt):
                if gt_taken[g] and not crowd[g]:
                    continue
                if m > -1 and gt_ignore[m] == 0 and gt_ignore[g] == 1:
                    break
                if row[g] < best:
                    continue
                best, m = row[g], g
            if m == -1:
                continue
            matched[d] |= bit
            if gt_ignore[m]:
                matched_ignored[d] |= bit
            gt_taken[m] = True
    return matched, matched_ignored


class _CategoryStore:
    """Growing compact columns for one category's kept detections."""

    def __init__(self) -> None:
        self.scores = array("f")
        self.image_order = array("l")
        self.rank = array("B")
        self.matched = [array("H") for _ in AREA_RANGES]
        self.ignored = [array("H") for _ in AREA_RANGES]
        self.num_gt = [0] * len(AREA_RANGES)  # non-ignored ground-truth boxes per area range
        self.seen = False  # any image had a box (GT or detection) of this category


class StreamingCocoEval:
    """Feed images one at a time with `add`, then `compute` the COCO tables."""

    def __init__(self, category_ids: list[int], *, score_threshold: float) -> None:
        self.category_ids = sorted(category_ids)
        self.score_threshold = score_threshold
        self._stores = {c: _CategoryStore() for c in self.category_ids}

    def add(self, image_order: int, gt: dict[int, Boxes], dt: dict[int, Boxes]) -> ImageOutcome:
        """One image: `image_order` is its place among the sorted ground-truth image ids; gt and dt map
        category id to that category's boxes (detections in the order the detector gave them)."""
        outcome = ImageOutcome()
        for cat in set(gt) | set(dt):
            store = self._stores.get(cat)
            if store is None:
                continue  # a category the ground truth does not have is not evaluated, as in COCOeval
            self._add_category(store, image_order, gt.get(cat), dt.get(cat), outcome)
        return outcome

    def _add_category(self, store: _CategoryStore, image_order: int, gt: Boxes | None, dt: Boxes | None,
                      outcome: ImageOutcome) -> None:
        num_gt = 0 if gt is None else len(gt.xywh)
        num_dt = 0 if dt is None else len(dt.xywh)
        if num_gt == 0 and num_dt == 0:
            return
        store.seen = True
        if num_dt:
            order = np.argsort(-dt.scores, kind="mergesort")[: MAX_DETECTIONS[-1]]
            dt_xywh, dt_scores, dt_areas = dt.xywh[order], dt.scores[order], dt.areas[order]
        else:
            dt_xywh, dt_scores, dt_areas = np.zeros((0, 4)), np.zeros(0, np.float32), np.zeros(0)
        kept = len(dt_scores)
        if num_gt:
            ious_all = box_iou(dt_xywh, gt.xywh, gt.iscrowd) if kept else np.zeros((0, num_gt))
            crowd_all = gt.iscrowd.astype(bool)
        cache: dict[tuple[int, ...], tuple[list[int], list[int], np.ndarray]] = {}
        for a, (lo, hi) in enumerate(AREA_RANGES):
            if num_gt:
                ignore = (crowd_all | (gt.areas < lo) | (gt.areas > hi)).astype(int)
                key = tuple(ignore.tolist())
                if key not in cache:
                    gtind = np.argsort(ignore, kind="mergesort")
                    cache[key] = (*_match(ious_all[:, gtind].tolist(), ignore[gtind].tolist(),
                                          crowd_all[gtind].tolist()), ignore)
                matched, matched_ignored, _ = cache[key]
                store.num_gt[a] += int(np.count_nonzero(ignore == 0))
            else:
                matched, matched_ignored = [0] * kept, [0] * kept
            # Unmatched detections outside the area range are ignored (COCOeval's last step).
            outside = ((dt_areas < lo) | (dt_areas > hi)).tolist()
            full = (1 << _T) - 1
            ignored = [mi | (full & ~m if out else 0) for m, mi, out in zip(matched, matched_ignored, outside)]
            store.matched[a].extend(matched)
            store.ignored[a].extend(ignored)
            if a == 0:
                crowd = 0 if num_gt == 0 else int(np.count_nonzero(gt.iscrowd))
                _count_at_threshold(dt_scores, matched, ignored, num_gt - crowd, self.score_threshold, outcome)
        store.scores.extend(dt_scores.astype(np.float32).tolist())
        store.image_order.extend([image_order] * kept)
        store.rank.extend(range(kept))

    def counts_at_thresholds(self, category_ids: list[int], thresholds: np.ndarray) -> tuple[np.ndarray, ...]:
        """True and false positives (IoU 0.5, all areas, 100 per image) of the boxes scored at or
        above each threshold, and the ground-truth boxes they are measured against."""
        scores, hits, num_gt = [], [], 0
        for cat in category_ids:
            store = self._stores[cat]
            counted = ~_unpack(np.frombuffer(store.ignored[0], dtype=np.uint16))[0]
            scores.append(np.frombuffer(store.scores, dtype=np.float32)[counted])
            hits.append(_unpack(np.frombuffer(store.matched[0], dtype=np.uint16))[0][counted])
            num_gt += store.num_gt[0]
        s, h = np.concatenate(scores), np.concatenate(hits)
        order = np.argsort(-s, kind="mergesort")
        tp_cum = np.concatenate([[0], np.cumsum(h[order])])
        kept = len(s) - np.searchsorted(s[order][::-1], thresholds, side="left")  # boxes scored >= thr
        tp = tp_cum[kept]
        return tp, kept - tp, num_gt

    # ---------------------------------------------------------------- accumulate and summarize

    def compute(self) -> CocoTables:
        """COCOeval.accumulate: precision (T, R, K, A, M) and recall (T, K, A, M), -1 where undefined."""
        num_k, num_a, num_m = len(self.category_ids), len(AREA_RANGES), len(MAX_DETECTIONS)
        precision = -np.ones((_T, len(RECALL_THRESHOLDS), num_k, num_a, num_m))
        recall = -np.ones((_T, num_k, num_a, num_m))
        for k, cat in enumerate(self.category_ids):
            store = self._stores[cat]
            if not store.seen:
                continue
            scores = np.frombuffer(store.scores, dtype=np.float32)
            image_order = np.frombuffer(store.image_order, dtype=np.int_)
            rank = np.frombuffer(store.rank, dtype=np.uint8)
            order = np.lexsort((rank, image_order, -scores))
            for a in range(num_a):
                if store.num_gt[a] == 0:
                    continue
                matched = _unpack(np.frombuffer(store.matched[a], dtype=np.uint16)[order])
                ignored = _unpack(np.frombuffer(store.ignored[a], dtype=np.uint16)[order])
                for m, max_det in enumerate(MAX_DETECTIONS):
                    keep = rank[order] < max_det
                    pr, rc = _pr_table(matched[:, keep], ignored[:, keep], store.num_gt[a])
                    precision[:, :, k, a, m] = pr
                    recall[:, k, a, m] = rc
        return CocoTables(self.category_ids, precision, recall)


def _count_at_threshold(scores: np.ndarray, matched: list[int], ignored: list[int], num_counted_gt: int,
                        threshold: float, outcome: ImageOutcome) -> None:
    # Greedy matching goes by score, so the boxes above a threshold match as they would alone.
    tp = fp = 0
    for s, m, ig in zip(scores.tolist(), matched, ignored):
        if s < threshold or ig & 1:
            continue
        tp += m & 1
        fp += 1 - (m & 1)
    outcome.true_positives += tp
    outcome.false_positives += fp
    outcome.missed += num_counted_gt - tp


def _unpack(bits: np.ndarray) -> np.ndarray:
    return (bits[None, :] & _BITS[:, None]) != 0  # (T, N)


def _pr_table(matched: np.ndarray, ignored: np.ndarray, num_gt: int) -> tuple[np.ndarray, np.ndarray]:
    tps = np.cumsum(matched & ~ignored, axis=1).astype(float)
    fps = np.cumsum(~matched & ~ignored, axis=1).astype(float)
    nd = tps.shape[1]
    precision = np.zeros((_T, len(RECALL_THRESHOLDS)))
    recall = np.zeros(_T)
    if nd == 0:
        return precision, recall
    for t in range(_T):
        rc = tps[t] / num_gt
        pr = tps[t] / (fps[t] + tps[t] + np.spacing(1))
        recall[t] = rc[-1]
        pr = np.maximum.accumulate(pr[::-1])[::-1]  # the interpolation's running max from the right
        inds = np.searchsorted(rc, RECALL_THRESHOLDS, side="left")
        precision[t] = np.where(inds < nd, pr[np.minimum(inds, nd - 1)], 0.0)
    return precision, recall


@dataclass
class CocoTables:
    category_ids: list[int]
    precision: np.ndarray  # (T, R, K, A, M)
    recall: np.ndarray  # (T, K, A, M)

    def stats(self) -> list[float]:
        """COCOeval.summarize's twelve numbers, in its order."""
        def mean(s: np.ndarray) -> float:
            s = s[s > -1]
            return float(np.mean(s)) if s.size else -1.0

        p, r = self.precision, self.recall
        last = len(MAX_DETECTIONS) - 1
        return [
            mean(p[:, :, :, 0, last]), mean(p[0, :, :, 0, last]), mean(p[5, :, :, 0, last]),
            mean(p[:, :, :, 1, last]), mean(p[:, :, :, 2, last]), mean(p[:, :, :, 3, last]),
            mean(r[:, :, 0, 0]), mean(r[:, :, 0, 1]), mean(r[:, :, 0, last]),
            mean(r[:, :, 1, last]), mean(r[:, :, 2, last]), mean(r[:, :, 3, last]),
        ]
