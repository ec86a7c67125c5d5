"""`platescope submit` against a real local Ray head (the `ray_head` fixture runs
cluster/start-local-head.sh: token authentication, dashboard and Job API on 127.0.0.1): a detect job that succeeds and writes its table,
one that fails with its own error, and a head that refuses a missing or wrong token."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

CLI = [sys.executable, "-m", "platescope.cli"]
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def submit(*args: str, token: str | None, home: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(home)  # no ~/.ray/auth_token of this machine's user gets used by accident
    if token is not None:
        env["RAY_AUTH_TOKEN"] = token
    return subprocess.run([*CLI, "submit", *args], check=False, capture_output=True, text=True, timeout=timeout,
                          env=env)


def write_job(path: Path, **fields) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(fields))
    return path


def test_a_detect_job_runs_on_the_cluster_and_writes_its_table(ray_head, scenes, tiny_model, tmp_path):
    job = write_job(tmp_path / "detect-job.yaml", input=[str(scenes)], output=str(tmp_path / "out"),
                    model=tiny_model, threshold=0.0)
    # an override after the options, as the README writes it
    proc = submit(str(job), "--address", ray_head.dashboard_url, "--follow", "--timeout", "240",
                  "--env", "PLATESCOPE_EXAMPLE=1", "run_id=on-cluster", token=ray_head.token, home=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "submitted job platescope-detect-" in proc.stdout and "SUCCEEDED" in proc.stdout
    assert "platescope detect: run on-cluster" in proc.stdout  # the job's own logs, streamed
    assert ray_head.token not in proc.stdout + proc.stderr
    rows = pq.read_table(tmp_path / "out" / "on-cluster" / "data").to_pylist()
    assert len(rows) == 8 and not any(r["error"] for r in rows)


def test_a_failing_job_ends_submit_non_zero_with_its_error(ray_head, scenes, tmp_path):
    job = write_job(tmp_path / "broken.yaml", input=[str(scenes)], output=str(tmp_path / "out"),
                    model=str(tmp_path / "no-such-model"))
    proc = submit(str(job), "--address", ray_head.dashboard_url, "--follow", "--timeout", "180",
                  token=ray_head.token, home=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("platescope submit: error: job platescope-detect-") and " FAILED: " in last
    assert last.endswith(f"platescope detect: error: model {tmp_path / 'no-such-model'}: no such directory"), last


def test_missing_or_wrong_token_and_unreachable_head_are_one_line(ray_head, scenes, tiny_model, tmp_path):
    job = write_job(tmp_path / "job.yaml", input=[str(scenes)], output=str(tmp_path / "out"), model=tiny_model)
    cases = [
        (None, ray_head.dashboard_url, "needs a token (token authentication is on)"),
        ("not-the-token", ray_head.dashboard_url, "rejected the token"),
        (ray_head.token, f"http://127.0.0.1:{_free_port()}", "unreachable"),
    ]
    for token, address, message in cases:
        proc = submit(str(job), "--address", address, token=token, home=tmp_path, timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert "not-the-token" not in proc.stderr and ray_head.token not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_bad_job_files_and_secrets_are_refused_before_anything_is_sent(tmp_path, tiny_model):
    misspelt = write_job(tmp_path / "typo.yaml", input=["s3://footage/"], output="s3://detections/",
                         treshold=0.3)
    proc = submit(str(misspelt), "--address", "http://127.0.0.1:9", token=None, home=tmp_path)
    assert proc.returncode == 2 and "treshold: unknown field" in proc.stderr
    unknown = write_job(tmp_path / "what.yaml", name="x")
    proc = submit(str(unknown), "--dry-run", token=None, home=tmp_path)
    assert proc.returncode == 2 and "cannot tell its job from its fields" in proc.stderr
    job = write_job(tmp_path / "ok.yaml", input=["s3://footage/"], output="s3://detections/", model=tiny_model)
    for args, message in [(["s3.secret_access_key=abc"], "s3.secret_access_key would reach the cluster"),
                          (["--env", "AWS_SECRET_ACCESS_KEY=abc"], "--env AWS_SECRET_ACCESS_KEY: looks like a secret")]:
        proc = submit(str(job), *args, "--dry-run", token=None, home=tmp_path)
        assert proc.returncode == 2 and message in proc.stderr and "abc" not in proc.stderr


def test_dry_run_prints_the_entrypoint_and_runtime_env(tmp_path, tiny_model):
    import json

    job = write_job(tmp_path / "nightly.yaml", input=["s3://footage/"], output="s3://detections/", model=tiny_model)
    runtime_env = REPO / "cluster" / "runtime_env.yaml"
    proc = submit(str(job), "run_id=nightly-2026-11-21", "input=s3://footage/2026-11-21/", "--dry-run",
                  "--runtime-env", str(runtime_env), "--submission-id", "nightly-2026-11-21", token=None,
                  home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["entrypoint"] == ("platescope detect --config nightly.yaml run_id=nightly-2026-11-21 "
                                  "input=s3://footage/2026-11-21/")
    assert plan["submission_id"] == "nightly-2026-11-21"
    assert plan["runtime_env"]["working_dir"] == {"files": ["nightly.yaml"]}
    assert plan["runtime_env"]["env_vars"]  # from cluster/runtime_env.yaml


def test_ship_code_sends_this_package_and_runs_it_as_a_module(tmp_path, tiny_model):
    import json

    import platescope

    job = write_job(tmp_path / "job.yaml", input=["s3://footage/"], output="s3://detections/", model=tiny_model)
    proc = submit(str(job), "--dry-run", "--ship-code", token=None, home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["entrypoint"] == "python -m platescope.cli detect --config job.yaml"
    assert plan["runtime_env"]["py_modules"] == [str(Path(platescope.__file__).parent)]


SECRET_ENV_NAMES = ["OPENAI_API_KEY", "WANDB_API_KEY", "AWS_ACCESS_KEY_ID", "DATABASE_URL",
                    "AZURE_STORAGE_CONNECTION_STRING", "SLACK_WEBHOOK_URL"]


def test_env_vars_named_like_secrets_are_refused_in_one_line(tmp_path, tiny_model):
    job = write_job(tmp_path / "job.yaml", input=["s3://footage/"], output="s3://detections/", model=tiny_model)
    for name in SECRET_ENV_NAMES:
        proc = submit(str(job), "--env", f"{name}=x", "--dry-run", token=None, home=tmp_path)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert lines[0].startswith(f"platescope submit: error: --env {name}: looks like a secret"), lines[0]
        assert not proc.stdout
    # a harmless name with a URL that carries a password, and a runtime env file naming a secret
    proc = submit(str(job), "--env", "AWS_ENDPOINT_URL=http://admin:hunter2pw@minio:9000", "--dry-run", token=None,
                  home=tmp_path)
    assert proc.returncode == 2 and "--env AWS_ENDPOINT_URL: holds a secret" in proc.stderr
    assert "hunter2pw" not in proc.stderr
    runtime_env = tmp_path / "runtime_env.yaml"
    runtime_env.write_text("env_vars:\n  WANDB_API_KEY: abc123\n")
    proc = submit(str(job), "--runtime-env", str(runtime_env), "--dry-run", token=None, home=tmp_path)
    assert proc.returncode == 2 and "env_vars.WANDB_API_KEY looks like a secret" in proc.stderr
    assert "abc123" not in proc.stderr
    runtime_env.write_text("pip:\n  packages: [platescope]\n  pip_install_options: "
                           "['--index-url', 'https://ci:hunter2pw@pypi.internal/simple']\n")
    proc = submit(str(job), "--runtime-env", str(runtime_env), "--dry-run", token=None, home=tmp_path)
    assert proc.returncode == 2 and "holds a secret" in proc.stderr and "hunter2pw" not in proc.stderr


def test_harmless_env_vars_pass(tmp_path, tiny_model):
    import json

    job = write_job(tmp_path / "job.yaml", input=["s3://footage/"], output="s3://detections/", model=tiny_model)
    harmless = {"RAY_DATA_LOG_LEVEL": "INFO", "AWS_ENDPOINT_URL": "http://minio:9000", "AWS_DEFAULT_REGION": "eu-west-1",
                "OMP_NUM_THREADS": "4", "TOKENIZERS_PARALLELISM": "false", "PYTHONHASHSEED": "0",
                "RAY_AUTH_MODE": "token"}
    args = [a for name, value in harmless.items() for a in ("--env", f"{name}={value}")]
    proc = submit(str(job), *args, "--dry-run", token=None, home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["runtime_env"]["env_vars"] == harmless


def test_a_job_file_with_a_secret_anywhere_is_refused(tmp_path, tiny_model):
    for fields, where in [({"s3": {"access_key_id": "AKIAEXAMPLE"}}, "s3.access_key_id"),
                          ({"s3": {"endpoint_url": "http://admin:hunter2pw@minio:9000"}}, "s3.endpoint_url"),
                          ({"address": "ray://admin:hunter2pw@head:10001"}, "address")]:
        job = write_job(tmp_path / "job.yaml", input=["s3://footage/"], output="s3://detections/", model=tiny_model,
                        **fields)
        proc = submit(str(job), "--dry-run", token=None, home=tmp_path)
        assert proc.returncode == 2 and f"{where} would reach the cluster in plain text" in proc.stderr, proc.stderr
        assert "hunter2pw" not in proc.stderr and "AKIAEXAMPLE" not in proc.stderr
