"""Typed job configs: a YAML file, then `key=value` overrides, strict about every field.

A misspelt key or a bad value fails at once with a message naming the field, before any work starts.
Types are strict: `true` is no number and `"1"` no boolean, while a string field takes what was written
(`run_id=20261121` is the name "20261121"). No error message shows the value of anything that looks
like a secret (`is_secret_name`, `looks_secret_value`), and the resolved config saved beside a run's
outputs has secrets masked.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import types
import urllib.parse
from typing import Annotated, Any, Literal, Union, get_args, get_origin

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

from platescope.models import DEFAULT_MODEL_NMS, default_model_dir
from platescope.storage import S3Options, absolute, is_s3

# --------------------------------------------------------------------------------------------
# What holds a secret: one rule for config fields (right or misspelt), job files and env vars
# --------------------------------------------------------------------------------------------

MASK = "**********"  # as pydantic's SecretStr shows one

# Anywhere in a name (APIKEY and ACCESSTOKEN run words together; nothing harmless contains these).
_SECRET_PARTS = ("SECRET", "PASSWORD", "PASSWD", "PASSPHRASE", "CREDENTIAL", "WEBHOOK", "COOKIE", "PRIVATE",
                 "APIKEY", "ACCESSKEY", "AUTHTOKEN", "ACCESSTOKEN", "CONNSTR", "CONNECTIONSTRING",
                 "AUTHORIZATION", "BASICAUTH", "SSHKEY", "SIGNINGKEY", "MASTERKEY", "ENCRYPTIONKEY",
                 "LICENSEKEY")
# Whole words only: KEYRING, MONKEY, TOKENIZERS_PARALLELISM, max_new_tokens, PASSTHROUGH are no secrets.
# (KEY: AWS_ACCESS_KEY_ID, OPENAI_API_KEY, SSH_KEY; PYTHONHASHSEED, KEYRING and MONKEY have no KEY word.)
_SECRET_WORDS = {"KEY", "TOKEN", "PASS", "DSN"}
# AUTH and SESSION name a secret unless the name ends in a word saying it is a setting about one
# (RAY_AUTH_MODE, AUTH_URL, SESSION_TIMEOUT).
_WEAK_WORDS = {"AUTH", "OAUTH", "OAUTH2", "SESSION"}
_SETTING_WORDS = {"MODE", "TYPE", "METHOD", "ENABLED", "DISABLED", "PROVIDER", "URL", "URI", "HOST", "PORT",
                  "ENDPOINT", "DOMAIN", "REALM", "ISSUER", "SCOPE", "SCOPES", "TIMEOUT", "TTL", "NAME", "LEVEL"}
# <DATABASE>_URL and the like carry user:password@ as a rule; AWS_ENDPOINT_URL does not.
_STORE_WORDS = {"DATABASE", "DB", "REDIS", "MONGO", "MONGODB", "POSTGRES", "POSTGRESQL", "PG", "MYSQL",
                "AMQP", "RABBITMQ", "BROKER", "CELERY", "SQLALCHEMY"}
_URL_WORDS = {"URL", "URI", "URLS"}
_URL_WITH_PASSWORD = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#@\s:]*:[^/?#\s]+@")


def _name_words(name: str) -> list[str]:
    """secretAccessKey, secret-access-key and SECRET_ACCESS_KEY -> [SECRET, ACCESS, KEY]."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)
    return [w for w in re.split(r"[^A-Za-z0-9]+", spaced.upper()) if w]


def is_secret_name(name: str) -> bool:
    """Whether a field or environment variable called `name` holds a secret (a dotted name: any part).

    Yes: AWS_SECRET_ACCESS_KEY, AWS_ACCESS_KEY_ID, OPENAI_API_KEY, HF_TOKEN, DB_PASSWORD,
    AZURE_STORAGE_CONNECTION_STRING, SLACK_WEBHOOK_URL, DATABASE_URL, SENTRY_DSN, AWS_SESSION_TOKEN,
    GOOGLE_APPLICATION_CREDENTIALS, s3.secret-access-key (misspelt or not).
    No: AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, RAY_AUTH_MODE, PYTHONHASHSEED, TOKENIZERS_PARALLELISM,
    max_new_tokens, GIT_AUTHOR_NAME, PYTHON_KEYRING_BACKEND.
    """
    words = _name_words(name)
    joined = "".join(words)
    if any(part in joined for part in _SECRET_PARTS):
        return True
    if any(w in _SECRET_WORDS or w.endswith(("TOKEN", "DSN")) for w in words):
        return True
    if "PWD" in words and len(words) > 1:  # MYSQL_PWD; PWD alone is the working dir
        return True
    if any(w in _WEAK_WORDS or w.endswith("AUTH") for w in words) and words[-1] not in _SETTING_WORDS:
        return True
    return bool(set(words) & _STORE_WORDS and set(words) & _URL_WORDS)


