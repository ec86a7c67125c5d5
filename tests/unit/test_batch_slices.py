"""On CPU a detector's threads each run a slice of the batch on one torch thread: the results are those
of running the batch whole, in the batch's order, and the phase clock counts each slice's CPU once."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from platescope.cputime import PhaseClock
from platescope.detectors.hf import HFDetector
from platescope.samples import make_scene
from platescope.sources.images import decode_image_for_model


def _scenes(n: int, *, sizes: int = 2) -> list[np.ndarray]:
    """n scenes, alternating between `sizes` widths."""
    rng = np.random.default_rng(3)
    return [make_scene(rng, width=160 + 16 * (i % sizes), height=120)[0] for i in range(n)]


def test_slices_give_the_whole_batch_s_detections_in_order(tiny_rtdetr_dir, same_detections):
    sliced = HFDetector(tiny_rtdetr_dir, threshold=0.0, num_threads=2)
    whole = HFDetector(tiny_rtdetr_dir, threshold=0.0, num_threads=2, slice_batches=False)
    assert (sliced.slices, whole.slices) == (2, 1)
    images = _scenes(7)  # two sizes, odd counts: uneven slices of each size group
    found = sliced.detect(images)
    same_detections(found, whole.detect(images))
    assert sum(len(d.scores) for d in found) > 0
    # One image at a time (each batch its own slice) is the same again.
    same_detections(found, [sliced.detect([im])[0] for im in images])

    # The fast path: images resized to model size by the decode tasks' code.
    import io

    from PIL import Image

    resized, sizes = [], []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="PNG")
        pixels, width, height = decode_image_for_model(buf.getvalue(), sliced.geometry, name="scene")
        resized.append(pixels)
        sizes.append((height, width))
    same_detections(sliced.detect_resized(resized, sizes), whole.detect_resized(resized, sizes))


def test_slices_run_at_once_on_their_own_threads(tiny_rtdetr_dir, monkeypatch):
    detector = HFDetector(tiny_rtdetr_dir, num_threads=3)
    seen: dict[int, list[int]] = {}
    inside = threading.Barrier(3, timeout=30)  # passes only when all three slices run at the same time
    run = detector._run

    def spy(inputs, sizes):
        seen[threading.get_ident()] = [len(sizes)]
        inside.wait()
        return run(inputs, sizes)

    monkeypatch.setattr(detector, "_run", spy)
    found = detector.detect(_scenes(7, sizes=1))  # one size: slices of 3, 2 and 2
    assert len(found) == 7
    assert len(seen) == 3 and threading.get_ident() not in seen


@pytest.mark.parametrize("settings", [dict(num_threads=4, device="cpu", compile=True),
                                      dict(num_threads=None, device="cpu")])
def test_no_slices_with_compile_or_without_a_thread_count(tiny_rtdetr_dir, settings):
    import torch

    before = torch.get_num_threads()
    try:
        assert HFDetector(tiny_rtdetr_dir, **settings).slices == 1
    finally:
        torch.set_num_threads(before)


def test_the_clock_counts_a_thread_s_own_cpu_inside_own_thread():
    clock = PhaseClock()

    def busy(seconds: float) -> None:
        with clock.own_thread(), clock.phase("busy"):
            deadline = time.thread_time() + seconds
            while time.thread_time() < deadline:
                pass

    threads = [threading.Thread(target=busy, args=(0.1,)) for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    busy_ms = clock.take()["busy"]
    # Two threads of 100 ms each: 200 ms, not more (process time would count the other thread's
    # work in each) and not less.
    assert 195 <= busy_ms < 260
