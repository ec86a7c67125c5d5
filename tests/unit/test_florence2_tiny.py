"""The tiny Florence-2 dir loads like a hub checkpoint, generates, and round-trips box answers."""

from __future__ import annotations

import pytest
import torch
import transformers
from PIL import Image

from platescope.detectors.florence2_tiny import build_florence2_tiny, build_florence2_tiny_dir

W, H = 640, 480


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_florence2_tiny_dir(str(tmp_path_factory.mktemp("florence2") / "tiny"), seed=0)


@pytest.fixture(scope="module")
def loaded(tiny_dir: str):
    model = transformers.Florence2ForConditionalGeneration.from_pretrained(tiny_dir).eval()
    processor = transformers.AutoProcessor.from_pretrained(tiny_dir)
    return model, processor


def _center(bin_index: int, size: int) -> int:
    # Florence-2 bins are 1/1000 of the side; dequantize takes the bin centre and truncates to int.
    return int((bin_index + 0.5) * size / 1000)


def test_dir_loads_with_native_classes(loaded) -> None:
    model, processor = loaded
    assert isinstance(processor, transformers.Florence2Processor)
    tok = processor.tokenizer
    assert model.config.text_config.vocab_size == len(tok)
    assert model.config.image_token_id == tok.image_token_id == tok.convert_tokens_to_ids("<image>")
    assert tok.image_token_id == len(tok) - 1  # last, as upstream
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id) == (0, 1, 2)
    assert processor.num_image_tokens == processor.image_processor.image_seq_length == 5


def test_batch_generate_two_prompts(loaded) -> None:
    model, processor = loaded
    images = [Image.new("RGB", (120, 80), (200, 10, 10)), Image.new("RGB", (50, 90), (10, 10, 200))]
    prompts = ["<OD>", "<CAPTION_TO_PHRASE_GROUNDING> licence plate"]
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    assert inputs["pixel_values"].shape == (2, 3, 64, 64)
    assert (inputs["input_ids"] == processor.tokenizer.image_token_id).sum(dim=1).tolist() == [5, 5]
    decoded_prompt = processor.tokenizer.decode(inputs["input_ids"][1], skip_special_tokens=True)
    assert decoded_prompt == "Locate the phrases in the caption: licence plate"

    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, num_beams=1, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
    seqs = out.sequences
    assert seqs.shape[0] == 2 and 2 <= seqs.shape[1] <= 9
    assert seqs[:, 0].tolist() == [model.generation_config.decoder_start_token_id] * 2
    assert len(processor.batch_decode(seqs, skip_special_tokens=False)) == 2
    # Per-token probabilities of the chosen tokens, what a detector turns into box scores.
    logprobs = model.compute_transition_scores(seqs, out.scores, normalize_logits=True)
    assert logprobs.shape == (2, seqs.shape[1] - 1)
    assert bool(((logprobs <= 0) | torch.isinf(logprobs)).all())


def test_answer_round_trip_and_od_post_processing(loaded) -> None:
    _, processor = loaded
    tok = processor.tokenizer
    answer = "licence plate<loc_100><loc_200><loc_300><loc_400>"
    ids = tok(answer, add_special_tokens=False)["input_ids"]
    tokens = tok.convert_ids_to_tokens(ids)
    assert tokens[-4:] == ["<loc_100>", "<loc_200>", "<loc_300>", "<loc_400>"]
    assert tok.decode(ids, skip_special_tokens=False) == answer
    # Pitfall: <loc_*> are special tokens, so skip_special_tokens=True drops every coordinate.
    assert tok.decode(ids, skip_special_tokens=True) == "licence plate"

    expected = [_center(100, W), _center(200, H), _center(300, W), _center(400, H)]
    assert expected == [64, 96, 192, 192]
    parsed = processor.post_process_generation(f"</s><s>{answer}</s>", task="<OD>", image_size=(W, H))
    assert parsed == {"<OD>": {"bboxes": [expected], "labels": ["licence plate"]}}
    # The same through token ids (the path that skips a leading <s>).
    by_ids = processor.post_process_generation(sequence=[0, *ids, 2], task="<OD>", image_size=(W, H))
    assert by_ids == parsed


def test_phrase_grounding_format(loaded) -> None:
    _, processor = loaded
    # One phrase, then every box for it; a second phrase starts after the last <loc_>.
    answer = "licence plate<loc_0><loc_0><loc_999><loc_999><loc_500><loc_250><loc_750><loc_500>car<loc_10><loc_20><loc_30><loc_40>"
    ids = processor.tokenizer(answer, add_special_tokens=False)["input_ids"]
    assert processor.tokenizer.decode(ids) == answer
    parsed = processor.post_process_generation(answer, task="<CAPTION_TO_PHRASE_GROUNDING>", image_size=(W, H))
    assert parsed["<CAPTION_TO_PHRASE_GROUNDING>"] == {
        "bboxes": [[0, 0, 639, 479], [320, 120, 480, 240],
                   [_center(10, W), _center(20, H), _center(30, W), _center(40, H)]],
        "labels": ["licence plate", "licence plate", "car"],
    }
    # Banned phrases (post_processor_config) are dropped.
    banned = processor.post_process_generation("the image<loc_1><loc_2><loc_3><loc_4>",
                                               task="<CAPTION_TO_PHRASE_GROUNDING>", image_size=(W, H))
    assert banned["<CAPTION_TO_PHRASE_GROUNDING>"] == {"bboxes": [], "labels": []}


def test_open_vocabulary_detection_format(loaded) -> None:
    _, processor = loaded
    answer = "licence plate<loc_100><loc_200><loc_300><loc_400>"
    parsed = processor.post_process_generation(answer, task="<OPEN_VOCABULARY_DETECTION>", image_size=(W, H))
    assert parsed["<OPEN_VOCABULARY_DETECTION>"] == {
        "bboxes": [[64, 96, 192, 192]], "bboxes_labels": ["licence plate"],
        "polygons": [], "polygons_labels": [],
    }


def test_same_seed_same_weights() -> None:
    a, _ = build_florence2_tiny(seed=0)
    b, _ = build_florence2_tiny(seed=0)
    c, _ = build_florence2_tiny(seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert sum(p.numel() for p in a.parameters()) < 200_000
