"""The detector as a Ray Data actor: the model loads once per actor, then batches stream through.

The Detector itself knows nothing of Ray; this class only adapts Ray Data batches to `detect` and
its results back to table columns (plus the sink's bookkeeping columns).
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from platescope.pipeline.decode import CPU_DECODE, CPU_PREFIX
from platescope.schema import BOX, Detections

if TYPE_CHECKING:
    from platescope.pipeline.stage import DetectorSpec

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

# CPU milliseconds each row cost, by phase: decode (fetch wait excluded, decode and resize included)
# in the decode task; preprocess, model, postprocess and the rest of the batch in the actor, split
# evenly over the batch's rows. Appended after OUTPUT_SCHEMA's columns; the sink adds them up for the
# run's summary and never writes them.
ACTOR_CPU_PHASES = ("preprocess", "model", "postprocess", "actor_other")


def _nullable(values: np.ndarray) -> list:
    """numpy column -> Python list with NaN/None as None (Ray turns null ints into floats)."""
    out = []
    for v in values.tolist():
        out.append(None if v is None or (isinstance(v, float) and np.isnan(v)) else v)
    return out


def decide_num_threads(*, configured: int | None, on_gpu: bool, node_cpus: float, num_actors_max: int,
                       num_cpus_per_actor: float, cores: int) -> int | None:
    """Torch threads for one detector actor, decided on the node it runs on.

    `configured` (num_threads_per_actor) wins when set. On GPU the model is not CPU-bound: None
    leaves Ray's OMP_NUM_THREADS=num_cpus. On CPU the model is the bottleneck (decoding is cheap next
    to it), so an actor takes its share of its node's CPUs: the node's CPUs (as Ray reports them)
    divided by the actors that could land there, which is num_actors_max, or fewer when fewer fit
    (num_cpus_per_actor each); never less than the CPUs it reserved, never more than the `cores` this
    process may run on (Ray can be told of more CPUs than the machine has).
    """
    if configured is not None:
        return configured
    if on_gpu:
        return None
    fit = max(1, int(node_cpus // num_cpus_per_actor)) if num_cpus_per_actor > 0 else num_actors_max
    actors_on_node = max(1, min(num_actors_max, fit))
    share = int(node_cpus // actors_on_node)
    return max(1, min(cores, max(int(num_cpus_per_actor), share)))


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def _node_cpus() -> float:
    """CPUs of the node this process runs on: as Ray reports them when this is a Ray worker or driver,
    else the cores this process may use (a detector built outside Ray, e.g. by `platescope bench`)."""
    import sys

    ray = sys.modules.get("ray")  # never import Ray here: outside it, this is plain local compute
    if ray is not None and ray.is_initialized():
        node_id = ray.get_runtime_context().get_node_id()
        for node in ray.nodes():
            if node.get("NodeID") == node_id and node.get("Resources", {}).get("CPU"):
                return float(node["Resources"]["CPU"])
    return float(_usable_cores())


def spec_num_threads(spec: DetectorSpec) -> int | None:
    """`decide_num_threads` for a detector spec, with this node's CPUs."""
    return decide_num_threads(
        configured=spec.num_threads, on_gpu=spec.num_gpus > 0, node_cpus=_node_cpus(),
        num_actors_max=spec.num_actors_max, num_cpus_per_actor=spec.num_cpus_per_actor, cores=_usable_cores(),
    )


