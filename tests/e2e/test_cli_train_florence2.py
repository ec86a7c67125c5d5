"""`platescope train detector=florence2` through the CLI: a LoRA adapter on a tiny Florence-2, 2 CPU
Ray Train workers, base model, checkpoints and adapter on the SeaweedFS S3 server, a resumed rerun,
and `detect --adapter` on the result."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from platescope import samples, storage
from platescope.detectors.florence2_tiny import build_florence2_tiny_dir
from platescope.training.loop import TRAIN_STATE

CLI = [sys.executable, "-m", "platescope.cli"]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("scenes")
    return samples.write_image_dataset(str(folder), 8, seed=11, size=(320, 240))


def test_lora_trains_on_two_workers_resumes_and_the_adapter_runs_in_detect(labelled, tmp_path, s3_server):
    s3 = s3_server.options()
    env = {**os.environ, **s3_server.env()}
    bucket = s3_server.make_bucket("florence2-lora")
    base_local = build_florence2_tiny_dir(str(tmp_path / "base"))
    base = f"{bucket}/models/tiny-florence2"
    storage.upload_dir(base_local, base, s3)
    # Validation generates answers token by token, the slowest part of an epoch here: two images show
    # that it runs and is recorded.
    coco = json.loads(labelled.read_text())
    keep = {image["id"] for image in coco["images"][:2]}
    val = labelled.parent / "val-2.json"
    val.write_text(json.dumps({**coco, "images": [i for i in coco["images"] if i["id"] in keep],
                               "annotations": [a for a in coco["annotations"] if a["image_id"] in keep]}))
    args = [*CLI, "train", "detector=florence2", f"model={base}", f"train={labelled}", f"val={val}",
            f"storage={bucket}/runs", "name=lora", "num_workers=2", "batch_size=2", "learning_rate=0.001",
            "warmup_steps=1", "max_new_tokens=24", "lora.r=4", "lora.alpha=8", "augment=false",
            "ema_decay=0.9"]

    first = subprocess.run([*args, "num_epochs=2"], check=False, capture_output=True, text=True, timeout=400, env=env)
    assert first.returncode == 0, first.stderr[-4000:]
    history = json.loads(storage.read_bytes(f"{bucket}/runs/lora/metrics.json", s3))
    assert [h["epoch"] for h in history] == [1, 2] and [h["step"] for h in history] == [2, 4]  # 8 images / (2x2)
    assert all("map" in h and h["loss"] > 0 for h in history)
    # A checkpoint is the adapter (and the optimizer state), never a copy of the base.
    checkpoint_files = {o.uri.rsplit("/", 1)[1] for o in storage.list_objects(f"{bucket}/runs/lora/epoch-0002", s3)}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= checkpoint_files
    assert "model.safetensors" not in checkpoint_files

    # Rerunning the name with more epochs carries on from epoch 2 rather than starting over.
    second = subprocess.run([*args, "num_epochs=3"], check=False, capture_output=True, text=True, timeout=400, env=env)
    assert second.returncode == 0, second.stderr[-4000:]
    history = json.loads(storage.read_bytes(f"{bucket}/runs/lora/metrics.json", s3))
    assert [h["epoch"] for h in history] == [1, 2, 3] and history[-1]["step"] == 6
    printed = second.stdout + second.stderr
    assert "epoch 3 step 6" in printed and "epoch 1 step" not in printed and "epoch 2 step" not in printed
    # The weight average carried on too, over the adapter only (the frozen base is never copied).
    state = torch.load(io.BytesIO(storage.read_bytes(f"{bucket}/runs/lora/epoch-0003/{TRAIN_STATE}", s3)),
                       weights_only=True)
    average = state["weight_average"]
    assert average["updates"] == state["step"] == 6
    tracked = average["training_weights"]
    assert any("lora_A" in k for k in tracked) and any("lora_B" in k for k in tracked)
    # Besides the adapter, only floating buffers (a position table here), no weight of the base.
    assert not [k for k in tracked if "lora_" not in k and k.endswith((".weight", ".bias"))]

    adapter = f"{bucket}/runs/lora/model"
    exported = {o.uri.rsplit("/", 1)[1]: o for o in storage.list_objects(adapter, s3)}
    assert sorted(exported) == ["adapter_config.json", "adapter_model.safetensors", "platescope_training.json"]
    info = json.loads(storage.read_bytes(f"{adapter}/platescope_training.json", s3))
    assert info["base_model"]["model"] == base and info["merged"] is False
    assert json.loads(storage.read_bytes(f"{adapter}/adapter_config.json", s3))["base_model_name_or_path"] == base
    assert s3_server.secret_access_key not in json.dumps(info)

    out = tmp_path / "detections"
    det = subprocess.run([*CLI, "detect", "--input", str(labelled.parent), "--output", str(out), "--run-id", "lora",
                          "--detector", "florence2", "--model", base, "--adapter", adapter, "--prompt", "<OD>",
                          "--no-progress"], check=False, capture_output=True, text=True, timeout=300, env=env)
    assert det.returncode == 0, det.stderr[-3000:]
    rows = pq.read_table(out / "lora" / "data").to_pylist()
    assert len(rows) == 8 and not any(r["error"] for r in rows)
    assert {r["prompt"] for r in rows} == {"<OD>"}
    assert all(r["model"].startswith(f"{base}@") and f"+{adapter}@" in r["model"] for r in rows)