def looks_secret_value(value: Any) -> bool:
    """A value that is a secret whatever its name: a URL with user:password@, a private key."""
    return isinstance(value, str) and bool(_URL_WITH_PASSWORD.search(value) or "PRIVATE KEY-----" in value)


def mask_secret_value(value: str) -> str:
    """`value` with the password of any URL in it masked (and a private key masked whole)."""
    if "PRIVATE KEY-----" in value:
        return MASK

    def mask(m: re.Match) -> str:
        scheme, userinfo = m.group(0).split("://", 1)
        return f"{scheme}://{userinfo.split(':', 1)[0]}:{MASK}@"

    return _URL_WITH_PASSWORD.sub(mask, value)


def _secret_texts(node: Any, under_secret: bool = False) -> set[str]:
    """Every text in parsed config data that must not be shown: the values (scalars, however deep)
    under a secret-looking key, right or misspelt, and URL passwords anywhere."""
    found: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            found |= _secret_texts(value, under_secret or is_secret_name(str(key)))
    elif isinstance(node, (list, tuple)):
        for value in node:
            found |= _secret_texts(value, under_secret)
    elif node is not None and not isinstance(node, bool):
        text = node.get_secret_value() if isinstance(node, SecretStr) else str(node)
        if under_secret:
            found.add(text)
        elif looks_secret_value(text):
            found |= _url_passwords(text) | {text}
    return found


def _url_passwords(text: str) -> set[str]:
    out = set()
    for m in _URL_WITH_PASSWORD.finditer(text):
        userinfo = m.group(0).split("://", 1)[1][:-1]
        password = userinfo.split(":", 1)[1]
        out |= {password, urllib.parse.unquote(password)}
    return out


# `key: value`, `key=value`, `"key": value` on one line of a file that did not parse.
_KEY_VALUE_LINE = re.compile(r"""["']?([A-Za-z0-9_.-]+)["']?\s*[:=]\s*(.*)""")


def _secret_texts_in_raw(text: str) -> set[str]:
    """What `_secret_texts` would find, from the text of a YAML file that does not parse."""
    found: set[str] = set()
    for line in text.splitlines():
        for m in _KEY_VALUE_LINE.finditer(line):
            key, value = m.group(1), m.group(2).strip()
            if value and is_secret_name(key):
                found |= {value, value.strip("'\"{}[], ")}
                found |= set(re.split(r"[\s,{}\[\]#*&!'\"]+", value))
        if looks_secret_value(line):
            found |= _url_passwords(line)
    return found


def _redact(message: str, secrets: set[str]) -> str:
    # Longest first, so a value is masked whole before any part of it; very short ones would mask
    # ordinary words of the message and give nothing away.
    for secret in sorted((s for s in secrets if len(s) >= 3), key=len, reverse=True):
        message = message.replace(secret, MASK)
    return mask_secret_value(message)


