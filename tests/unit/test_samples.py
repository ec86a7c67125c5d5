from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from platescope import samples
from platescope.sources import media_kind
from platescope.sources.video import probe_video


def test_make_scene_is_deterministic_per_seed():
    a = samples.make_scene(np.random.default_rng(5))
    b = samples.make_scene(np.random.default_rng(5))
    c = samples.make_scene(np.random.default_rng(6))
    assert np.array_equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("seed", range(8))
def test_make_scene_boxes_are_inside_and_disjoint(seed):
    image, boxes, labels = samples.make_scene(
        np.random.default_rng(seed), width=320, height=240, num_plates=(2, 4)
    )
    assert image.shape == (240, 320, 3) and image.dtype == np.uint8
    assert 1 <= len(boxes) <= 4 and labels == ["licence_plate"] * len(boxes)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        assert 0 <= x0 < x1 <= 320 and 0 <= y0 < y1 <= 240
        # The plate border is drawn dark at the box's own corner pixel.
        assert image[int(y0), int(x0)].max() < 60
        for other in boxes[i + 1 :]:
            assert x1 <= other[0] or other[2] <= x0 or y1 <= other[1] or other[3] <= y0


def test_make_scene_plate_width_and_shape_follow_the_asked_ranges():
    widths, shapes = [], []
    for seed in range(12):
        image, boxes, _ = samples.make_scene(np.random.default_rng(seed), width=1280, height=720,
                                             plate_width=(0.04, 0.06), plate_aspect=(1.2, 1.5), min_plate=(16, 7))
        for x0, y0, x1, y1 in boxes:
            widths.append((x1 - x0) / 1280)
            shapes.append((x1 - x0) / (y1 - y0))
            assert image[int(y0), int(x0)].max() < 60  # the plate is drawn where its box says
    assert widths and all(0.039 <= w <= 0.061 for w in widths)
    assert all(1.15 <= a <= 1.55 for a in shapes)  # whole pixels round the drawn shape a little


def test_image_dataset_draws_each_scene_at_one_of_the_given_sizes(tmp_path):
    sizes = [(400, 300), (256, 144)]
    path = samples.write_image_dataset(tmp_path / "set", 12, seed=1, sizes=sizes, plate_width=(0.1, 0.2))
    coco = json.loads(path.read_text())
    assert {(im["width"], im["height"]) for im in coco["images"]} == set(sizes)
    by_id = {im["id"]: im for im in coco["images"]}
    for im in coco["images"]:
        assert Image.open(tmp_path / "set" / im["file_name"]).size == (im["width"], im["height"])
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        width = by_id[ann["image_id"]]["width"]
        assert x + w <= width and y + h <= by_id[ann["image_id"]]["height"]
        assert 0.1 * width - 1 <= w <= max(0.2 * width, 40) + 1  # the default minimum: 40 px


def test_make_scene_plate_count_range():
    counts = {len(samples.make_scene(np.random.default_rng(s), num_plates=(1, 3))[1]) for s in range(20)}
    assert counts <= {1, 2, 3} and len(counts) > 1


def test_image_dataset_is_valid_coco(tmp_path):
    path = samples.write_image_dataset(tmp_path / "ds", num_images=4, seed=1, size=(200, 150))
    assert path == tmp_path / "ds" / "annotations.json"
    coco = json.loads(path.read_text())
    assert coco["categories"] == [{"id": 1, "name": "licence_plate"}]
    images = {image["id"]: image for image in coco["images"]}
    assert len(images) == 4
    for image in images.values():
        with Image.open(tmp_path / "ds" / image["file_name"]) as stored:
            assert stored.size == (image["width"], image["height"]) == (200, 150)
    ids = [a["id"] for a in coco["annotations"]]
    assert len(ids) == len(set(ids)) >= 4
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        image = images[ann["image_id"]]
        assert ann["category_id"] == 1 and ann["iscrowd"] == 0
        assert w > 0 and h > 0 and ann["area"] == pytest.approx(w * h)
        assert 0 <= x and 0 <= y and x + w <= image["width"] and y + h <= image["height"]


def test_image_dataset_is_deterministic(tmp_path):
    first = samples.write_image_dataset(tmp_path / "a", num_images=2, seed=3, size=(160, 120))
    second = samples.write_image_dataset(tmp_path / "b", num_images=2, seed=3, size=(160, 120))
    assert first.read_text() == second.read_text()
    for image in json.loads(first.read_text())["images"]:
        assert (tmp_path / "a" / image["file_name"]).read_bytes() == (
            tmp_path / "b" / image["file_name"]
        ).read_bytes()


def test_write_video_rounds_to_even_size_and_returns_boxes(tmp_path):
    boxes = samples.write_video(tmp_path / "v.mp4", num_frames=12, fps=6, size=(101, 75), seed=2)
    info = probe_video(tmp_path / "v.mp4")
    assert (info["width"], info["height"]) == (100, 74)
    assert info["num_frames"] == 12 and info["fps"] == pytest.approx(6)
    assert len(boxes) == 12
    assert boxes[0][0] == 0 and boxes[-1][2] == 100  # slides from the left edge to the right edge
    assert all(0 <= b[1] < b[3] <= 74 for b in boxes)


def test_bad_inputs_cover_every_case(tmp_path):
    cases = samples.write_bad_inputs(tmp_path)
    assert set(cases) == {
        "empty_file", "truncated_jpeg", "text_as_jpeg", "unsupported_extension", "png_alpha",
        "png_palette_transparency", "png_16bit", "greyscale_jpeg", "cmyk_jpeg", "exif_rotated",
        "oversized_image", "corrupt_video", "truncated_video", "audio_only_video",
    }  # fmt: skip
    for case, file_name in cases.items():
        assert (tmp_path / file_name).is_file()
        expected = None if case == "unsupported_extension" else ("video" if "video" in case else "image")
        assert media_kind(file_name) == expected
    assert (tmp_path / cases["empty_file"]).stat().st_size == 0
    assert (tmp_path / cases["oversized_image"]).stat().st_size < 100_000  # tiny file, huge image
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(cases.values())  # no scratch left


def test_pretraining_set_script_writes_a_set_train_can_read(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from platescope.training.data import read_coco_set

    script = Path(__file__).resolve().parents[2] / "scripts" / "make_pretraining_set.py"
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "synthetic"), "--images", "6"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    labelled = read_coco_set(done.stdout.strip(), None)
    assert len(labelled.records) == 6 and sum(len(r["boxes"]) for r in labelled.records) >= 6
    bad = subprocess.run([sys.executable, str(script), str(tmp_path / "none"), "--images", "0"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 2 and "--images 0" in bad.stderr
