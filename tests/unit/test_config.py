"""Job configs: YAML + flags + key=value, strict and typed, secrets masked."""

from __future__ import annotations

import json

import pytest

from platescope.cli import build_parser, detect_config_from_args
from platescope.config import ConfigError, DetectConfig, build_config, parse_override


def parse(argv):
    return detect_config_from_args(build_parser().parse_args(["detect", *argv]))


def test_yaml_then_flags_then_overrides(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("input: [s3://footage/]\noutput: s3://detections/\nmodel: ./models/plates\n"
                   "batch_size: 4\nvideo_fps: 1\nthreshold: 0.5\n")
    cfg = parse(["--config", str(job), "--batch-size", "16", "run_id=nightly-2026-11-21", "threshold=0.25",
                 "input=s3://footage/2026-11-21/"])
    assert cfg.batch_size == 16 and cfg.threshold == 0.25 and cfg.video_fps == 1.0
    assert cfg.run_id == "nightly-2026-11-21"
    assert cfg.input == ["s3://footage/2026-11-21/"]


def test_flags_alone_make_a_config():
    cfg = parse(["--input", "a", "b", "--output", "o", "--model", "m", "--video-fps", "2", "--incremental",
                 "--no-progress"])
    assert cfg.input == ["a", "b"] and cfg.video_fps == 2.0 and cfg.incremental and not cfg.progress
    assert cfg.run_id.startswith("run-")


@pytest.mark.parametrize(
    ("override", "field"),
    [("batchsize=4", "batchsize"), ("batch_size=many", "batch_size"), ("threshold=2", "threshold"),
     ("video_fps=0", "video_fps"), ("run_id=a/b", "run_id"), ("s3.endpoint=x", "s3.endpoint"),
     ("device=tpu", "device")],
)
def test_bad_values_fail_naming_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        build_config(DetectConfig, values={"input": ["a"], "output": "o", "model": "m"}, overrides=[override])
    assert str(e.value).split("): ", 1)[1].startswith(field + ":")
    assert "\n" not in str(e.value)


def test_missing_required_fields_are_named_and_the_model_defaults_to_the_bundled_one():
    from platescope.models import default_model_dir

    with pytest.raises(ConfigError, match="output: Field required"):
        build_config(DetectConfig, values={"input": ["a"]})
    assert build_config(DetectConfig, values={"input": ["a"], "output": "o"}).model == default_model_dir()


def test_misspelt_key_in_yaml_names_file_and_field(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("input: [a]\noutput: o\nmodel: m\nvideo_fsp: 2\n")
    with pytest.raises(ConfigError, match=r"job.yaml\): video_fsp: unknown field"):
        build_config(DetectConfig, file=str(job))


def test_unreadable_or_malformed_job_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        build_config(DetectConfig, file=str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        build_config(DetectConfig, file=str(bad))


def test_actor_range_is_checked():
    with pytest.raises(ConfigError, match="num_actors_max .* below num_actors_min"):
        build_config(DetectConfig, values={"input": ["a"], "output": "o", "model": "m", "num_actors_min": 3})


def test_secrets_never_appear_in_the_resolved_config():
    cfg = build_config(DetectConfig, values={"input": ["a"], "output": "o", "model": "m"},
                       overrides=["s3.secret_access_key=hunter2", "s3.access_key_id=AKIAXYZ"])
    assert cfg.s3.options().secret_access_key == "hunter2"
    text = json.dumps(cfg.resolved())
    assert "hunter2" not in text and "AKIAXYZ" not in text


def test_override_values_are_typed_by_yaml():
    assert parse_override("batch_size=16") == (["batch_size"], 16)
    assert parse_override("strict=true") == (["strict"], True)
    assert parse_override("input=[a, b]") == (["input"], ["a", "b"])
    assert parse_override("run_id=2026-11-21") == (["run_id"], "2026-11-21")
    with pytest.raises(ConfigError, match="not key=value"):
        parse_override("batch_size")


def test_ground_truth_flag_and_evaluate_overrides_nest_under_evaluate():
    cfg = parse(["--input", "a", "--output", "o", "--model", "m", "--ground-truth", "labels.json",
                 "evaluate.score_threshold=0.7"])
    assert cfg.evaluate.ground_truth == "labels.json" and cfg.evaluate.score_threshold == 0.7
    with pytest.raises(ConfigError, match="evaluate.ground_truth: Field required"):
        parse(["--input", "a", "--output", "o", "--model", "m", "evaluate.score_threshold=0.7"])


def test_evaluate_config_is_strict_and_names_the_field():
    from platescope.config import EvaluateConfig

    args = build_parser().parse_args(["evaluate", "--detections", "d", "--ground-truth", "g.json",
                                      "--label-map", "license-plate=licence_plate", "--label-map", "car="])
    assert args.label_map == ["license-plate=licence_plate", "car="]
    with pytest.raises(ConfigError, match="scor_threshold: unknown field"):
        build_config(EvaluateConfig, values={"detections": "d", "ground_truth": "g"}, overrides=["scor_threshold=1"])
    with pytest.raises(ConfigError, match="ground_truth_format: Input should be"):
        build_config(EvaluateConfig, values={"detections": "d", "ground_truth": "g", "ground_truth_format": "csv"})


def test_florence2_needs_a_detection_prompt_and_hf_takes_none():
    base = ["--input", "a", "--output", "o", "--model", "m"]
    cfg = parse([*base, "--detector", "florence2", "--prompt", "<OPEN_VOCABULARY_DETECTION> white van",
                 "--adapter", "s3://adapters/vans/"])
    assert cfg.prompt.endswith("white van") and cfg.adapter == "s3://adapters/vans/"
    with pytest.raises(ConfigError, match="prompt: florence2 needs a prompt starting with one of <OD>"):
        parse([*base, "--detector", "florence2", "--prompt", "licence plate"])
    with pytest.raises(ConfigError, match="prompt and adapter are for detector florence2"):
        parse([*base, "--prompt", "<OD>"])


TRAIN = ["name=run", "storage=/tmp/ckpt", "train=train.json"]


def test_florence2_training_fields_are_checked_before_any_work():
    from platescope.config import TrainConfig

    cfg = build_config(TrainConfig, overrides=[*TRAIN, "detector=florence2", "model=m", "lora.r=16"])
    assert cfg.task_prompt == "<OD>" and cfg.lora.r == 16 and cfg.lora.alpha == 128
    cases = [
        (["detector=florence2", "preset=rtdetr-slim"], "model: florence2 fine-tuning needs the base model dir"),
        (["detector=florence2", "model=m", "prompt=plates please"], "prompt: florence2 needs a prompt"),
        (["detector=florence2", "model=m", "lora.rank=8"], "lora.rank: unknown field"),
        (["detector=florence2", "model=m", "lora.target_modules=[]"], "lora.target_modules"),
        (["preset=rtdetr-slim", "merge=true"], "merge: only for detector florence2"),
        (["preset=rtdetr-slim", "lora.r=8"], "lora: only for detector florence2"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            build_config(TrainConfig, overrides=[*TRAIN, *overrides])
