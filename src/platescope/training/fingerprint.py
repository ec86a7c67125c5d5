"""What a training run's weights depend on, recorded at its first start, so that rerunning the same
name resumes that run and never trains on with other settings.

`<storage>/<name>/fingerprint.json` (detect's format, `pipeline.fingerprint`) holds the training set
and val set (hashes of the labels as parsed, so a path written differently on another machine still
matches), the model as named with its weights' hash (or the preset), and every setting that changes
the weights: the optimiser's, the weight average's, the augmentation's, the input size, the seed,
the number of workers and the batch size (together they set the steps of an epoch). A rerun
computes the same from its own config before Ray starts; if the run folder holds a checkpoint and a
field differs, it refuses, naming each one. Without a checkpoint there is nothing to mix: the new
settings are recorded.

Free to differ: how long it trains (num_epochs, max_steps: a rerun with more carries on from its
last checkpoint, the cosine schedule stretched to the new end), where and how it runs (use_gpu,
num_cpus_per_worker, address, S3 credentials and endpoint), how failures and checkpoints are
handled (max_failures, num_checkpoints_to_keep), the export (export, export_dtype, merge), and
allow_unsafe_weights (the loading policy, not the weights).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from platescope import storage
from platescope.config import TrainConfig
from platescope.pipeline import fingerprint as detect_fingerprint
from platescope.training.data import LabelledSet

TRAINING_FIELDS = ("model", "preset", "detector", "prompt", "max_new_tokens", "lora", "num_workers",
                   "batch_size", "learning_rate", "weight_decay", "warmup_steps", "max_grad_norm", "ema_decay",
                   "precision", "augment", "augment_recipe", "aspect_jitter", "plate_zoom", "input_height",
                   "input_width", "letterbox", "min_box_size", "seed")
# A field added after runs were recorded is absent from their fingerprints; absent reads as None, so it
# must default to None (off) for those runs to resume.
ABOUT = "settings the weights depend on, from the run's first start; a rerun that differs refuses"
# Ray Train's record of the checkpoints it has committed: what a rerun resumes from.
CHECKPOINT_INDEX = "checkpoint_manager_snapshot.json"


class TrainResumeError(ValueError):
    """A rerun of a run name whose settings differ from its first start's."""


def labels_hash(labelled: LabelledSet) -> str:
    """12 hex of SHA-256 over what training reads from a COCO set (categories, and each image's path
    relative to the JSON, size, boxes, categories and crowd flags), taken from the set already parsed."""
    digest = hashlib.sha256(repr(sorted(labelled.ground_truth.categories.items())).encode())
    for image in labelled.ground_truth.images:
        digest.update(f"\0{image.key}\0{image.width}x{image.height}\0".encode())
        for array in (image.boxes_xywh, image.category_ids, image.iscrowd):
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:12]


def compute(cfg: TrainConfig, s3, train: LabelledSet, val: LabelledSet | None) -> dict[str, Any]:
    values = cfg.model_dump(mode="json")
    fields: dict[str, Any] = {name: values[name] for name in TRAINING_FIELDS}
    if cfg.detector != "florence2":
        for name in ("prompt", "max_new_tokens", "lora"):
            fields[name] = None  # only the Florence-2 recipe reads them
    fields["model_weights"] = detect_fingerprint.weights_id("model", cfg.model, s3) if cfg.model else None
    fields["train_labels"] = labels_hash(train)
    fields["val_labels"] = labels_hash(val) if val is not None else None
    return fields


def check_or_record(cfg: TrainConfig, s3, train: LabelledSet, val: LabelledSet | None) -> None:
    """Refuse (TrainResumeError, one line) to go on with a run started with other settings; otherwise
    record this config's fingerprint if the run has none yet (or has no checkpoint to resume)."""
    run_dir = storage.join(cfg.storage, cfg.name)
    current = compute(cfg, s3, train, val)
    recorded = detect_fingerprint.read(run_dir, s3)
    resumable = storage.exists(storage.join(run_dir, CHECKPOINT_INDEX), s3)
    if recorded is not None and resumable:
        diffs = detect_fingerprint.differences(recorded, current)
        if diffs:
            raise TrainResumeError(
                f"run {cfg.name} ({run_dir}) holds checkpoints of a run started with other settings; going on "
                f"with these would train one model under two configs: {'; '.join(diffs)}. Rerun with the "
                "first start's settings, or give a new name (to train on from its best weights: a new name "
                "with model=<its export>)")
    if recorded != current:
        # A first start, a run from before fingerprints (adopted as it is), or a folder with no checkpoint.
        detect_fingerprint.write(run_dir, current, s3, about=ABOUT)