def _masked_dump(node: Any) -> Any:
    """A JSON-ready dump (SecretStr fields already masked) with URL passwords masked too."""
    if isinstance(node, dict):
        return {k: _masked_dump(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_masked_dump(v) for v in node]
    return mask_secret_value(node) if isinstance(node, str) else node


def _holds_url_secret(node: Any) -> bool:
    if isinstance(node, dict):
        return any(_holds_url_secret(v) for v in node.values())
    if isinstance(node, (list, tuple)):
        return any(_holds_url_secret(v) for v in node)
    return looks_secret_value(node)


def secret_fields(cfg: BaseModel, prefix: str = "") -> list[str]:
    """Dotted names of the fields of `cfg` set to a secret: a secret-named field with a value, or any
    value holding a URL password (for `submit`, which must not send them in plain text)."""
    found = []
    for name in type(cfg).model_fields:
        value = getattr(cfg, name)
        dotted = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            found += secret_fields(value, dotted + ".")
        elif (value is not None and value != "" and is_secret_name(name)) or _holds_url_secret(value):
            found.append(dotted)
    return found


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
    # strict: no number from `true` or "1", no boolean from 1 or "yes" (YAML's own yes/true are booleans
    # already); an int is still a float. `build_config` gives string fields the text as written.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)


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
    input_root: list[Text] | None = Field(
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


def _is_the_bundled_model(model: Any) -> bool:
    """Whether a detect config's `model` (unset, or a local path or file:// written any way) names the bundled
    model."""
    if model is None:
        return True
    return isinstance(model, str) and not is_s3(model) and os.path.realpath(absolute(model)) == default_model_dir()


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


class TrackOptions(_Strict):
    """How `detect --track` links a video's detections into tracks (ByteTrack, pipeline.tracks). The
    defaults were measured on real footage sampled at 1-5 fps (README, Detect)."""

    iou: float = Field(
        0.1, gt=0.0, le=1.0, description="least IoU between a track's predicted box and a detection, both widened "
        "by buffer, for the detection to continue the track")
    buffer: float = Field(
        0.5, ge=0.0, le=5.0, description="boxes are widened by this share of their width and height on each side "
        "before they are compared (buffered IoU): at 1-2 fps a car's plate moves farther than its own size between "
        "samples, and unwidened boxes would not overlap")
    lost_track_s: float = Field(
        1.0, ge=0.0, description="seconds of sampled frames a track waits for its plate to be detected again "
        "before it ends")
    min_frames: int = Field(2, ge=1, description="tracks detected in fewer sampled frames are left out")
    high_score: float = Field(
        0.5, ge=0.0, le=1.0, description="detections scoring at least this start tracks and are matched first; "
        "lower ones (down to the run's threshold) only continue tracks (ByteTrack's two stages)")
    duplicate_iou: float = Field(
        0.3, gt=0.0, le=1.0, description="a box overlapping a higher-scored box of its label in the same frame "
        "above this IoU is a duplicate of it and is not tracked")
    crop_margin: float = Field(
        0.25, ge=0.0, le=5.0, description="crops: the crop reaches this share of the box's width and height "
        "beyond it on each side")


# Resource requests no node could ever grant would wait forever; they fail before any work instead.
_FITS = " (checked before any work against the largest node, live or one the autoscaler can add)"


class DetectConfig(_Strict):
    """Everything a `detect` run needs. Counts are named num_*."""

    input: list[Text] = Field(..., min_length=1, description="local folders/files or s3:// prefixes, listed recursively")
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
    video_segment_s: float = Field(
        60.0, gt=0.0, description="a video longer than this many seconds is split into time segments of about "
        "this length, each its own shard: decoded in parallel and resumed one by one (the rows are the same; a "
        "resumed run keeps its first start's segments)")
    batch_size: int = Field(8, ge=1, le=4096, description="images per detector call")
    num_actors_min: int = Field(1, ge=1, description="fewest detector actors; all must fit beside a decode task"
                                + _FITS)
    num_actors_max: int = Field(1, ge=1, description="most detector actors (autoscaling between min and max)")
    num_gpus_per_actor: float | None = Field(
        None, ge=0.0, description="GPUs per actor; default 1 when the cluster has GPUs, else 0" + _FITS
    )
    num_cpus_per_actor: float = Field(1.0, gt=0.0, description="CPUs reserved per detector actor" + _FITS)
    num_threads_per_actor: int | None = Field(
        None, ge=1, description="torch threads in each actor; default: all cores of its node on CPU"
    )
    slice_batches: bool = Field(
        True, description="on CPU, each of an actor's torch threads runs its own slice of every batch on one "
        "thread, instead of all threads working on each op in turn (faster; hf detectors without compile)")
    onnx_runtime: bool = Field(
        True, description="on CPU, run the model in ONNX Runtime (its forward pass 1.3x faster on the default model) "
        "when it exports and agrees with PyTorch, checked once and cached under ~/.cache/platescope/onnx; else "
        "PyTorch, with a warning (hf detectors without compile)")
    num_cpus_per_decoder: float = Field(0.5, gt=0.0, description="CPUs reserved per fetch+decode task" + _FITS)
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
    jpeg_draft: bool = Field(
        True, description="decode JPEGs at 1/2, 1/4 or 1/8 scale when that is at least 90% of the model's input "
        "size (faster; pixels differ slightly from a full decode: val AP moved by at most 0.002 where it "
        "applied); false: the processor's exact pixels")
    compile: bool = Field(
        False, description="torch.compile the model in each detector actor: faster per image after a compile of "
        "minutes on first use, cached under ~/.cache/platescope/torch-compile for later runs; for long runs "
        "(hf detectors)")
    nms_iou: float | None = Field(
        None, gt=0.0, le=1.0, description="class-wise non-maximum suppression of boxes overlapping a higher-scored "
        "box of the same label above this IoU (hf detectors; DETR-family models trained briefly give near-duplicates); "
        "default off, for the bundled model 0.4 with nms_merge unless either is given")
    nms_merge: bool = Field(
        False, description="with nms_iou: merging NMS, each kept box moved to the score-weighted mean of itself and "
        "the boxes it suppresses, those under the threshold included (tighter boxes: see README)")
    track: bool = Field(
        False, description="link each video's detections across its sampled frames into tracks, one row per "
        "plate sighting in <run>/tracks/part-<video>.parquet, made once all the video's shards are done")
    crops: bool = Field(
        False, description="with track: a JPEG of each track's best view around its box, under <run>/crops/ (the "
        "frame is decoded again)")
    tracker: TrackOptions = Field(default_factory=TrackOptions, description="track: how detections are linked")
    progress: bool = Field(True, description="show a progress bar")
    s3: S3Config = Field(default_factory=S3Config, description="S3 endpoint and credentials")
    evaluate: EvaluationOptions | None = Field(
        None, description="score the run against ground truth when it ends (report in <run>/evaluation/)")

    @model_validator(mode="before")
    @classmethod
    def _bundled_model_merges_duplicates(cls, data: Any) -> Any:
        """The bundled model runs with its merging NMS unless nms_iou or nms_merge is given
        (`nms_merge=false` alone turns it off)."""
        if (isinstance(data, dict) and not {"nms_iou", "nms_merge"} & data.keys()
                and data.get("detector", "hf") == "hf" and _is_the_bundled_model(data.get("model"))):
            data = {**data, **DEFAULT_MODEL_NMS}
        return data

    @model_validator(mode="after")
    def _prompt_fits_the_detector(self) -> DetectConfig:
        if self.detector == "florence2":
            _check_florence2_prompt(self.prompt)
        elif self.prompt or self.adapter:
            raise ValueError("prompt and adapter are for detector florence2")
        if self.compile and self.detector != "hf":
            raise ValueError("compile: only hf detectors are compiled (florence2 generates token by token)")
        if self.nms_iou is not None and self.detector != "hf":
            raise ValueError("nms_iou: only hf detectors' boxes are suppressed (florence2's boxes have no scores)")
        if self.nms_merge and self.nms_iou is None:
            raise ValueError("nms_merge: merges the boxes NMS suppresses; set nms_iou as well")
        return self

    @model_validator(mode="after")
    def _crops_need_tracks(self) -> DetectConfig:
        if self.crops and not self.track:
            raise ValueError("crops: a crop is cut for each track; set track as well")
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
        return _masked_dump(self.model_dump(mode="json"))


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
    ema_decay: float | None = Field(
        None, gt=0, lt=1, description="keep a moving average of the weights (e.g. 0.999: about the last 1,000 "
        "steps); val scores it and the export ships it (off: the training weights)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="autocast dtype on GPU (auto: bf16 where supported, else fp16); CPU runs fp32")
    augment: bool = Field(True, description="albumentations on training images (never on val)")
    augment_recipe: Literal["basic", "cameras"] = Field(
        "cameras", description="cameras: scale/translation jitter, blur, JPEG quality, noise, greyscale and dark "
        "exposures for unseen cameras, on top of basic; basic: flips, mild perspective and colour")
    aspect_jitter: float = Field(
        0.0, ge=0, le=3, description="stretch or squeeze each training image's width by up to 1 + this "
        "factor (0: off), so plates of other shapes than the training set's are seen")
    plate_zoom: float | None = Field(
        None, gt=0, le=1, description="this share of training images is zoomed in or out so that one plate is "
        "3-60 % of the image's width, drawn log-uniformly: plates at other cameras' sizes (off by default)")
    input_height: int | None = Field(
        None, ge=32, description="hf: train (and export) at this input height; with input_width (default: the "
        "model's or preset's own)")
    input_width: int | None = Field(None, ge=32, description="hf: input width; with input_height")
    letterbox: bool = Field(
        True, description="hf, with input_height/width: keep the image's aspect and pad to that size (else stretch)")
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

    @model_validator(mode="after")
    def _jitters_are_augmentation(self) -> TrainConfig:
        for name in ("aspect_jitter", "plate_zoom"):
            if getattr(self, name) and not self.augment:
                raise ValueError(f"{name}: it is an augmentation, and augment is false")
        return self

    @model_validator(mode="after")
    def _input_size(self) -> TrainConfig:
        if (self.input_height is None) != (self.input_width is None):
            raise ValueError("input_height, input_width: give both or neither")
        if self.input_height is not None and self.detector != "hf":
            raise ValueError("input_height, input_width: only for hf detectors (Florence-2 has its own input size)")
        return self

    @property
    def task_prompt(self) -> str:
        """florence2: the prompt training targets answer (<OD> unless set)."""
        return self.prompt or "<OD>"

    def resolved(self) -> dict[str, Any]:
        """JSON-ready config with secrets masked, as saved beside the model."""
        return _masked_dump(self.model_dump(mode="json"))


def _format_error(err: ValidationError, source: str) -> str:
    parts = []
    for e in err.errors():
        field = ".".join(str(x) for x in e["loc"]) or "(config)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (misspelt?)"
        parts.append(f"{field}: {msg}")
    return f"invalid config ({source}): " + "; ".join(parts)


# A scalar's text as written, and whether it was plain (unquoted): path -> (text, plain).
_Texts = dict[tuple, tuple[str, bool]]


def _parse_yaml(text: str) -> tuple[Any, _Texts]:
    """yaml.safe_load, plus the text of every scalar as it was written, by its path in the result
    (string fields take that text instead of the number, boolean or date YAML made of it)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}
        value = loader.construct_document(node)
        texts: _Texts = {}
        _scalar_texts(loader, node, (), texts, set())
        return value, texts
    finally:
        loader.dispose()


def _scalar_texts(loader: yaml.SafeLoader, node: yaml.Node, path: tuple, texts: _Texts, seen: set[int]) -> None:
    if isinstance(node, yaml.ScalarNode):
        texts[path] = (node.value, node.style is None)
        return
    if id(node) in seen:  # an alias of an enclosing node
        return
    seen = seen | {id(node)}
    if isinstance(node, yaml.SequenceNode):
        for i, child in enumerate(node.value):
            _scalar_texts(loader, child, (*path, i), texts, seen)
    elif isinstance(node, yaml.MappingNode):
        for key_node, child in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key = loader.construct_object(key_node)
                if isinstance(key, (str, int, float, bool)):
                    _scalar_texts(loader, child, (*path, key), texts, seen)


def _yaml_error(e: yaml.YAMLError) -> str:
    """Where and what, without PyYAML's snippet of the line (which may hold a secret)."""
    if not isinstance(e, yaml.MarkedYAMLError):
        return type(e).__name__

    def at(mark) -> str:
        return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""

    text = f"{e.problem or 'invalid'}{at(e.problem_mark)}"
    if e.context:
        text += f" ({e.context}{at(e.context_mark)})"
    return " ".join(text.split())


def _override_parts(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not key=value")
    key, raw = text.split("=", 1)
    if not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        shown = f"{key}=..." if is_secret_name(key) or looks_secret_value(raw) else text
        raise ConfigError(f"override '{shown}': '{key}' is not a field name")
    return key, raw


def _parse_override(text: str) -> tuple[list[str], Any, _Texts]:
    key, raw = _override_parts(text)
    texts: _Texts = {}
    try:
        value, texts = _parse_yaml(raw) if raw.strip() else ("", {})
    except yaml.YAMLError:
        value = raw
    # Keep strings that YAML would turn into something surprising (dates, null for an empty run id).
    if isinstance(value, (_dt.date, _dt.datetime)) or value is None and not raw.strip():
        value = raw
    if () not in texts:  # a list, a mapping or no YAML at all: a string field takes the whole text
        texts[()] = (raw, False)
    return key.split("."), value, texts


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as YAML, so numbers, booleans and lists get their types)."""
    path, value, _ = _parse_override(text)
    return path, value


def _set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {'.'.join(path)}: '{part}' is not a section")
    node[path[-1]] = value


def _load_yaml(path: str) -> tuple[dict[str, Any], _Texts, set[str]]:
    """The file's fields, their texts as written, and the secrets in it (to keep out of messages)."""
    from platescope import storage

    try:
        text = storage.read_bytes(path).decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: not found") from None
    try:
        data, texts = _parse_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError(_redact(f"config file {path}: not valid YAML ({_yaml_error(e)})",
                                  _secret_texts_in_raw(text))) from None
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: must be a mapping of fields, not {type(data).__name__}")
    return data, texts, _secret_texts(data)


def load_yaml(path: str) -> dict[str, Any]:
    return _load_yaml(path)[0]


# -- string fields take the text as written; lists take one item as a list of one ------------------


def _bare(tp: Any) -> Any:
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    return tp


def _members(tp: Any) -> list[Any]:
    """The types a field accepts besides None."""
    tp = _bare(tp)
    if get_origin(tp) in (Union, types.UnionType):
        return [_bare(a) for a in get_args(tp) if a is not type(None)]
    return [tp]


def _is_text_type(tp: Any) -> bool:
    if tp in (str, SecretStr):
        return True
    return get_origin(tp) is Literal and all(isinstance(a, str) for a in get_args(tp))


# YAML 1.2 floats that PyYAML (YAML 1.1) reads as strings: 1e-4, 5E3 (it wants 1.0e-4).
_PLAIN_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")


def _as_written(tp: Any, value: Any, path: tuple, texts: _Texts) -> Any:
    """`value` for a field of type `tp`, with string fields given the text as written (20261121,
    true or 2026-11-21 stay text) and plain 1e-4 read as a number; nested sections, lists and
    mappings followed down."""
    members = _members(tp)
    if value is None:
        return value
    if all(_is_text_type(m) for m in members):
        if not isinstance(value, (str, SecretStr)) and path in texts:
            return texts[path][0]
        return value
    if float in members and isinstance(value, str) and texts.get(path, ("", False))[1] \
            and _PLAIN_FLOAT.fullmatch(value):
        return float(value)
    for m in members:
        if isinstance(m, type) and issubclass(m, BaseModel) and isinstance(value, dict):
            return _fields_as_written(m, value, path, texts)
        if get_origin(m) is list:
            item = get_args(m)[0]
            if not isinstance(value, (list, dict)):  # `input=s3://x`: a list of one
                if path in texts:
                    texts[(*path, 0)] = texts[path]
                return [_as_written(item, value, (*path, 0), texts)]
            if isinstance(value, list):
                return [_as_written(item, v, (*path, i), texts) for i, v in enumerate(value)]
        if get_origin(m) is dict and isinstance(value, dict):
            key_type, item = get_args(m)
            return {(str(k) if key_type is str and isinstance(k, int) and not isinstance(k, bool) else k):
                    _as_written(item, v, (*path, k), texts) for k, v in value.items()}
    return value


def _fields_as_written(model_cls: type[BaseModel], data: dict[str, Any], path: tuple, texts: _Texts) -> dict:
    fields = model_cls.model_fields
    return {k: _as_written(fields[k].annotation, v, (*path, k), texts) if k in fields else v
            for k, v in data.items()}


def _drop_texts(texts: _Texts, path: tuple) -> None:
    for p in [p for p in texts if p[:len(path)] == path]:
        del texts[p]


def build_config(
    model_cls: type[BaseModel],
    *,
    file: str | None = None,
    values: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
) -> Any:
    """YAML file < explicit values (CLI flags) < key=value overrides, validated strictly.

    No message of the ConfigError it raises shows a secret: the value of anything named like one
    (right or misspelt, in the file, a flag or an override) or a URL's password.
    """
    secrets: set[str] = set()
    try:
        data, texts, secrets = _load_yaml(file) if file else ({}, {}, set())
        for key, value in (values or {}).items():
            path = key.split(".")
            secrets |= _secret_texts({key: value})
            _drop_texts(texts, tuple(path))
            _set_path(data, path, value)
        for text in overrides or []:
            key, _, raw = text.partition("=")
            if is_secret_name(key):
                secrets |= {raw, raw.strip(), raw.strip().strip("'\"")}
            secrets |= _secret_texts(raw)
            path, value, override_texts = _parse_override(text)
            secrets |= _secret_texts({key: value})
            _drop_texts(texts, tuple(path))
            texts.update({(*path, *p): t for p, t in override_texts.items()})
            _set_path(data, path, value)
        data = _fields_as_written(model_cls, data, (), texts)
        try:
            return model_cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(_format_error(e, file or "command line")) from None
    except ConfigError as e:
        raise ConfigError(_redact(str(e), secrets)) from None
