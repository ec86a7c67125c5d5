"""The detector as a Ray Data actor: the model loads once per actor, then batches stream through.

The Detector itself knows nothing of Ray; this class only adapts Ray Data batches to `detect` and
its results back to table columns (plus the sink's bookkeeping columns).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import pyarrow as pa

from platescope.schema import BOX, Detections

log = logging.getLogger(__name__)

PASSTHROUGH = ["shard", "seq", "shard_rows", "source_uri", "frame_index", "timestamp_s", "width", "height"]

OUTPUT_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("seq", pa.int64()),
        ("shard_rows", pa.int64()),
        ("source_uri", pa.string()),
        ("frame_index", pa.int64()),
        ("timestamp_s", pa.float64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("boxes", pa.list_(BOX)),
        ("scores", pa.list_(pa.float32())),
        ("label_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.string())),
        ("model", pa.string()),
        ("prompt", pa.string()),
        ("error", pa.string()),
    ]
)


def _nullable(values: np.ndarray) -> list:
    """numpy column -> Python list with NaN/None as None (Ray turns null ints into floats)."""
    out = []
    for v in values.tolist():
        out.append(None if v is None or (isinstance(v, float) and np.isnan(v)) else v)
    return out


def build_detector(spec: dict[str, Any]):
    """The detector a spec names; kept here so the pipeline and the benchmark build it the same way."""
    if spec["detector"] == "hf":
        from platescope.detectors.hf import HFDetector

        return HFDetector(
            spec["model"],
            threshold=spec["threshold"],
            device=spec["device"],
            dtype=spec["dtype"],
            trust_remote_code=spec["trust_remote_code"],
            allow_unsafe_weights=spec["allow_unsafe_weights"],
            s3=spec["s3"],
            num_threads=spec.get("num_threads"),
        )
    if spec["detector"] == "florence2":
        from platescope.detectors.florence2 import Florence2Detector

        return Florence2Detector(
            spec["model"], prompt=spec["prompt"], adapter=spec.get("adapter"), threshold=spec["threshold"],
            device=spec["device"], s3=spec["s3"], num_threads=spec.get("num_threads"),
            max_new_tokens=spec.get("max_new_tokens", 256), allow_unsafe_weights=spec["allow_unsafe_weights"],
        )
    raise ValueError(f"detector: unknown family {spec['detector']!r}")


class DetectorActor:
    def __init__(self, spec: dict[str, Any]):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one "Loading weights" bar per actor only clutters the console
        self.detector = build_detector(spec)
        self.prompt = spec.get("prompt")
        log.info("detector ready in pid %s: %s", os.getpid(), self.detector.model_id)

    def _detect_all(self, images: list[np.ndarray]) -> list[Detections | str]:
        """Detections per image, or an error string for an image the model itself failed on."""
        try:
            return list(self.detector.detect(images))
        except Exception:
            if len(images) == 1:
                raise
        out: list[Detections | str] = []
        for img in images:
            try:
                out.append(self.detector.detect([img])[0])
            except Exception as e:  # noqa: BLE001
                out.append(f"detector_failed: {type(e).__name__}: {e}")
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["shard"])
        errors = _nullable(batch["error"])
        todo = [i for i in range(n) if errors[i] is None]
        results: dict[int, Detections | str] = {}
        if todo:
            images = [np.asarray(batch["image"][i]) for i in todo]
            try:
                found = self._detect_all(images)
            except Exception as e:  # noqa: BLE001 - a single image the model cannot take
                found = [f"detector_failed: {type(e).__name__}: {e}"]
            results = dict(zip(todo, found))
        empty = Detections()
        dets: list[Detections] = []
        for i in range(n):
            r = results.get(i, empty)
            if isinstance(r, str):
                errors[i] = r
                r = empty
            dets.append(r)
        columns = {name: _nullable(batch[name]) for name in PASSTHROUGH}
        columns.update(
            boxes=[d.boxes.tolist() for d in dets],
            scores=[d.scores.tolist() for d in dets],
            label_ids=[d.label_ids.tolist() for d in dets],
            labels=[list(d.labels) for d in dets],
            model=[self.detector.model_id] * n,
            prompt=[self.prompt] * n,
            error=errors,
        )
        return pa.Table.from_pydict(columns, schema=OUTPUT_SCHEMA)
