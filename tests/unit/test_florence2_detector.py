"""Florence2Detector on a tiny Florence-2 built offline: parsing, scores, adapters, the Detector seam."""

from __future__ import annotations

import math

import numpy as np
import pytest

from platescope.detectors.florence2 import Florence2Detector, parse_boxes, parsed_to_detections, task_of
from platescope.detectors.florence2_tiny import build_florence2_scripted_dir, build_florence2_tiny_dir

GROUNDING = "<CAPTION_TO_PHRASE_GROUNDING> licence plate"
ANSWER = "licence plate<loc_100><loc_200><loc_300><loc_400>"


@pytest.fixture(scope="module")
def florence_dir(tmp_path_factory) -> str:
    return build_florence2_tiny_dir(str(tmp_path_factory.mktemp("florence2") / "tiny"), seed=0)


@pytest.fixture(scope="module")
def detector(florence_dir) -> Florence2Detector:
    return Florence2Detector(florence_dir, prompt="<OD>", device="cpu", max_new_tokens=12)


def tokens_of(detector, text: str) -> list[str]:
    tok = detector.processor.tokenizer
    return tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])


def test_boxes_whose_tokens_the_model_was_sure_of_score_higher(detector):
    tokens = tokens_of(detector, "licence plate<loc_100><loc_200><loc_300><loc_400>car<loc_1><loc_2><loc_3><loc_4></s>")
    logprobs = []
    for t in tokens:
        # sure of the plate (p=0.95 per token), unsure of the car's coordinates (p=0.2)
        logprobs.append(math.log(0.2) if t in ("<loc_1>", "<loc_2>", "<loc_3>", "<loc_4>") else math.log(0.95))
    boxes = parse_boxes(tokens, logprobs, detector.processor.tokenizer.convert_tokens_to_string)
    assert [b.label for b in boxes] == ["licence plate", "car"]
    assert [b.bins for b in boxes] == [(100, 200, 300, 400), (1, 2, 3, 4)]
    assert boxes[0].score == pytest.approx(0.95)
    assert boxes[1].score < 0.5 < boxes[0].score
    # geometric mean over the label's tokens and the four locations
    n_car = len(tokens_of(detector, "car"))
    assert boxes[1].score == pytest.approx(math.exp((n_car * math.log(0.95) + 4 * math.log(0.2)) / (n_car + 4)))


def test_a_phrase_with_several_boxes_and_a_cut_off_box(detector):
    tokens = tokens_of(detector, "licence plate<loc_1><loc_2><loc_3><loc_4><loc_5><loc_6><loc_7><loc_8>car<loc_9><loc_10>")
    boxes = parse_boxes(tokens, [0.0] * len(tokens), detector.processor.tokenizer.convert_tokens_to_string)
    assert [(b.label, b.bins) for b in boxes] == [("licence plate", (1, 2, 3, 4)), ("licence plate", (5, 6, 7, 8))]
    assert all(b.score == pytest.approx(1.0) for b in boxes)


@pytest.mark.parametrize("task", ["<OD>", "<OPEN_VOCABULARY_DETECTION>", "<CAPTION_TO_PHRASE_GROUNDING>"])
def test_boxes_equal_the_processors_own_post_processing(detector, task):
    text = "licence plate<loc_100><loc_200><loc_300><loc_400>"
    size = (640, 480)
    expected = detector.processor.post_process_generation(text, task=task, image_size=size)[task]
    tokens = tokens_of(detector, text)
    parsed = parse_boxes(tokens, [0.0] * len(tokens), detector.processor.tokenizer.convert_tokens_to_string)
    got = parsed_to_detections(detector.processor, parsed, size)
    labels = expected.get("labels", expected.get("bboxes_labels"))
    np.testing.assert_allclose(got.boxes, np.array(expected["bboxes"], np.float32), atol=1.0)
    assert got.labels == labels


def test_a_real_answer_becomes_a_confident_box_in_image_pixels(tmp_path):
    scripted = build_florence2_scripted_dir(str(tmp_path / "scripted"), prompt=GROUNDING, answer=ANSWER)
    det = Florence2Detector(scripted, prompt=GROUNDING, device="cpu", max_new_tokens=16, threshold=0.5)
    (found,) = det.detect([np.zeros((480, 640, 3), np.uint8)])
    assert found.labels == ["licence plate"] and found.label_ids.tolist() == [-1]
    np.testing.assert_allclose(found.boxes, [[64.32, 96.24, 192.32, 192.24]], atol=0.5)  # bin centres
    assert found.scores[0] > 0.8


def test_detect_gives_one_result_per_image_with_scores_in_range(detector):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (80, 120, 3), dtype=np.uint8), rng.integers(0, 255, (90, 50, 3), dtype=np.uint8)]
    found = detector.detect(images, prompts=["<OD>", "<CAPTION_TO_PHRASE_GROUNDING> licence plate"])
    assert len(found) == 2
    for det, image in zip(found, images):
        assert np.all((det.scores > 0) & (det.scores <= 1))
        assert np.all(det.boxes[:, 2] <= image.shape[1] + 1) and np.all(det.boxes[:, 3] <= image.shape[0] + 1)
    assert detector.detect([]) == []


def test_prompts_must_be_a_detection_task(florence_dir, detector):
    assert task_of("<OPEN_VOCABULARY_DETECTION> white van") == "<OPEN_VOCABULARY_DETECTION>"
    with pytest.raises(ValueError, match="must start with one of"):
        Florence2Detector(florence_dir, prompt="<CAPTION>", device="cpu")
    with pytest.raises(ValueError, match="must start with one of"):
        detector.detect([np.zeros((32, 32, 3), np.uint8)], prompts=["licence plate"])


def test_a_lora_adapter_changes_the_model_and_names_itself(florence_dir, tmp_path, detector):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Florence2ForConditionalGeneration

    base = Florence2ForConditionalGeneration.from_pretrained(florence_dir)
    torch.manual_seed(0)
    # init_lora_weights=False: a random (non-identity) adapter, as if trained
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False))
    lora.save_pretrained(str(tmp_path / "adapter"))
    adapted = Florence2Detector(florence_dir, prompt="<OD>", adapter=str(tmp_path / "adapter"), device="cpu",
                                max_new_tokens=12)
    assert "+" in adapted.model_id and adapted.model_id.startswith(detector.model_id)
    image = [np.full((64, 64, 3), 128, np.uint8)]
    inputs = detector.processor(text=["<OD>"], images=[image[0]], return_tensors="pt")
    with torch.no_grad():
        plain = detector.model(**inputs, decoder_input_ids=torch.tensor([[2]])).logits
        with_adapter = adapted.model(**inputs, decoder_input_ids=torch.tensor([[2]])).logits
    assert not torch.allclose(plain, with_adapter)
