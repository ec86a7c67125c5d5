"""How the training loop builds, steps, validates and saves an object detector
(any AutoModelForObjectDetection): all weights train, a checkpoint is a whole model dir.

The loop in `loop.py` is the same for every family; a recipe module (this one, or
`florence2_recipe`) supplies these five functions.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from platescope.training.data import processor_inputs


def build(cfg, id2label: dict[int, str], s3, checkpoint_dir: str | None) -> tuple[Any, Any]:
    """(model in train mode, processor): from the checkpoint when resuming, else the preset or model dir."""
    import torch
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    from platescope.detectors.loading import resolve_model
    from platescope.detectors.presets import build_model

    if checkpoint_dir is None and cfg.preset:
        # In memory: under torch.distributed only rank 0 may write a model dir (save_pretrained).
        model, processor = build_model(cfg.preset, id2label=id2label, seed=cfg.seed)
        return model.train(), processor
    # The loading policy of detect: safetensors only unless allow_unsafe_weights, no remote code.
    weights = resolve_model(checkpoint_dir if checkpoint_dir is not None else cfg.model, s3=s3,
                            allow_unsafe_weights=cfg.allow_unsafe_weights)
    label2id = {name: i for i, name in id2label.items()}
    # dtype explicitly: transformers 5 would keep a float16 export's dtype, and train it in float16.
    model = AutoModelForObjectDetection.from_pretrained(weights.path, id2label=id2label, label2id=label2id,
                                                        ignore_mismatched_sizes=True, dtype=torch.float32,
                                                        **weights.model_kwargs)
    return model.train(), AutoImageProcessor.from_pretrained(weights.path, **weights.processor_kwargs)


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
    results = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=sizes)
    return [(r["boxes"].float().cpu().numpy(), r["scores"].float().cpu().numpy(), r["labels"].cpu().numpy())
            for r in results]


def save(model, processor, directory: str) -> None:
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


def finish_export(directory: str, cfg, s3) -> dict[str, Any]:
    """Nothing to add: the checkpoint already is a model dir `detect --model` loads."""
    return {}
