"""The train job: preflight -> Ray Data sets -> TorchTrainer -> export of the best checkpoint.

Checkpoints live under <storage>/<name>/ (Ray Train's run folder); rerunning the same name after
the driver died finds them there and resumes, if its settings are the first start's (`fingerprint`).
The best checkpoint by val mAP (or the last one without val) is exported as a model dir
`platescope detect --model` loads as it is; for Florence-2, as a LoRA adapter `detect --detector
florence2 --adapter` loads on its base (or, with merge, as a full model dir).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from typing import Any

from platescope import storage
from platescope.config import TrainConfig
from platescope.training import data, fingerprint
from platescope.training.lineage import TRAINING_INFO

EXPORT_DIR = "model"


class TrainPreflightError(ValueError):
    """The run cannot start; one line naming the input and the problem."""


@dataclass
class TrainResult:
    export: str
    best_metrics: dict[str, Any]
    history: list[dict[str, Any]]


def _preflight(cfg: TrainConfig, s3) -> tuple[data.LabelledSet, data.LabelledSet | None]:
    from platescope.detectors.presets import PRESET_NAMES
    from platescope.evaluation.groundtruth import GroundTruthError
    from platescope.pipeline.run import PreflightError, check_model

    if cfg.preset and cfg.preset not in PRESET_NAMES:
        raise TrainPreflightError(f"preset {cfg.preset!r}: unknown; choose one of {', '.join(PRESET_NAMES)}")
    if cfg.model:
        try:
            check_model(cfg.model, s3, trust_remote_code=False)
        except PreflightError as e:
            raise TrainPreflightError(str(e)) from None
        _check_family(cfg, s3)
    try:
        train = data.read_coco_set(cfg.train, s3)
        val = data.read_coco_set(cfg.val, s3, id2label=train.id2label) if cfg.val else None
    except GroundTruthError as e:
        raise TrainPreflightError(str(e)) from None
    if not train.records or not any(len(r["labels"]) for r in train.records):
        raise TrainPreflightError(f"train {cfg.train}: no labelled boxes to learn from")
    try:
        storage.check_writable(storage.join(cfg.storage, cfg.name), s3)
    except Exception as e:  # noqa: BLE001 - permissions, DNS, credentials: one line
        raise TrainPreflightError(f"storage {cfg.storage}: cannot be written ({type(e).__name__}: {e})") from None
    try:
        fingerprint.check_or_record(cfg, s3, train, val)
    except fingerprint.TrainResumeError as e:
        raise TrainPreflightError(str(e)) from None
    return train, val


def _check_family(cfg: TrainConfig, s3) -> None:
    """A Florence-2 dir for detector florence2, an object detector otherwise (read from its
    config.json; a hub id is checked when it loads)."""
    config_json = storage.join(cfg.model, "config.json")
    if not (storage.is_s3(cfg.model) or os.path.isdir(cfg.model)):
        return
    try:
        model_type = json.loads(storage.read_bytes(config_json, s3)).get("model_type")
    except (OSError, ValueError) as e:
        raise TrainPreflightError(f"model {cfg.model}: config.json cannot be read ({e})") from None
    if (model_type == "florence2") != (cfg.detector == "florence2"):
        wanted = "a Florence-2 model" if cfg.detector == "florence2" else "an object detector"
        hint = "" if cfg.detector == "florence2" else " (set detector=florence2 for a LoRA adapter on it)"
        raise TrainPreflightError(f"model {cfg.model}: is a {model_type} model; detector={cfg.detector} needs "
                                  f"{wanted}{hint}")


def run_train(cfg: TrainConfig) -> TrainResult:
    from platescope.ray_session import start_ray

    s3 = cfg.s3.options()
    train, val = _preflight(cfg, s3)
    worker_cfg = for_workers(cfg)
    # Workers hold their CPUs for the whole run; Ray Data's decode tasks need at least one more.
    # The dashboard serves the state API Ray Train's placement-group cleaner polls (without it, it
    # warns every few seconds and cannot clean up after a dead controller).
    needed = math.ceil(cfg.num_workers * cfg.num_cpus_per_worker) + 1
    started_ray = start_ray(cfg.address, num_cpus=max(os.cpu_count() or 1, needed), dashboard=True)
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from platescope.training.loop import train_loop

    try:
        ray.data.DataContext.get_current().enable_progress_bars = False  # one line per epoch instead
        # Decoded images; the loop augments training batches itself (seeded per seed, epoch and image).
        datasets = {"train": data.dataset(train.records, s3=s3)}
        if val is not None:
            datasets["val"] = data.dataset(val.records, s3=s3)
        fs, path = storage.arrow_filesystem(cfg.storage, s3)
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"cfg": worker_cfg.model_dump(mode="json"), "s3": s3, "id2label": train.id2label,
                               "num_train_images": len(train.records),
                               "val_ground_truth": val.ground_truth if val else None},
            scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                         resources_per_worker={"CPU": cfg.num_cpus_per_worker}),
            run_config=RunConfig(
                name=cfg.name, storage_path=path, storage_filesystem=fs,
                checkpoint_config=CheckpointConfig(
                    num_to_keep=cfg.num_checkpoints_to_keep,
                    checkpoint_score_attribute="map" if val is not None else None, checkpoint_score_order="max"),
                failure_config=FailureConfig(max_failures=cfg.max_failures),
            ),
            datasets=datasets,
            dataset_config=DataConfig(datasets_to_split="all"),
        )
        result = trainer.fit()
        best, best_metrics = _best(result, scored=val is not None)
        export = cfg.export or storage.join(cfg.storage, cfg.name, EXPORT_DIR)
        history = export_model(best, export, cfg, best_metrics, train.id2label, s3)
        return TrainResult(export=export, best_metrics=best_metrics, history=history)
    finally:
        if started_ray:
            ray.shutdown()


def for_workers(cfg: TrainConfig) -> TrainConfig:
    """The config as workers read it: Ray Train runs each worker in its own directory, where a relative
    local path (the model dir to load, the storage metrics.json goes to) would point elsewhere. S3
    URIs and hub ids stay; the export records the config as given."""
    update = {"storage": storage.absolute(cfg.storage)}
    if cfg.model and not storage.is_s3(cfg.model) and os.path.isdir(cfg.model):  # else a hub id
        update["model"] = storage.absolute(cfg.model)
    return cfg.model_copy(update=update)


def _best(result, *, scored: bool):
    candidates = list(result.best_checkpoints or [])
    if not candidates:
        raise RuntimeError(f"training reported no checkpoint ({result.error})")
    if scored:
        return max(candidates, key=lambda cm: (cm[1].get("map", -1.0), cm[1].get("epoch", 0)))
    return max(candidates, key=lambda cm: cm[1].get("epoch", 0))


def export_model(checkpoint, export: str, cfg: TrainConfig, metrics: dict[str, Any], id2label: dict[int, str],
                 s3) -> list[dict[str, Any]]:
    """The checkpoint's model (or Florence-2 adapter), processor and label map, minus optimizer state,
    plus what trained it."""
    import torch

    from platescope.training.loop import TRAIN_STATE, recipe_for

    with tempfile.TemporaryDirectory(prefix="platescope-export-") as tmp:
        local = checkpoint.to_directory(os.path.join(tmp, "ckpt"))
        state = torch.load(os.path.join(local, TRAIN_STATE), weights_only=True)
        os.remove(os.path.join(local, TRAIN_STATE))
        info = {"training_config": cfg.resolved(), "val_metrics": metrics, "id2label": id2label,
                **recipe_for(cfg).finish_export(local, cfg, s3), "history": state["history"]}
        with open(os.path.join(local, TRAINING_INFO), "w") as f:
            json.dump(info, f, indent=2)
        if cfg.export_dtype == "float16":
            _halve_weights(local)
        if storage.exists(export, s3):
            storage.remove(export, s3)  # a stale export must not keep files the new one lacks
        storage.upload_dir(local, export, s3)
    return state["history"]


def _halve_weights(model_dir: str) -> None:
    """float32 tensors of the dir's safetensors files to float16, in place (loaders upcast them)."""
    import torch
    from safetensors.torch import load_file, save_file

    for name in os.listdir(model_dir):
        if name.endswith(".safetensors"):
            path = os.path.join(model_dir, name)
            tensors = {k: v.half() if v.dtype == torch.float32 else v for k, v in load_file(path).items()}
            save_file(tensors, path, metadata={"format": "pt"})
