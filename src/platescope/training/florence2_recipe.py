"""How the training loop fine-tunes Florence-2 with a PEFT LoRA adapter.

The base model stays frozen; only the adapter's low-rank matrices train, so a checkpoint is the
adapter alone (megabytes, not the base's gigabyte). Each image's target is the answer Florence-2
should give to the task prompt: its boxes in reading order (top to bottom, then left to right),
each written as

    <category name><loc_x1><loc_y1><loc_x2><loc_y2>

with the processor's own quantisation into 1000 location bins (the inverse of what detection
dequantises). Answers longer than `max_new_tokens` keep as many whole boxes as fit. Validation
generates answers exactly as `detect --detector florence2` does and scores them with the evaluate
code; a generated label that is not a category name counts as no detection of any category.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from platescope.detectors.geometry import xywh_to_xyxy
from platescope.detectors.loading import resolve_adapter, resolve_model
from platescope.training.data import processor_inputs
from platescope.training.lineage import BASE_INFO_KEY, base_model_record

ADAPTER_CONFIG = "adapter_config.json"


def _base(cfg, s3):
    """(base model, its processor, the resolved source) under detect's loading policy."""
    import torch
    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    weights = resolve_model(cfg.model, s3=s3, allow_unsafe_weights=cfg.allow_unsafe_weights)
    processor = AutoProcessor.from_pretrained(weights.path, **weights.processor_kwargs)
    model = Florence2ForConditionalGeneration.from_pretrained(weights.path, dtype=torch.float32,
                                                              **weights.model_kwargs)
    return model, processor, weights


def lora_config(cfg):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(cfg.lora.target_modules), bias="none")


def build(cfg, id2label: dict[int, str], s3, checkpoint_dir: str | None) -> tuple[Any, Any]:
    """(the base with a trainable adapter, the base's processor); the adapter from the checkpoint
    when resuming, else freshly initialised (LoRA's B = 0: the model starts as the base)."""
    from peft import PeftModel, get_peft_model

    base, processor, _ = _base(cfg, s3)
    if checkpoint_dir is not None:
        adapter = resolve_adapter(checkpoint_dir, s3=s3, allow_unsafe_weights=cfg.allow_unsafe_weights)
        model = PeftModel.from_pretrained(base, adapter.path, is_trainable=True)
    else:
        model = get_peft_model(base, lora_config(cfg))
    return model.train(), processor


def answer(boxes_xywh: np.ndarray, labels: np.ndarray, id2label: dict[int, str], size: tuple[int, int],
           processor, max_tokens: int) -> str:
    """The target text for one image of `size` (width, height), as the module doc describes."""
    import torch

    boxes = np.asarray(boxes_xywh, np.float32).reshape(-1, 4)
    if not len(boxes):
        return ""
    xyxy = xywh_to_xyxy(boxes)
    bins = processor.post_processor.quantize(torch.from_numpy(xyxy), size).reshape(-1, 4).tolist()
    order = sorted(range(len(boxes)), key=lambda i: (bins[i][1], bins[i][0]))
    budget = max_tokens - 2  # <s> and </s>
    parts = []
    label_tokens: dict[str, int] = {}  # a crowded image repeats one label many times
    for i in order:
        name = id2label[int(labels[i])]
        if name not in label_tokens:
            label_tokens[name] = len(processor.tokenizer.tokenize(name))
        cost = label_tokens[name] + 4
        if cost > budget:
            break
        budget -= cost
        parts.append(name + "".join(f"<loc_{int(b)}>" for b in bins[i]))
    return "".join(parts)


def loss(model, processor, batch: dict[str, np.ndarray], cfg, id2label: dict[int, str], device):
    from PIL import Image

    images, annotations = processor_inputs(batch)
    answers = []
    for image, ann in zip(images, annotations):
        boxes = np.array([a["bbox"] for a in ann["annotations"]], np.float32).reshape(-1, 4)
        labels = np.array([a["category_id"] for a in ann["annotations"]], np.int64)
        answers.append(answer(boxes, labels, id2label, (image.shape[1], image.shape[0]), processor, cfg.max_new_tokens))
    pil = [Image.fromarray(im) for im in images]
    inputs = processor(text=[cfg.task_prompt] * len(pil), images=pil, return_tensors="pt", padding=True)
    target = processor.tokenizer(answers, return_tensors="pt", padding=True)
    labels = target["input_ids"].masked_fill(target["attention_mask"] == 0, -100)  # no loss on padding
    inputs = {k: v.to(device) for k, v in inputs.items()}
    return model(**inputs, labels=labels.to(device)).loss


def predict(model, processor, batch: dict[str, np.ndarray], cfg, id2label: dict[int, str], device) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per image: (xyxy on original pixels, scores, class indices; -1 for a label that is no category)."""
    from platescope.detectors.florence2 import generate_detections

    label2id = {name: i for i, name in id2label.items()}
    images = [np.asarray(im) for im in batch["image"]]
    found = generate_detections(model, processor, images, [cfg.task_prompt] * len(images),
                                max_new_tokens=cfg.max_new_tokens)
    return [(d.boxes, d.scores, np.array([label2id.get(lab, -1) for lab in d.labels], np.int64)) for d in found]


def save(model, processor, directory: str) -> None:
    """The adapter alone (PEFT's adapter_config.json + adapter_model.safetensors)."""
    model.save_pretrained(directory)


def finish_export(directory: str, cfg, s3) -> dict[str, Any]:
    """Record the base the adapter belongs to (as the user named it, its weights' hash, and its own
    training record if it has one); with `merge`, replace the adapter by base + adapter folded into one
    full model dir."""
    from peft import PeftModel

    identity = base_model_record(cfg, s3)
    readme = os.path.join(directory, "README.md")  # PEFT's empty model card
    if os.path.exists(readme):
        os.remove(readme)
    if cfg.merge:  # only merging needs the base's weights in memory
        base, processor, _ = _base(cfg, s3)
        adapter = resolve_adapter(directory, allow_unsafe_weights=cfg.allow_unsafe_weights)
        merged = PeftModel.from_pretrained(base, adapter.path).merge_and_unload()
        for name in (ADAPTER_CONFIG, "adapter_model.safetensors"):
            os.remove(os.path.join(directory, name))
        merged.save_pretrained(directory)
        processor.save_pretrained(directory)
    else:
        path = os.path.join(directory, ADAPTER_CONFIG)
        with open(path) as f:
            adapter_config = json.load(f)
        adapter_config["base_model_name_or_path"] = cfg.model  # not this machine's cache path
        with open(path, "w") as f:
            json.dump(adapter_config, f, indent=2)
    return {BASE_INFO_KEY: identity, "merged": cfg.merge}
