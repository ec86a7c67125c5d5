"""Every job file users start from parses through the real config parser."""

from __future__ import annotations

from pathlib import Path

import pytest

from platescope.config import DetectConfig, TrainConfig, build_config

JOBS_DIR = Path(__file__).resolve().parents[2] / "jobs"
TRAIN_JOBS = {"plates-finetune.yaml", "florence2-lora.yaml"}
JOBS = sorted(p for p in JOBS_DIR.glob("*.yaml") if p.name not in TRAIN_JOBS | {"kustomization.yaml"})


def test_there_are_job_files():
    assert {p.name for p in JOBS} >= {"plates-nightly.yaml", "demo.yaml", "plates-drift-check.yaml"}


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.name)
def test_job_file_loads(job):
    cfg = build_config(DetectConfig, file=str(job), overrides=["run_id=check-1"])
    assert cfg.run_id == "check-1" and cfg.input and cfg.model  # a job without model: the bundled one


def test_drift_check_job_scores_the_run_against_labels():
    cfg = build_config(DetectConfig, file=str(JOBS[0].parent / "plates-drift-check.yaml"))
    assert cfg.evaluate is not None and cfg.evaluate.ground_truth.endswith("labels.json")
    assert cfg.evaluate.label_map == {"license-plate": "licence_plate"}


@pytest.mark.parametrize("job", sorted(TRAIN_JOBS))
def test_train_job_file_loads(job):
    cfg = build_config(TrainConfig, file=str(JOBS_DIR / job), overrides=["num_workers=4", "use_gpu=true",
                                                                       "name=plates-rtdetr-2026-11"])
    assert cfg.num_workers == 4 and cfg.use_gpu and cfg.name == "plates-rtdetr-2026-11" and cfg.val


def test_florence2_lora_job_uses_the_seed_recipe():
    cfg = build_config(TrainConfig, file=str(JOBS_DIR / "florence2-lora.yaml"), overrides=["use_gpu=true"])
    assert cfg.detector == "florence2" and cfg.task_prompt == "<OD>" and cfg.learning_rate == 1e-4
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (64, 128, 0.1)


ALL_JOBS = sorted(p for p in JOBS_DIR.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("job", ALL_JOBS, ids=lambda p: p.name)
def test_submit_tells_every_job_files_verb_and_it_loads(job):
    from platescope.config import load_yaml
    from platescope.submit import verb_of

    verb, config_cls = verb_of(load_yaml(str(job)), str(job))
    assert verb == ("train" if job.name in TRAIN_JOBS else "detect")
    build_config(config_cls, file=str(job))
