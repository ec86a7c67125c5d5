"""Every job file users start from parses through the real config parser."""

from __future__ import annotations

from pathlib import Path

import pytest

from platescope.config import DetectConfig, build_config

JOBS = sorted((Path(__file__).resolve().parents[2] / "jobs").glob("*.yaml"))


def test_there_are_job_files():
    assert {p.name for p in JOBS} >= {"plates-nightly.yaml", "demo.yaml", "plates-drift-check.yaml"}


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.name)
def test_job_file_loads(job):
    cfg = build_config(DetectConfig, file=str(job), overrides=["run_id=check-1"])
    assert cfg.run_id == "check-1" and cfg.input and cfg.model


def test_drift_check_job_scores_the_run_against_labels():
    cfg = build_config(DetectConfig, file=str(JOBS[0].parent / "plates-drift-check.yaml"))
    assert cfg.evaluate is not None and cfg.evaluate.ground_truth.endswith("labels.json")
    assert cfg.evaluate.label_map == {"license-plate": "licence_plate"}
