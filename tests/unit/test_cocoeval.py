"""The streaming COCO evaluation gives pycocotools' COCOeval numbers (to 1e-6) on awkward cases."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from platescope.evaluation.cocoeval import Boxes, StreamingCocoEval

# A case: {image_id: (gt, dt)} with gt = [(cat, [x, y, w, h], iscrowd, area or None)] and
# dt = [(cat, [x, y, w, h], score)], plus the category ids.


def reference(case: dict, cats: list[int]) -> COCOeval:
    images, anns, dets = [], [], []
    for image_id, (gt, dt) in case.items():
        images.append({"id": image_id, "width": 640, "height": 480, "file_name": f"{image_id}.jpg"})
        for cat, box, crowd, area in gt:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "bbox": list(box),
                         "iscrowd": int(crowd), "area": box[2] * box[3] if area is None else area})
        dets += [{"image_id": image_id, "category_id": cat, "bbox": list(box), "score": float(score)}
                 for cat, box, score in dt]
    categories = [{"id": c, "name": f"c{c}"} for c in cats]
    return pycocotools_eval({"images": images, "annotations": anns, "categories": categories}, dets)


def pycocotools_eval(dataset: dict, dets: list[dict]) -> COCOeval:
    """COCOeval run and summarised as pycocotools users do; no detections is an empty result set
    (loadRes([]) fails in pycocotools, so it is built as loadRes would have built it)."""
    gt = COCO()
    gt.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        if dets:
            res = gt.loadRes(dets)
        else:
            res = COCO()
            res.dataset = {"images": dataset["images"], "categories": dataset["categories"], "annotations": []}
            res.createIndex()
        ev = COCOeval(gt, res, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def streamed(case: dict, cats: list[int]):
    ev = StreamingCocoEval(cats, score_threshold=0.5)
    order = {image_id: i for i, image_id in enumerate(sorted(case))}
    for image_id, (gt, dt) in case.items():  # table order, not id order: ties must not depend on it
        gt_by_cat, dt_by_cat = {}, {}
        for cat in {g[0] for g in gt}:
            rows = [g for g in gt if g[0] == cat]
            xywh = np.array([g[1] for g in rows], dtype=np.float64)
            areas = np.array([g[1][2] * g[1][3] if g[3] is None else g[3] for g in rows], dtype=np.float64)
            gt_by_cat[cat] = Boxes(xywh, areas, iscrowd=np.array([bool(g[2]) for g in rows]))
        for cat in {d[0] for d in dt}:
            rows = [d for d in dt if d[0] == cat]
            xywh = np.array([d[1] for d in rows], dtype=np.float64)
            dt_by_cat[cat] = Boxes(xywh, xywh[:, 2] * xywh[:, 3],
                                   scores=np.array([d[2] for d in rows], dtype=np.float32))
        ev.add(order[image_id], gt_by_cat, dt_by_cat)
    return ev.compute()


def random_box(rng, size_class: str | None = None) -> list[float]:
    side = {"small": (4, 30), "medium": (34, 94), "large": (100, 300), None: (4, 300)}[size_class]
    w, h = rng.uniform(*side), rng.uniform(*side)
    return [float(np.float32(rng.uniform(0, 600))), float(np.float32(rng.uniform(0, 400))),
            float(np.float32(w)), float(np.float32(h))]


def jitter(rng, box: list[float], amount: float) -> list[float]:
    x, y, w, h = box
    return [float(np.float32(v)) for v in (x + rng.normal(0, amount * w), y + rng.normal(0, amount * h),
                                           w * rng.uniform(1 - amount, 1 + amount), h * rng.uniform(1 - amount, 1 + amount))]


def random_case(seed: int, *, num_images=20, cats=(1, 2, 3), crowd_p=0.1, max_gt=6, max_dt=8,
                score_levels=None) -> dict:
    rng = np.random.default_rng(seed)
    case = {}
    for i in range(num_images):
        image_id = int(rng.integers(1, 10_000))
        while image_id in case:
            image_id += 1
        gt = [(int(rng.choice(cats)), random_box(rng, rng.choice(["small", "medium", "large"])),
               bool(rng.random() < crowd_p), None) for _ in range(int(rng.integers(0, max_gt + 1)))]
        dt = []
        for cat, box, _, _ in gt:
            if rng.random() < 0.7:
                dt.append((cat if rng.random() < 0.9 else int(rng.choice(cats)), jitter(rng, box, 0.15), 0.0))
        dt += [(int(rng.choice(cats)), random_box(rng), 0.0) for _ in range(int(rng.integers(0, max_dt + 1)))]
        dt = [(c, b, float(np.float32(rng.choice(score_levels) if score_levels else rng.random()))) for c, b, _ in dt]
        case[image_id] = (gt, dt)
    return case


def assert_parity(case: dict, cats: list[int]) -> None:
    ref = reference(case, cats)
    got = streamed(case, cats)
    np.testing.assert_allclose(got.stats(), ref.stats, atol=1e-6, rtol=0)
    np.testing.assert_allclose(got.precision, ref.eval["precision"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(got.recall, ref.eval["recall"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", range(12))
def test_random_cases_with_several_classes_sizes_and_crowds(seed):
    assert_parity(random_case(seed), [1, 2, 3])


@pytest.mark.parametrize("seed", range(4))
def test_tied_scores_across_images_break_as_pycocotools(seed):
    # Scores from a handful of levels tie everywhere; images arrive in table order, not id order.
    assert_parity(random_case(100 + seed, score_levels=[0.25, 0.5, 0.75, 0.9]), [1, 2, 3])


def test_more_than_100_detections_on_an_image():
    rng = np.random.default_rng(7)
    gt = [(1, random_box(rng, "medium"), False, None) for _ in range(30)]
    dt = [(1, jitter(rng, g[1], 0.1), float(np.float32(rng.random()))) for g in gt for _ in range(5)]
    dt += [(1, random_box(rng), float(np.float32(rng.random()))) for _ in range(60)]
    case = {5: (gt, dt), 9: (gt[:3], dt[:20])}
    assert len(dt) > 200
    assert_parity(case, [1])


def test_images_without_ground_truth_and_without_predictions():
    rng = np.random.default_rng(3)
    case = random_case(3)
    case[90001] = ([], [(1, random_box(rng), 0.9), (2, random_box(rng), 0.4)])  # false alarms only
    case[90002] = ([(1, random_box(rng, "large"), False, None)], [])  # missed entirely
    case[90003] = ([], [])
    assert_parity(case, [1, 2, 3])


def test_no_predictions_at_all_gives_zero_recall():
    rng = np.random.default_rng(4)
    case = {i: ([(1, random_box(rng), False, None)], []) for i in range(1, 6)}
    assert_parity(case, [1])
    got = streamed(case, [1]).stats()
    assert got[0] == 0.0 and got[8] == 0.0  # precision and recall of every threshold are 0, not undefined
    case[90001] = ([], [])  # and an image with nothing at all changes none of it
    assert_parity(case, [1, 2])


def test_a_class_without_ground_truth_is_left_out_of_the_mean():
    rng = np.random.default_rng(5)
    case = random_case(5, cats=(1,))
    first = next(iter(case))
    case[first][1].append((2, random_box(rng), 0.99))  # predictions of a class no image has
    assert_parity(case, [1, 2])
    assert np.all(streamed(case, [1, 2]).precision[:, :, 1] == -1)


def test_annotation_area_not_box_area_decides_the_size_range():
    # COCO files carry a segmentation 'area' that can disagree with the box; COCOeval uses it.
    case = {1: ([(1, [10.0, 10.0, 50.0, 50.0], False, 500.0), (1, [200.0, 10.0, 20.0, 20.0], False, 5000.0)],
                [(1, [11.0, 10.0, 50.0, 50.0], 0.8), (1, [201.0, 10.0, 20.0, 20.0], 0.7)])}
    assert_parity(case, [1])


def test_crowd_region_swallows_detections_inside_it():
    crowd = (1, [0.0, 0.0, 300.0, 300.0], True, None)
    plate = (1, [400.0, 10.0, 60.0, 20.0], False, None)
    dets = [(1, [10.0 + 30 * i, 20.0, 25.0, 25.0], 0.9 - 0.05 * i) for i in range(8)]
    dets.append((1, [401.0, 11.0, 60.0, 20.0], 0.5))
    case = {1: ([crowd, plate], dets)}
    assert_parity(case, [1])
    stats = streamed(case, [1]).stats()
    assert stats[1] == pytest.approx(1.0)  # boxes inside the crowd are neither hits nor false alarms


def test_outcome_counts_at_the_score_threshold():
    ev = StreamingCocoEval([1], score_threshold=0.5)
    gt = Boxes(np.array([[0, 0, 10, 10], [50, 50, 10, 10], [100, 100, 10, 10]], float), np.array([100.0] * 3),
               iscrowd=np.array([False, False, False]))
    dt_xywh = np.array([[0, 0, 10, 10], [50, 50, 10, 10], [300, 300, 10, 10], [100, 100, 10, 10]], float)
    dt = Boxes(dt_xywh, dt_xywh[:, 2] * dt_xywh[:, 3], scores=np.array([0.9, 0.6, 0.7, 0.2], np.float32))
    outcome = ev.add(0, {1: gt}, {1: dt})
    # kept: 0.9 hit, 0.7 false alarm, 0.6 hit; the 0.2 hit is below the threshold -> one plate missed
    assert (outcome.true_positives, outcome.false_positives, outcome.missed) == (2, 1, 1)
    tp, fp, num_gt = ev.counts_at_thresholds([1], np.array([0.0, 0.5, 0.8, 0.95]))
    assert tp.tolist() == [3, 2, 1, 0] and fp.tolist() == [1, 1, 0, 0] and num_gt == 3
