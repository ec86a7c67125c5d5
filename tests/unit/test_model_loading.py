"""The one loading policy (detectors.loading) as every loader applies it: detect's HFDetector,
Florence2Detector (base and LoRA adapter) and both training recipes (model and resumed checkpoint).

Pickle-only dirs are real ones: the tiny models' state dicts written with torch.save as
pytorch_model.bin (transformers 5's save_pretrained only writes safetensors), and a LoRA adapter
written by PEFT with safe_serialization=False (adapter_model.bin). Hub ids cannot be reached here:
the hub branch is checked through what the policy would hand from_pretrained.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from platescope.config import TrainConfig
from platescope.detectors import loading
from platescope.detectors.florence2 import Florence2Detector
from platescope.detectors.florence2_tiny import build_florence2_tiny_dir
from platescope.detectors.hf import HFDetector
from platescope.detectors.loading import UnsafeWeightsError, resolve_adapter, resolve_model
from platescope.detectors.presets import build_model_dir
from platescope.training import detector_recipe, florence2_recipe

ID2LABEL = {0: "licence_plate"}
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def pickled_copy(model_dir: str, dest: Path) -> str:
    """`model_dir` with its model.safetensors replaced by the same weights as pytorch_model.bin."""
    from safetensors.torch import load_file

    shutil.copytree(model_dir, dest)
    state = load_file(str(dest / "model.safetensors"))
    os.remove(dest / "model.safetensors")
    torch.save(state, dest / "pytorch_model.bin")
    return str(dest)


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory) -> str:
    return build_model_dir("yolos-tiny-test", str(tmp_path_factory.mktemp("det") / "yolos"), id2label=ID2LABEL)


@pytest.fixture(scope="module")
def pickled_detector_dir(detector_dir, tmp_path_factory) -> str:
    return pickled_copy(detector_dir, tmp_path_factory.mktemp("det-pickle") / "yolos")


@pytest.fixture(scope="module")
def florence_dir(tmp_path_factory) -> str:
    return build_florence2_tiny_dir(str(tmp_path_factory.mktemp("f2") / "base"), seed=0)


@pytest.fixture(scope="module")
def pickled_florence_dir(florence_dir, tmp_path_factory) -> str:
    return pickled_copy(florence_dir, tmp_path_factory.mktemp("f2-pickle") / "base")


@pytest.fixture(scope="module")
def pickled_adapter_dir(florence_dir, tmp_path_factory) -> str:
    """A LoRA adapter for the tiny Florence-2, as PEFT writes it without safetensors."""
    from peft import LoraConfig, get_peft_model
    from transformers import Florence2ForConditionalGeneration

    base = Florence2ForConditionalGeneration.from_pretrained(florence_dir)
    torch.manual_seed(0)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False))
    dest = tmp_path_factory.mktemp("adapter") / "adapter"
    lora.save_pretrained(str(dest), safe_serialization=False)
    assert sorted(os.listdir(dest)) == ["README.md", "adapter_config.json", "adapter_model.bin"]
    return str(dest)


def refused(path: str):
    """The policy's refusal, naming the path and the opt-in."""
    return pytest.raises(UnsafeWeightsError, match=f"{path} holds only pickle weights .*allow_unsafe_weights")


def train_config(**kw) -> TrainConfig:
    return TrainConfig(name="t", storage="unused", train="unused.json", **kw)


# -- detect ------------------------------------------------------------------------------------


def test_detect_detector_refuses_pickle_weights_unless_allowed(pickled_detector_dir, detector_dir):
    with refused(pickled_detector_dir):
        HFDetector(pickled_detector_dir)
    image = [np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)]
    got = HFDetector(pickled_detector_dir, threshold=0.0, allow_unsafe_weights=True).detect(image)[0]
    want = HFDetector(detector_dir, threshold=0.0).detect(image)[0]
    np.testing.assert_allclose(got.boxes, want.boxes, atol=1e-5)


