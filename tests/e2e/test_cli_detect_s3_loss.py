"""`platescope detect` when S3 goes away: one line naming the object and the cause, exit code 3, and a
rerun after S3 is back that completes the run exactly once.

These tests run their own SeaweedFS (the shared `s3_server` keeps serving the other tests): killed
part-way through a run, then started again on the same data folder and ports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types

import pyarrow.parquet as pq
import pytest

from platescope import samples

CLI = [sys.executable, "-m", "platescope.cli"]
EXIT_STORAGE_FAILED = 3


def _restartable_server_class(s3_server):
    """The conftest's S3Server, but restartable on the same data folder and ports."""
    base = type(s3_server)
    # The conftest module's own globals: several test folders have a `conftest`, so the name in
    # sys.modules may be another one's.
    conftest = types.SimpleNamespace(**base.start.__globals__)

    class RestartableS3Server(base):
        def _start_once(self, attempt, deadline):
            data_dir = self.base_dir / "data"
            data_dir.mkdir(parents=True, exist_ok=True)
            if not self.ports:
                self.ports = dict(zip(conftest._PORT_FLAGS, conftest._free_ports(len(conftest._PORT_FLAGS))))
            self.endpoint_url = f"http://127.0.0.1:{self.ports['s3.port']}"
            cmd = [self.weed, "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                   *(f"-{flag}={port}" for flag, port in self.ports.items()), *conftest._DISABLED_FLAGS,
                   "-admin.ui=false", "-master.telemetry=false", "-s3.autoCreateBucket=false"]
            env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
            env.update(AWS_ACCESS_KEY_ID=self.access_key_id, AWS_SECRET_ACCESS_KEY=self.secret_access_key)
            self.log_path = self.base_dir / f"weed-{time.monotonic_ns()}.log"
            self._log = open(self.log_path, "wb")  # noqa: SIM115 - held open for the server's lifetime
            self.proc = subprocess.Popen(cmd, cwd=self.base_dir, env=env, stdin=subprocess.DEVNULL,
                                         stdout=self._log, stderr=subprocess.STDOUT)
            self._wait_ready(deadline)

        def kill(self) -> None:
            """Gone at once, as a crashed server or a lost network: no clean shutdown."""
            self.proc.kill()
            self.proc.wait(timeout=30)
            self.stop()

    return RestartableS3Server


@pytest.fixture
def own_s3(s3_server, tmp_path_factory):
    server = _restartable_server_class(s3_server)(s3_server.weed, tmp_path_factory.mktemp("own-seaweedfs"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("platescope detect: error:")]


def test_starting_while_s3_is_down_is_one_line_and_exit_3(tmp_path, tiny_model, scenes, own_s3):
    bucket = own_s3.make_bucket("down-at-start")
    env = {**os.environ, **own_s3.env()}
    own_s3.kill()
    proc = subprocess.run([*CLI, "detect", "--input", str(scenes), "--model", tiny_model, "--output",
                           f"{bucket}/out", "--run-id", "r", "--no-progress"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == EXIT_STORAGE_FAILED, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"platescope detect: error: storage unreachable reading {bucket}/out/r/")
    assert "EndpointConnectionError" in lines[0] and own_s3.endpoint_url in lines[0]


def test_losing_s3_mid_run_exits_3_naming_the_object_and_a_rerun_completes_exactly_once(
        tmp_path, tiny_model, own_s3):
    bucket = own_s3.make_bucket("lost-mid-run")
    name = bucket[len("s3://"):]
    inputs = tmp_path / "inputs"
    samples.write_image_dataset(str(inputs), 40, seed=31, size=(320, 240))
    os.remove(inputs / "annotations.json")
    client = own_s3.client()
    for p in sorted(inputs.iterdir()):
        client.put_object(Bucket=name, Key=f"in/{p.name}", Body=p.read_bytes())
    env = {**os.environ, **own_s3.env()}
    args = [*CLI, "detect", "--input", f"{bucket}/in/", "--output", f"{bucket}/out", "--model", tiny_model,
            "--run-id", "lost", "--no-progress", "--batch-size", "1", "num_inputs_per_shard=1"]

    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 480
        done = 0
        while time.monotonic() < deadline and proc.poll() is None:
            done = client.list_objects_v2(Bucket=name, Prefix="out/lost/_done/").get("KeyCount", 0)
            if done >= 3:
                break
            time.sleep(0.1)
        assert 3 <= done < 40, f"the kill should land mid-run, found {done} of 40 shards done"
        own_s3.kill()
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_STORAGE_FAILED, stderr[-3000:]
    (line,) = _error_lines(stderr)
    assert line.startswith("platescope detect: error: storage failed ") and f"{bucket}/" in line, line
    assert own_s3.endpoint_url in line or "Connect" in line, line  # the cause, from the S3 client
    assert "Traceback" not in stderr

    own_s3.start()  # same data folder and ports: the objects written before the loss are there
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=480)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(client.get_object(Bucket=name, Key="out/lost/summary.json")["Body"].read())
    assert summary["complete"] and summary["inputs"] == summary["rows"] == 40 and summary["errors"] == 0
    assert summary["shards_resumed"] >= 3
    from platescope import storage

    fs, path = storage.filesystem(f"{bucket}/out/lost/data", own_s3.options())
    rows = pq.read_table(path, filesystem=fs).column("source_uri").to_pylist()
    assert len(rows) == 40 and sorted(rows) == sorted(f"{bucket}/in/{p.name}" for p in inputs.iterdir())
