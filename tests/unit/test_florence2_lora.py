"""Florence-2 LoRA fine-tuning pieces on a tiny Florence-2 built offline: targets, what a step
changes, saving and reloading the adapter, merging it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from platescope.config import TrainConfig
from platescope.detectors.florence2 import Florence2Detector, generate_detections
from platescope.detectors.florence2_tiny import build_florence2_scripted_dir, build_florence2_tiny_dir
from platescope.training import florence2_recipe as recipe

PROMPT = "<OD>"
ID2LABEL = {0: "licence_plate", 1: "car"}
# The scripted base answers this for every image; the adapter is taught another box.
BASE_ANSWER = "licence_plate<loc_100><loc_200><loc_300><loc_400>"
BASE_BINS = [100, 200, 300, 400]
# The taught box is written with the base's own location tokens in another order. The tiny base's
# output layer is frozen (tied to its embeddings) and 16 wide, so a location token it never wrote
# stays a small random embedding that attention-only LoRA can lift to p ~ 0.02 at most, barely above
# a thousand others: which one wins then hangs on float rounding (thread count, CPU), the flake this
# test had (a box of new bins, 500 500 800 700, came back as 500 500 800 654). Tokens the base
# already writes can be made near-certain (p > 0.9 each, measured), so the adapter's answer is
# decided by what it learnt, not by rounding.
TAUGHT_BINS = [200, 100, 400, 300]
TAUGHT_BOX_XYWH = [64.0, 24.0, 64.0, 48.0]  # those bins on a 320x240 image
TORCH_THREADS = 1  # fixed: a float sum's order (and so a trained weight's last bits) depends on it


def config(base: str, **kwargs) -> TrainConfig:
    return TrainConfig(name="lora", storage="unused", train="unused.json", detector="florence2", model=base,
                       max_new_tokens=32, **{"lora": {"r": 8, "alpha": 16, "dropout": 0.0}, **kwargs})


def batch_of(images: list[np.ndarray], boxes: list[list[float]], labels: list[list[int]]) -> dict[str, np.ndarray]:
    def objects(values):
        out = np.empty(len(values), dtype=object)
        out[:] = values
        return out

    return {"image": objects(images), "boxes": objects([np.asarray(b, np.float32) for b in boxes]),
            "labels": objects([np.asarray(lab, np.int64) for lab in labels]),
            "image_id": np.arange(1, len(images) + 1)}


@pytest.fixture(scope="module", autouse=True)
def deterministic_torch():
    """Every test here (and the module's fixtures, which train the scripted base) runs on one torch
    thread with deterministic algorithms; the caller's settings come back afterwards."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(TORCH_THREADS)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> str:
    return build_florence2_tiny_dir(str(tmp_path_factory.mktemp("f2") / "base"), seed=0)


@pytest.fixture(scope="module")
def scripted_base(tmp_path_factory) -> str:
    return build_florence2_scripted_dir(str(tmp_path_factory.mktemp("f2") / "scripted"), prompt=PROMPT,
                                        answer=BASE_ANSWER)


def test_targets_are_boxes_in_reading_order_as_location_tokens(tiny_base):
    _, processor = recipe.build(config(tiny_base), ID2LABEL, None, None)
    boxes = np.array([[200, 150, 40, 20], [10, 20, 50, 30], [100, 20, 30, 30]], np.float32)  # xywh
    text = recipe.answer(boxes, np.array([0, 1, 0]), ID2LABEL, (320, 240), processor, max_tokens=64)
    parsed = processor.post_process_generation(text, task="<OD>", image_size=(320, 240))["<OD>"]
    # top row first (y 20: left to right), then the lower box; the processor reads back the boxes
    assert parsed["labels"] == ["car", "licence_plate", "licence_plate"]
    expected = [[10, 20, 60, 50], [100, 20, 130, 50], [200, 150, 240, 170]]
    np.testing.assert_allclose(parsed["bboxes"], expected, atol=0.5)
    assert text.startswith("car<loc_")
    # a budget that holds two boxes keeps two whole boxes, never a cut one
    tokens_per_box = len(processor.tokenizer.tokenize("licence_plate")) + 4
    short = recipe.answer(boxes, np.array([0, 0, 0]), ID2LABEL, (320, 240), processor,
                          max_tokens=2 + 2 * tokens_per_box + 1)
    assert short.count("licence_plate") == 2 and short.count("<loc_") == 8


def test_a_lora_step_changes_only_adapter_weights(tiny_base):
    torch.manual_seed(0)
    model, processor = recipe.build(config(tiny_base), ID2LABEL, None, None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(
        "lora_" in name for name, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    image = np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8)
    loss = recipe.loss(model, processor, batch_of([image], [TAUGHT_BOX_XYWH], [[0]]), config(tiny_base),
                       ID2LABEL, "cpu")
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    adapter_keys = {k for k in after if "lora_" in k}
    assert changed and changed <= adapter_keys
    # every adapter's B (zero at start, so the model began as the base) has moved
    assert {k for k in adapter_keys if "lora_B" in k} <= changed


MAX_TEACH_STEPS = 150  # measured: the answer is right from step 10 and sure (>= 0.9) by step 30
CHECK_EVERY = 5
SURE = 0.9  # a box's score: the geometric mean of its tokens' probabilities (label and locations)


def read_back(processor, bins: list[int]) -> np.ndarray:
    """Location bins as detection reads them back on a 320x240 image (the processor's dequantisation)."""
    return processor.post_processor.dequantize(torch.tensor([bins], dtype=torch.float32), (320, 240)).numpy()


def _answers_taught_box(found, processor) -> bool:
    expected = read_back(processor, TAUGHT_BINS)
    return all(d.labels == ["licence_plate"] and np.allclose(d.boxes, expected, atol=1e-3)
               and min(d.scores) >= SURE for d in found)


def _teach(base: str):
    """LoRA on the scripted base, taught TAUGHT_BOX on 4 noise images until greedy generation answers
    it on all of them with every box scored >= SURE (so no near-tie is left for rounding to flip),
    within MAX_TEACH_STEPS; returns (model, processor, config, images)."""
    cfg = config(base)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # LoRA's A matrices
        model, processor = recipe.build(cfg, ID2LABEL, None, None)
    target = recipe.answer(np.array([TAUGHT_BOX_XYWH]), np.array([0]), ID2LABEL, (320, 240), processor, 32)
    assert target == "licence_plate" + "".join(f"<loc_{b}>" for b in TAUGHT_BINS)
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (240, 320, 3), dtype=np.uint8) for _ in range(4)]
    batch = batch_of(images, [TAUGHT_BOX_XYWH] * 4, [[0]] * 4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    found = []
    for step in range(1, MAX_TEACH_STEPS + 1):
        loss = recipe.loss(model, processor, batch, cfg, ID2LABEL, "cpu")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % CHECK_EVERY == 0:
            model.eval()
            found = generate_detections(model, processor, images, [PROMPT] * len(images), max_new_tokens=32)
            if _answers_taught_box(found, processor):
                return model, processor, cfg, images
            model.train()
    pytest.fail(f"the adapter did not learn its box in {MAX_TEACH_STEPS} steps: last answers "
                f"{[(d.labels, d.boxes.tolist(), d.scores.tolist()) for d in found]}")


def test_a_saved_adapter_reloads_to_the_same_output_and_merges(scripted_base, tmp_path):
    model, processor, cfg, images = _teach(scripted_base)
    image = images[0]
    (taught,) = generate_detections(model, processor, [image], [PROMPT], max_new_tokens=32)
    # the adapter learnt its box, where the base answers another
    assert taught.labels == ["licence_plate"] and min(taught.scores) >= SURE
    np.testing.assert_allclose(taught.boxes, read_back(processor, TAUGHT_BINS), atol=1e-3)
    (plain,) = Florence2Detector(scripted_base, prompt=PROMPT, device="cpu", max_new_tokens=32).detect([image])
    assert plain.labels == ["licence_plate"]
    np.testing.assert_allclose(plain.boxes, read_back(processor, BASE_BINS), atol=1e-3)
    assert np.abs(plain.boxes - taught.boxes).max() > 20  # pixels: another box

    adapter = tmp_path / "adapter"
    recipe.save(model, processor, str(adapter))
    info = recipe.finish_export(str(adapter), cfg, None)
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert info["base_model"]["model"] == scripted_base and len(info["base_model"]["weights_sha256_12"]) == 12
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == scripted_base
    reloaded = Florence2Detector(scripted_base, prompt=PROMPT, adapter=str(adapter), device="cpu",
                                 max_new_tokens=32)
    (again,) = reloaded.detect([image])
    assert again.labels == taught.labels
    np.testing.assert_array_equal(again.boxes, taught.boxes)
    # the same weights and computation: the same scores but for rounding
    np.testing.assert_allclose(again.scores, taught.scores, rtol=1e-5)

    merged = tmp_path / "merged"
    recipe.save(model, processor, str(merged))
    recipe.finish_export(str(merged), config(scripted_base, merge=True), None)
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()
    (folded,) = Florence2Detector(str(merged), prompt=PROMPT, device="cpu", max_new_tokens=32).detect([image])
    np.testing.assert_array_equal(folded.boxes, taught.boxes)
    # W + BA folded into one matrix sums in another order: float32 rounding, far below 1e-4
    np.testing.assert_allclose(folded.scores, taught.scores, rtol=1e-4)


def test_preflight_refuses_a_model_of_the_other_family(tiny_base, tiny_model, tmp_path):
    from platescope.training.run import TrainPreflightError, _preflight

    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "plate"}]}))
    common = {"name": "x", "storage": str(tmp_path / "ckpt"), "train": str(labels)}
    with pytest.raises(TrainPreflightError, match=f"model {tiny_base}: is a florence2 model; detector=hf needs an "
                                                  "object detector .set detector=florence2"):
        _preflight(TrainConfig(**common, model=tiny_base), None)
    with pytest.raises(TrainPreflightError, match="detector=florence2 needs a Florence-2 model"):
        _preflight(TrainConfig(**common, model=tiny_model, detector="florence2"), None)


def test_an_adapter_on_another_base_is_refused_naming_both(tiny_base, scripted_base, tmp_path):
    from platescope.detectors.loading import hash_weights

    model, processor = recipe.build(config(tiny_base), ID2LABEL, None, None)
    adapter = tmp_path / "adapter"
    recipe.save(model, processor, str(adapter))
    info = recipe.finish_export(str(adapter), config(tiny_base), None)
    (adapter / "platescope_training.json").write_text(json.dumps(info))
    Florence2Detector(tiny_base, prompt=PROMPT, adapter=str(adapter), device="cpu")  # its own base: fine
    with pytest.raises(ValueError, match=f"adapter {adapter}: trained on base {tiny_base} "
                                         f"\\(weights {hash_weights(tiny_base)}\\), not on model {scripted_base}"):
        Florence2Detector(scripted_base, prompt=PROMPT, adapter=str(adapter), device="cpu")