def test_florence2_base_refuses_pickle_weights_unless_allowed(pickled_florence_dir):
    with refused(pickled_florence_dir):
        Florence2Detector(pickled_florence_dir, prompt="<OD>", device="cpu")
    det = Florence2Detector(pickled_florence_dir, prompt="<OD>", device="cpu", max_new_tokens=8,
                            allow_unsafe_weights=True)
    assert det.model_id.startswith(pickled_florence_dir + "@")


def test_florence2_adapter_refuses_pickle_weights_unless_allowed(florence_dir, pickled_adapter_dir):
    with refused(pickled_adapter_dir):
        Florence2Detector(florence_dir, prompt="<OD>", adapter=pickled_adapter_dir, device="cpu")
    det = Florence2Detector(florence_dir, prompt="<OD>", adapter=pickled_adapter_dir, device="cpu",
                            max_new_tokens=8, allow_unsafe_weights=True)
    assert f"+{pickled_adapter_dir}@" in det.model_id
    assert any("lora_" in name for name, _ in det.model.named_parameters())


def test_the_detect_pipeline_passes_the_opt_in_to_its_detector(pickled_detector_dir):
    from platescope.config import DetectConfig
    from platescope.pipeline.actor import build_detector
    from platescope.pipeline.stage import DetectorSpec
    from platescope.storage import S3Options

    def spec(**kw):
        return DetectorSpec.from_config(DetectConfig(input=["x"], output="y", model=pickled_detector_dir, **kw), S3Options(), 0.0)

    with refused(pickled_detector_dir):
        build_detector(spec())
    assert build_detector(spec(allow_unsafe_weights=True)).model_id.startswith(pickled_detector_dir)


# -- train -------------------------------------------------------------------------------------


def test_detector_training_refuses_a_pickle_model_unless_allowed(pickled_detector_dir):
    with refused(pickled_detector_dir):
        detector_recipe.build(train_config(model=pickled_detector_dir), ID2LABEL, None, None)
    model, _ = detector_recipe.build(train_config(model=pickled_detector_dir, allow_unsafe_weights=True),
                                     ID2LABEL, None, None)
    assert model.training


def test_detector_training_refuses_to_resume_from_a_pickle_checkpoint_unless_allowed(pickled_detector_dir):
    with refused(pickled_detector_dir):
        detector_recipe.build(train_config(preset="yolos-tiny-test"), ID2LABEL, None, pickled_detector_dir)
    model, _ = detector_recipe.build(train_config(preset="yolos-tiny-test", allow_unsafe_weights=True),
                                     ID2LABEL, None, pickled_detector_dir)
    assert model.training


def florence_train_config(base: str, **kw) -> TrainConfig:
    return train_config(detector="florence2", model=base, lora=LORA, **kw)


def test_florence2_training_refuses_a_pickle_base_unless_allowed(pickled_florence_dir):
    with refused(pickled_florence_dir):
        florence2_recipe.build(florence_train_config(pickled_florence_dir), ID2LABEL, None, None)
    model, _ = florence2_recipe.build(florence_train_config(pickled_florence_dir, allow_unsafe_weights=True),
                                      ID2LABEL, None, None)
    assert any(p.requires_grad for p in model.parameters())


def test_florence2_training_refuses_to_resume_a_pickle_adapter_unless_allowed(florence_dir, pickled_adapter_dir):
    with refused(pickled_adapter_dir):
        florence2_recipe.build(florence_train_config(florence_dir), ID2LABEL, None, pickled_adapter_dir)
    model, _ = florence2_recipe.build(florence_train_config(florence_dir, allow_unsafe_weights=True), ID2LABEL,
                                      None, pickled_adapter_dir)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)


def test_train_config_has_the_opt_in_off_by_default():
    field = TrainConfig.model_fields["allow_unsafe_weights"]
    assert field.default is False and "pickle" in field.description
    assert train_config(model="m", allow_unsafe_weights=True).allow_unsafe_weights is True


# -- the policy itself -------------------------------------------------------------------------


