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
TAUGHT_BOX_XYWH = [160.0, 120.0, 96.0, 48.0]  # on a 320x240 image


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


def _teach(base: str, steps: int = 150):
    """LoRA on the scripted base, taught TAUGHT_BOX on 4 noise images (returned with the model)."""
    torch.manual_seed(0)
    cfg = config(base)
    model, processor = recipe.build(cfg, ID2LABEL, None, None)
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (240, 320, 3), dtype=np.uint8) for _ in range(4)]
    batch = batch_of(images, [TAUGHT_BOX_XYWH] * 4, [[0]] * 4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = recipe.loss(model, processor, batch, cfg, ID2LABEL, "cpu")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), processor, cfg, images


def test_a_saved_adapter_reloads_to_the_same_output_and_merges(scripted_base, tmp_path):
    model, processor, cfg, images = _teach(scripted_base)
    image = images[0]
    (taught,) = generate_detections(model, processor, [image], [PROMPT], max_new_tokens=32)
    # the adapter learnt its box (a bin centre off at most), where the base answers another
    assert taught.labels == ["licence_plate"]
    np.testing.assert_allclose(taught.boxes, [[160, 120, 256, 168]], atol=1.0)
    (plain,) = Florence2Detector(scripted_base, prompt=PROMPT, device="cpu", max_new_tokens=32).detect([image])
    assert not np.allclose(plain.boxes, taught.boxes, atol=5)

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
    np.testing.assert_allclose(again.scores, taught.scores, rtol=1e-5)

    merged = tmp_path / "merged"
    recipe.save(model, processor, str(merged))
    recipe.finish_export(str(merged), config(scripted_base, merge=True), None)
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()
    (folded,) = Florence2Detector(str(merged), prompt=PROMPT, device="cpu", max_new_tokens=32).detect([image])
    np.testing.assert_array_equal(folded.boxes, taught.boxes)
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
    from platescope.detectors.hf import hash_weights

    model, processor = recipe.build(config(tiny_base), ID2LABEL, None, None)
    adapter = tmp_path / "adapter"
    recipe.save(model, processor, str(adapter))
    info = recipe.finish_export(str(adapter), config(tiny_base), None)
    (adapter / "platescope_training.json").write_text(json.dumps(info))
    Florence2Detector(tiny_base, prompt=PROMPT, adapter=str(adapter), device="cpu")  # its own base: fine
    with pytest.raises(ValueError, match=f"adapter {adapter}: trained on base {tiny_base} "
                                         f"\\(weights {hash_weights(tiny_base)}\\), not on model {scripted_base}"):
        Florence2Detector(scripted_base, prompt=PROMPT, adapter=str(adapter), device="cpu")
