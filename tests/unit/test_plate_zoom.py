"""Plate zoom: one plate put at a drawn share of the image's width, the pixels and boxes moved alike."""

from __future__ import annotations

import numpy as np

from platescope.training import data
from platescope.training.plate_zoom import WIDTHS, zoom_to_plate

PLATE = (255, 255, 0)


def road_frame() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 16:9 grey frame with two yellow plates (4:1), as a road camera sees them: small."""
    image = np.full((360, 640, 3), 60, np.uint8)
    boxes = np.array([[100.0, 250.0, 48.0, 12.0], [420.0, 200.0, 40.0, 10.0]], np.float32)
    for x, y, w, h in boxes.astype(int):
        image[y:y + h, x:x + w] = PLATE
    return image, boxes, np.array([0, 0])


def test_the_zoomed_plate_lies_under_its_box_at_a_width_drawn_across_the_range():
    image, boxes, labels = road_frame()
    rng = np.random.default_rng(0)
    widest = []
    for _ in range(200):
        out, moved, kept = zoom_to_plate(image, boxes, labels, rng, min_box_size=2.0)
        assert out.shape == image.shape and out.dtype == image.dtype
        assert len(moved) == len(kept) >= 1  # the plate zoomed to always stays whole on the canvas
        assert np.all(moved[:, :2] >= 0) and np.all(moved[:, 0] + moved[:, 2] <= 640 + 1e-3)
        assert np.all(moved[:, 1] + moved[:, 3] <= 360 + 1e-3) and np.all(moved[:, 2:] >= 2.0)
        widest.append(moved[:, 2].max() / 640)
        for x, y, w, h in moved:
            whole = x > 0.5 and y > 0.5 and x + w < 639.5 and y + h < 359.5  # not cut by an edge
            if whole and w >= 8 and h >= 8:  # and large enough to sample
                inner = out[int(y + h * 0.3):int(y + h * 0.7), int(x + w * 0.3):int(x + w * 0.7)]
                assert np.abs(inner.reshape(-1, 3).mean(axis=0) - PLATE).max() < 30
                assert abs(w / h - 4.0) < 4.0 * 0.2  # shape kept: the canvas keeps the image's aspect
    widest = np.array(widest)
    # Both ways and far: these plates are 6-8 % of the width; draws go to both ends of the range.
    assert widest.min() < 0.05 and widest.max() > 0.4
    assert widest.max() <= WIDTHS[1] + 0.01
    assert 0.08 < np.median(widest) < 0.25  # log-uniform: the median near the range's geometric middle


def test_zooming_out_fills_the_margin_with_the_mean_colour_and_zooming_in_drops_boxes_cut_off():
    image, boxes, labels = road_frame()
    out, moved, _ = zoom_to_plate(image, boxes[:1], labels[:1], np.random.default_rng(1), min_box_size=2.0,
                                  widths=(0.03, 0.03))
    assert abs(moved[0, 2] / 640 - 0.03) < 0.005
    fill = image.reshape(-1, 3).mean(axis=0).astype(np.uint8)
    margin = (out == fill).all(axis=2).mean()
    assert margin > 0.5  # the frame shrank to about 40 % of its width: most of the canvas is margin
    # Zoomed in on the first plate to 60 % of the width, the second (320 px to its right) leaves the canvas.
    out, moved, kept = zoom_to_plate(image, boxes, labels, np.random.default_rng(2), min_box_size=2.0,
                                     widths=(0.6, 0.6))
    assert len(moved) == len(kept) == 1 and abs(moved[0, 2] / 640 - 0.6) < 0.01


def test_an_image_without_a_box_comes_back_as_it_is():
    image, _, _ = road_frame()
    out, moved, kept = zoom_to_plate(image, np.zeros((0, 4)), np.zeros(0), np.random.default_rng(0),
                                     min_box_size=2.0)
    assert out is image and moved.shape == (0, 4) and kept.shape == (0,)


def test_plate_zoom_in_augment_is_seeded_per_image_and_zooms_the_share_asked():
    image, boxes, labels = road_frame()
    batch = {"image": np.stack([image] * 8), "boxes": np.stack([boxes.reshape(-1)] * 8),
             "labels": np.stack([labels] * 8), "image_id": np.arange(8)}

    def widths(plate_zoom, seed=0):
        out = data.augment_batch(batch, seed=seed, epoch=0, min_box_size=2.0, recipe="basic",
                                 plate_zoom=plate_zoom)
        return out, [float(np.asarray(b).reshape(-1, 4)[:, 2].max(initial=0)) for b in out["boxes"]]

    plain, unzoomed = widths(None)
    assert max(unzoomed) < 60  # basic's mild perspective leaves these plates about their size
    every, zoomed = widths(1.0)
    assert sum(w < 25 or w > 80 for w in zoomed) >= 5  # most drawn far from the plates' own width
    again, _ = widths(1.0)
    assert all(np.array_equal(a, b) for a, b in zip(every["image"], again["image"]))
    _, other = widths(1.0, seed=1)
    assert other != zoomed
