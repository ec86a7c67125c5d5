"""An HF detector run from its checked ONNX export alone: neither torch nor transformers is imported.

Importing torch and transformers and building the model cost a detector process 5-8 s on a
2-core machine before its first batch, longer than the default model then takes for a hundred images.
Once an HFDetector has exported a model for its input shape and checked the graph against PyTorch
(detectors.onnx_runtime), everything else a detector does on CPU is plain arithmetic: the decode tasks
already resized the images (detectors.geometry), rescale and normalise are a multiply and an add, and
post-processing is written out in numpy for the processor families it knows (detectors.postprocess).
So a later run builds this instead, from files: the model dir's configs and the cached graph.

It answers `detect_resized` only (images at model size), for models whose input has one fixed shape:
`from_cache` gives None for anything else, and for a model not exported yet, and the caller then
builds an HFDetector (which exports it for next time).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from platescope.cputime import PhaseClock
from platescope.detectors.geometry import (
    PREPROCESSOR_CONFIG,
    InputGeometry,
    geometry_from_config,
    pixel_arrays,
)
from platescope.detectors.loading import resolve_local_model
from platescope.detectors.onnx_runtime import export_path, failed_marker, load_session, model_dir_identity
from platescope.detectors.postprocess import RECIPES, box_frames, candidate_threshold, finish, post_process
from platescope.detectors.slices import resized_groups, run_slices, slice_indices
from platescope.schema import Detections
from platescope.storage import S3Options

log = logging.getLogger(__name__)


class OnnxDetector:
    """detect_resized of an HFDetector with ONNX Runtime on CPU, from a cached export (see module doc)."""

    runtime = "onnxruntime"

    def __init__(self, *, model_id: str, session: Any, geometry: InputGeometry, recipe: tuple[str, int | None],
                 id2label: dict[int, str], threshold: float, nms_iou: float | None, num_threads: int | None,
                 slices: int, nms_merge: bool = False) -> None:
        self.model_id = model_id
        self.geometry = geometry
        self.threshold = float(threshold)
        self.nms_iou = None if nms_iou is None else float(nms_iou)
        self.nms_merge = bool(nms_merge)
        self.num_threads = num_threads
        self.slices = slices
        self.clock = PhaseClock()
        self._session = session
        self._graph_inputs = [i.name for i in session.get_inputs()]
        self._recipe = recipe
        self._id2label = id2label
        self._pool = ThreadPoolExecutor(slices, thread_name_prefix="detector-slice") if slices > 1 else None

    @classmethod
    def from_cache(cls, model: str, *, threshold: float = 0.3, s3: S3Options | None = None,
                   allow_unsafe_weights: bool = False, trust_remote_code: bool = False,
                   num_threads: int | None = None, nms_iou: float | None = None,
                   nms_merge: bool = False, slice_batches: bool = True) -> OnnxDetector | None:
        """The detector for a local or s3:// model dir whose export for its one input shape is cached and
        whose processor's post-processing is written out here; None otherwise (the reason logged)."""
        weights = resolve_local_model(model, s3=s3, allow_unsafe_weights=allow_unsafe_weights,
                                      trust_remote_code=trust_remote_code)
        if weights is None:
            return _without(model, "a hub id")
        try:
            with open(os.path.join(weights.path, PREPROCESSOR_CONFIG), encoding="utf-8") as f:
                geometry = geometry_from_config(json.load(f))
            with open(os.path.join(weights.path, "config.json"), encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            return _without(model, f"its configs do not read ({e})")
        canvas = geometry.fixed_canvas() if geometry is not None else None
        if canvas is None:
            return _without(model, "its input has no one fixed shape")
        recipe = RECIPES.get(geometry.processor)
        if recipe is None:
            return _without(model, f"no post-processing written out for {geometry.processor}")
        if not isinstance(config.get("id2label"), dict):
            return _without(model, "config.json names no labels")
        identity = model_dir_identity(weights.path, weights.weights_hash, trust_remote_code=trust_remote_code)
        path = export_path(identity, (3, *canvas))
        if not os.path.exists(path) or os.path.exists(failed_marker(path)):
            return _without(model, "no checked export of it is cached yet")
        slices = (num_threads or 1) if slice_batches else 1
        try:
            session = load_session(path, 1 if slices > 1 else num_threads)
        except Exception as e:  # noqa: BLE001 - e.g. written by another ONNX Runtime: HFDetector re-checks it
            return _without(model, f"{path} does not load: {type(e).__name__}: {e}")
        return cls(model_id=weights.model_id, session=session, geometry=geometry, recipe=recipe,
                   id2label={int(k): str(v) for k, v in config["id2label"].items()}, threshold=threshold,
                   nms_iou=nms_iou, nms_merge=nms_merge, num_threads=num_threads, slices=slices)

    def detect_resized(self, images: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]]) -> list[Detections]:
        """HFDetector.detect_resized: images at model size (`self.geometry.resize` of the originals),
        boxes in the originals' pixels; `sizes` are the originals' (height, width)."""
        groups = resized_groups(images, sizes)

        def run(indices: list[int]) -> list[Detections]:
            return self._run([images[i] for i in indices], [tuple(sizes[i]) for i in indices])

        out: list[Detections | None] = [None] * len(images)
        for indices in groups.values():  # one size per group, as HFDetector does (see its `detect`)
            parts = slice_indices(indices, self.slices)
            found = run(indices) if len(parts) == 1 else run_slices(self._pool, self.clock, parts, run)
            for i, det in zip(indices, found):
                out[i] = det
        return out  # type: ignore[return-value]

    def _run(self, images: list[np.ndarray], image_sizes: list[tuple[int, int]]) -> list[Detections]:
        with self.clock.phase("preprocess"):
            arrays = pixel_arrays(images, self.geometry)
        with self.clock.phase("model"):
            logits, boxes = self._session.run(["logits", "pred_boxes"],
                                              {name: arrays[name] for name in self._graph_inputs})
        with self.clock.phase("postprocess"):
            frames, padded = box_frames(image_sizes, self.geometry, arrays["pixel_values"].shape[-2:])
            results = post_process(logits, boxes, recipe=self._recipe, frames=frames,
                                   threshold=candidate_threshold(self.threshold, self.nms_merge))
            return [finish(b, s, lab, image_size=size, padded=padded, threshold=self.threshold, nms_iou=self.nms_iou,
                           nms_merge=self.nms_merge, id2label=self._id2label)
                    for (b, s, lab), size in zip(results, image_sizes)]


def _without(model: str, why: str) -> None:
    log.info("model %s: loads with torch, not from its ONNX export alone: %s", model, why)
    return None
