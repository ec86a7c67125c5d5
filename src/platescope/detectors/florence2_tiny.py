"""A randomly initialised, tiny Florence-2 model dir, built offline.

Tests, the demo and benchmarks need a Florence-2 dir that loads through exactly the path a hub or
fine-tuned checkpoint takes (`Florence2ForConditionalGeneration` + `AutoProcessor`), on machines
without internet. The real tokenizer is BART's 50k byte-level BPE; here a few hundred merges are
trained on an in-code corpus, then the tokens Florence-2 adds on top are appended in the same order
as upstream: task tags (`<od>`, `</od>`, ...), `<loc_0>`..`<loc_999>` and finally `<image>`. They
are special tokens, so each is one id and `decode(..., skip_special_tokens=False)` keeps them (the
post-processor parses them out of the text; `skip_special_tokens=True` would drop every box).

The vision tower keeps DaViT's four stages (total stride 32) at one block each and a few channels,
so a 64 px image becomes 2x2 spatial tokens plus one temporal token: `image_seq_length` = 5
(upstream: 768 px -> 24x24 + 1 = 577).
"""

from __future__ import annotations

import json
import os
from typing import Any

IMAGE_SIZE = 64
IMAGE_TOKEN = "<image>"
NUM_LOC_BINS = 1000

# The tags upstream's processor adds after BART's vocabulary (before the locations: <od>..</ocr>).
_TAGS_BEFORE_LOCS = ["<od>", "</od>", "<ocr>", "</ocr>"]
_TAGS_AFTER_LOCS = [
    "<cap>", "</cap>", "<ncap>", "</ncap>", "<dcap>", "</dcap>", "<grounding>", "</grounding>",
    "<seg>", "</seg>", "<sep>", "<region_cap>", "</region_cap>", "<region_to_desciption>",
    "</region_to_desciption>", "<proposal>", "</proposal>", "<poly>", "</poly>", "<and>",
]

# Phrases upstream never grounds (a shortened version of its pronoun/"the image" black list).
_BANNED_GROUNDING = ["it", "I", "me", "mine", "you", "your", "yours", "he", "she", "they", "them",
                     "the image", "image", "images", "photo", "picture", "this", "that"]

# The parse rules upstream ships in processor_config.json. Florence2PostProcessor refuses a task
# whose key is missing, so every post-processing type must appear, even with an empty dict.
POST_PROCESSOR_CONFIG: dict[str, dict[str, Any]] = {
    "ocr": {
        "PATTERN": r"(.+?)<loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)><loc_(\d+)>",
        "AREA_THRESHOLD": 0.0,
    },
    "phrase_grounding": {"banned_grounding_tokens": _BANNED_GROUNDING},
    "pure_text": {},
    "description_with_bboxes": {},
    "description_with_polygons": {},
    "polygons": {},
    "bboxes": {},
    "description_with_bboxes_or_polygons": {},
}

# The sentences Florence2Processor turns task tokens into (its _construct_prompts), so prompts
# tokenize into a few merged tokens rather than bytes.
_TASK_PROMPTS = [
    "What is the text in the image?", "What is the text in the image, with regions?",
    "What does the image describe?", "Describe in detail what is shown in the image.",
    "Describe with a paragraph what is shown in the image.",
    "Locate the objects with category name in the image.",
    "Locate the objects in the image, with their descriptions.",
    "Locate the region proposals in the image.", "Locate the phrases in the caption: {input}",
    "Locate {input} in the image with mask", "What is the polygon mask of region {input}",
    "Locate {input} in the image.", "What is the region {input}?",
    "What does the region {input} describe?", "What text is in the region {input}?",
]
_CORPUS_WORDS = [
    "licence plate", "license plate", "number plate", "car", "cars", "truck", "bus", "van",
    "motorcycle", "bicycle", "person", "people", "a car with a licence plate", "the plate",
    "a person next to a car", "vehicle", "registration", "text", "sign", "road", "street",
]


def _train_bpe(vocab_size: int = 400) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocab and merges of a byte-level BPE trained on the task prompts and a few domain words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = [p.replace("{input}", w) for p in _TASK_PROMPTS for w in _CORPUS_WORDS] + _CORPUS_WORDS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        # BART's ids: <s>=0, <pad>=1, </s>=2, <unk>=3 (BartConfig's bos/pad/eos defaults), <mask> last.
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    state = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    return dict(state["vocab"]), merges


