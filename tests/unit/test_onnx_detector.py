"""Once an HFDetector has exported and checked a model, a later detector runs it from that file alone
(OnnxDetector): its post-processing is transformers' own, written out in numpy, and a detector actor
built that way imports neither torch nor transformers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest

from platescope.cache import cache_folder
from platescope.detectors.geometry import read_geometry
from platescope.detectors.hf import HFDetector
from platescope.detectors.onnx_detector import OnnxDetector
from platescope.detectors.postprocess import RECIPES, post_process
from platescope.samples import make_scene


@pytest.fixture
def home(tmp_path, monkeypatch) -> str:
    """A home of its own, so the exports this test makes and finds are its own."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return str(tmp_path / "home")


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_post_processing_is_transformers_own(name):
    import torch
    import transformers
    from transformers.utils import is_torchvision_available

    processor = getattr(transformers, name if is_torchvision_available() else f"{name}Pil")()
    rng = np.random.default_rng(3)
    # 40 queries x 4 classes: more (query, class) pairs than the 100 that top-k recipes keep
    logits = (rng.standard_normal((2, 40, 4)) * 3).astype(np.float32)
    boxes = rng.uniform(0.05, 0.95, (2, 40, 4)).astype(np.float32)
    frames = [(720, 1280), (360.5, 641.25)]
    outputs = SimpleNamespace(logits=torch.from_numpy(logits), pred_boxes=torch.from_numpy(boxes))
    expected = processor.post_process_object_detection(outputs, threshold=0.2, target_sizes=frames)
    got = post_process(logits, boxes, recipe=RECIPES[name], threshold=0.2, frames=frames)
    assert sum(len(r["scores"]) for r in expected) > 10
    for want, (b, s, lab) in zip(expected, got):
        np.testing.assert_array_equal(lab, want["labels"].numpy())
        np.testing.assert_allclose(s, want["scores"].numpy(), atol=1e-6)
        np.testing.assert_allclose(b, want["boxes"].numpy(), atol=1e-3)
        assert b.dtype == np.float32 and s.dtype == np.float32


def _scenes(n: int, geometry) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    rng = np.random.default_rng(11)
    full = [make_scene(rng, width=320 - 16 * (i % 3), height=180 + 12 * (i % 2))[0] for i in range(n)]
    return [geometry.resize(im) for im in full], [im.shape[:2] for im in full]


def test_a_cached_export_runs_without_torch_with_the_exporter_s_boxes(tiny_rtdetr_dir, home, same_detections):
    geometry = read_geometry(tiny_rtdetr_dir)
    images, sizes = _scenes(7, geometry)
    assert OnnxDetector.from_cache(tiny_rtdetr_dir) is None  # nothing exported in this home yet
    exporter = HFDetector(tiny_rtdetr_dir, threshold=0.0, device="cpu", num_threads=1, nms_iou=0.5)
    expected = exporter.detect_resized(images, sizes)
    assert exporter.runtime == "onnxruntime"

    for num_threads in (1, 2):  # whole batches, and slices on two threads
        lean = OnnxDetector.from_cache(tiny_rtdetr_dir, threshold=0.0, num_threads=num_threads, nms_iou=0.5)
        assert lean is not None and lean.geometry == geometry and lean.model_id == exporter.model_id
        found = lean.detect_resized(images, sizes)
        assert sum(len(d.scores) for d in found) > 0
        same_detections(found, expected, box_atol=1e-3, score_atol=1e-6)
        assert lean.clock.take()["model"] > 0  # the pipeline's CPU figures count it

    merging = HFDetector(tiny_rtdetr_dir, threshold=0.0, device="cpu", num_threads=1, nms_iou=0.5, nms_merge=True)
    lean = OnnxDetector.from_cache(tiny_rtdetr_dir, threshold=0.0, num_threads=2, nms_iou=0.5, nms_merge=True)
    same_detections(lean.detect_resized(images, sizes), merging.detect_resized(images, sizes),
                    box_atol=1e-3, score_atol=1e-6)


