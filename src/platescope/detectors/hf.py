"""Any Hugging Face `AutoModelForObjectDetection` family (DETR, Conditional/Deformable DETR, YOLOS,
RT-DETR, ...) behind the `Detector` protocol.

`detect` is deliberately the plain Hugging Face recipe (image processor on the batch -> model ->
`post_process_object_detection`), so a model behaves here as on its model card, up to float rounding:
the additions are device placement, autocast, batch norms folded into convolutions, and on CPU the
forward pass in ONNX Runtime (detectors.onnx_runtime). It is the hot path of the whole product, so
it keeps to one processor call, one host->device copy per input tensor and one device->host copy
per output.

Loading follows the one policy in `detectors.loading`: safetensors only and no remote code unless the
caller opts in, s3:// dirs copied once into a local cache keyed by the objects' versions, and a
`model_id` that names the exact weights so the table can tell two runs' models apart.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from platescope.cache import cache_folder
from platescope.cputime import PhaseClock
from platescope.detectors.fold import fold_conv_norms
from platescope.detectors.geometry import geometry_from_config, to_pixel_values
from platescope.detectors.loading import resolve_model
from platescope.detectors.postprocess import box_frames, candidate_threshold, finish
from platescope.detectors.slices import resized_groups, run_slices, slice_indices
from platescope.schema import Detections
from platescope.storage import S3Options

_HALF_DTYPES = {"float16": "float16", "fp16": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}


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
        compile: bool = False,
        nms_iou: float | None = None,
        nms_merge: bool = False,
        slice_batches: bool = True,
        onnx_runtime: bool = True,
    ) -> None:
        import torch
        from transformers import AutoImageProcessor, AutoModelForObjectDetection

        self.num_threads = num_threads
        if num_threads:
            torch.set_num_threads(num_threads)
        self.threshold = float(threshold)
        # Class-wise NMS after post-processing (None: off), for models that give near-duplicate boxes;
        # merging: each kept box the score-weighted mean of itself and those it suppresses.
        self.nms_iou = None if nms_iou is None else float(nms_iou)
        self.nms_merge = bool(nms_merge)
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

        weights = resolve_model(model, s3=s3, cache_dir=cache_dir, allow_unsafe_weights=allow_unsafe_weights,
                                trust_remote_code=trust_remote_code)
        self.model_id = weights.model_id
        try:
            self.processor = AutoImageProcessor.from_pretrained(weights.path, **weights.processor_kwargs)
            # dtype explicitly: transformers 5 defaults to the checkpoint's dtype ("auto").
            self.model = AutoModelForObjectDetection.from_pretrained(
                weights.path, dtype=torch.float32, **weights.model_kwargs)
        except OSError as e:
            if weights.is_local:
                raise
            raise FileNotFoundError(
                f"{model}: no local dir of that name, and loading it as a Hugging Face hub id failed: {e}"
            ) from e
        self.model.to(self.device).eval()
        # Batch norms folded into the convolutions before them: one pass over the activations instead
        # of three (about 10% of the default model's CPU time; same boxes up to float rounding).
        fold_conv_norms(self.model)
        # Convolutions run faster on channels-last tensors (measured 1.1-1.3x on the default model on
        # CPU, same boxes: tests/unit/test_fast_path_parity.py); a model without them is unaffected.
        self.channels_last = any(isinstance(m, torch.nn.Conv2d) for m in self.model.modules())
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self._id2label = {int(k): str(v) for k, v in self.model.config.id2label.items()}
        # Only the inputs forward() names: e.g. the YOLOS processor returns a pixel_mask that the
        # model ignores, so copying it to the device would be wasted work.
        params = inspect.signature(self.model.forward).parameters
        names = list(self.processor.model_input_names)
        self._input_names = [n for n in names if n in params] or names
        # What the processor does to an image, when it is a family whose rules we know: then CPU tasks
        # can resize to model size and `detect_resized` does the rest (None: only `detect`).
        self.geometry = geometry_from_config(self.processor.to_dict())
        # CPU time of preprocess, model and postprocess, which the pipeline reports per image.
        self.clock = PhaseClock()
        # On CPU, num_threads threads each run a slice of the batch on one torch thread (detectors.slices).
        # Not with torch.compile, whose graphs are not shared across threads here, nor on a GPU, which
        # one stream of batches keeps busy.
        self.slices = (num_threads or 1) if slice_batches and self.device.type == "cpu" and not compile else 1
        # What runs the model. torch.compile: compiled on the first batch of each input shape (minutes on
        # CPU for the default model), and kept in inductor's cache on disk so a later run on this machine
        # loads it instead. Otherwise on CPU, ONNX Runtime (1.3x on the default model; see onnx_runtime)
        # where the model exports and agrees with PyTorch; eager PyTorch for the rest, and on a GPU.
        self._forward = self.model
        if compile:
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", cache_folder("torch-compile"))
            self._forward = torch.compile(self.model, dynamic=False)
        elif onnx_runtime and self.device.type == "cpu":
            from platescope.detectors.onnx_runtime import OnnxForward, export_identity, model_dir_identity

            identity = (model_dir_identity(weights.path, weights.weights_hash, trust_remote_code=trust_remote_code)
                        if weights.is_local else
                        export_identity(self.model_id, self.model.config.to_json_string(use_diff=False),
                                        self.processor.to_json_string(), trust_remote_code=trust_remote_code))
            self._forward = OnnxForward(self.model, identity, num_threads=1 if self.slices > 1 else num_threads)
        self._pool = None
        if self.slices > 1:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.slices, thread_name_prefix="detector-slice",
                                            initializer=torch.set_num_threads, initargs=(1,))

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
            for i, det in zip(indices, self._sliced(indices, lambda part: self._detect_same_size(
                    [images[i] for i in part]))):
                out[i] = det
        return out  # type: ignore[return-value]

    def detect_resized(self, images: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]]) -> list[Detections]:
        """One Detections per image already at model size (`self.geometry.resize` of the original, as
        the decode tasks make them), boxes in the original's pixels: `sizes` are the originals'
        (height, width). Rescale, normalise and pad run on the model's device, so the only CPU work
        left here is the model itself. Grouped by size for the reason `detect` gives."""
        if self.geometry is None:
            raise ValueError("this model's image processor has no known geometry; use detect()")
        groups = resized_groups(images, sizes)

        def run(indices: list[int]) -> list[Detections]:
            with self.clock.phase("preprocess"):
                inputs = to_pixel_values([images[i] for i in indices], self.geometry, self.device,
                                         channels_last=self._channels_last_inputs())
            return self._run({n: inputs[n] for n in self._input_names if n in inputs},
                             [tuple(sizes[i]) for i in indices])

        out: list[Detections | None] = [None] * len(images)
        for indices in groups.values():
            for i, det in zip(indices, self._sliced(indices, run)):
                out[i] = det
        return out  # type: ignore[return-value]

    def _channels_last_inputs(self) -> bool:
        """Channels-last pixel_values for a PyTorch model with convolutions; ONNX Runtime takes NCHW."""
        return self.channels_last and self.runtime == "torch"

    @property
    def runtime(self) -> str:
        """What runs the model: "onnxruntime" or "torch"."""
        return getattr(self._forward, "runtime", "torch")

    def _sliced(self, indices: list[int], run) -> list[Detections]:
        """run(indices) for one group of same-size images: cut into `self.slices` slices run at once on
        the slice threads (one torch thread each), or whole on this thread with all of num_threads."""
        parts = slice_indices(indices, self.slices)
        if len(parts) == 1:
            if self._pool is not None:
                import torch

                # Starting the slice threads set torch's count for threads not yet started to 1; this
                # thread (Ray may call from a new one) gets all of num_threads back.
                torch.set_num_threads(self.num_threads)
            return run(indices)
        return run_slices(self._pool, self.clock, parts, run)

    def _detect_same_size(self, images: list[np.ndarray]) -> list[Detections]:
        import torch

        # input_data_format="channels_last" spelled out: a 3-pixel-wide image would otherwise be read as channels-first.
        with self.clock.phase("preprocess"):
            batch = self.processor(images=images, return_tensors="pt", input_data_format="channels_last")
            inputs = {n: batch[n].to(self.device, non_blocking=True) for n in self._input_names if n in batch}
            pixels = inputs.get("pixel_values")
            if self._channels_last_inputs() and pixels is not None and pixels.dim() == 4:
                inputs["pixel_values"] = inputs["pixel_values"].contiguous(memory_format=torch.channels_last)
        return self._run(inputs, [image.shape[:2] for image in images])

    def _run(self, inputs: dict[str, Any], image_sizes: list[tuple[int, int]]) -> list[Detections]:
        """The model on prepared inputs, then the processor's own post-processing to the original image
        sizes (of a padded canvas, when the batch was padded: see geometry.canvas_target_sizes)."""
        import torch

        pixels = inputs.get("pixel_values")
        frames, padded = (box_frames(image_sizes, self.geometry, tuple(pixels.shape[-2:])) if pixels is not None
                          else (image_sizes, False))

        amp = (torch.autocast(self.device.type, dtype=self._amp_dtype) if self._amp_dtype is not None
               else contextlib.nullcontext())
        with torch.inference_mode():
            with self.clock.phase("model"):
                with amp:
                    outputs = self._forward(**inputs)
                # Post-process on the host: two small transfers instead of three per image afterwards.
                # (Counted with the model: on a GPU this is where the host waits for it.)
                outputs.logits = outputs.logits.float().cpu()
                outputs.pred_boxes = outputs.pred_boxes.float().cpu()
            with self.clock.phase("postprocess"):
                results = self.processor.post_process_object_detection(
                    outputs, threshold=candidate_threshold(self.threshold, self.nms_merge), target_sizes=frames)
                detections = [finish(r["boxes"].numpy(), r["scores"].numpy(), r["labels"].numpy(), image_size=size,
                                     padded=padded, threshold=self.threshold, nms_iou=self.nms_iou,
                                     nms_merge=self.nms_merge, id2label=self._id2label)
                              for r, size in zip(results, image_sizes)]
        return detections
