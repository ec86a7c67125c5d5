"""S3 credentials given in a job file's `s3:` section reach Ray tasks, actors and Ray Train workers
(pickled in their arguments), yet a failure in each of them leaves the secret nowhere: not in the
CLI's stdout or stderr, not in any file of the output, run or storage folders (local and on S3), not
in Ray's own logs. Each run is the real CLI in a subprocess against the real S3 server, with no AWS
variables in its environment, so the job file is the only place the keys come from."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from platescope import samples, storage

CLI = [sys.executable, "-m", "platescope.cli"]


@pytest.fixture
def run_env(s3_server, s3_bucket, tmp_path):
    """(environment for the CLI, the folders a leak could land in, the bucket). Ray's temp dir is
    this test's own (RAY_TMPDIR, short for its Unix sockets), so its session logs are ours to read."""
    ray_tmp = tempfile.mkdtemp(prefix="ray-leak-", dir="/tmp")
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    env.update(HOME=str(home), RAY_TMPDIR=ray_tmp)
    try:
        yield env, [tmp_path / "work", home, Path(ray_tmp)], s3_bucket
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def s3_section(s3_server) -> dict:
    return {"endpoint_url": s3_server.endpoint_url, "region": s3_server.region,
            "access_key_id": s3_server.access_key_id, "secret_access_key": s3_server.secret_access_key}


def run_cli(verb: str, fields: dict, job_dir: Path, work: Path, env: dict) -> subprocess.CompletedProcess:
    """The job file lives apart from the folders searched (it holds the keys on purpose)."""
    job_dir.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    job = job_dir / "job.yaml"
    job.write_text(yaml.safe_dump(fields))
    return subprocess.run([*CLI, verb, "--config", str(job)], cwd=work, env=env, capture_output=True, text=True,
                          timeout=600, check=False)


def assert_no_secret(s3_server, proc: subprocess.CompletedProcess, folders: list[Path], s3_prefix: str) -> None:
    secret = s3_server.secret_access_key
    # The key id is a prefix of the secret here; a whole-word match finds the id alone.
    key_id = re.compile(rf"(?<![\w-]){re.escape(s3_server.access_key_id)}(?![\w-])")

    def check(text: str, where: str) -> None:
        assert secret not in text, f"the secret key is in {where}"
        assert not key_id.search(text), f"the access key id is in {where}"

    check(proc.stdout, "stdout")
    check(proc.stderr, "stderr")
    searched = 0
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink():
                check(path.read_bytes().decode("utf-8", "replace"), str(path))
                searched += 1
    for obj in storage.list_objects(s3_prefix, s3_server.options()):
        check(storage.read_bytes(obj.uri, s3_server.options()).decode("utf-8", "replace"), obj.uri)
        searched += 1
    assert searched  # Ray's logs at least: the search looked somewhere


def upload_dir(s3_server, local: Path, uri: str) -> str:
    storage.upload_dir(str(local), uri, s3_server.options())
    return uri


def test_a_decode_task_that_fails_leaks_no_secret(s3_server, run_env, scenes, tmp_path):
    """A resumed run whose manifest on S3 is damaged (an entry lost its URI): the driver schedules the
    shard as it stands, and its decode task, holding the S3 options, fails on it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from platescope.sources.manifest import MANIFEST_FILE, MANIFEST_SCHEMA

    env, folders, bucket = run_env
    inputs = upload_dir(s3_server, scenes, f"{bucket}/in")
    listed = storage.list_objects(inputs, s3_server.options())
    entries = [{"uri": o.uri, "kind": "image", "size": o.size, "version": o.version, "input_root": inputs,
                "shard": "i000000"} for o in listed]
    entries[0]["uri"] = None
    manifest = tmp_path / MANIFEST_FILE
    pq.write_table(pa.Table.from_pylist(entries, schema=MANIFEST_SCHEMA), manifest)
    storage.write_bytes_atomic(f"{bucket}/out/leak/{MANIFEST_FILE}", manifest.read_bytes(), s3_server.options())
    fields = {"input": [inputs], "output": f"{bucket}/out", "run_id": "leak", "progress": False,
              "s3": s3_section(s3_server)}
    proc = run_cli("detect", fields, tmp_path / "job", tmp_path / "work", env)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "decode_shard" in proc.stderr, proc.stderr[-3000:]  # it failed in the decode task
    assert_no_secret(s3_server, proc, folders, bucket)


def test_a_detector_actor_that_cannot_load_its_model_leaks_no_secret(s3_server, run_env, tiny_model, scenes,
                                                                      tmp_path):
    env, folders, bucket = run_env
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])  # a header that promises more than is there
    fields = {"input": [upload_dir(s3_server, scenes, f"{bucket}/in")], "output": f"{bucket}/out",
              "model": upload_dir(s3_server, model, f"{bucket}/model"), "run_id": "leak", "progress": False,
              "s3": s3_section(s3_server)}
    proc = run_cli("detect", fields, tmp_path / "job", tmp_path / "work", env)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "DetectorActor" in proc.stderr, proc.stderr[-3000:]  # it failed building the actor
    assert_no_secret(s3_server, proc, folders, bucket)


def test_a_training_worker_that_fails_leaks_no_secret(s3_server, run_env, tmp_path):
    env, folders, bucket = run_env
    data = tmp_path / "data"
    labels = samples.write_image_dataset(str(data), 4, seed=4, size=(160, 120))
    coco = json.loads(Path(labels).read_text())
    (data / coco["images"][0]["file_name"]).write_bytes(b"this is no image")  # the worker's data fails
    upload_dir(s3_server, data, f"{bucket}/data")
    fields = {"preset": "rtdetr-tiny-test", "train": f"{bucket}/data/{Path(labels).name}",
              "storage": f"{bucket}/checkpoints", "name": "leak", "num_workers": 1, "batch_size": 2,
              "num_epochs": 1, "max_failures": 0, "augment": False, "s3": s3_section(s3_server)}
    proc = run_cli("train", fields, tmp_path / "job", tmp_path / "work", env)
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "WorkerGroupError" in proc.stderr or "Training failed" in proc.stderr, proc.stderr[-3000:]
    assert_no_secret(s3_server, proc, folders, bucket)