def test_a_local_dir_is_checked_and_hashed(detector_dir, pickled_detector_dir):
    source = resolve_model(detector_dir)
    assert source.is_local and source.path == detector_dir
    assert source.model_id == f"{detector_dir}@{loading.hash_weights(detector_dir)}"
    assert source.model_kwargs == {"use_safetensors": True, "trust_remote_code": False}
    assert source.processor_kwargs == {"trust_remote_code": False}
    allowed = resolve_model(pickled_detector_dir, allow_unsafe_weights=True, trust_remote_code=True)
    assert allowed.model_kwargs == {"use_safetensors": None, "trust_remote_code": True}


def test_a_dir_without_weights_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UnsafeWeightsError, match=f"{tmp_path}: no weights found"):
        resolve_model(str(tmp_path))


def test_a_hub_model_is_loaded_with_safetensors_only(monkeypatch):
    """No download: what from_pretrained would be called with for a hub id."""
    class Commit(str):
        resolved = "0123456789abcdef"

    monkeypatch.setattr(loading, "hub_revision", lambda model, cache_dir: Commit("main"))
    source = resolve_model("acme/plate-detector", cache_dir="/tmp/hub-cache")
    assert not source.is_local and source.path == "acme/plate-detector"
    assert source.model_kwargs == {"use_safetensors": True, "trust_remote_code": False,
                                   "cache_dir": "/tmp/hub-cache", "revision": "main"}
    assert "use_safetensors" not in source.processor_kwargs
    assert source.processor_kwargs["trust_remote_code"] is False
    assert source.model_id == "acme/plate-detector@0123456789abcdef"
    opted_in = resolve_model("acme/plate-detector", allow_unsafe_weights=True, trust_remote_code=True)
    assert opted_in.model_kwargs["use_safetensors"] is None and opted_in.model_kwargs["trust_remote_code"] is True


def test_a_hub_adapter_downloads_no_pickle_unless_allowed(monkeypatch, tmp_path, pickled_adapter_dir):
    """PEFT itself would fetch adapter_model.bin when the repo has no safetensors; the policy
    downloads the adapter itself, with only the files it may load."""
    calls = []

    def snapshot_download(repo_id, *, allow_patterns, cache_dir=None):  # a hub repo holding pickle_adapter_dir
        calls.append(allow_patterns)
        dest = tmp_path / f"snapshot-{len(calls)}"
        dest.mkdir()
        for name in os.listdir(pickled_adapter_dir):
            if any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                shutil.copy(os.path.join(pickled_adapter_dir, name), dest / name)
        return str(dest)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(UnsafeWeightsError, match="acme/lora.*adapter_model.safetensors.*allow_unsafe_weights"):
        resolve_adapter("acme/lora")
    assert not any(p.endswith(".bin") for p in calls[0])
    adapter = resolve_adapter("acme/lora", allow_unsafe_weights=True)
    assert os.listdir(adapter.path) and "adapter_model.bin" in os.listdir(adapter.path)
    assert adapter.model_id.startswith("acme/lora@")


def test_remote_code_in_a_model_dir_does_not_run_unless_trusted(tmp_path, detector_dir):
    """A dir whose config asks for its own code: transformers refuses it when the policy says
    trust_remote_code=False, before importing the module."""
    from transformers import AutoModelForObjectDetection

    marker = tmp_path / "ran"
    model_dir = tmp_path / "custom"
    model_dir.mkdir()
    for name in ("model.safetensors", "preprocessor_config.json"):
        shutil.copy(os.path.join(detector_dir, name), model_dir / name)
    (model_dir / "config.json").write_text(json.dumps({
        "model_type": "platescope-custom",
        "auto_map": {"AutoConfig": "custom.CustomConfig", "AutoModelForObjectDetection": "custom.CustomModel"},
    }))
    (model_dir / "custom.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    source = resolve_model(str(model_dir))
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForObjectDetection.from_pretrained(source.path, **source.model_kwargs)
    with pytest.raises(ValueError, match="trust_remote_code"):
        HFDetector(str(model_dir))
    assert not marker.exists()
