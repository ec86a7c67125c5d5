"""A letterboxed model (aspect kept, padded to a fixed canvas) gives boxes on the original image: its
relative boxes are fractions of the padded canvas, as its training targets were, so both detect paths
and training's validation scale them by the canvas, not by the image."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from platescope.config import TrainConfig
from platescope.detectors.geometry import read_geometry
from platescope.detectors.hf import HFDetector
from platescope.samples import make_scene
from platescope.sources.images import decode_image, decode_image_for_model

CANVAS = (96, 160)  # height, width: multiples of 32, as RT-DETR needs
SIZES = [(320, 180), (200, 150), (150, 260)]  # wide, 4:3, portrait: each padded on one side


@pytest.fixture(scope="module")
def letterboxed_dir(tmp_path_factory) -> str:
    from platescope.detectors.presets import build_model
    from platescope.training.detector_recipe import with_input_size

    cfg = TrainConfig(name="t", storage="/unused", train="unused.json", preset="rtdetr-tiny-test",
                      input_height=CANVAS[0], input_width=CANVAS[1])
    model, processor = build_model("rtdetr-tiny-test", id2label={0: "licence_plate"}, seed=0)
    dest = str(tmp_path_factory.mktemp("models") / "letterboxed")
    model.save_pretrained(dest)
    with_input_size(processor, cfg).save_pretrained(dest)
    return dest


def _jpeg(width: int, height: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(make_scene(np.random.default_rng(seed), width, height)[0]).save(buf, "JPEG", quality=92)
    return buf.getvalue()


def _by_hand(model_dir: str, data: bytes, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The plain model's relative boxes, scaled by the canvas measured in original pixels, clipped."""
    import torch
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    processor = AutoImageProcessor.from_pretrained(model_dir)
    model = AutoModelForObjectDetection.from_pretrained(model_dir).eval()
    image = Image.open(io.BytesIO(data)).convert("RGB")
    scale = min(CANVAS[0] / image.height, CANVAS[1] / image.width)
    resized = (int(image.height * scale), int(image.width * scale))
    with torch.no_grad():
        out = model(**processor(images=image, return_tensors="pt"))
    scores = out.logits.sigmoid()[0, :, 0].numpy()
    cx, cy, w, h = out.pred_boxes[0].numpy().T
    sx, sy = CANVAS[1] * image.width / resized[1], CANVAS[0] * image.height / resized[0]
    boxes = np.stack([(cx - w / 2) * sx, (cy - h / 2) * sy, (cx + w / 2) * sx, (cy + h / 2) * sy], axis=1)
    boxes = np.clip(boxes, 0, [image.width, image.height, image.width, image.height])
    keep = scores > threshold
    order = np.argsort(-scores[keep])
    return boxes[keep][order], scores[keep][order]


def test_the_saved_processor_is_a_letterbox_the_fast_path_knows(letterboxed_dir):
    geometry = read_geometry(letterboxed_dir)
    assert (geometry.max_height, geometry.max_width) == CANVAS
    assert (geometry.pad_height, geometry.pad_width) == CANVAS and geometry.do_pad
    assert geometry.output_size(720, 1280) == (90, 160)  # 16:9 keeps its aspect
    assert geometry.output_size(300, 400) == (96, 128)  # so does 4:3


def test_both_detect_paths_scale_boxes_by_the_canvas(letterboxed_dir):
    detector = HFDetector(letterboxed_dir, threshold=0.3, device="cpu", num_threads=1)
    compared = 0
    for seed, (width, height) in enumerate(SIZES):
        data = _jpeg(width, height, seed)
        boxes, scores = _by_hand(letterboxed_dir, data, 0.3)
        image, w, h = decode_image_for_model(data, detector.geometry, name="x", draft=False)
        for found in (detector.detect_resized([image], [(h, w)])[0], detector.detect([decode_image(data, name="x")])[0]):
            order = np.argsort(-found.scores)
            np.testing.assert_allclose(found.scores[order], scores, atol=1e-3)
            np.testing.assert_allclose(found.boxes[order], boxes, atol=1.0)
            assert np.all(found.boxes[:, 2] <= width) and np.all(found.boxes[:, 3] <= height)
        compared += len(scores)
    assert compared > 0
    # ONNX Runtime ran it, though its graph lacks the pixel_mask the processor gives and RT-DETR ignores.
    assert detector.runtime == "onnxruntime"


def test_validation_in_training_sees_the_boxes_detect_gives(letterboxed_dir):
    """Training picks checkpoints by val mAP: its predictions must be detect's (same canvas scaling)."""
    import torch
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    from platescope.training.detector_recipe import predict

    processor = AutoImageProcessor.from_pretrained(letterboxed_dir)
    model = AutoModelForObjectDetection.from_pretrained(letterboxed_dir).eval()
    images = [decode_image(_jpeg(w, h, seed), name="x") for seed, (w, h) in enumerate(SIZES)]
    batch = {"image": images, "boxes": [np.zeros(0, np.float32)] * len(images),
             "labels": [np.zeros(0, np.int64)] * len(images), "image_id": list(range(len(images)))}
    with torch.no_grad():
        predicted = predict(model, processor, batch, None, {0: "licence_plate"}, "cpu")
    detector = HFDetector(letterboxed_dir, threshold=0.3, device="cpu", num_threads=1)
    for (boxes, scores, _), image in zip(predicted, images):
        (found,) = detector.detect([image])
        keep = scores > 0.3
        assert keep.sum() == len(found.scores) > 0
        np.testing.assert_allclose(np.sort(scores[keep]), np.sort(found.scores), atol=1e-3)
        np.testing.assert_allclose(boxes[keep][np.argsort(-scores[keep])], found.boxes[np.argsort(-found.scores)],
                                   atol=1.0)


def test_fine_tuning_a_float16_export_trains_in_float32():
    import torch

    from platescope.config import default_model_dir
    from platescope.training.detector_recipe import build

    cfg = TrainConfig(name="t", storage="/unused", train="unused.json", model=default_model_dir(),
                      input_height=352, input_width=576)
    model, processor = build(cfg, {0: "licence_plate"}, None, None)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert processor.size.max_height == 352 and processor.pad_size.width == 576 and processor.do_pad


@pytest.mark.parametrize("fields, message", [
    ({"input_height": 352}, "input_height, input_width: give both or neither"),
    ({"input_height": 16, "input_width": 64}, "input_height"),
])
def test_an_input_size_is_checked_before_training(fields, message):
    from platescope.config import ConfigError, build_config

    with pytest.raises(ConfigError, match=message):
        build_config(TrainConfig, values={"name": "t", "storage": "/s", "train": "t.json", "preset": "rtdetr-slim",
                                         **fields})
