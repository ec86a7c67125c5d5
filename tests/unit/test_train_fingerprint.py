"""A training run's settings, recorded at its first start: a rerun of the same name with settings that change
the weights is refused once there is a checkpoint to resume; settings that do not may change freely.
(The refusal through the CLI, on a real interrupted run: tests/e2e/test_cli_train.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from platescope import samples
from platescope.config import TrainConfig
from platescope.training import fingerprint
from platescope.training.data import read_coco_set


@pytest.fixture(scope="module")
def labels(tmp_path_factory) -> Path:
    return samples.write_image_dataset(str(tmp_path_factory.mktemp("labels")), 3, seed=1, size=(160, 120))


def _cfg(labels: Path, storage: Path, **fields) -> TrainConfig:
    return TrainConfig(name="run", storage=str(storage), train=str(labels), preset="rtdetr-tiny-test", **fields)


def _check(cfg: TrainConfig) -> None:
    """What the train preflight does with the sets it has read."""
    fingerprint.check_or_record(cfg, None, read_coco_set(cfg.train, None), None)


def _holds_a_checkpoint(storage: Path) -> None:
    """What Ray Train writes once it has committed a checkpoint, and reads to resume."""
    (storage / "run" / fingerprint.CHECKPOINT_INDEX).write_text("{}")


def test_the_first_start_records_and_the_same_settings_resume(labels, tmp_path):
    _check(_cfg(labels, tmp_path, learning_rate=0.001))
    recorded = json.loads((tmp_path / "run" / "fingerprint.json").read_text())["fields"]
    assert recorded["learning_rate"] == 0.001 and len(recorded["train_labels"]) == 12
    _holds_a_checkpoint(tmp_path)
    _check(_cfg(labels, tmp_path, learning_rate=0.001))


@pytest.mark.parametrize("change, named", [
    ({"learning_rate": 0.002}, "learning_rate 0.001 -> 0.002"),
    ({"weight_decay": 0.01}, "weight_decay 0.0001 -> 0.01"),
    ({"augment_recipe": "basic"}, 'augment_recipe "cameras" -> "basic"'),
    ({"num_workers": 4, "seed": 3}, "num_workers 2 -> 4; seed 0 -> 3"),
    ({"ema_decay": 0.999}, "ema_decay null -> 0.999"),
    ({"plate_zoom": 0.5}, "plate_zoom null -> 0.5"),
])
def test_a_rerun_that_would_train_under_other_settings_is_refused_naming_them(labels, tmp_path, change, named):
    _check(_cfg(labels, tmp_path, learning_rate=0.001))
    _holds_a_checkpoint(tmp_path)
    with pytest.raises(fingerprint.TrainResumeError, match="run run ") as err:
        _check(_cfg(labels, tmp_path, **{"learning_rate": 0.001, **change}))
    assert named in str(err.value) and "new name" in str(err.value)


def test_other_labels_under_the_same_path_are_refused_and_the_same_labels_elsewhere_are_not(labels, tmp_path):
    moved = tmp_path / "elsewhere" / labels.name
    moved.parent.mkdir()
    shutil.copy(labels, moved)
    _check(_cfg(labels, tmp_path / "ckpt"))
    _holds_a_checkpoint(tmp_path / "ckpt")
    _check(_cfg(moved, tmp_path / "ckpt"))
    coco = json.loads(moved.read_text())
    coco["annotations"] = coco["annotations"][1:]
    moved.write_text(json.dumps(coco))
    with pytest.raises(fingerprint.TrainResumeError, match="train_labels"):
        _check(_cfg(moved, tmp_path / "ckpt"))


def test_how_long_and_where_the_run_goes_and_its_export_may_change(labels, tmp_path):
    """More epochs carry a run on (tests/e2e/test_cli_train_florence2.py does so through the CLI)."""
    _check(_cfg(labels, tmp_path))
    _holds_a_checkpoint(tmp_path)
    _check(_cfg(labels, tmp_path, num_epochs=30, max_steps=500, max_failures=0, num_checkpoints_to_keep=5,
                use_gpu=True, export=str(tmp_path / "x"), export_dtype="float16", num_cpus_per_worker=2))


@pytest.mark.parametrize("field, value", [("ema_decay", 0.99), ("plate_zoom", 0.5)])
def test_a_run_recorded_before_a_field_existed_resumes_without_it_and_refuses_it(labels, tmp_path, field, value):
    _check(_cfg(labels, tmp_path))
    path = tmp_path / "run" / "fingerprint.json"
    older = json.loads(path.read_text())
    del older["fields"][field]
    path.write_text(json.dumps(older))
    _holds_a_checkpoint(tmp_path)
    with pytest.raises(fingerprint.TrainResumeError, match=f"{field} null -> {value}"):
        _check(_cfg(labels, tmp_path, **{field: value}))
    _check(_cfg(labels, tmp_path))


def test_without_a_checkpoint_new_settings_are_recorded_instead(labels, tmp_path):
    _check(_cfg(labels, tmp_path, learning_rate=0.001))
    _check(_cfg(labels, tmp_path, learning_rate=0.002))
    recorded = json.loads((tmp_path / "run" / "fingerprint.json").read_text())["fields"]
    assert recorded["learning_rate"] == 0.002


def test_a_fine_tuning_run_records_its_base_weights(tiny_rtdetr_dir, labels, tmp_path):
    from platescope.detectors.loading import hash_weights

    cfg = TrainConfig(name="run", storage=str(tmp_path), train=str(labels), model=tiny_rtdetr_dir)
    fields = fingerprint.compute(cfg, None, read_coco_set(cfg.train, None), None)
    assert fields["model_weights"] == hash_weights(tiny_rtdetr_dir)
