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
     ("device=tpu", "device"), ("tracker.iou=0", "tracker.iou"), ("tracker.min_frames=0", "tracker.min_frames"),
     ("tracker.lost_track_s=-1", "tracker.lost_track_s"), ("tracker.buffr=1", "tracker.buffr")],
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


def test_track_and_crops_flags_and_tracker_overrides():
    cfg = parse(["--input", "a", "--output", "o", "--model", "m", "--track", "--crops", "tracker.lost_track_s=2"])
    assert cfg.track and cfg.crops and cfg.tracker.lost_track_s == 2.0 and cfg.tracker.min_frames == 2
    assert not parse(["--input", "a", "--output", "o", "--model", "m"]).track
    with pytest.raises(ConfigError, match="crops: a crop is cut for each track; set track as well"):
        parse(["--input", "a", "--output", "o", "--model", "m", "--crops"])


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
    assert parse([*base, "compile=true"]).compile is True
    with pytest.raises(ConfigError, match="compile: only hf detectors are compiled"):
        parse([*base, "--detector", "florence2", "--prompt", "<OD>", "compile=true"])


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


def test_aspect_jitter_and_plate_zoom_are_refused_without_augmentation_or_out_of_range():
    from platescope.config import TrainConfig

    assert build_config(TrainConfig, overrides=[*TRAIN, "preset=p", "aspect_jitter=0.5"]).aspect_jitter == 0.5
    assert build_config(TrainConfig, overrides=[*TRAIN, "preset=p", "plate_zoom=0.5"]).plate_zoom == 0.5
    cases = [(["aspect_jitter=0.5", "augment=false"], "aspect_jitter: it is an augmentation"),
             (["aspect_jitter=-0.5"], "aspect_jitter: Input should be greater than or equal"),
             (["plate_zoom=0.5", "augment=false"], "plate_zoom: it is an augmentation"),
             (["plate_zoom=1.5"], "plate_zoom: Input should be less than or equal to 1"),
             (["plate_zoom=0"], "plate_zoom: Input should be greater than 0")]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            build_config(TrainConfig, overrides=[*TRAIN, "preset=p", *overrides])


def test_ema_decay_must_lie_between_0_and_1():
    from platescope.config import TrainConfig

    assert build_config(TrainConfig, overrides=[*TRAIN, "preset=p"]).ema_decay is None
    assert build_config(TrainConfig, overrides=[*TRAIN, "preset=p", "ema_decay=0.999"]).ema_decay == 0.999
    for value, message in (("1", "less than 1"), ("0", "greater than 0"), ("x", "valid number")):
        with pytest.raises(ConfigError, match=f"ema_decay: .*{message}"):
            build_config(TrainConfig, overrides=[*TRAIN, "preset=p", f"ema_decay={value}"])


# -- no error message shows a secret -------------------------------------------------------------

SECRET = "wJalrXUtnFEMI-K7MDENG"
BASE = {"input": ["a"], "output": "o", "model": "m"}


@pytest.mark.parametrize("override", [
    f"s3.secret-access-key={SECRET}",  # misspelt: not even a field name
    f"s3.secret_acess_key={SECRET}",  # misspelt: an unknown field
    f"s3.secret_access_key=[{SECRET}, x",  # bad YAML
    f"s3.secret_access_key=[bad, {SECRET}]",
    f"s3.access_key_id={{id: {SECRET}}}",
    f"s3.secret_access_key={SECRET}",  # fine itself, but beside a bad field
    f"address=ray://admin:{SECRET}@head:10001",  # a URL's password, whatever its field
])
def test_no_config_error_shows_a_secret(override):
    with pytest.raises(ConfigError) as e:
        build_config(DetectConfig, values=BASE, overrides=[override, "threshold=2"])
    assert SECRET not in str(e.value) and "\n" not in str(e.value)
    assert "threshold" in str(e.value) or "s3" in str(e.value) or "override" in str(e.value)


@pytest.mark.parametrize("s3_section", [
    f"s3:\n  secret_access_key: {SECRET}: x\n",  # mapping values not allowed: PyYAML quotes the line
    f"s3:\n  secret_access_key: '{SECRET}\n",  # unterminated quote
    f"s3: {{secret_access_key: {SECRET}\n",  # unterminated flow mapping
    f"s3:\n  secret-acess-key: *{SECRET}\n",  # misspelt key, undefined alias named in the error
    f"s3:\n  secret_access_key: [{SECRET}]\n",  # valid YAML, wrong type
    f"s3:\n  endpoint_url: http://admin:{SECRET}@minio:9000\n  anon: maybe: not\n",
])
def test_a_job_file_error_never_quotes_a_secret(tmp_path, s3_section):
    job = tmp_path / "job.yaml"
    job.write_text("input: [a]\noutput: o\n" + s3_section)
    with pytest.raises(ConfigError) as e:
        build_config(DetectConfig, file=str(job))
    message = str(e.value)
    assert SECRET not in message and "\n" not in message, message
    assert "job.yaml" in message
    if "not valid YAML" in message:
        assert "line " in message  # where, without the line's text


