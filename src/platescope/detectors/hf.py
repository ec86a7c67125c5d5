"""Any Hugging Face `AutoModelForObjectDetection` family (DETR, Conditional/Deformable DETR, YOLOS,
RT-DETR, ...) behind the `Detector` protocol.

`detect` is deliberately the plain Hugging Face recipe (image processor on the batch -> model ->
`post_process_object_detection`), so a model behaves here exactly as on its model card; the only
additions are device placement and autocast. It is the hot path of the whole product, so it keeps
to one processor call, one host->device copy per input tensor and one device->host copy per output.

Loading is where the policy lives: safetensors only and no remote code unless the caller opts in,
s3:// dirs copied once into a local cache keyed by the objects' versions, and a `model_id` that
names the exact weights so the table can tell two runs' models apart.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import re
import shutil
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from platescope import storage
from platescope.schema import Detections
from platescope.storage import S3Options

_SAFE_SUFFIXES = (".safetensors", ".safetensors.index.json")
_PICKLE_SUFFIXES = (".bin", ".bin.index.json", ".pt", ".pth", ".ckpt")
# "name" or "org/name" as the hub spells them; anything else that does not exist is a missing path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_HALF_DTYPES = {"float16": "float16", "fp16": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def _default_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "platescope", "models")


def _weight_files(path: str) -> list[str]:
    """Top-level weight files (from_pretrained never reads weights from subfolders), sorted."""
    return sorted(
        f for f in os.listdir(path)
        if f.endswith(_SAFE_SUFFIXES + _PICKLE_SUFFIXES) and os.path.isfile(os.path.join(path, f))
    )


def check_weights(path: str, allow_unsafe_weights: bool) -> None:
    files = _weight_files(path)
    if any(f.endswith(_SAFE_SUFFIXES) for f in files):
        return
    if not files:
        raise ValueError(f"{path}: no model weights found (expected model.safetensors)")
    if not allow_unsafe_weights:
        raise ValueError(
            f"{path} holds only pickle weights ({', '.join(files)}), which can run arbitrary code when "
            "loaded; convert them to safetensors, or pass allow_unsafe_weights=True if you trust this model"
        )


def hash_weights(path: str) -> str:
    """12 hex chars of sha256 over the weight files' names and bytes: the same weights give the same
    id wherever they are stored (local dir, s3 copy), and any change to them gives a new one."""
    files = _weight_files(path)
    safe = [f for f in files if f.endswith(_SAFE_SUFFIXES)]
    digest = hashlib.sha256()
    for name in safe or files:  # pickle files lying beside safetensors are never loaded
        digest.update(name.encode() + b"\0")
        with open(os.path.join(path, name), "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()[:12]


def _fetch_s3_dir(uri: str, s3: S3Options | None, cache_dir: str | None) -> str:
    """A local copy of an s3:// model dir, reused while none of its objects change.

    Keyed by the objects' URIs, sizes and ETags, so an overwritten model is fetched again. The copy
    lands in a temporary sibling that is renamed into place, so several actors on one node can race
    for the same model without ever loading a half-written dir.
    """
    objects = storage.list_objects(uri, s3)
    key = hashlib.sha256(
        "\n".join([uri.rstrip("/")] + [f"{o.uri}\t{o.size}\t{o.version}" for o in objects]).encode()
    ).hexdigest()[:24]
    root = cache_dir or _default_cache_dir()
    dest = os.path.join(root, f"s3-{key}")
    if os.path.isdir(dest):
        return dest
    tmp = os.path.join(root, f".tmp-{key}-{uuid.uuid4().hex}")
    try:
        storage.download_dir(uri.rstrip("/"), tmp, s3)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not os.path.isdir(dest):  # not lost to a concurrent download of the same key
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def local_model_dir(model: str, s3: S3Options | None, cache_dir: str | None = None) -> str | None:
    """The local dir to load `model` from, or None when `model` is a hub id."""
    if storage.is_s3(model):
        return _fetch_s3_dir(model, s3, cache_dir)
    path = os.path.expanduser(model.removeprefix("file://"))
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise NotADirectoryError(f"{model}: is a file; a model is a dir with config.json and weights")
    if not _HUB_ID.match(model):
        raise FileNotFoundError(f"{model}: no such model dir")
    return None


def _hub_revision(model: str, cache_dir: str | None) -> Any:
    """The hub revision pinned to a commit, so processor and weights come from the same commit and
    model_id can name it. Best effort: transformers returns the request unchanged when offline."""
    try:
        from transformers.utils.hub import resolve_revision
    except ImportError:  # transformers releases before revision pinning
        return None
    return resolve_revision(model, None, cache_dir=cache_dir)


class HFDetector:
    """A detector from a local dir, an s3:// dir or a hub id (needs internet), loaded once."""

    def __init__(
        self,
        model: str,
        *,
        threshold: float = 0.3,
        device: str = "auto",
        dtype: str = "auto",
        trust_remote_code: bool = False,
        allow_unsafe_weights: bool = False,
        s3: S3Options | None = None,
        num_threads: int | None = None,
        cache_dir: str | None = None,
    ) -> None:
        import torch
        from transformers import AutoImageProcessor, AutoModelForObjectDetection

        if num_threads:
            torch.set_num_threads(num_threads)
        self.threshold = float(threshold)
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                                   else "cpu" if device == "auto" else device)
        # Weights stay float32; half precision is autocast on GPU, which keeps softmax, norms and box
        # arithmetic in float32. On CPU autocast buys little and changes results, so it is refused.
        if dtype in ("auto", "float32", "fp32"):
            self._amp_dtype = None
        elif dtype in _HALF_DTYPES:
            if self.device.type != "cuda":
                raise ValueError(f"dtype={dtype!r} needs a CUDA device; {self.device} runs float32")
            self._amp_dtype = getattr(torch, _HALF_DTYPES[dtype])
        else:
            raise ValueError(f"dtype={dtype!r}: use auto, float32, float16 or bfloat16")

        local = local_model_dir(model, s3, cache_dir)
        load_kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
        if local is not None:
            check_weights(local, allow_unsafe_weights)
            source, self.model_id = local, f"{model}@{hash_weights(local)}"
        else:
            revision = _hub_revision(model, cache_dir)
            commit = getattr(revision, "resolved", None)
            source, self.model_id = model, f"{model}@{commit}" if commit else model
            load_kwargs.update(cache_dir=cache_dir, revision=revision)
        try:
            self.processor = AutoImageProcessor.from_pretrained(source, **load_kwargs)
            # dtype explicitly: transformers 5 defaults to the checkpoint's dtype ("auto").
            self.model = AutoModelForObjectDetection.from_pretrained(
                source, use_safetensors=True if not allow_unsafe_weights else None,
                dtype=torch.float32, **load_kwargs,
            )
        except OSError as e:
            if local is not None:
                raise
            raise FileNotFoundError(
                f"{model}: no local dir of that name, and loading it as a Hugging Face hub id failed: {e}"
            ) from e
        self.model.to(self.device).eval()
        self._id2label = {int(k): str(v) for k, v in self.model.config.id2label.items()}
        # Only the inputs forward() names: e.g. the YOLOS processor returns a pixel_mask that the
        # model ignores, so copying it to the device would be wasted work.
        params = inspect.signature(self.model.forward).parameters
        names = list(self.processor.model_input_names)
        self._input_names = [n for n in names if n in params] or names

    def detect(self, images: Sequence[np.ndarray], prompts: Sequence[str] | None = None) -> list[Detections]:
        """One Detections per image (H x W x 3 uint8 RGB, any sizes), boxes in its own pixels.

        Images are run in groups of one size. Processors pad a mixed batch to its largest image and
        YOLOS/DETR then see the padding, so an image's boxes would depend on its batch neighbours;
        grouping keeps every result equal to running that image alone (a resumed run that batches
        differently gives the same table). Video frames and camera archives are mostly one size anyway.
        """
        if prompts is not None:
            raise ValueError("HFDetector takes no prompts (prompts must be None); use a prompted detector")
        for i, image in enumerate(images):
            if image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"image {i}: expected H x W x 3 RGB, got shape {image.shape}")
        groups: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault(image.shape[:2], []).append(i)
        out: list[Detections | None] = [None] * len(images)
        for indices in groups.values():
            for i, det in zip(indices, self._detect_same_size([images[i] for i in indices])):
                out[i] = det
        return out  # type: ignore[return-value]

    def _detect_same_size(self, images: list[np.ndarray]) -> list[Detections]:
        import torch

        # channels_last spelled out: a 3-pixel-wide image would otherwise be read as channels-first.
        batch = self.processor(images=images, return_tensors="pt", input_data_format="channels_last")
        inputs = {n: batch[n].to(self.device, non_blocking=True) for n in self._input_names if n in batch}
        amp = (torch.autocast(self.device.type, dtype=self._amp_dtype) if self._amp_dtype is not None
               else contextlib.nullcontext())
        with torch.inference_mode():
            with amp:
                outputs = self.model(**inputs)
            # Post-process on the host: two small transfers instead of three per image afterwards.
            outputs.logits = outputs.logits.float().cpu()
            outputs.pred_boxes = outputs.pred_boxes.float().cpu()
            results = self.processor.post_process_object_detection(
                outputs, threshold=self.threshold, target_sizes=[image.shape[:2] for image in images]
            )
        detections = []
        for r in results:
            label_ids = r["labels"].numpy()
            detections.append(Detections(
                boxes=r["boxes"].numpy(),
                scores=r["scores"].numpy(),
                label_ids=label_ids,
                labels=[self._id2label.get(int(i), str(int(i))) for i in label_ids],
            ))
        return detections