def build_tokenizer() -> Any:
    """BART's (fast, byte-level BPE) tokenizer class with Florence-2's added tokens, offline."""
    from transformers import BartTokenizer

    vocab, merges = _train_bpe()
    added = _TAGS_BEFORE_LOCS + [f"<loc_{i}>" for i in range(NUM_LOC_BINS)] + _TAGS_AFTER_LOCS
    # Appending them to the BPE vocab fixes their ids in upstream's order, <image> last (upstream:
    # 51289, Florence2Config's default image_token_id); registering them as special tokens keeps
    # each one a single token that BPE never splits.
    for token in [*added, IMAGE_TOKEN]:
        vocab[token] = len(vocab)
    return BartTokenizer(
        vocab=vocab, merges=merges, extra_special_tokens=added,
        model_specific_special_tokens={"image_token": IMAGE_TOKEN},
    )


def build_processor() -> Any:
    from transformers import Florence2Processor

    from platescope.detectors.presets import _processor

    # Upstream: CLIPImageProcessor at 768x768, bicubic, no crop, ImageNet mean/std.
    image_processor = _processor(
        "CLIPImageProcessor",
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=False,
        resample=3,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        image_seq_length=(IMAGE_SIZE // 32) ** 2 + 1,
    )
    return Florence2Processor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        post_processor_config=POST_PROCESSOR_CONFIG,
    )


def build_config(vocab_size: int, image_token_id: int, *, d_model: int = 16, init: float = 0.2) -> Any:
    # A wide init (as the presets' *-tiny-test models): at transformers' 0.02 a model this narrow
    # generates the same tokens for every image and prompt, so tests could not tell inputs apart.
    from transformers import BartConfig, Florence2Config, Florence2VisionConfig

    vision = Florence2VisionConfig(
        depths=[1, 1, 1, 1],
        embed_dim=[8, 8, 16, 16],
        num_heads=[1, 1, 2, 2],
        num_groups=[1, 1, 2, 2],
        window_size=4,
        drop_path_rate=0.0,
        mlp_ratio=2.0,
        projection_dim=d_model,
        initializer_range=init,
    )
    text = BartConfig(
        vocab_size=vocab_size,
        d_model=d_model,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=2 * d_model,
        decoder_ffn_dim=2 * d_model,
        max_position_embeddings=1024,
        dropout=0.0,
        init_std=init,
    )
    return Florence2Config(vision_config=vision, text_config=text, image_token_id=image_token_id)


def build_florence2_tiny(*, seed: int = 0) -> tuple[Any, Any]:
    """A randomly initialised tiny Florence-2 (eval mode) and its processor, in memory."""
    import torch
    from transformers import Florence2ForConditionalGeneration

    processor = build_processor()
    tokenizer = processor.tokenizer
    config = build_config(len(tokenizer), tokenizer.image_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Florence2ForConditionalGeneration(config)
    model.eval()
    return model, processor


def build_florence2_tiny_dir(dest: str, *, seed: int = 0) -> str:
    """Write a randomly initialised tiny Florence-2 (model + processor with an offline tokenizer) to dest."""
    model, processor = build_florence2_tiny(seed=seed)
    os.makedirs(dest, exist_ok=True)
    model.save_pretrained(dest)
    processor.save_pretrained(dest)
    return dest


def build_florence2_scripted_dir(dest: str, *, prompt: str, answer: str, seed: int = 0, steps: int = 150) -> str:
    """A tiny Florence-2 taught (a few seconds of teacher forcing on noise images) to answer `prompt`
    with `answer`, e.g. "licence plate<loc_100><loc_200><loc_300><loc_400>", whatever the image.

    A random tiny model almost never writes a well-formed `label<loc_*>x4` answer, so tests of what
    happens to real answers (parsing, scores, the pipeline's rows) use this one.
    """
    import numpy as np
    import torch
    from PIL import Image

    model, processor = build_florence2_tiny(seed=seed)
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (48 + 16 * i, 64, 3), dtype=np.uint8)) for i in range(4)]
    inputs = processor(text=[prompt] * len(images), images=images, return_tensors="pt", padding=True)
    labels = processor.tokenizer([answer] * len(images), return_tensors="pt")["input_ids"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(steps):
            loss = model(**inputs, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    os.makedirs(dest, exist_ok=True)
    model.save_pretrained(dest)
    processor.save_pretrained(dest)
    return dest
