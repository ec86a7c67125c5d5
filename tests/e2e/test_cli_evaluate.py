"""`platescope evaluate`, and `detect --ground-truth`, through the CLI in their own processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from platescope import samples
from platescope.evaluation.result import COCO_METRIC_NAMES
from platescope.evaluation.simulate import simulate_rows, synthetic_coco, write_coco, write_detections

CLI = [sys.executable, "-m", "platescope.cli"]


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], check=False, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("simulated")
    coco = synthetic_coco(120, seed=8, categories=("licence_plate", "car"))
    gt = write_coco(coco, root / "labels.json")
    write_detections(simulate_rows(coco, root="s3://footage/2026-11-21", seed=9, error_rate=0.02), root / "run")
    return gt, root / "run"


def test_evaluate_writes_metrics_and_reports_and_prints_the_coco_table(simulated, tmp_path):
    gt, run = simulated
    out = tmp_path / "report"
    proc = run_cli("evaluate", "--detections", str(run), "--ground-truth", str(gt), "--output", str(out),
                   "--score-threshold", "0.4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(isinstance(metrics[n], float) for n in COCO_METRIC_NAMES)
    assert {"map_licence_plate", "map_car", "mar_100_licence_plate", "mar_100_car"} <= set(metrics)
    assert metrics["score_threshold"] == 0.4 and metrics["counts"]["errors"] > 0
    printed = proc.stdout.splitlines()
    assert printed[0].startswith(" Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = ")
    assert printed[0].endswith(f"{metrics['map']:0.3f}")
    assert str(out / "report.html") in proc.stdout
    assert printed[0] in (out / "report.md").read_text()
    assert (out / "report.html").read_text().count("data:image/png;base64,") >= 4  # PR + threshold per class


def test_default_output_is_beside_the_detections(simulated, tmp_path):
    gt, run = simulated
    copy = tmp_path / "run"
    copy.mkdir()
    (copy / "data").symlink_to(run / "data")
    proc = run_cli("evaluate", "--detections", str(copy), "--ground-truth", str(gt))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (copy / "evaluation" / "report.html").is_file()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d, gt, run: ["--ground-truth", str(d / "missing.json")], "ground truth {d}/missing.json: not found"),
        (lambda d, gt, run: ["--detections", str(d / "empty")], "detections {d}/empty: the table has no rows"),
        (lambda d, gt, run: ["--label-map", "licence_plate=plate"], "['plate'], which are not ground-truth"),
        (lambda d, gt, run: ["--ground-truth", str(d / "other.json")], "detection labels ['car', 'licence_plate']"),
        (lambda d, gt, run: ["score_threshold=2"], "score_threshold: Input should be less than or equal to 1"),
    ],
)
def test_bad_input_fails_with_one_line_and_exit_2(simulated, tmp_path, make, message):
    gt, run = simulated
    write_detections([], tmp_path / "empty")
    write_coco(synthetic_coco(3, categories=("plate",)), tmp_path / "other.json")
    args = {"--detections": str(run), "--ground-truth": str(gt), "--output": str(tmp_path / "out")}
    extra = make(tmp_path, gt, run)
    for flag in list(args):
        if flag in extra:
            args.pop(flag)
    proc = run_cli("evaluate", *[x for kv in args.items() for x in kv], *extra)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("platescope evaluate: error: "), proc.stderr
    assert message.format(d=tmp_path) in lines[0]
    assert not (tmp_path / "out").exists()


def test_detect_with_ground_truth_evaluates_at_the_end(tmp_path, tiny_model):
    images = tmp_path / "images"
    labels = samples.write_image_dataset(str(images), 6, seed=4, size=(320, 240))
    moved = tmp_path / "labels.json"
    labels.rename(moved)
    out = tmp_path / "out"
    proc = run_cli("detect", "--input", str(images), "--output", str(out), "--model", tiny_model,
                   "--run-id", "scored", "--threshold", "0.0", "--ground-truth", str(moved))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out / "scored" / "evaluation"
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["counts"]["images"] == metrics["counts"]["images_with_rows"] == 6
    assert metrics["counts"]["rows_without_ground_truth"] == 0 and metrics["counts"]["detections"] > 0
    assert "Average Precision  (AP)" in proc.stdout and (report / "report.html").is_file()


def test_detect_with_unreadable_ground_truth_fails_before_any_work(tmp_path, tiny_model):
    images = tmp_path / "images"
    samples.write_image_dataset(str(images), 2, seed=4, size=(320, 240))
    (tmp_path / "bad.json").write_text("[1, 2")
    proc = run_cli("detect", "--input", str(images), "--output", str(tmp_path / "out"), "--model", tiny_model,
                   "--run-id", "x", "--ground-truth", str(tmp_path / "bad.json"))
    assert proc.returncode == 2 and "bad.json" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_detect_refuses_labels_its_model_cannot_name_before_any_work_unless_mapped(tmp_path, tiny_model):
    images = tmp_path / "images"
    labels = samples.write_image_dataset(str(images), 4, seed=6, size=(320, 240))
    data = json.loads(labels.read_text())
    data["categories"] = [{**c, "name": "license-plate"} for c in data["categories"]]
    renamed = tmp_path / "renamed.json"
    renamed.write_text(json.dumps(data))
    labels.unlink()
    common = ["detect", "--input", str(images), "--output", str(tmp_path / "out"), "--model", tiny_model,
              "--threshold", "0.0", "--ground-truth", str(renamed)]
    proc = run_cli(*common, "--run-id", "unmapped")
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("platescope detect: error: model ") and "['licence_plate']" in line
    assert "['license-plate']" in line and not (tmp_path / "out").exists()
    proc = run_cli(*common, "--run-id", "mapped", "--label-map", "licence_plate=license-plate")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "mapped" / "evaluation" / "metrics.json").read_text())
    assert metrics["label_map"] == {"licence_plate": "license-plate"} and metrics["counts"]["detections"] > 0