def _quiet_transformers() -> None:
    """No "Loading weights" progress bar: one per actor only clutters the console."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def build_detector(spec: DetectorSpec):
    """The detector a spec names; kept here so the pipeline and the benchmark build it the same way.

    Its torch thread count is decided here, on the machine that builds it (see decide_num_threads),
    not by the driver that wrote the spec.
    """
    num_threads = spec_num_threads(spec)
    if spec.detector == "hf":
        if (spec.onnx_runtime and spec.device == "cpu" and not spec.compile and spec.geometry is not None
                and spec.dtype in ("auto", "float32", "fp32")):
            # An export made and checked by an earlier run: no torch or transformers to load (seconds).
            from platescope.detectors.onnx_detector import OnnxDetector

            detector = OnnxDetector.from_cache(
                spec.model, threshold=spec.threshold, s3=spec.s3, allow_unsafe_weights=spec.allow_unsafe_weights,
                trust_remote_code=spec.trust_remote_code, num_threads=num_threads, nms_iou=spec.nms_iou,
                nms_merge=spec.nms_merge, slice_batches=spec.slice_batches)
            if detector is not None:
                return detector
        from platescope.detectors.hf import HFDetector

        _quiet_transformers()
        return HFDetector(spec.model, threshold=spec.threshold, device=spec.device, dtype=spec.dtype,
                          trust_remote_code=spec.trust_remote_code, allow_unsafe_weights=spec.allow_unsafe_weights,
                          s3=spec.s3, num_threads=num_threads, compile=spec.compile, nms_iou=spec.nms_iou,
                          nms_merge=spec.nms_merge, slice_batches=spec.slice_batches, onnx_runtime=spec.onnx_runtime)
    if spec.detector == "florence2":
        from platescope.detectors.florence2 import Florence2Detector

        _quiet_transformers()
        return Florence2Detector(
            spec.model, prompt=spec.prompt, adapter=spec.adapter, threshold=spec.threshold, device=spec.device,
            s3=spec.s3, num_threads=num_threads, max_new_tokens=spec.max_new_tokens,
            allow_unsafe_weights=spec.allow_unsafe_weights, trust_remote_code=spec.trust_remote_code,
        )
    raise ValueError(f"detector: unknown family {spec.detector!r}")


class DetectorActor:
    def __init__(self, spec: DetectorSpec):
        self.detector = build_detector(spec)
        self.prompt = spec.prompt
        # The geometry the decode tasks resized with: it must be what this model's processor does,
        # or every box would be scaled wrong; the driver read it from the same model dir.
        self.geometry = spec.geometry
        if self.geometry is not None and self.geometry != getattr(self.detector, "geometry", None):
            raise RuntimeError(f"model {spec.model}: its image processor does not match the input geometry "
                               f"the decode tasks used ({self.geometry!r}); was the model dir changed mid-run?")
        log.info("detector ready in pid %s: %s (%s threads; model in %s)", os.getpid(), self.detector.model_id,
                 getattr(self.detector, "num_threads", None) or "default", getattr(self.detector, "runtime", "torch"))

    def _detect(self, images: list[np.ndarray], sizes: list[tuple[int, int]]) -> list[Detections]:
        if self.geometry is None:
            return list(self.detector.detect(images))
        return list(self.detector.detect_resized(images, sizes))

    def _detect_all(self, images: list[np.ndarray], sizes: list[tuple[int, int]]) -> list[Detections | str]:
        """Detections per image, or an error string for an image the model itself failed on."""
        try:
            return self._detect(images, sizes)
        except Exception:
            if len(images) == 1:
                raise
        out: list[Detections | str] = []
        for img, size in zip(images, sizes):
            try:
                out.append(self._detect([img], [size])[0])
            except Exception as e:  # noqa: BLE001
                out.append(f"detector_failed: {type(e).__name__}: {e}")
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        started = time.process_time()
        table = self._rows(batch)
        return _with_cpu_columns(table, batch, self.detector, (time.process_time() - started) * 1000.0)

    def _rows(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["shard"])
        errors = _nullable(batch["error"])
        todo = [i for i in range(n) if errors[i] is None]
        results: dict[int, Detections | str] = {}
        if todo:
            images = [np.asarray(batch["image"][i]) for i in todo]
            # (height, width) of each decoded image: the boxes' frame when images come at model size
            sizes = [(int(batch["height"][i]), int(batch["width"][i])) for i in todo]
            try:
                found = self._detect_all(images, sizes)
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


def _with_cpu_columns(table: pa.Table, batch: dict[str, np.ndarray], detector, batch_ms: float) -> pa.Table:
    """The rows with their CPU milliseconds by phase (see ACTOR_CPU_PHASES). A detector without a phase
    clock (Florence-2's generate loop) counts all its time as model."""
    n = table.num_rows
    clock = getattr(detector, "clock", None)
    phases = clock.take() if clock is not None else {}
    measured = sum(phases.get(p, 0.0) for p in ACTOR_CPU_PHASES[:3])
    phases["actor_other"] = max(0.0, batch_ms - measured)
    if clock is None:
        phases["model"], phases["actor_other"] = batch_ms, 0.0
    decode = batch.get(CPU_DECODE)
    decode_ms = _nullable(decode) if decode is not None else [None] * n
    table = table.append_column(CPU_DECODE, pa.array(decode_ms, pa.float32()))
    for phase in ACTOR_CPU_PHASES:
        table = table.append_column(f"{CPU_PREFIX}{phase}", pa.array([phases.get(phase, 0.0) / max(n, 1)] * n, pa.float32()))
    return table