def test_every_known_family_from_its_export_matches_its_pytorch_boxes(tmp_path, home, same_detections,
                                                                    conditional_detr_builder):
    """DETR, YOLOS and Conditional-DETR too, at a fixed input size (the only kind OnnxDetector takes)."""
    from platescope.detectors.presets import build_model_dir

    dirs = [build_model_dir(p, str(tmp_path / p)) for p in ("detr-tiny-test", "yolos-tiny-test")]
    dirs.append(conditional_detr_builder(str(tmp_path / "conditional-detr")))
    for path in dirs:
        config_path = os.path.join(path, "preprocessor_config.json")
        config = json.loads(open(config_path).read())
        config["size"] = {"height": 128, "width": 160}
        open(config_path, "w").write(json.dumps(config))
        geometry = read_geometry(path)
        images, sizes = _scenes(3, geometry)
        torch_boxes = HFDetector(path, threshold=0.0, device="cpu", num_threads=1, onnx_runtime=False)
        expected = torch_boxes.detect_resized(images, sizes)
        HFDetector(path, threshold=0.0, device="cpu", num_threads=1).detect_resized(images[:1], sizes[:1])  # exports
        lean = OnnxDetector.from_cache(path, threshold=0.0, num_threads=1)
        assert lean is not None, path
        found = lean.detect_resized(images, sizes)
        assert sum(len(d.scores) for d in found) > 0, path
        same_detections(found, expected, box_atol=0.01, score_atol=1e-4)


def test_models_it_cannot_run_alone_are_left_to_hf_detector(tiny_rtdetr_dir, tmp_path, home):
    # a hub id: nothing is fetched, nothing imported
    assert OnnxDetector.from_cache("some-org/some-detector") is None
    # an input that keeps each image's aspect has no one shape to have exported
    keeps_aspect = str(tmp_path / "aspect")
    shutil.copytree(tiny_rtdetr_dir, keeps_aspect)
    config_path = os.path.join(keeps_aspect, "preprocessor_config.json")
    config = json.loads(open(config_path).read())
    config["size"] = {"shortest_edge": 128, "longest_edge": 160}
    config["image_processor_type"] = "DetrImageProcessor"
    open(config_path, "w").write(json.dumps(config))
    assert read_geometry(keeps_aspect) is not None
    assert OnnxDetector.from_cache(keeps_aspect) is None
    # an export that failed its check is never run
    geometry = read_geometry(tiny_rtdetr_dir)
    images, sizes = _scenes(1, geometry)
    HFDetector(tiny_rtdetr_dir, device="cpu", num_threads=1).detect_resized(images, sizes)
    assert OnnxDetector.from_cache(tiny_rtdetr_dir) is not None
    (export,) = [f for f in os.listdir(cache_folder("onnx")) if f.endswith(".onnx")]
    open(os.path.join(cache_folder("onnx"), export + ".failed"), "w").write("disagreed")
    assert OnnxDetector.from_cache(tiny_rtdetr_dir) is None


def test_an_actor_on_a_cached_export_imports_neither_torch_nor_transformers(tiny_rtdetr_dir, home):
    geometry = read_geometry(tiny_rtdetr_dir)
    images, sizes = _scenes(2, geometry)
    HFDetector(tiny_rtdetr_dir, device="cpu", num_threads=1).detect_resized(images, sizes)  # the earlier run
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        from platescope.detectors.geometry import read_geometry
        from platescope.pipeline.actor import DetectorActor
        from platescope.pipeline.stage import DetectorSpec

        spec = DetectorSpec(model={tiny_rtdetr_dir!r}, device="cpu", threshold=0.0,
                            geometry=read_geometry({tiny_rtdetr_dir!r}))
        actor = DetectorActor(spec)
        image = spec.geometry.resize(np.full((90, 160, 3), 128, np.uint8))
        found = actor._detect([image], [(90, 160)])
        print(type(actor.detector).__name__, len(found), sorted(m for m in ("torch", "transformers") if m in sys.modules))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HOME": home})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[-2] == "OnnxDetector 1 []"
