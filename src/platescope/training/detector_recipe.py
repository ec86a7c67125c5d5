"""How the training loop builds, steps, validates and saves an object detector
(any AutoModelForObjectDetection): all weights train, a checkpoint is a whole model dir.

The loop in `loop.py` is the same for every family; a recipe module (this one, or
`florence2_recipe`) supplies these five functions.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from platescope.detectors.geometry import canvas_target_sizes, clip_boxes, geometry_from_config
from platescope.training.data import processor_inputs
from platescope.training.lineage import BASE_INFO_KEY, base_model_record


def build(cfg, id2label: dict[int, str], s3, checkpoint_dir: str | None) -> tuple[Any, Any]:
    """(model in train mode, processor): from the checkpoint when resuming, else the preset or model dir."""
    import torch
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    from platescope.detectors.loading import resolve_model
    from platescope.detectors.presets import build_model

    if checkpoint_dir is None and cfg.preset:
        # In memory: under torch.distributed only rank 0 may write a model dir (save_pretrained).
        model, processor = build_model(cfg.preset, id2label=id2label, seed=cfg.seed)
        return model.train(), with_input_size(processor, cfg)
    # The loading policy of detect: safetensors only unless allow_unsafe_weights, no remote code.
    weights = resolve_model(checkpoint_dir if checkpoint_dir is not None else cfg.model, s3=s3,
                            allow_unsafe_weights=cfg.allow_unsafe_weights)
    label2id = {name: i for i, name in id2label.items()}
    # dtype explicitly: transformers 5 would keep a float16 export's dtype, and train it in float16.
    model = AutoModelForObjectDetection.from_pretrained(weights.path, id2label=id2label, label2id=label2id,
                                                        ignore_mismatched_sizes=True, dtype=torch.float32,
                                                        **weights.model_kwargs)
    processor = AutoImageProcessor.from_pretrained(weights.path, **weights.processor_kwargs)
    return model.train(), with_input_size(processor, cfg)


def with_input_size(processor, cfg):
    """The processor at the config's input size, when it sets one: letterboxed (aspect kept, fitted in
    input_height x input_width, zero-padded at the bottom and right to exactly that size) or stretched.
    Exported with the model, so `detect` sees the images as training did."""
    if cfg.input_height is None:
        return processor
    height, width = cfg.input_height, cfg.input_width
    if cfg.letterbox:
        change = {"size": {"max_height": height, "max_width": width}, "do_pad": True,
                  "pad_size": {"height": height, "width": width}}
    else:
        change = {"size": {"height": height, "width": width}, "do_pad": False, "pad_size": None}
    return type(processor).from_dict({**processor.to_dict(), **change})


def _encode(processor, batch, device, with_labels: bool):
    images, annotations = processor_inputs(batch)
    enc = processor(images=images, annotations=annotations if with_labels else None, return_tensors="pt")
    inputs = {k: enc[k].to(device) for k in ("pixel_values", "pixel_mask") if k in enc}
    if with_labels:
        inputs["labels"] = [{k: v.to(device) for k, v in t.items()} for t in enc["labels"]]
    return inputs, images


def loss(model, processor, batch: dict[str, np.ndarray], cfg, id2label: dict[int, str], device):
    inputs, _ = _encode(processor, batch, device, with_labels=True)
    return model(**inputs).loss


def predict(model, processor, batch: dict[str, np.ndarray], cfg, id2label: dict[int, str], device) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per image: (xyxy on original pixels, scores, class indices of the head)."""
    inputs, images = _encode(processor, batch, device, with_labels=False)
    outputs = model(**inputs)
    sizes = [im.shape[:2] for im in images]
    # A padded batch's boxes are fractions of the canvas (as the training targets were), as in detect.
    targets = canvas_target_sizes(sizes, geometry_from_config(processor.to_dict()),
                                  tuple(inputs["pixel_values"].shape[-2:]))
    results = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=targets)
    return [(clip_boxes(r["boxes"].float().cpu().numpy(), size), r["scores"].float().cpu().numpy(),
             r["labels"].cpu().numpy()) for r, size in zip(results, sizes)]


def save(model, processor, directory: str) -> None:
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


def finish_export(directory: str, cfg, s3) -> dict[str, Any]:
    """The checkpoint already is a model dir `detect --model` loads; a fine-tuned one records its base."""
    if cfg.model is None:
        return {}
    return {BASE_INFO_KEY: base_model_record(cfg, s3)}
