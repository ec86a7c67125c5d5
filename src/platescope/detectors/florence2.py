"""Prompted detection with Florence-2 (transformers' native Florence2ForConditionalGeneration).

Florence-2 answers a task prompt with text: `label<loc_x1><loc_y1><loc_x2><loc_y2>...`, each
location a bin of 1/1000 of the image side. It gives no scores, but ranking, thresholds and mAP need
one, so each box is scored from the generation itself:

    score = geometric mean of the probabilities of the box's four location tokens and of its
            label's tokens (a grounded phrase's tokens count for every box of that phrase)

i.e. exp(mean log-probability) over those tokens, from `compute_transition_scores`. A box the model
was sure of, token by token, scores near 1; a box it hesitated over scores low. Coordinates use the
processor's own dequantisation (bin centres), so boxes equal `post_process_generation`'s.

An optional PEFT LoRA adapter is loaded on top of the base model; one detector serves one base model
with one adapter.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from platescope.detectors.loading import resolve_adapter, resolve_model
from platescope.schema import Detections
from platescope.storage import S3Options

DETECTION_TASKS = ("<OD>", "<CAPTION_TO_PHRASE_GROUNDING>", "<OPEN_VOCABULARY_DETECTION>")
_LOC = re.compile(r"^<loc_(\d+)>$")
NO_LABEL_ID = -1  # Florence-2 labels are free text, not indices of a fixed label set


def task_of(prompt: str) -> str:
    for task in DETECTION_TASKS:
        if prompt.startswith(task):
            return task
    raise ValueError(f"prompt {prompt!r}: must start with one of {', '.join(DETECTION_TASKS)}")


@dataclass
class ParsedBox:
    label: str
    bins: tuple[int, int, int, int]  # x1, y1, x2, y2 location bins
    score: float


def parse_boxes(tokens: Sequence[str], logprobs: Sequence[float], to_text) -> list[ParsedBox]:
    """Walk generated tokens (after the decoder start) into boxes with scores.

    A run of ordinary tokens is a label; each following group of four `<loc_*>` tokens is one box of
    that label; an unfinished group (generation cut off) is dropped. Special tokens other than
    locations (`</s>`, `<pad>`, `<s>`) end a label and are not scored. `to_text` joins label tokens
    into text (the tokenizer's convert_tokens_to_string).
    """
    boxes: list[ParsedBox] = []
    label_tokens: list[str] = []
    label_logprobs: list[float] = []
    locs: list[int] = []
    loc_logprobs: list[float] = []
    after_box = False
    for token, lp in zip(tokens, logprobs):
        m = _LOC.match(token)
        if m:
            locs.append(int(m.group(1)))
            loc_logprobs.append(float(lp))
            if len(locs) == 4:
                all_lp = label_logprobs + loc_logprobs
                boxes.append(ParsedBox(to_text(label_tokens).strip(), tuple(locs), math.exp(sum(all_lp) / len(all_lp))))
                locs, loc_logprobs, after_box = [], [], True
            continue
        if token in ("</s>", "<pad>", "<s>"):
            if token != "<s>":
                break
            continue
        if after_box or locs:  # a new label starts: the previous one's boxes are done
            label_tokens, label_logprobs, locs, loc_logprobs, after_box = [], [], [], [], False
        label_tokens.append(token)
        label_logprobs.append(float(lp))
    return boxes


def check_adapter_base(adapter: str, adapter_dir: str, model: str, base_hash: str | None) -> None:
    """An adapter `platescope train` exported records its base's weights hash; on another base it
    would load without complaint and answer nonsense, so that is an error naming both."""
    import json
    import os

    info_path = os.path.join(adapter_dir, "platescope_training.json")
    if base_hash is None or not os.path.isfile(info_path):
        return  # a hub base or an adapter trained elsewhere: nothing to compare
    with open(info_path) as f:
        trained_on = json.load(f).get("base_model") or {}
    expected = trained_on.get("weights_sha256_12")
    if expected and expected != base_hash:
        raise ValueError(f"adapter {adapter}: trained on base {trained_on.get('model')} (weights {expected}), "
                         f"not on model {model} (weights {base_hash}); give its base as the model")


class Florence2Detector:
    """Florence-2 from a local dir, an s3:// dir or a hub id, with an optional LoRA adapter."""

    def __init__(self, model: str, *, prompt: str, adapter: str | None = None, threshold: float = 0.0,
                 device: str = "auto", s3: S3Options | None = None, num_threads: int | None = None,
                 max_new_tokens: int = 256, allow_unsafe_weights: bool = False, trust_remote_code: bool = False,
                 cache_dir: str | None = None) -> None:
        import torch
        from transformers import AutoProcessor, Florence2ForConditionalGeneration

        if num_threads:
            torch.set_num_threads(num_threads)
        task_of(prompt)  # fail at construction, not on the first batch
        self.prompt, self.threshold, self.max_new_tokens = prompt, float(threshold), max_new_tokens
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                                   else "cpu" if device == "auto" else device)
        # Base and adapter are both resolved and checked before either loads: a refused adapter
        # costs no base model load.
        base = resolve_model(model, s3=s3, cache_dir=cache_dir, allow_unsafe_weights=allow_unsafe_weights,
                             trust_remote_code=trust_remote_code)
        lora = (resolve_adapter(adapter, s3=s3, cache_dir=cache_dir, allow_unsafe_weights=allow_unsafe_weights)
                if adapter else None)
        if lora is not None:
            check_adapter_base(adapter, lora.path, model, base.weights_hash)
        self.model_id = base.model_id
        self.processor = AutoProcessor.from_pretrained(base.path, **base.processor_kwargs)
        self.model = Florence2ForConditionalGeneration.from_pretrained(base.path, dtype=torch.float32,
                                                                       **base.model_kwargs)
        if lora is not None:
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, lora.path)
            self.model_id += f"+{lora.model_id}"
        self.model.to(self.device).eval()

    def detect(self, images: Sequence[np.ndarray], prompts: Sequence[str] | None = None) -> list[Detections]:
        prompts = list(prompts) if prompts is not None else [self.prompt] * len(images)
        return generate_detections(self.model, self.processor, images, prompts,
                                   max_new_tokens=self.max_new_tokens, threshold=self.threshold)


