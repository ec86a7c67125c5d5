"""`platescope train` through the CLI: Ray Train on a local Ray with 2 CPU workers, a tiny RT-DETR,
checkpoints on the SeaweedFS S3 server, worker failure, export, and `detect` on the export."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from platescope import samples, storage

CLI = [sys.executable, "-m", "platescope.cli"]
# A tiny RT-DETR fits 8 images in about 100 steps of 8 (4 on each of 2 workers), as one process does.
OVERFIT = ["preset=rtdetr-tiny-test", "num_workers=2", "batch_size=4", "learning_rate=0.001",
           "warmup_steps=5", "max_grad_norm=1.0", "augment=false"]
COPIES = 8  # the training set lists each image this many times, so an epoch is 8 steps, not 1


@pytest.fixture(scope="module")
def plates(tmp_path_factory) -> Path:
    """8 generated scenes and their COCO labels (the val set)."""
    folder = tmp_path_factory.mktemp("plates")
    return samples.write_image_dataset(str(folder), 8, seed=3, size=(320, 240))


@pytest.fixture(scope="module")
def plates_x8(plates) -> Path:
    """The same 8 scenes, each copied 8 times under its own name, as a training set."""
    coco = json.loads(plates.read_text())
    out = {"images": [], "annotations": [], "categories": coco["categories"]}
    for copy in range(COPIES):
        for image in coco["images"]:
            name = image["file_name"].replace(".jpg", f"-copy{copy}.jpg")
            shutil.copy(plates.parent / image["file_name"], plates.parent / name)
            new_id = len(out["images"]) + 1
            out["images"].append({**image, "id": new_id, "file_name": name})
            out["annotations"] += [{**a, "id": len(out["annotations"]) + i + 1, "image_id": new_id}
                                   for i, a in enumerate(a for a in coco["annotations"] if a["image_id"] == image["id"])]
    path = plates.parent / "train-x8.json"
    path.write_text(json.dumps(out))
    return path


def train_cli(*args: str, env: dict, timeout: float = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "train", *args], check=False, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **env}, cwd=cwd)


def epochs_printed(output: str) -> list[int]:
    """Epoch numbers of rank 0's progress lines, in order, as often as each was printed."""
    return [int(line.split("epoch ", 1)[1].split()[0]) for line in output.splitlines()
            if "epoch " in line and " step " in line and "loss" in line and "Reporting" not in line]


