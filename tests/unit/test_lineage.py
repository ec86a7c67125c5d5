"""A fine-tuned export names its base and carries the base's own training record, generation by generation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from platescope.config import TrainConfig
from platescope.detectors.loading import hash_weights
from platescope.models import default_model_dir
from platescope.training.detector_recipe import finish_export


def _fine_tuned_from(model: str, tmp_path: Path) -> dict:
    cfg = TrainConfig(name="t", storage=str(tmp_path / "runs"), train="unused.json", model=model)
    return finish_export(str(tmp_path), cfg, None)


def test_a_model_fine_tuned_from_a_trained_one_records_how_its_base_was_trained(tmp_path):
    base = default_model_dir()
    base_info = json.loads((Path(base) / "platescope_training.json").read_text())
    record = _fine_tuned_from(base, tmp_path)["base_model"]
    assert record["model"] == base and record["weights_sha256_12"] == hash_weights(base)
    assert record["training"]["training_config"] == base_info["training_config"]
    assert record["training"]["val_metrics"] == base_info["val_metrics"]
    assert "history" not in record["training"]


def test_the_record_goes_back_more_than_one_generation(tmp_path):
    """The base of a base is kept: a second fine-tuning still names the first run's start."""
    child = tmp_path / "child"
    shutil.copytree(default_model_dir(), child)
    info = json.loads((child / "platescope_training.json").read_text())
    info["base_model"] = _fine_tuned_from(default_model_dir(), tmp_path / "first")["base_model"]
    (child / "platescope_training.json").write_text(json.dumps(info))
    record = _fine_tuned_from(str(child), tmp_path / "second")["base_model"]
    assert record["model"] == str(child)
    assert record["training"]["base_model"]["model"] == default_model_dir()
    root = record["training"]["base_model"]["training"]
    while "base_model" in root:  # the default model may itself be fine-tuned from another run
        root = root["base_model"]["training"]
    assert root["training_config"]["preset"] == "rtdetr-slim"


def test_a_base_trained_elsewhere_is_named_and_hashed_only(tiny_rtdetr_dir, tmp_path):
    record = _fine_tuned_from(tiny_rtdetr_dir, tmp_path)["base_model"]
    assert record == {"model": tiny_rtdetr_dir, "weights_sha256_12": hash_weights(tiny_rtdetr_dir)}


def test_a_run_from_a_preset_has_no_base(tmp_path):
    cfg = TrainConfig(name="t", storage=str(tmp_path), train="unused.json", preset="rtdetr-slim")
    assert finish_export(str(tmp_path), cfg, None) == {}