def test_the_cli_masks_secrets_in_its_errors(tmp_path):
    import subprocess
    import sys

    job = tmp_path / "job.yaml"
    job.write_text(f"input: [a]\noutput: o\ns3:\n  secret_access_key: {SECRET}: x\n")
    for args in (["--config", str(job)], ["--input", "a", "--output", "o", f"s3.secret-access-key={SECRET}"],
                 ["--input", "a", "--output", "o", f"s3.secret_access_key=[{SECRET}, x", "strict=1"]):
        proc = subprocess.run([sys.executable, "-m", "platescope", "detect", *args], capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 2 and SECRET not in proc.stdout + proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_the_resolved_config_masks_url_passwords():
    cfg = build_config(DetectConfig, values=BASE, overrides=[f"s3.endpoint_url=http://minio:{SECRET}@h:9000"])
    assert SECRET not in json.dumps(cfg.resolved())
    assert cfg.s3.options().endpoint_url == f"http://minio:{SECRET}@h:9000"


# -- one rule for what holds a secret ------------------------------------------------------------


@pytest.mark.parametrize("name", [
    "OPENAI_API_KEY", "WANDB_API_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "DATABASE_URL", "REDIS_URL", "AZURE_STORAGE_CONNECTION_STRING", "SLACK_WEBHOOK_URL", "HF_TOKEN",
    "RAY_AUTH_TOKEN", "DB_PASSWORD", "MYSQL_PWD", "SENTRY_DSN", "GOOGLE_APPLICATION_CREDENTIALS",
    "SSH_PRIVATE_KEY", "SESSION_SECRET", "AUTHORIZATION", "BASIC_AUTH", "secret_access_key", "access_key_id",
    "s3.secret-access-key", "secretAccessKey", "apiKey", "s3.acess_key_id",
])
def test_secret_names(name):
    from platescope.config import is_secret_name

    assert is_secret_name(name)


@pytest.mark.parametrize("name", [
    "RAY_DATA_LOG_LEVEL", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "OMP_NUM_THREADS", "PYTHONHASHSEED",
    "TOKENIZERS_PARALLELISM", "RAY_AUTH_MODE", "GIT_AUTHOR_NAME", "PYTHON_KEYRING_BACKEND", "PWD",
    "PYTHONUNBUFFERED", "MLFLOW_TRACKING_URI", "max_new_tokens",
])
def test_harmless_names(name):
    from platescope.config import is_secret_name

    assert not is_secret_name(name)


def test_only_the_s3_keys_among_config_fields_are_secret():
    from platescope.config import (
        EvaluateConfig,
        EvaluationOptions,
        LoraOptions,
        S3Config,
        TrainConfig,
        is_secret_name,
    )

    secret = {f"{cls.__name__}.{name}" for cls in (DetectConfig, TrainConfig, EvaluateConfig, EvaluationOptions,
                                                   LoraOptions, S3Config)
              for name in cls.model_fields if is_secret_name(name)}
    assert secret == {"S3Config.access_key_id", "S3Config.secret_access_key"}


# -- strict types; string fields take what was written -------------------------------------------


@pytest.mark.parametrize("override", ["input=", "input=[a, '']", "input=' '"])
def test_an_empty_input_fails_naming_input(override):
    with pytest.raises(ConfigError, match=r"\): input(\.\d)?: .*must not be empty"):
        build_config(DetectConfig, values={"output": "o", "model": "m"}, overrides=[override])


def test_an_empty_input_in_a_job_file_or_flag_fails_naming_input(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text('input: [""]\noutput: o\nmodel: m\n')
    with pytest.raises(ConfigError, match=r"input\.0: .*must not be empty"):
        build_config(DetectConfig, file=str(job))
    with pytest.raises(ConfigError, match=r"input\.0: .*must not be empty"):
        parse(["--input", "", "--output", "o", "--model", "m"])
    with pytest.raises(ConfigError, match=r"evaluate\.input_root\.0: .*must not be empty"):
        build_config(DetectConfig, values=BASE, overrides=["evaluate.ground_truth=g", "evaluate.input_root="])


@pytest.mark.parametrize(("override", "field", "kind"), [
    ("threshold=true", "threshold", "number"), ("threshold='0.5'", "threshold", "number"),
    ("video_fps=yes", "video_fps", "number"), ("max_error_fraction=false", "max_error_fraction", "number"),
    ("num_gpus_per_actor=true", "num_gpus_per_actor", "number"), ("batch_size=true", "batch_size", "integer"),
    ("batch_size=16.0", "batch_size", "integer"), ("max_pixels='100'", "max_pixels", "integer"),
    ("strict='true'", "strict", "boolean"), ("incremental=1", "incremental", "boolean"),
    ("progress='1'", "progress", "boolean"), ("s3.anon=1", "s3.anon", "boolean"),
    ("evaluate.score_threshold=true", "evaluate.score_threshold", "number"),
    ("evaluate.num_worst_images=true", "evaluate.num_worst_images", "integer"),
])
def test_numbers_and_booleans_are_strict(override, field, kind):
    with pytest.raises(ConfigError) as e:
        build_config(DetectConfig, values=BASE, overrides=["evaluate.ground_truth=g", override])
    assert f"): {field}: Input should be a valid {kind}" in str(e.value)


@pytest.mark.parametrize(("cls", "values", "override", "field"), [
    ("TrainConfig", TRAIN + ["preset=p"], "learning_rate=true", "learning_rate"),
    ("TrainConfig", TRAIN + ["preset=p"], "use_gpu=1", "use_gpu"),
    ("TrainConfig", TRAIN + ["preset=p"], "num_workers=2.0", "num_workers"),
    ("TrainConfig", TRAIN + ["detector=florence2", "model=m"], "lora.alpha=true", "lora.alpha"),
    ("TrainConfig", TRAIN + ["detector=florence2", "model=m"], "lora.r='8'", "lora.r"),
    ("EvaluateConfig", ["detections=d", "ground_truth=g"], "score_threshold=true", "score_threshold"),
    ("EvaluateConfig", ["detections=d", "ground_truth=g"], "s3.anon='yes'", "s3.anon"),
])
def test_other_configs_are_strict_too(cls, values, override, field):
    from platescope import config

    with pytest.raises(ConfigError, match=rf"\): {field}: Input should be a valid"):
        build_config(getattr(config, cls), overrides=[*values, override])


def test_yaml_numbers_still_fill_number_fields(tmp_path):
    from platescope.config import TrainConfig

    job = tmp_path / "job.yaml"
    job.write_text("input: [a]\noutput: o\nmodel: m\nthreshold: 1\nvideo_fps: 2\nmax_error_fraction: 0\n"
                   "strict: true\nincremental: yes\n")
    cfg = build_config(DetectConfig, file=str(job), overrides=["batch_size=16", "num_cpus_per_actor=2",
                                                               "evaluate.ground_truth=g", "evaluate.score_threshold=1"])
    assert (cfg.threshold, cfg.video_fps, cfg.max_error_fraction) == (1.0, 2.0, 0.0)
    assert cfg.strict is True and cfg.incremental is True and cfg.batch_size == 16
    # YAML 1.1 reads 1e-4 as a string; written plainly it is a number all the same (quoted it is not)
    cfg = build_config(TrainConfig, overrides=[*TRAIN, "preset=p", "learning_rate=1e-4"])
    assert cfg.learning_rate == 1e-4
    # flags argparse typed
    cfg = parse(["--input", "a", "--output", "o", "--threshold", "1", "--batch-size", "2", "--strict"])
    assert cfg.threshold == 1.0 and cfg.batch_size == 2 and cfg.strict is True


def test_a_dumped_config_validates_again_as_workers_do():
    from platescope.config import TrainConfig

    cfg = build_config(TrainConfig, overrides=[*TRAIN, "detector=florence2", "model=m", "lora.alpha=16"])
    assert TrainConfig.model_validate(cfg.model_dump(mode="json")).lora.alpha == 16.0


@pytest.mark.parametrize(("override", "expected"), [
    ("run_id=20261121", "20261121"), ("run_id=2026-11-21", "2026-11-21"), ("run_id=true", "true"),
    ("run_id=1.50", "1.50"), ("run_id=0x1F", "0x1F"),
])
def test_a_string_field_takes_the_override_as_written(override, expected):
    assert build_config(DetectConfig, values=BASE, overrides=[override]).run_id == expected


def test_string_fields_take_numbers_as_written_everywhere(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("input: [20261121, s3://footage/]\noutput: 2026\nmodel: m\nrun_id: 007\n")
    cfg = build_config(DetectConfig, file=str(job))
    assert cfg.input == ["20261121", "s3://footage/"] and cfg.output == "2026" and cfg.run_id == "007"
    assert parse(["--input", "a", "--output", "o", "--run-id", "20261121"]).run_id == "20261121"
    assert build_config(DetectConfig, values=BASE, overrides=["input=20261121"]).input == ["20261121"]
    cfg = build_config(DetectConfig, values=BASE, overrides=["s3.secret_access_key=[odd", "s3.region=1"])
    assert cfg.s3.options().secret_access_key == "[odd" and cfg.s3.region == "1"


def test_the_cli_is_strict_and_takes_a_numeric_run_id(tmp_path):
    import subprocess
    import sys

    def detect(*args):
        return subprocess.run([sys.executable, "-m", "platescope", "detect", "--input", str(tmp_path / "none"),
                               "--output", str(tmp_path / "out"), *args], capture_output=True, text=True, timeout=120)

    for args, message in [(["threshold=true"], "threshold: Input should be a valid number"),
                          (["input="], "input.0: Value error, must not be empty"),
                          (["--input", ""], "input.0: Value error, must not be empty")]:
        proc = detect(*args)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    # a numeric run id passes the config and the run stops only at its missing input
    for args in (["run_id=20261121"], ["--run-id", "20261121"]):
        proc = detect(*args)
        assert proc.returncode == 2 and "invalid config" not in proc.stderr, proc.stderr
        assert "none: does not exist" in proc.stderr, proc.stderr