def test_overfitting_8_images_raises_map_and_the_export_runs_in_detect(plates, plates_x8, tmp_path, s3_server,
                                                                      s3_bucket):
    storage_uri = f"{s3_bucket}/checkpoints"
    proc = train_cli(*OVERFIT, f"train={plates_x8}", f"val={plates}", f"storage={storage_uri}", "name=overfit",
                     "num_epochs=14", env=s3_server.env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    s3 = s3_server.options()
    history = json.loads(storage.read_bytes(f"{storage_uri}/overfit/metrics.json", s3))
    assert [h["epoch"] for h in history] == list(range(1, 15))
    first, best = history[0]["map"], max(h["map"] for h in history)
    assert best > first + 0.15, [round(h["map"], 3) for h in history]  # measured: 0.00 -> 0.24 by epoch 12
    # Checkpoints on S3, the best two kept; the export is a model dir with its training record.
    keys = [o.uri for o in storage.list_objects(f"{storage_uri}/overfit", s3)]
    kept = {k.split("/overfit/", 1)[1].split("/")[0] for k in keys if "/epoch-" in k}
    assert 1 <= len(kept) <= 2
    export = f"{storage_uri}/overfit/model"
    info = json.loads(storage.read_bytes(f"{export}/platescope_training.json", s3))
    assert info["val_metrics"]["map"] == pytest.approx(best) and info["id2label"] == {"0": "licence_plate"}
    assert s3_server.secret_access_key not in json.dumps(info)

    # The export runs in detect as it is, and gives the plain Hugging Face recipe's boxes.
    out = tmp_path / "detections"
    det = subprocess.run([*CLI, "detect", "--input", str(plates.parent), "--model", export, "--output", str(out),
                          "--run-id", "exported", "--threshold", "0.0", "--no-progress"],
                         check=False, capture_output=True, text=True, timeout=300, env={**os.environ, **s3_server.env()})
    assert det.returncode == 0, det.stderr[-3000:]
    rows = {Path(r["source_uri"]).name: r for r in pq.read_table(out / "exported" / "data").to_pylist()}
    assert len(rows) == 8 * (COPIES + 1)
    local = storage.download_dir(export, str(tmp_path / "export"), s3)
    expected = plain_hf_boxes(local, plates.parent / "scene_00001.jpg")
    got = rows["scene_00001.jpg"]
    np.testing.assert_allclose(np.array(got["boxes"]).reshape(-1, 4), expected["boxes"], atol=1e-3)
    np.testing.assert_allclose(got["scores"], expected["scores"], atol=1e-4)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def test_a_float16_export_is_half_the_size_and_detects_as_the_float32_one(plates, tmp_path):
    """One run of a few steps through the CLI, exported from its best checkpoint in float32; then the
    same checkpoint exported again in float16 by the same export function (a second `train` would
    only start Ray to do that). Augmentation is on, with aspect jitter and plate zoom on every image, so
    the loop's seeded augmentation runs too, through Ray, on images whose widths then differ within a
    batch."""
    from ray.train import Checkpoint
    from safetensors.torch import load_file

    from platescope.config import TrainConfig
    from platescope.detectors.hf import HFDetector
    from platescope.training.run import export_model

    ckpt = tmp_path / "ckpt"
    args = [*OVERFIT, f"train={plates}", f"storage={ckpt}", "name=half", "num_workers=1", "max_steps=4",
            "augment=true", "aspect_jitter=0.5", "plate_zoom=1.0", "seed=5"]
    f32, f16 = tmp_path / "f32", tmp_path / "f16"
    proc = train_cli(*args, f"export={f32}", env={})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert epochs_printed(proc.stdout + proc.stderr) == [1, 2]  # 8 images, batch 4: two epochs, each said once
    info32 = json.loads((f32 / "platescope_training.json").read_text())
    assert info32["training_config"]["aspect_jitter"] == 0.5 and info32["training_config"]["plate_zoom"] == 1.0
    (best,) = sorted((ckpt / "half").glob("epoch-*"))[-1:]
    cfg16 = TrainConfig(**{**info32["training_config"], "export_dtype": "float16", "export": str(f16)})
    history = export_model(Checkpoint.from_directory(str(best)), str(f16), cfg16, info32["val_metrics"],
                           {0: "licence_plate"}, None)
    info16 = json.loads((f16 / "platescope_training.json").read_text())
    assert history == info16["history"] == info32["history"] and info16["training_config"]["export_dtype"] == "float16"

    # Every floating tensor is float16 and is the float32 export's, rounded; the rest is as it was.
    w32, w16 = load_file(str(f32 / "model.safetensors")), load_file(str(f16 / "model.safetensors"))
    assert w16.keys() == w32.keys()
    floating = [k for k, v in w32.items() if v.is_floating_point()]
    assert floating and all(w32[k].dtype == torch.float32 and w16[k].dtype == torch.float16 for k in floating)
    assert all(torch.equal(w16[k], w32[k].half() if k in floating else w32[k]) for k in w32)
    # The dir is about half: the weights are, and the rest (configs, safetensors header) is small.
    assert sum(w16[k].nbytes for k in floating) * 2 == sum(w32[k].nbytes for k in floating)
    assert 0.45 <= _dir_bytes(f16) / _dir_bytes(f32) <= 0.56, (_dir_bytes(f16), _dir_bytes(f32))

    # detect's detector loads it (float32 in memory) and finds what the float32 export finds, box by
    # box (nearest box: the order of near-equal scores may differ). A float16 weight is its float32
    # value to within 2**-11 (relative); through this small network that moves outputs by the order of
    # 1e-3 relative, i.e. well under 0.5 px on a 320 px image and under 5e-3 on a score (measured:
    # 0.001 px, 2.5e-4), while distinct boxes here lie tens of px apart and a weight misread would be
    # off by far more. (The first test runs an export through the detect CLI.)
    detector = HFDetector(str(f16), threshold=0.0, device="cpu")
    from platescope.sources.images import decode_image

    for image in json.loads(plates.read_text())["images"]:
        path = plates.parent / image["file_name"]
        (found,) = detector.detect([decode_image(path.read_bytes(), name=str(path))])
        expected = plain_hf_boxes(str(f32), path)
        assert len(found.boxes) == len(expected["boxes"]) > 0
        distance = np.abs(expected["boxes"][:, None, :] - found.boxes[None, :, :]).max(axis=-1)
        nearest = distance.argmin(axis=1)
        assert len(set(nearest.tolist())) == len(nearest), path.name  # one to one
        np.testing.assert_allclose(found.boxes[nearest], expected["boxes"], atol=0.5)
        np.testing.assert_allclose(found.scores[nearest], expected["scores"], atol=5e-3)


def plain_hf_boxes(model_dir: str, image_path: Path) -> dict[str, np.ndarray]:
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    model = AutoModelForObjectDetection.from_pretrained(model_dir).eval()
    processor = AutoImageProcessor.from_pretrained(model_dir)
    image = Image.open(image_path).convert("RGB")
    with torch.no_grad():
        outputs = model(**processor(images=[image], return_tensors="pt"))
    r = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=[image.size[::-1]])[0]
    return {"boxes": r["boxes"].numpy(), "scores": r["scores"].numpy()}