def generate_detections(model, processor, images: Sequence[np.ndarray], prompts: Sequence[str], *,
                        max_new_tokens: int, threshold: float = 0.0) -> list[Detections]:
    """Greedy generation for a batch of images and prompts -> boxes in original pixels, scored as the
    module doc says. `model` may carry a LoRA adapter (training's validation passes its own)."""
    import torch
    from PIL import Image

    if not len(images):
        return []
    for p in set(prompts):
        task_of(p)
    pil = [Image.fromarray(np.asarray(im)) for im in images]
    device = next(model.parameters()).device
    inputs = processor(text=list(prompts), images=pil, return_tensors="pt", padding=True)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=1, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
    logprobs = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
    tokenizer = processor.tokenizer
    results = []
    for seq, lp, image in zip(out.sequences.cpu(), logprobs.float().cpu(), pil):
        tokens = tokenizer.convert_ids_to_tokens(seq[1:].tolist())  # [0] is the decoder start
        parsed = [b for b in parse_boxes(tokens, lp.tolist(), tokenizer.convert_tokens_to_string)
                  if b.score >= threshold]
        results.append(parsed_to_detections(processor, parsed, image.size))
    return results


def parsed_to_detections(processor, parsed: list[ParsedBox], size: tuple[int, int]) -> Detections:
    import torch

    if not parsed:
        return Detections()
    bins = torch.tensor([b.bins for b in parsed], dtype=torch.float32)
    boxes = processor.post_processor.dequantize(bins, size).reshape(-1, 4).numpy()
    return Detections(boxes=boxes, scores=[b.score for b in parsed],
                      label_ids=[NO_LABEL_ID] * len(parsed), labels=[b.label for b in parsed])
