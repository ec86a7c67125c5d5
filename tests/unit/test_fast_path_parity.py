"""The fast path (decode tasks resize to model size, the detector rescales, normalises and pads on its
device) gives what the plain Hugging Face way gives (processor -> model -> post-process on the full
image): the same boxes above threshold, coordinates within 1 px, scores within 1e-3, for every model
family whose processor geometry it knows."""

from __future__ import annotations

import functools
import io

import numpy as np
import pytest
from PIL import Image

from platescope.detectors.hf import HFDetector
from platescope.samples import make_scene
from platescope.sources.images import decode_image, decode_image_for_model

THRESHOLD = 0.3
# landscape 16:9 and 4:3, portrait, square, odd; the shortest/longest-edge processors keep aspect
SIZES = [(320, 180), (256, 192), (150, 260), (200, 200), (301, 157)]


@pytest.fixture(scope="module", params=["yolos-tiny-test", "detr-tiny-test", "rtdetr-tiny-test", "conditional-detr"])
def model_dir(request, tmp_path_factory, conditional_detr_builder) -> str:
    dest = str(tmp_path_factory.mktemp("models") / request.param)
    if request.param == "conditional-detr":
        return conditional_detr_builder(dest)
    from platescope.detectors.presets import build_model_dir

    return build_model_dir(request.param, dest)


def _jpegs() -> list[bytes]:
    rng = np.random.default_rng(7)
    out = []
    for width, height in SIZES:
        buf = io.BytesIO()
        Image.fromarray(make_scene(rng, width, height)[0]).save(buf, "JPEG", quality=92)
        out.append(buf.getvalue())
    return out


@functools.cache
def _plain_model(model_dir: str) -> tuple:
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    return AutoImageProcessor.from_pretrained(model_dir), AutoModelForObjectDetection.from_pretrained(model_dir).eval()


def _plain_hugging_face(model_dir: str, data: bytes) -> dict:
    """What a user's own loop gives: image processor -> model (as loaded) -> post-process."""
    import torch

    processor, model = _plain_model(model_dir)
    image = Image.open(io.BytesIO(data)).convert("RGB")
    with torch.no_grad():
        outputs = model(**processor(images=image, return_tensors="pt"))
    (result,) = processor.post_process_object_detection(outputs, threshold=THRESHOLD,
                                                        target_sizes=[(image.height, image.width)])
    return {k: v.numpy() for k, v in result.items()}


def test_fast_path_equals_the_plain_hugging_face_way(model_dir):
    detector = HFDetector(model_dir, threshold=THRESHOLD, device="cpu", num_threads=1)
    assert detector.geometry is not None
    num_boxes = 0
    for data in _jpegs():
        plain = _plain_hugging_face(model_dir, data)
        image, width, height = decode_image_for_model(data, detector.geometry, name="x", draft=False)
        for found in (detector.detect_resized([image], [(height, width)])[0],  # the fast path
                      detector.detect([decode_image(data, name="x")])[0]):  # the processor in the detector
            np.testing.assert_array_equal(found.label_ids, plain["labels"])
            np.testing.assert_allclose(found.boxes, plain["boxes"], atol=1.0)
            np.testing.assert_allclose(found.scores, plain["scores"], atol=1e-3)
        num_boxes += len(plain["scores"])
    assert num_boxes > 0  # the comparison compared something
    # What was compared is ONNX Runtime's forward pass, which every family here exports to.
    assert detector.runtime == "onnxruntime"


def test_a_batch_of_mixed_sizes_gives_each_image_its_own_result(model_dir):
    detector = HFDetector(model_dir, threshold=THRESHOLD, device="cpu", num_threads=1)
    decoded = [decode_image_for_model(data, detector.geometry, name="x", draft=False) for data in _jpegs()]
    together = detector.detect_resized([d[0] for d in decoded], [(d[2], d[1]) for d in decoded])
    for (image, width, height), batched in zip(decoded, together):
        (alone,) = detector.detect_resized([image], [(height, width)])
        np.testing.assert_allclose(batched.boxes, alone.boxes, atol=1e-3)
        np.testing.assert_allclose(batched.scores, alone.scores, atol=1e-5)


def test_a_processor_of_unknown_geometry_has_only_the_plain_path(tmp_path):
    import json

    from platescope.detectors.presets import build_model_dir

    path = build_model_dir("rtdetr-tiny-test", str(tmp_path / "m"))
    config_path = tmp_path / "m" / "preprocessor_config.json"
    config = json.loads(config_path.read_text())
    config["size"] = {"shortest_edge": 96}  # a rule the RT-DETR fast path does not know
    config_path.write_text(json.dumps(config))
    detector = HFDetector(path, device="cpu", num_threads=1)
    assert detector.geometry is None
    with pytest.raises(ValueError, match="no known geometry"):
        detector.detect_resized([np.zeros((96, 96, 3), np.uint8)], [(96, 96)])