def _committed(run: Path, checkpoint: str) -> bool:
    """Whether Ray Train has registered `checkpoint` of `run` (listed in its manager snapshot): its
    folder appears while it is still being written, and a resume skips a checkpoint not yet listed."""
    try:
        snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or caught mid-write
        return False
    return any(r["checkpoint_dir_name"] == checkpoint for r in snapshot["checkpoint_results"])


def _train_worker_pids(session: int) -> list[int]:
    """Training worker processes of the Ray the CLI in session `session` started (not any other Ray
    on this machine: its raylet and workers inherit the CLI's session)."""
    out = subprocess.run(["ps", "-eo", "pid,sid,args"], check=True, capture_output=True, text=True).stdout
    rows = [line.split(None, 2) for line in out.splitlines()[1:]]
    return [int(pid) for pid, sid, args in rows if int(sid) == session and "RayTrainWorker" in args]


def test_a_killed_worker_restarts_from_the_last_checkpoint(plates_x8, tmp_path):
    ckpt = tmp_path / "ckpt"
    proc = subprocess.Popen([*CLI, "train", *OVERFIT, f"train={plates_x8}", f"storage={ckpt}", "name=killed",
                             "num_epochs=6", "max_failures=2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (ckpt / "killed" / "epoch-0002").is_dir():
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.5)
        victims = _train_worker_pids(proc.pid)
        assert victims, "no training worker process found"
        os.kill(victims[-1], signal.SIGKILL)
        output, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output[-4000:]
    epochs = epochs_printed(output)
    assert epochs == sorted(epochs) and epochs[-1] == 6, epochs  # carried on, never started over
    assert "restart" in output.lower() or "failure" in output.lower(), output[-3000:]
    history = json.loads((ckpt / "killed" / "metrics.json").read_text())
    assert [h["epoch"] for h in history] == list(range(1, 7))
    assert (ckpt / "killed" / "model" / "model.safetensors").is_file()


def test_rerunning_after_the_driver_died_resumes(plates_x8, tmp_path):
    ckpt = tmp_path / "ckpt"
    args = [*CLI, "train", *OVERFIT, f"train={plates_x8}", f"storage={ckpt}", "name=again", "num_epochs=4"]
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not _committed(ckpt / "again", "epoch-0002"):
            assert first.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.5)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver and its local Ray die together
        first.wait(timeout=60)
    # The same name with another learning rate would train one model under two configs: refused before
    # Ray starts, naming the field; the checkpoints stay as they were.
    kept = sorted(p.name for p in (ckpt / "again").glob("epoch-*"))
    other = [a if not a.startswith("learning_rate=") else "learning_rate=0.002" for a in args]
    refused = subprocess.run(other, check=False, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "learning_rate 0.001 -> 0.002" in refused.stderr, refused.stderr[-3000:]
    assert "worker group" not in refused.stdout + refused.stderr
    assert sorted(p.name for p in (ckpt / "again").glob("epoch-*")) == kept
    second = subprocess.run(args, check=False, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stderr[-4000:]
    epochs = epochs_printed(second.stdout + second.stderr)
    assert epochs and min(epochs) >= 3 and max(epochs) == 4, epochs


def test_with_ema_decay_val_checkpoints_and_export_hold_the_average_and_a_rerun_carries_it_on(plates, tmp_path):
    """4 steps, then a rerun to 8: each checkpoint's model is the averaged weights (what val scored),
    its train state the training weights and the update count; the export is the best checkpoint's
    model as it is; the rerun resumes the average where it was (8 updates, not 4). The storage is
    given relative to where the CLI runs, as the README's commands give it: checkpoints, metrics.json
    (which the worker writes, from its own directory) and the export all land under it."""
    from safetensors.torch import load_file

    from platescope.training.loop import TRAIN_STATE

    ckpt = tmp_path / "ckpt"
    args = [*OVERFIT, f"train={plates}", f"val={plates}", "storage=ckpt", "name=avg", "num_workers=1",
            "ema_decay=0.9", "num_checkpoints_to_keep=4"]
    first = train_cli(*args, "max_steps=4", env={}, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    run = ckpt / "avg"
    info = json.loads((run / "model" / "platescope_training.json").read_text())
    assert info["training_config"]["ema_decay"] == 0.9

    def checkpoint(epoch: int) -> tuple[dict, dict]:
        folder = run / f"epoch-{epoch:04d}"
        return load_file(str(folder / "model.safetensors")), torch.load(folder / TRAIN_STATE, weights_only=True)

    best_model, best_state = checkpoint(info["val_metrics"]["epoch"])
    exported = load_file(str(run / "model" / "model.safetensors"))
    assert exported.keys() == best_model.keys() and all(torch.equal(exported[k], best_model[k]) for k in exported)
    average = best_state["weight_average"]
    assert average["updates"] == best_state["step"] == 2 * info["val_metrics"]["epoch"]
    trained = average["training_weights"]
    moved = [k for k in trained if k in best_model and not torch.equal(trained[k], best_model[k])]
    assert len(moved) > len(trained) // 2, "the checkpoint's model is not the average"

    second = train_cli(*args, "max_steps=8", env={}, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-4000:]
    assert epochs_printed(second.stdout + second.stderr) == [3, 4]
    assert [h["epoch"] for h in json.loads((run / "metrics.json").read_text())] == [1, 2, 3, 4]
    _, last_state = checkpoint(4)
    assert last_state["weight_average"]["updates"] == last_state["step"] == 8


def test_bad_train_config_fails_before_any_work(tmp_path, plates):
    proc = train_cli(f"train={plates}", f"storage={tmp_path}/ckpt", "name=x", "num_workrs=2",
                     "preset=rtdetr-tiny-test", env={})
    assert proc.returncode == 2 and "num_workrs: unknown field" in proc.stderr
    proc = train_cli(f"train={tmp_path}/missing.json", f"storage={tmp_path}/ckpt", "name=x",
                     "preset=rtdetr-tiny-test", env={})
    assert proc.returncode == 2 and "missing.json: not found" in proc.stderr
    proc = train_cli(f"train={plates}", f"storage={tmp_path}/ckpt", "name=x", env={})
    assert proc.returncode == 2 and "exactly one of model" in proc.stderr
    assert not (tmp_path / "ckpt").exists()
