"""The per-worker training loop Ray Train runs on every worker, top to bottom.

    build or resume the model (the family's recipe) -> DDP -> AdamW on what trains + cosine warm-up
    [+ a moving average of the weights, with ema_decay]
    per epoch: train on this worker's shard, augmented as (seed, epoch, image) draws (autocast on GPU,
               clipped gradients)
               -> predict this worker's val shard -> gather -> COCO metrics (the evaluate code)
               -> report loss and metrics; rank 0 attaches a checkpoint
    (with ema_decay, val and the checkpoint's model are the averaged weights: weight_average)
A restarted worker (FailureConfig) or a rerun of the same name gets the last checkpoint from
`ray.train.get_checkpoint()` and carries on from the epoch after it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from typing import Any

import numpy as np

TRAIN_STATE = "train_state.pt"

# Ray Train turns a worker's print into a log record and, because Ray wraps the worker's stdout, also
# echoes it: every progress line came out twice. A log record comes out once.
log = logging.getLogger(__name__)


def recipe_for(cfg):
    """The module that knows the model family: detector_recipe or florence2_recipe."""
    if cfg.detector == "florence2":
        from platescope.training import florence2_recipe

        return florence2_recipe
    from platescope.training import detector_recipe

    return detector_recipe


def _autocast(device, precision: str):
    import contextlib

    import torch

    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext, None
    dtype = torch.float16 if precision == "fp16" or (
        precision == "auto" and not torch.cuda.is_bf16_supported()) else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return (lambda: torch.autocast("cuda", dtype=dtype)), scaler


def _predict(recipe, model, processor, shard, cfg, id2label, device, autocast) -> dict[int, tuple]:
    """This worker's share of val: {image_id: (xyxy, scores, class indices)} on original pixels."""
    import torch

    found = {}
    model.eval()
    with torch.no_grad():
        for batch in shard.iter_batches(batch_size=cfg.batch_size, batch_format="numpy"):
            with autocast():
                per_image = recipe.predict(model, processor, batch, cfg, id2label, device)
            for image_id, prediction in zip(batch["image_id"], per_image):
                found[int(image_id)] = prediction
    model.train()
    return found


