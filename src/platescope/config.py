"""Typed job configs: a YAML file, then `key=value` overrides, strict about every field.

A misspelt key or a bad value fails at once with a message naming the field, before any work starts.
The resolved config is saved beside a run's outputs with secrets masked.
"""

from __future__ import annotations

import datetime as _dt
import re
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)

from platescope.models import default_model_dir
from platescope.storage import S3Options


def _require_text(v: str) -> str:
    if not v.strip():
        raise ValueError("must not be empty")
    return v


def _require_name(v: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", v):
        raise ValueError("must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return v


# A path that must say something: "" or "  " fails naming the field.
Text = Annotated[str, AfterValidator(_require_text)]
# A run name that is safe as one folder name, locally and as an S3 key part.
Name = Annotated[str, AfterValidator(_require_name)]


class ConfigError(ValueError):
    """A config that cannot run; the message names the field and the problem in one line."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class S3Config(_Strict):
    """S3 access. Unset fields fall back to the AWS environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID...)."""

    endpoint_url: str | None = Field(None, description="S3 endpoint, e.g. http://127.0.0.1:8333 or a MinIO URL")
    region: str | None = Field(None, description="S3 region name")
    access_key_id: SecretStr | None = Field(None, description="access key; prefer the environment")
    secret_access_key: SecretStr | None = Field(None, description="secret key; prefer the environment")
    anon: bool = Field(False, description="anonymous access to public buckets")

    def options(self) -> S3Options:
        return S3Options(
            endpoint_url=self.endpoint_url,
            region=self.region,
            access_key_id=self.access_key_id.get_secret_value() if self.access_key_id else None,
            secret_access_key=self.secret_access_key.get_secret_value() if self.secret_access_key else None,
            anon=self.anon,
        )


def default_run_id() -> str:
    return "run-" + _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")


class EvaluationOptions(_Strict):
    """How detections are scored against ground truth; shared by `evaluate` and `detect --ground-truth`."""

    ground_truth: Text = Field(..., description="COCO JSON file, YOLO labels folder or Pascal VOC XML folder (local or s3://)")
    ground_truth_format: Literal["auto", "coco", "yolo", "voc"] = Field("auto", description="labels format")
    input_root: list[str] | None = Field(
        None, description="roots the detections' URIs are made relative to before matching label paths; "
        "default: the inputs of the run that wrote them")
    label_map: dict[str, str] = Field(
        default_factory=dict, description="detector label -> ground-truth category name ('' leaves it out)")
    score_threshold: float = Field(0.5, ge=0.0, le=1.0, description="score for precision, recall, F1 and the gallery")
    num_worst_images: int = Field(12, ge=0, le=200, description="images in the report's gallery of failures")


class EvaluateConfig(EvaluationOptions):
    """Everything an `evaluate` run needs."""

    detections: Text = Field(..., description="a detect run folder, a folder of Parquet files, or one file")
    output: str | None = Field(None, description="report folder; default <detections>/evaluation")
    s3: S3Config = Field(default_factory=S3Config, description="S3 endpoint and credentials")


def _check_florence2_prompt(prompt: str | None) -> None:
    from platescope.detectors.florence2 import DETECTION_TASKS

    if not prompt or not prompt.startswith(DETECTION_TASKS):
        raise ValueError(f"prompt: florence2 needs a prompt starting with one of {', '.join(DETECTION_TASKS)}")


# Florence-2's attention projections: the language model's q/k/v/out (encoder, decoder self- and
# cross-attention) and the DaViT vision tower's fused qkv and output proj (window and channel blocks).
FLORENCE2_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "qkv", "proj"]


class LoraOptions(_Strict):
    """PEFT LoRA for Florence-2 fine-tuning (the seed recipe's numbers by default)."""

    r: int = Field(64, ge=1, description="rank of the low-rank update")
    alpha: float = Field(128, gt=0, description="lora_alpha: the update is scaled by alpha / r")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout on the LoRA branch")
    target_modules: list[Text] = Field(
        default_factory=lambda: list(FLORENCE2_LORA_TARGETS), min_length=1,
        description="module name suffixes that get an adapter (default: all attention projections)")


class DetectConfig(_Strict):
    """Everything a `detect` run needs. Counts are named num_*."""

    input: list[str] = Field(..., min_length=1, description="local folders/files or s3:// prefixes, listed recursively")
    output: Text = Field(..., description="output root; the run writes into <output>/<run_id>/")
    model: Text = Field(default_factory=default_model_dir,
                        description="model dir (local or s3://) or a hub id; default: the bundled plate model")
    run_id: Name = Field(default_factory=default_run_id, description="names the run's folder; rerun to resume")
    detector: Literal["hf", "florence2"] = Field(
        "hf", description="detector family: hf (any AutoModelForObjectDetection) or florence2 (prompted)")
    prompt: str | None = Field(
        None, description="florence2: task and phrase, e.g. '<CAPTION_TO_PHRASE_GROUNDING> licence plate'")
    adapter: str | None = Field(None, description="florence2: PEFT LoRA adapter dir (local or s3://)")
    max_new_tokens: int = Field(256, ge=8, le=4096, description="florence2: longest generated answer")
    threshold: float = Field(0.3, ge=0.0, le=1.0, description="minimum score of a kept box")
    video_fps: float = Field(1.0, gt=0.0, description="frames per second sampled from videos")
    batch_size: int = Field(8, ge=1, le=4096, description="images per detector call")
    num_actors_min: int = Field(1, ge=1, description="fewest detector actors")
    num_actors_max: int = Field(1, ge=1, description="most detector actors (autoscaling between min and max)")
    num_gpus_per_actor: float | None = Field(
        None, ge=0.0, description="GPUs per actor; default 1 when the cluster has GPUs, else 0"
    )
    num_cpus_per_actor: float = Field(1.0, gt=0.0, description="CPUs reserved per detector actor")
    num_threads_per_actor: int | None = Field(
        None, ge=1, description="torch threads in each actor; default: all cores of its node on CPU"
    )
    num_cpus_per_decoder: float = Field(0.5, gt=0.0, description="CPUs reserved per fetch+decode task")
    num_inputs_per_shard: int = Field(
        64, ge=1, description="images per shard, the unit of resume (each video is a shard of its own)"
    )
    max_pixels: int = Field(100_000_000, ge=1, description="larger images or frames are errors (decompression bomb)")
    max_error_fraction: float = Field(0.1, ge=0.0, le=1.0, description="exit non-zero above this share of error rows")
    strict: bool = Field(False, description="unsupported file types are error rows instead of skipped")
    incremental: bool = Field(False, description="process only inputs no earlier run under output has seen")
    address: str | None = Field(None, description="Ray cluster to join (else RAY_ADDRESS, else a local Ray)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where the model runs")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field("auto", description="model dtype")
    trust_remote_code: bool = Field(False, description="allow model code from the model dir/hub")
    allow_unsafe_weights: bool = Field(False, description="allow pickle (.bin) weights, not just safetensors")
    progress: bool = Field(True, description="show a progress bar")
    s3: S3Config = Field(default_factory=S3Config, description="S3 endpoint and credentials")
    evaluate: EvaluationOptions | None = Field(
        None, description="score the run against ground truth when it ends (report in <run>/evaluation/)")

    @model_validator(mode="after")
    def _prompt_fits_the_detector(self) -> DetectConfig:
        if self.detector == "florence2":
            _check_florence2_prompt(self.prompt)
        elif self.prompt or self.adapter:
            raise ValueError("prompt and adapter are for detector florence2")
        return self

    @model_validator(mode="after")
    def _actor_range(self) -> DetectConfig:
        if self.num_actors_max < self.num_actors_min:
            raise ValueError(
                f"num_actors_max ({self.num_actors_max}) is below num_actors_min ({self.num_actors_min})"
            )
        return self

    def resolved(self) -> dict[str, Any]:
        """JSON-ready config with secrets masked, as saved beside the outputs."""
        return self.model_dump(mode="json")


class TrainConfig(_Strict):
    """Everything a `train` run needs. Batch size is per worker; steps count optimizer steps."""

    name: Name = Field(..., description="run name: checkpoints go to <storage>/<name>/; rerun it to resume")
    storage: Text = Field(..., description="checkpoint root, local or s3:// (shared by all workers)")
    train: Text = Field(..., description="COCO JSON of the training set; images are beside it (local or s3://)")
    val: str | None = Field(None, description="COCO JSON of the validation set; picks the best checkpoint")
    model: str | None = Field(None, description="model dir (local or s3://) or hub id to fine-tune")
    preset: str | None = Field(None, description="architecture trained from scratch instead, e.g. rtdetr-r18")
    allow_unsafe_weights: bool = Field(
        False, description="allow pickle (.bin) weights, not just safetensors, in the model, adapter or "
        "checkpoint loaded")
    detector: Literal["hf", "florence2"] = Field(
        "hf", description="hf: fine-tune all weights of an object detector; florence2: a LoRA adapter on Florence-2")
    prompt: str | None = Field(
        None, description="florence2: the task prompt the adapter learns to answer (default <OD>)")
    max_new_tokens: int = Field(
        256, ge=8, le=4096, description="florence2: longest answer; targets are cut at a whole box to fit")
    lora: LoraOptions = Field(default_factory=LoraOptions, description="florence2: LoRA rank, scale and modules")
    merge: bool = Field(False, description="florence2: export base + adapter merged into one model dir")
    num_workers: int = Field(2, ge=1, description="training workers (one GPU each with use_gpu)")
    use_gpu: bool = Field(False, description="train on GPUs")
    num_cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker")
    num_epochs: int = Field(10, ge=1, description="passes over the training set")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps (overrides epochs)")
    batch_size: int = Field(4, ge=1, description="images per worker per step")
    learning_rate: float = Field(1e-4, gt=0, description="AdamW peak learning rate")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(50, ge=0, description="linear warm-up before the cosine decay")
    max_grad_norm: float = Field(0.1, gt=0, description="gradient clipping")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="autocast dtype on GPU (auto: bf16 where supported, else fp16); CPU runs fp32")
    augment: bool = Field(True, description="albumentations on training images (never on val)")
    min_box_size: float = Field(2.0, ge=0, description="boxes thinner than this (px) after augmentation are dropped")
    num_checkpoints_to_keep: int = Field(2, ge=1, description="best checkpoints kept, by val mAP")
    max_failures: int = Field(3, ge=0, description="worker failures survived by restarting from the last checkpoint")
    export: str | None = Field(None, description="model dir for the best checkpoint; default <storage>/<name>/model")
    export_dtype: Literal["float32", "float16"] = Field(
        "float32", description="weights dtype of the exported model dir (float16 halves it; detect runs float32)")
    seed: int = Field(0, description="seed for weights of presets, shuffling and augmentation")
    address: str | None = Field(None, description="Ray cluster to join (else RAY_ADDRESS, else a local Ray)")
    s3: S3Config = Field(default_factory=S3Config, description="S3 endpoint and credentials")

    @model_validator(mode="after")
    def _one_model_source(self) -> TrainConfig:
        if (self.model is None) == (self.preset is None):
            raise ValueError("give exactly one of model (a model dir or hub id) and preset (train from scratch)")
        return self

    @model_validator(mode="after")
    def _florence2_fields(self) -> TrainConfig:
        if self.detector == "florence2":
            if self.model is None:
                raise ValueError("model: florence2 fine-tuning needs the base model dir (presets are detectors)")
            _check_florence2_prompt(self.task_prompt)
        else:
            # Compared with the defaults, not fields_set: a dumped config (as workers get it) sets all.
            given = [name for name, unset in (("prompt", None), ("lora", LoraOptions()), ("merge", False))
                     if getattr(self, name) != unset]
            if given:
                raise ValueError(f"{', '.join(given)}: only for detector florence2")
        return self

    @property
    def task_prompt(self) -> str:
        """florence2: the prompt training targets answer (<OD> unless set)."""
        return self.prompt or "<OD>"

    def resolved(self) -> dict[str, Any]:
        """JSON-ready config with secrets masked, as saved beside the model."""
        return self.model_dump(mode="json")


def _format_error(err: ValidationError, source: str) -> str:
    parts = []
    for e in err.errors():
        field = ".".join(str(x) for x in e["loc"]) or "(config)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (misspelt?)"
        parts.append(f"{field}: {msg}")
    return f"invalid config ({source}): " + "; ".join(parts)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as YAML, so numbers, booleans and lists get their types)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not key=value")
    key, raw = text.split("=", 1)
    if not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        raise ConfigError(f"override '{text}': '{key}' is not a field name")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    # Keep strings that YAML would turn into something surprising (dates, null for an empty run id).
    if isinstance(value, (_dt.date, _dt.datetime)):
        value = raw
    return key.split("."), value


def _set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {'.'.join(path)}: '{part}' is not a section")
    node[path[-1]] = value


def load_yaml(path: str) -> dict[str, Any]:
    from platescope import storage

    try:
        text = storage.read_bytes(path).decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: must be a mapping of fields, not {type(data).__name__}")
    return data


def build_config(
    model_cls: type[BaseModel],
    *,
    file: str | None = None,
    values: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
) -> Any:
    """YAML file < explicit values (CLI flags) < key=value overrides, validated strictly."""
    data: dict[str, Any] = load_yaml(file) if file else {}
    for key, value in (values or {}).items():
        _set_path(data, key.split("."), value)
    for text in overrides or []:
        path, value = parse_override(text)
        # A list field given one string (input=s3://x) means a list of one.
        if path == ["input"] and isinstance(value, str):
            value = [value]
        _set_path(data, path, value)
    if isinstance(data.get("input"), str):
        data["input"] = [data["input"]]
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e, file or "command line")) from None
