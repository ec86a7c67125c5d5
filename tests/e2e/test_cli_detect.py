"""`platescope detect` through the CLI, each run in its own process with its own local Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from platescope import samples

CLI = [sys.executable, "-m", "platescope.cli"]


def run_cli(*args: str, timeout: float = 240, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], check=False, capture_output=True, text=True, timeout=timeout, **kw)


def test_detect_end_to_end_prints_and_saves_the_summary(tmp_path, tiny_model, scenes):
    job = tmp_path / "job.yaml"
    job.write_text(f"input: [{scenes}]\nmodel: {tiny_model}\nthreshold: 0.0\nbatch_size: 3\n")
    out = tmp_path / "out"
    proc = run_cli("detect", "--config", str(job), "--output", str(out), "run_id=e2e-1", "video_fps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "run e2e-1" in proc.stdout and "rows" in proc.stdout
    run_dir = out / "e2e-1"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rows"] == summary["images"] == 8 and summary["errors"] == 0
    assert summary["detections"] > 0 and summary["rows_per_s"] > 0
    assert summary["num_gpus_per_actor"] == 0.0  # no GPU in this cluster: CPU actors
    # Where each image's CPU went, by phase, measured in the decode tasks and the detector actor; and
    # when the first result came, counted from the process's start.
    cpu = summary["cpu_ms_per_row"]
    assert set(cpu) == {"decode", "preprocess", "model", "postprocess", "actor_other"}
    assert cpu["decode"] > 0 and cpu["model"] > 0 and all(v >= 0 for v in cpu.values())
    assert 0 < summary["first_result_s"] < summary["wall_time_s"] + 60
    config = json.loads((run_dir / "config.json").read_text())
    assert config["batch_size"] == 3 and config["video_fps"] == 2.0 and config["run_id"] == "e2e-1"
    table = pq.read_table(run_dir / "data")
    assert table.num_rows == 8 and set(table.column("run_id").to_pylist()) == {"e2e-1"}
    assert not [name for name in table.column_names if name.startswith("cpu_ms")]  # measured, never written


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "{tmp}/no-such-model"], "model {tmp}/no-such-model: no such directory"),
        (["--input", "{tmp}/nowhere"], "input {tmp}/nowhere: does not exist"),
        (["--output", "{file}/out"], "output {file}/out: cannot be written"),
        (["batchsize=3"], "batchsize: unknown field"),
        (["--threshold", "1.5"], "threshold: Input should be less than or equal to 1"),
        (["--detector", "florence2", "--prompt", "<OD>", "--adapter", "{tmp}/no-adapter"],
         "adapter {tmp}/no-adapter: no such directory"),
        (["--detector", "florence2", "--prompt", "<OD>", "--adapter", "{tmp}"],
         "adapter {tmp}: not a PEFT adapter dir (no adapter_config.json in it)"),
    ],
)
def test_a_job_that_cannot_start_fails_at_once_with_one_line(tmp_path, tiny_model, scenes, args, message):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    base = {"--input": str(scenes), "--model": tiny_model, "--output": str(tmp_path / "out")}
    fill = {"tmp": tmp_path, "file": blocker}
    args = [a.format(**fill) for a in args]
    for flag, value in base.items():
        if flag not in args:
            args += [flag, value]
    started = time.monotonic()
    proc = run_cli("detect", *args, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message.format(**fill) in lines[0], proc.stderr
    assert time.monotonic() - started < 30  # before any Ray start or model load
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_error_share_above_the_budget_exits_non_zero(tmp_path, tiny_model, mixed_inputs):
    proc = run_cli("detect", "--input", str(mixed_inputs.root / "bad"), "--model", tiny_model,
                   "--output", str(tmp_path / "out"), "--run-id", "bad", "--max-error-fraction", "0.2",
                   "--no-progress")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "above --max-error-fraction 20.0%" in proc.stderr
    summary = json.loads((tmp_path / "out" / "bad" / "summary.json").read_text())
    assert summary["error_fraction"] > 0.2


def test_sigkilled_run_resumes_without_redoing_or_duplicating(tmp_path, tmp_path_factory):
    """Kill the driver (and its local Ray) part-way, run the same command again: one row per input."""
    from platescope.detectors.presets import build_model_dir

    # A real-size YOLOS-tiny on CPU takes long enough per image that the kill lands mid-run.
    model = build_model_dir("yolos-tiny", str(tmp_path / "model"))
    inputs = tmp_path / "inputs"
    samples.write_image_dataset(str(inputs), 40, seed=11, size=(320, 240))
    os.remove(inputs / "annotations.json")
    out = tmp_path / "out"
    args = [*CLI, "detect", "--input", str(inputs), "--model", model, "--output", str(out), "--run-id", "crash",
            "--batch-size", "1", "--no-progress", "num_inputs_per_shard=1"]
    done_dir = out / "crash" / "_done"
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        # Generous: on a loaded machine Ray start-up and model load alone can take minutes.
        deadline = time.monotonic() + 480
        while time.monotonic() < deadline and proc.poll() is None:
            if done_dir.exists() and len(list(done_dir.glob("*.json"))) >= 3:
                break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started, like a lost node
        proc.wait(timeout=30)
    done_at_kill = len(list(done_dir.glob("*.json")))  # not a marker the kill caught mid-write
    assert 3 <= done_at_kill < 40, f"kill should land mid-run, found {done_at_kill} of 40 shards done"
    assert not (out / "crash" / "summary.json").exists()

    again = subprocess.run(args, check=False, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((out / "crash" / "summary.json").read_text())
    assert summary["shards_resumed"] >= done_at_kill
    assert summary["rows_per_s"] is not None and summary["complete"]
    rows = pq.read_table(out / "crash" / "data").column("source_uri").to_pylist()  # as any Parquet reader
    assert len(rows) == 40 and len(set(rows)) == 40


def test_s3_credentials_from_the_environment_reach_the_workers(tmp_path, tiny_model, scenes, s3_server, s3_bucket):
    """The CLI's own local Ray inherits AWS_* from the environment, as a user's shell would give it."""
    from platescope import storage

    env = {**os.environ, **s3_server.env()}
    for name in sorted(os.listdir(scenes))[:3]:
        storage.write_bytes_atomic(f"{s3_bucket}/day 1/{name}", (scenes / name).read_bytes(),
                                   storage.S3Options(endpoint_url=s3_server.endpoint_url,
                                                     access_key_id=s3_server.access_key_id,
                                                     secret_access_key=s3_server.secret_access_key))
    proc = run_cli("detect", "--input", f"{s3_bucket}/day 1/", "--output", f"{s3_bucket}/detections",
                   "--model", tiny_model, "--run-id", "from-env", "--no-progress", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert s3_server.secret_access_key not in proc.stdout + proc.stderr
    body = s3_server.client().get_object(Bucket=s3_bucket[len("s3://"):], Key="detections/from-env/summary.json")
    summary = json.loads(body["Body"].read())
    assert summary["rows"] == 3 and summary["errors"] == 0
    config = s3_server.client().get_object(Bucket=s3_bucket[len("s3://"):], Key="detections/from-env/config.json")
    assert s3_server.secret_access_key not in config["Body"].read().decode()


def test_address_joins_a_running_ray_cluster(tmp_path, tiny_model, scenes, ray_head):
    """--address joins an existing head (token authentication on, as Ray 2.60 clusters run) and runs there.

    The head advertises one GPU, as a GPU worker group does: detector actors then ask for one GPU each
    (Ray schedules them on it; this machine has no CUDA, so the model itself falls back to CPU).
    """
    proc = run_cli("detect", "--input", str(scenes), "--model", tiny_model, "--output", str(tmp_path / "out"),
                   "--run-id", "joined", "--address", ray_head.gcs_address, "--no-progress",
                   env={**os.environ, **ray_head.env()}, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Started a local Ray instance" not in proc.stderr
    summary = json.loads((tmp_path / "out" / "joined" / "summary.json").read_text())
    assert summary["rows"] == 8 and summary["errors"] == 0
    assert summary["num_gpus_per_actor"] == 1.0


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("platescope detect: error:")]


def _images(folder, n, seed):
    samples.write_image_dataset(str(folder), n, seed=seed, size=(320, 240))
    os.remove(folder / "annotations.json")
    return folder


def test_two_drivers_on_one_run_id_one_owns_it_and_the_run_stays_consistent(tmp_path, tiny_model):
    """A nightly job overlapping the previous one: same run id, different listings, started together."""
    big = _images(tmp_path / "big", 30, seed=21)
    small = _images(tmp_path / "small", 5, seed=22)
    out = tmp_path / "out"

    def driver(inputs):
        return subprocess.Popen([*CLI, "detect", "--input", str(inputs), "--model", tiny_model, "--output", str(out),
                                 "--run-id", "twice", "--no-progress", "--batch-size", "1", "num_inputs_per_shard=1"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    drivers = [driver(big), driver(small)]
    results = [(p, *p.communicate(timeout=480)) for p in drivers]
    codes = sorted(p.returncode for p, _, _ in results)
    assert codes == [0, 2], [(p.returncode, err[-2000:]) for p, _, err in results]
    (winner, _, _), = [r for r in results if r[0].returncode == 0]
    (_, _, refused), = [r for r in results if r[0].returncode == 2]
    assert len(refused.strip().splitlines()) == 1, refused
    assert "run twice" in refused and "is being run by another driver" in refused
    assert f"pid {winner.pid}" in refused and "since 20" in refused and "host " in refused
    run_dir = out / "twice"
    manifest = pq.read_table(run_dir / "manifest.parquet").column("uri").to_pylist()
    rows = pq.read_table(run_dir / "data").column("source_uri").to_pylist()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert sorted(rows) == sorted(manifest)  # every row is an input of the manifest, once
    assert summary["inputs"] == summary["rows"] == len(manifest) and summary["complete"]
    assert not (run_dir / "lock.json").exists()


def test_resume_with_settings_that_change_rows_refuses_before_any_work(tmp_path, tiny_model, scenes):
    out = tmp_path / "out"
    base = ["detect", "--input", str(scenes), "--model", tiny_model, "--output", str(out), "--run-id", "fp",
            "--no-progress", "--threshold", "0.2"]
    first = run_cli(*base)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = out / "fp"
    before = {p.name: p.stat().st_mtime_ns for p in (run_dir / "data").iterdir()}

    changed = run_cli(*base, "--threshold", "0.5", "max_pixels=1000", "--video-fps", "2", timeout=60)
    assert changed.returncode == 2, changed.stderr[-3000:]
    lines = changed.stderr.strip().splitlines()
    assert len(lines) == 1, changed.stderr
    assert "run fp" in lines[0] and "threshold 0.2 -> 0.5" in lines[0] and "max_pixels 100000000 -> 1000" in lines[0]
    assert "video_fps 1.0 -> 2.0" in lines[0] and "batch_size" not in lines[0]
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "data").iterdir()} == before
    assert json.loads((run_dir / "config.json").read_text())["threshold"] == 0.2

    # Settings that do not change rows may differ; the inputs are the manifest's, not a new listing.
    again = run_cli(*base, "--batch-size", "2", "--input", str(tmp_path / "gone"), "--max-error-fraction", "0.5")
    assert again.returncode == 0, again.stderr[-3000:]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["batch_size"] == 2 and config["input"] == [str(scenes)] and config["threshold"] == 0.2
    fingerprint = json.loads((run_dir / "fingerprint.json").read_text())["fields"]
    assert fingerprint["threshold"] == 0.2 and len(fingerprint["model_weights"]) == 12
    assert pq.read_table(run_dir / "data").num_rows == 8


def test_a_file_name_that_is_not_utf8_is_processed(tmp_path, tiny_model, scenes):
    """Local names are bytes; one that is not UTF-8 is stored %-escaped as a file:// URI and read back."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    good, other = sorted(scenes.iterdir())[:2]
    (inputs / good.name).write_bytes(good.read_bytes())
    bad = os.path.join(os.fsencode(inputs), b"bad\xff name%.jpg")
    with open(bad, "wb") as f:
        f.write(other.read_bytes())
    proc = run_cli("detect", "--input", str(inputs), "--model", tiny_model, "--output", str(tmp_path / "out"),
                   "--run-id", "bytes", "--no-progress", "--threshold", "0.0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["source_uri"]: r for r in pq.read_table(tmp_path / "out" / "bytes" / "data").to_pylist()}
    escaped = f"file://{inputs}/bad%FF name%25.jpg"
    assert set(rows) == {str(inputs / good.name), escaped}
    assert rows[escaped]["error"] is None and (rows[escaped]["width"], rows[escaped]["height"]) == (320, 240)
    assert rows[escaped]["scores"]  # detected like any other image
    manifest = pq.read_table(tmp_path / "out" / "bytes" / "manifest.parquet").column("uri").to_pylist()
    assert escaped in manifest
    from platescope.sources.manifest import open_uri

    assert os.fsencode(open_uri(escaped)) == bad  # lossless: the URI names exactly that file


def test_impossible_resources_fail_before_any_work(tmp_path, tiny_model, scenes):
    proc = run_cli("detect", "--input", str(scenes), "--model", tiny_model, "--output", str(tmp_path / "out"),
                   "--run-id", "huge", "--no-progress", "num_cpus_per_actor=1e9", timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = _error_lines(proc.stderr)
    assert "num_cpus_per_actor 1e+09: no node can hold a detector actor" in line
    assert f"the largest node has {os.cpu_count()} CPUs and 0 GPUs" in line
    assert not (tmp_path / "out" / "huge").exists()  # no manifest, no lease left behind


def test_an_unexpected_failure_during_the_run_still_prints_one_error_line(tmp_path, tiny_model, scenes):
    """Ray is shut down on the way out; the error line must still be printed, with its own exit code."""
    code = ("import sys\n"
            "from platescope.pipeline import sink\n"
            "def boom(self, batch):\n"
            "    raise RuntimeError('sink exploded')\n"
            "sink.ShardSink.add = boom\n"
            "from platescope.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", code, "detect", "--input", str(scenes), "--model", tiny_model,
                           "--output", str(tmp_path / "out"), "--run-id", "boom", "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 4, proc.stderr[-3000:]
    (line,) = _error_lines(proc.stderr)
    assert "the run stopped: RuntimeError: sink exploded" in line
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "boom" / "lock.json").exists()  # released on the way out
