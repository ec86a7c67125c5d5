"""Plate zoom: an augmentation that puts a plate at a size drawn across every camera's range.

One camera shows plates at the sizes its lens and distance give: a road camera's are small and far
(a dashcam's 5-20 % of the frame's width), a phone photo's close and large (5-50 %). A model trained
on one range finds few plates outside it. Scale jitter of +-30 % (the `cameras` recipe) moves a plate
within its own range; this moves it anywhere in the other's: it picks one labelled plate, draws its
new width as a fraction of the image's width log-uniformly in `WIDTHS` (so small and large are drawn
alike often), and zooms the image about a window that holds that plate: in (a crop, upsampled) to make
it larger, out (the image shrunk onto a canvas of its mean colour) to make it smaller. The canvas keeps
the image's size and aspect, so plates keep their shape, and every other box moves with the image.
"""

from __future__ import annotations

import math

import numpy as np

from platescope.detectors.geometry import clip_boxes, xywh_to_xyxy, xyxy_to_xywh

# Plate width over image width, the range drawn from: below the smallest a road camera gives (about
# 4 % at 1280 px), above the largest a close-up photo gives (about 50 %).
WIDTHS = (0.03, 0.6)


def zoom_to_plate(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, rng: np.random.Generator, *,
                  min_box_size: float,
                  widths: tuple[float, float] = WIDTHS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`image` (H, W, C) zoomed so that one of its COCO xywh `boxes` (drawn by `rng`) is a drawn
    fraction of its width; boxes are mapped, clipped to the canvas, and dropped when thinner than
    `min_box_size`. An image without a box of positive size comes back as it is."""
    import cv2

    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    labels = np.asarray(labels, np.int64).reshape(-1)
    sized = np.flatnonzero((boxes[:, 2] >= 1) & (boxes[:, 3] >= 1))
    if len(sized) == 0:
        return image, boxes, labels
    height, width = image.shape[:2]
    x, y, w, h = boxes[sized[rng.integers(len(sized))]].tolist()
    fraction = math.exp(rng.uniform(math.log(widths[0]), math.log(widths[1])))
    scale = fraction * width / w  # output pixels per source pixel
    # The source window the canvas shows, placed at random where it still holds the whole plate (or,
    # when the plate is taller than the window, where the window lies within the plate).
    window_w, window_h = width / scale, height / scale
    left = rng.uniform(*sorted((x + w - window_w, x)))
    top = rng.uniform(*sorted((y + h - window_h, y)))

    # The part of the image inside the window, resized by `scale` and pasted where it falls.
    x0, y0 = max(0, math.floor(left)), max(0, math.floor(top))
    x1, y1 = min(width, math.ceil(left + window_w)), min(height, math.ceil(top + window_h))
    out_x0, out_y0 = round((x0 - left) * scale), round((y0 - top) * scale)
    out_x1, out_y1 = round((x1 - left) * scale), round((y1 - top) * scale)
    if out_x1 <= out_x0 or out_y1 <= out_y0:
        return image, boxes, labels  # the plate lies off the image (a bad label): nothing to zoom to
    fill = image.reshape(-1, image.shape[-1]).mean(axis=0) if image.ndim == 3 else image.mean()
    canvas = np.empty_like(image)
    canvas[...] = np.asarray(fill).astype(image.dtype)
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    patch = cv2.resize(np.ascontiguousarray(image[y0:y1, x0:x1]), (out_x1 - out_x0, out_y1 - out_y0),
                       interpolation=interpolation).reshape(out_y1 - out_y0, out_x1 - out_x0, *image.shape[2:])
    # The patch may overhang the canvas by the window's rounding: paste the part that lands on it.
    cx0, cy0 = max(0, out_x0), max(0, out_y0)
    cx1, cy1 = min(width, out_x1), min(height, out_y1)
    canvas[cy0:cy1, cx0:cx1] = patch[cy0 - out_y0:cy1 - out_y0, cx0 - out_x0:cx1 - out_x0]

    # Boxes follow the pixels: the same mapping the patch went through, per axis.
    stretch = np.array([(out_x1 - out_x0) / (x1 - x0), (out_y1 - out_y0) / (y1 - y0)] * 2)
    corners = (xywh_to_xyxy(boxes) - [x0, y0, x0, y0]) * stretch + [out_x0, out_y0, out_x0, out_y0]
    mapped = xyxy_to_xywh(clip_boxes(corners, (height, width))).astype(np.float32)
    keep = (mapped[:, 2] >= max(min_box_size, 1e-3)) & (mapped[:, 3] >= max(min_box_size, 1e-3))
    return canvas, mapped[keep], labels[keep]
