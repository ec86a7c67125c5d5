"""HFDetector against the plain Hugging Face recipe, on tiny random models built from presets.

The reference path is written out here independently (AutoImageProcessor -> model ->
post_process_object_detection), so a detector that drifts from what a model card promises fails.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoImageProcessor, AutoModelForObjectDetection

from platescope.detectors.base import Detector
from platescope.detectors.hf import HFDetector
from platescope.detectors.presets import build_model_dir
from platescope.schema import Detections

FAMILIES = ["yolos-tiny-test", "detr-tiny-test", "rtdetr-tiny-test"]
LABELS = {0: "licence_plate", 1: "car"}
# The tiny presets' scores sit around 0.4-0.9; 0.0 keeps every query so there is plenty to compare.
THRESHOLD = 0.0


def _image(h: int, w: int, seed: int) -> np.ndarray:
    """Noise with a few bright and dark plates drawn on it: content the model's output depends on."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    for _ in range(3):
        y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
        image[y:y + h // 4, x:x + w // 3] = rng.integers(0, 256, 3, dtype=np.uint8)
    return image


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {name: build_model_dir(name, str(root / name), id2label=LABELS) for name in FAMILIES}


@pytest.fixture(scope="module")
def detectors(model_dirs: dict[str, str]) -> dict[str, HFDetector]:
    return {name: HFDetector(path, threshold=THRESHOLD, device="cpu") for name, path in model_dirs.items()}


def _reference(model_dir: str, images: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    processor = AutoImageProcessor.from_pretrained(model_dir)
    model = AutoModelForObjectDetection.from_pretrained(model_dir).eval()
    with torch.no_grad():
        outputs = model(**processor(images=images, return_tensors="pt"))
    results = processor.post_process_object_detection(
        outputs, threshold=THRESHOLD, target_sizes=[im.shape[:2] for im in images]
    )
    return [{k: v.numpy() for k, v in r.items()} for r in results]


def _assert_same_set(a: Detections, b: Detections, atol: float) -> None:
    """Same detections up to order: near-tied scores may swap places between batch shapes."""
    assert len(a) == len(b)
    rows_a = np.concatenate([a.boxes, a.scores[:, None], a.label_ids[:, None]], axis=1)
    rows_b = np.concatenate([b.boxes, b.scores[:, None], b.label_ids[:, None]], axis=1)
    dist = np.abs(rows_a[:, None, :] - rows_b[None, :, :]).max(axis=2)
    match = dist.argmin(axis=1)
    assert len(set(match.tolist())) == len(match), "detections matched more than once"
    assert dist[np.arange(len(match)), match].max() <= atol, dist[np.arange(len(match)), match].max()


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_plain_hugging_face(family: str, model_dirs: dict[str, str],
                                    detectors: dict[str, HFDetector]) -> None:
    images = [_image(96, 128, seed) for seed in range(3)]
    detector = detectors[family]
    assert isinstance(detector, Detector)

    got = detector.detect(images)
    want = _reference(model_dirs[family], images)

    assert len(got) == len(images)
    assert sum(len(d) for d in got) > 0, "nothing detected: the comparison would prove nothing"
    for d, r in zip(got, want, strict=True):
        assert d.boxes.dtype == np.float32 and d.boxes.shape == (len(r["scores"]), 4)
        np.testing.assert_allclose(d.boxes, r["boxes"], atol=1e-4, rtol=0)
        np.testing.assert_allclose(d.scores, r["scores"], atol=1e-4, rtol=0)
        np.testing.assert_array_equal(d.label_ids, r["labels"])
        assert d.labels == [LABELS[int(i)] for i in r["labels"]]
    # Different images must give different answers, or the test could not catch a mix-up.
    assert not np.allclose(got[0].scores, got[1].scores)


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_of_mixed_sizes_matches_single_images(family: str, detectors: dict[str, HFDetector]) -> None:
    # All landscape, so the processors of DETR and YOLOS scale them to the same height (shortest edge
    # 128); the first has the widest aspect (the longest-edge cap), so batching never pads it.
    images = [_image(120, 210, 10), _image(96, 128, 11), _image(64, 64, 12), _image(100, 150, 13)]
    detector = detectors[family]
    batched = detector.detect(images)
    singles = [detector.detect([im])[0] for im in images]

    for image, d in zip(images, batched, strict=True):
        h, w = image.shape[:2]
        assert len(d) > 0
        assert (d.boxes[:, 2] > d.boxes[:, 0]).any() and d.boxes[:, 2].max() <= w * 1.5 + 1
        assert d.boxes[:, 3].max() <= h * 1.5 + 1

    # DETR and YOLOS would pad a mixed batch to its largest image and see the padding (YOLOS has no
    # pixel mask; DETR's backbone convolutions see the border); HFDetector runs each size apart, so
    # every image's result equals running it alone, whatever its batch neighbours.
    for i in range(len(images)):
        _assert_same_set(batched[i], singles[i], atol=1e-4)


def test_model_id_names_the_weights(tmp_path) -> None:
    a = build_model_dir("yolos-tiny-test", str(tmp_path / "a"))
    b = build_model_dir("yolos-tiny-test", str(tmp_path / "b"))
    id_a = HFDetector(a).model_id
    name, digest = id_a.rsplit("@", 1)
    assert name == a and len(digest) == 12 and int(digest, 16) >= 0

    assert HFDetector(a).model_id == id_a  # stable across loads
    assert HFDetector(b).model_id.rsplit("@", 1)[1] == digest  # same weights, same digest anywhere

    build_model_dir("yolos-tiny-test", a, seed=1)  # new weights in the same dir
    assert HFDetector(a).model_id != id_a


def test_missing_dir_is_named(tmp_path) -> None:
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        HFDetector(missing)


def test_pickle_weights_need_opt_in(tmp_path, model_dirs: dict[str, str]) -> None:
    unsafe = tmp_path / "pickled"
    unsafe.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(os.path.join(model_dirs["yolos-tiny-test"], name), unsafe / name)
    state = AutoModelForObjectDetection.from_pretrained(model_dirs["yolos-tiny-test"]).state_dict()
    torch.save(state, unsafe / "pytorch_model.bin")
    with pytest.raises(ValueError, match="allow_unsafe_weights") as err:
        HFDetector(str(unsafe))
    assert str(unsafe) in str(err.value)

    # Opted in, the same weights load and detect the same.
    image = [_image(96, 128, 0)]
    got = HFDetector(str(unsafe), threshold=THRESHOLD, allow_unsafe_weights=True).detect(image)[0]
    want = HFDetector(model_dirs["yolos-tiny-test"], threshold=THRESHOLD).detect(image)[0]
    np.testing.assert_allclose(got.boxes, want.boxes, atol=1e-5)


def test_rejects_prompts_and_non_rgb(detectors: dict[str, HFDetector]) -> None:
    detector = detectors["rtdetr-tiny-test"]
    image = _image(64, 64, 0)
    with pytest.raises(ValueError, match="prompts"):
        detector.detect([image], prompts=["licence plate"])
    with pytest.raises(ValueError, match="image 1"):
        detector.detect([image, image[:, :, 0]])
    assert detector.detect([]) == []


def test_s3_dir_is_cached_by_object_versions(tmp_path, monkeypatch, model_dirs: dict[str, str]) -> None:
    """The s3 path without a server: listing and copying are storage's job, tested with a real one
    in tests/ray; here only the cache keying and reuse."""
    from platescope import storage
    from platescope.storage import ObjectInfo

    source = model_dirs["yolos-tiny-test"]
    uri = "s3://bucket/models/plate"
    version = {"etag": "v1"}
    downloads: list[str] = []

    def list_objects(u, s3=None):
        return [ObjectInfo(f"{uri}/{n}", 1, version["etag"]) for n in sorted(os.listdir(source))]

    def download_dir(u, dest, s3=None):
        downloads.append(u)
        shutil.copytree(source, dest)
        return dest

    monkeypatch.setattr(storage, "list_objects", list_objects)
    monkeypatch.setattr(storage, "download_dir", download_dir)
    cache = str(tmp_path / "cache")

    first = HFDetector(uri, cache_dir=cache)
    assert HFDetector(uri, cache_dir=cache).model_id == first.model_id
    assert len(downloads) == 1
    assert first.model_id.startswith(uri + "@")
    assert first.model_id.rsplit("@", 1)[1] == HFDetector(source).model_id.rsplit("@", 1)[1]

    version["etag"] = "v2"  # the model was overwritten in the bucket
    HFDetector(uri, cache_dir=cache)
    assert len(downloads) == 2
    assert not [n for n in os.listdir(cache) if n.startswith(".tmp")]


def test_a_compiled_detector_gives_the_same_boxes_and_keeps_its_compile_on_disk(tmp_path, monkeypatch):
    cache = tmp_path / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))  # not the user's own cache
    path = build_model_dir("yolos-tiny-test", str(tmp_path / "m"))
    images = [_image(120, 160, 1), _image(120, 160, 2)]
    plain = HFDetector(path, threshold=0.0, device="cpu", num_threads=1).detect(images)
    compiled = HFDetector(path, threshold=0.0, device="cpu", num_threads=1, compile=True).detect(images)
    for a, b in zip(plain, compiled):
        np.testing.assert_array_equal(a.label_ids, b.label_ids)
        np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-2)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)
    assert any(p.is_file() for p in cache.rglob("*"))  # what a later run on this machine loads
    torch._dynamo.reset()  # compiled graphs are process-wide: leave none for later tests