def _gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def train_loop(config: dict[str, Any]) -> None:
    import ray.train
    import torch
    from ray.train.torch import get_device, prepare_model
    from transformers import get_cosine_schedule_with_warmup

    from platescope import storage
    from platescope.config import TrainConfig
    from platescope.evaluation.groundtruth import GroundTruth
    from platescope.training.data import augment_batch
    from platescope.training.weight_average import STATE_KEY, WeightAverage

    cfg = TrainConfig.model_validate(config["cfg"])
    s3 = config["s3"]
    id2label = {int(k): v for k, v in config["id2label"].items()}
    val_gt: GroundTruth | None = config["val_ground_truth"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = get_device()
    torch.manual_seed(cfg.seed + rank)

    recipe = recipe_for(cfg)
    state: dict[str, Any] = {"epoch": 0, "step": 0, "history": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            model, processor = recipe.build(cfg, id2label, s3, d)
            state = torch.load(os.path.join(d, TRAIN_STATE), weights_only=True)
    else:
        model, processor = recipe.build(cfg, id2label, s3, None)
    model.to(device)
    average = WeightAverage(model, cfg.ema_decay, state.get(STATE_KEY)) if cfg.ema_decay else None
    # Detection heads leave some parameters out of some steps (e.g. denoising queries).
    ddp = prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True}) if world > 1 else model
    # Only what trains: a LoRA run's frozen base never enters the optimizer (nor its state).
    trainable = [p for p in ddp.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, math.ceil(config["num_train_images"] / (cfg.batch_size * world)))
    total_steps = cfg.max_steps or cfg.num_epochs * steps_per_epoch
    scheduler = get_cosine_schedule_with_warmup(optimizer, min(cfg.warmup_steps, total_steps // 2), total_steps)
    if "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    autocast, scaler = _autocast(device, cfg.precision)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if val_gt is not None else None
    step = state["step"]

    for epoch in range(state["epoch"], cfg.num_epochs if cfg.max_steps is None else 10**9):
        if step >= total_steps:
            break
        ddp.train()
        started, images, losses = time.perf_counter(), 0, []
        for batch in train_shard.iter_batches(batch_size=cfg.batch_size, batch_format="numpy",
                                              local_shuffle_buffer_size=4 * cfg.batch_size,
                                              local_shuffle_seed=cfg.seed + 1000 * epoch + rank):
            if cfg.augment:
                batch = augment_batch(batch, seed=cfg.seed, epoch=epoch, min_box_size=cfg.min_box_size,
                                      recipe=cfg.augment_recipe, aspect_jitter=cfg.aspect_jitter,
                                      plate_zoom=cfg.plate_zoom)
            with autocast():
                loss = recipe.loss(ddp, processor, batch, cfg, id2label, device)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            if average is not None:
                average.update()
            step += 1
            images += len(batch["image_id"])
            losses.append(float(loss.detach()))
            if step >= total_steps:
                break
        elapsed = time.perf_counter() - started
        metrics: dict[str, Any] = {"epoch": epoch + 1, "step": step,
                                   "loss": float(np.mean(_flatten(_gather(losses)) or [float("nan")])),
                                   "images_per_s": round(sum(_gather(images)) / max(elapsed, 1e-9), 3),
                                   "learning_rate": scheduler.get_last_lr()[0]}
        # Val scores, and the checkpoint keeps, the weights that would be exported: the average, if any.
        with average.swapped_in() if average is not None else contextlib.nullcontext():
            if val_shard is not None:
                metrics.update(_val_metrics(recipe, model, processor, val_shard, val_gt, cfg, id2label, device,
                                            autocast))
            state["history"].append(metrics)
            if average is not None and rank == 0:  # rank 0 writes the checkpoint
                state[STATE_KEY] = average.state()
            _report(ray.train, metrics, state, rank, recipe, model, processor, optimizer, scheduler, epoch, step,
                    cfg, s3, storage)


def _val_metrics(recipe, model, processor, val_shard, val_gt, cfg, id2label, device, autocast) -> dict[str, float]:
    """COCO metrics of the model's predictions on the whole val set (each worker predicts its shard)."""
    from platescope.evaluation.run import score_predictions

    predictions = {}
    # The unwrapped model: generation (Florence-2) is not a DDP forward, and eval needs no sync.
    for part in _gather(_predict(recipe, model, processor, val_shard, cfg, id2label, device, autocast)):
        predictions.update(part)
    names_to_cat = {name: c for c, name in val_gt.categories.items()}
    # -1 (a class index the head lacks, or a label that is no category) stays -1: no category.
    index_to_cat = np.array([names_to_cat.get(id2label[i], -1) for i in range(len(id2label))] + [-1])
    scored = score_predictions(val_gt, {k: (b, s, index_to_cat[lab]) for k, (b, s, lab) in predictions.items()})
    return {k: v for k, v in scored.items() if isinstance(v, float)}


def _flatten(parts: list[list[float]]) -> list[float]:
    return [x for part in parts for x in part]


def _report(train, metrics, state, rank, recipe, model, processor, optimizer, scheduler, epoch, step, cfg, s3,
            storage):
    """Every worker reports (it is a barrier); rank 0 attaches the checkpoint and writes the history."""
    import torch

    if rank != 0:
        train.report(metrics)
        return
    log.info("epoch {epoch} step {step}: loss {loss:.4f}".format(**metrics)
             + (f", map {metrics['map']:.4f}, map_50 {metrics['map_50']:.4f}" if "map" in metrics else "")
             + f", {metrics['images_per_s']:.1f} images/s")
    storage.write_bytes_atomic(storage.join(cfg.storage, cfg.name, "metrics.json"),
                               json.dumps(state["history"], indent=2).encode(), s3)
    with tempfile.TemporaryDirectory(prefix="platescope-ckpt-") as tmp:
        recipe.save(model, processor, tmp)
        torch.save({**state, "epoch": epoch + 1, "step": step,
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                   os.path.join(tmp, TRAIN_STATE))
        train.report(metrics, checkpoint=train.Checkpoint.from_directory(tmp),
                     checkpoint_dir_name=f"epoch-{epoch + 1:04d}")
