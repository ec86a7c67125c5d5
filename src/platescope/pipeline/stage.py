"""The detect graph as reusable Ray Data stages over a typed detector spec, so `detect`, `bench` and a
user's own pipeline build it the same way:

    ds = shards_dataset(shards, geometry=spec.geometry, batch_size=8)  # {"shard": id, "entries": [...]}
    ds = decode_stage(ds, s3=s3, video_fps=1.0, geometry=spec.geometry)
    ds = detect_stage(ds, spec, batch_size=8)

`decode_stage` fetches, decodes and (with the model's geometry) resizes on CPU tasks; `detect_stage`
runs the detector on an actor pool and gives detection rows (plus the sink's bookkeeping columns).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from platescope import storage
from platescope.detectors.geometry import InputGeometry
from platescope.storage import S3Options

log = logging.getLogger(__name__)


class DetectorSpec(BaseModel):
    """What a detector actor needs to build its detector, and nothing measured on the driver: on a
    cluster the driver is not the node the actors run on, so torch's thread count is decided in each
    actor from its own node (pipeline.actor.decide_num_threads); `num_threads` is only what the config
    says. Small and picklable: it travels to every actor."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    detector: Literal["hf", "florence2"] = "hf"
    model: str
    threshold: float = 0.3
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    allow_unsafe_weights: bool = False
    # Left out of dumps (its repr masks the keys): a dump printed or saved would otherwise show them.
    s3: S3Options | None = Field(None, exclude=True)
    num_threads: int | None = None  # None: decided in the actor
    num_gpus: float = 0.0
    num_cpus_per_actor: float = 1.0
    num_actors_max: int = 1
    prompt: str | None = None
    adapter: str | None = None
    max_new_tokens: int = 256
    compile: bool = False  # torch.compile the model (hf detectors)
    nms_iou: float | None = None  # class-wise NMS after post-processing (hf detectors)
    nms_merge: bool = False  # with nms_iou: merging NMS (kept boxes averaged with those they suppress)
    slice_batches: bool = True  # on CPU, each torch thread runs its own slice of a batch (hf detectors)
    onnx_runtime: bool = True  # on CPU, the model in ONNX Runtime where it exports (hf detectors)
    # The model's input geometry when the decode tasks resize to it (None: the detector's processor
    # prepares full-size images); the actor checks it against the processor it loads.
    geometry: InputGeometry | None = None

    @classmethod
    def from_config(cls, cfg: Any, s3: S3Options, num_gpus: float, geometry: InputGeometry | None = None
                    ) -> DetectorSpec:
        """The spec of a DetectConfig, with the GPUs per actor resolved against the cluster."""
        return cls(
            detector=cfg.detector, model=cfg.model, threshold=cfg.threshold,
            device=cfg.device if num_gpus > 0 or cfg.device != "auto" else "cpu", dtype=cfg.dtype,
            trust_remote_code=cfg.trust_remote_code, allow_unsafe_weights=cfg.allow_unsafe_weights, s3=s3,
            num_threads=cfg.num_threads_per_actor, num_gpus=num_gpus, num_cpus_per_actor=cfg.num_cpus_per_actor,
            num_actors_max=cfg.num_actors_max, prompt=cfg.prompt, adapter=cfg.adapter,
            max_new_tokens=cfg.max_new_tokens, compile=cfg.compile, nms_iou=cfg.nms_iou, nms_merge=cfg.nms_merge,
            slice_batches=cfg.slice_batches, onnx_runtime=cfg.onnx_runtime,
            geometry=geometry,
        )


def model_geometry(detector: str, model: str, s3: S3Options | None) -> InputGeometry | None:
    """The input geometry of a model dir (local or s3://) when the decode tasks can resize to it; None
    (logged) for a prompted detector, a hub id, or a processor whose rules are not known."""
    if detector != "hf":
        return None
    from platescope.detectors.geometry import read_geometry

    geometry = read_geometry(model, s3) if storage.is_s3(model) or os.path.isdir(model) else None
    if geometry is None:
        log.info("model %s: its image processor is not one whose geometry is known; images go to the detector "
                 "at full size and its processor prepares them", model)
    return geometry


FULL_SIZE_BLOCK_BYTES = 8 * 1024 * 1024  # blocks of full-size images: a few frames each
TYPICAL_FRAME = (1080, 1920)  # (height, width) a block is sized for when the model keeps aspect
# Detector batches per decoded block. Ray Data gives an actor one task per block here, and each task
# costs the actor a pause, so one batch per block cut the steady rate; a whole 64-image shard per block
# kept the actor waiting for the first shard. Measured on 2 cores (default model, 534 720p JPEGs,
# alternating whole-process pairs): 4 batches 43.1 s against 47.4 s for 8, and 8 batches 5% faster
# than 1; the first result comes after four batches instead of the eight of a whole shard.
BATCHES_PER_BLOCK = 4


def decoded_block_bytes(geometry: InputGeometry | None, batch_size: int) -> int:
    """Ray Data's target_max_block_size for the decoded rows: BATCHES_PER_BLOCK detector batches of
    model-size images. A block ends at the first row past the target, so blocks hold whole batches
    and none leaves a short remainder batch, which would leave slice threads idle. Sized for a 1080p
    frame when the model keeps aspect."""
    if geometry is None:
        return FULL_SIZE_BLOCK_BYTES
    height, width = geometry.output_size(*TYPICAL_FRAME)
    return int((max(1, batch_size) * BATCHES_PER_BLOCK - 0.5) * height * width * 3)


def shards_dataset(shards: list[dict[str, Any]], *, geometry: InputGeometry | None, batch_size: int) -> Any:
    """The shards as a Dataset (one block each) whose decoded blocks will hold whole detector batches. A
    Dataset keeps the DataContext it was made under, so Ray Data's block target is set while it is
    made, and then given back to what it was for the caller's other datasets."""
    import ray

    ctx = ray.data.DataContext.get_current()
    previous = ctx.target_max_block_size
    ctx.target_max_block_size = decoded_block_bytes(geometry, batch_size)
    try:
        return ray.data.from_items(shards, override_num_blocks=len(shards))
    finally:
        ctx.target_max_block_size = previous


def decode_stage(ds: Any, *, s3: S3Options | None, video_fps: float, max_pixels: int = 100_000_000,
                 geometry: InputGeometry | None = None, draft: bool = False, num_cpus: float = 0.5) -> Any:
    """Shards -> one row per image or sampled frame (model-size pixels when `geometry` is given)."""
    from platescope.pipeline.guard import decode_shard_guarded

    return ds.flat_map(decode_shard_guarded, num_cpus=num_cpus,
                       fn_kwargs={"s3": s3, "video_fps": video_fps, "max_pixels": max_pixels,
                                  "geometry": geometry, "draft": draft})


def detect_stage(ds: Any, spec: DetectorSpec, *, batch_size: int = 8, num_actors_min: int = 1,
                 num_actors_max: int | None = None, num_cpus: float | None = None) -> Any:
    """Decoded rows -> detection rows, on a pool of DetectorActors (one model each)."""
    import ray

    from platescope.pipeline.actor import DetectorActor

    return ds.map_batches(
        DetectorActor, fn_constructor_kwargs={"spec": spec}, batch_size=batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=num_actors_min, max_size=num_actors_max or spec.num_actors_max),
        num_cpus=spec.num_cpus_per_actor if num_cpus is None else num_cpus, num_gpus=spec.num_gpus,
    )
