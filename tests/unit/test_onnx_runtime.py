"""On CPU an HF detector runs its model in ONNX Runtime: exported once, checked against PyTorch, cached on
disk; the boxes are PyTorch's. A model that fails to export or to agree keeps PyTorch, with a warning,
and is not tried again."""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from platescope.cache import cache_folder
from platescope.detectors import onnx_runtime
from platescope.detectors.hf import HFDetector
from platescope.samples import make_scene


@pytest.fixture
def cache(tmp_path, monkeypatch) -> str:
    """A home of its own, so the exports this test makes and finds are its own."""
    monkeypatch.setenv("HOME", str(tmp_path))
    return cache_folder("onnx")


def _scenes(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    return [make_scene(rng, width=160 + 16 * (i % 2), height=120)[0] for i in range(n)]


def _exports(cache: str) -> list[str]:
    return sorted(f for f in os.listdir(cache) if f.endswith(".onnx")) if os.path.isdir(cache) else []


def _no_export(*args, **kwargs):
    raise AssertionError("exported again instead of using the cache")


def test_cpu_model_runs_in_onnx_runtime_with_pytorch_s_boxes_and_is_exported_once(tiny_rtdetr_dir, cache, monkeypatch,
                                                                                 same_detections):
    images = _scenes(5)  # of two sizes, which the processor resizes to its one input size
    expected = HFDetector(tiny_rtdetr_dir, threshold=0.0, num_threads=2, onnx_runtime=False).detect(images)
    fast = HFDetector(tiny_rtdetr_dir, threshold=0.0, num_threads=2)
    assert fast.runtime == "onnxruntime"
    found = fast.detect(images)
    assert sum(len(d.scores) for d in found) > 0
    same_detections(found, expected, score_atol=1e-4)
    assert fast.runtime == "onnxruntime"
    first = _exports(cache)
    assert len(first) == 1  # one export for the one input shape, whatever the batch sizes

    # Another detector (a later run, another actor) loads the checked graphs from disk.
    monkeypatch.setattr(onnx_runtime.OnnxForward, "_export", _no_export)
    again = HFDetector(tiny_rtdetr_dir, threshold=0.0, num_threads=1)  # one thread: whole batches, not slices
    same_detections(again.detect(images), expected, score_atol=1e-4)
    assert again.runtime == "onnxruntime" and _exports(cache) == first


def test_actors_starting_together_export_once(tiny_rtdetr_dir, cache, monkeypatch, same_detections):
    images = _scenes(2)
    expected = HFDetector(tiny_rtdetr_dir, threshold=0.0, num_threads=1, onnx_runtime=False).detect(images)
    exports = []
    export = onnx_runtime.OnnxForward._export

    def slow_export(self, path, inputs):
        exports.append(path)
        time.sleep(0.5)  # the other detector reaches the cache meanwhile
        export(self, path, inputs)

    monkeypatch.setattr(onnx_runtime.OnnxForward, "_export", slow_export)
    detectors = [HFDetector(tiny_rtdetr_dir, threshold=0.0, num_threads=1) for _ in range(2)]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda d: d.detect(images), detectors))
    assert len(exports) == 1
    for found, detector in zip(results, detectors):
        same_detections(found, expected, score_atol=1e-4)
        assert detector.runtime == "onnxruntime"


def _pytorch_with_one_warning(model_dir, images, expected, caplog, same_detections) -> str:
    """A detector that could not use ONNX Runtime: PyTorch's detections, and one warning, returned."""
    detector = HFDetector(model_dir, threshold=0.0, num_threads=2)
    with caplog.at_level(logging.WARNING, logger=onnx_runtime.__name__):
        found = detector.detect(images)
    same_detections(found, expected, score_atol=1e-4)
    assert detector.runtime == "torch"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "runs in PyTorch" in warnings[0]
    return warnings[0]


@pytest.mark.parametrize("failure", ["disagrees", "export raises"])
def test_a_model_onnx_runtime_cannot_match_keeps_pytorch_with_a_warning(tiny_rtdetr_dir, cache, monkeypatch, caplog,
                                                                         same_detections, failure):
    images = _scenes(3)
    expected = HFDetector(tiny_rtdetr_dir, threshold=0.0, num_threads=2, onnx_runtime=False).detect(images)
    if failure == "disagrees":
        monkeypatch.setattr(onnx_runtime, "BOXES_ATOL", -1.0)  # no difference is small enough
        reason = "pred_boxes differ from PyTorch's"
    else:
        import torch

        def broken_export(*args, **kwargs):
            raise RuntimeError("unsupported operator")

        monkeypatch.setattr(torch.onnx, "export", broken_export)
        reason = "export to ONNX failed: RuntimeError: unsupported operator"
    assert reason in _pytorch_with_one_warning(tiny_rtdetr_dir, images, expected, caplog, same_detections)
    assert _exports(cache) == []  # no half-written or unchecked graph left behind

    # The verdict is kept: a later detector does not try again, even where it now could.
    monkeypatch.undo()
    monkeypatch.setenv("HOME", os.path.dirname(os.path.dirname(os.path.dirname(cache))))
    monkeypatch.setattr(onnx_runtime.OnnxForward, "_export", _no_export)
    later = HFDetector(tiny_rtdetr_dir, threshold=0.0, num_threads=2)
    same_detections(later.detect(images), expected, score_atol=1e-4)
    assert later.runtime == "torch"


def test_a_cache_it_cannot_write_keeps_pytorch_with_a_warning(tiny_rtdetr_dir, tmp_path, monkeypatch, caplog,
                                                               same_detections):
    images = _scenes(2)
    expected = HFDetector(tiny_rtdetr_dir, threshold=0.0, num_threads=2, onnx_runtime=False).detect(images)
    home = tmp_path / "home"
    home.write_text("a file where the cache's folders would go")
    monkeypatch.setenv("HOME", str(home))
    warning = _pytorch_with_one_warning(tiny_rtdetr_dir, images, expected, caplog, same_detections)
    assert "NotADirectoryError" in warning and str(home) in warning


def test_pytorch_when_asked_or_compiling(tiny_rtdetr_dir, cache):
    assert HFDetector(tiny_rtdetr_dir, num_threads=1, onnx_runtime=False).runtime == "torch"
    assert HFDetector(tiny_rtdetr_dir, num_threads=1, compile=True).runtime == "torch"
