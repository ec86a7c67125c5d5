"""`platescope submit`: run a job file on a Ray cluster through Ray's Job Submission API.

    job file + key=value -> which verb (detect / train / evaluate, from the file's fields)
      -> validated here with the same config the job will use (a bad config never reaches the cluster)
      -> entrypoint `platescope <verb> --config <file> key=value...`, the job file shipped as the
         runtime env's working dir (plus cluster/runtime_env.yaml-style extras with --runtime-env)
      -> JobSubmissionClient(address, token) -> job id; --follow streams its logs and exits with its outcome

Secrets never travel in the submission: a job file or override carrying S3 keys (any field named
like a secret, or a URL with a password), or an --env / --runtime-env variable named like a secret or
holding a URL with a password, is refused (the dashboard shows runtime envs and entrypoints in plain
text); the cluster gets credentials from its own environment (Kubernetes Secrets). One rule decides
what a secret is: `platescope.config.is_secret_name` and `looks_secret_value`. The Ray auth token goes
only into the request's Authorization header and is never printed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import yaml

from platescope.config import (
    ConfigError,
    DetectConfig,
    EvaluateConfig,
    TrainConfig,
    build_config,
    is_secret_name,
    load_yaml,
    looks_secret_value,
    secret_fields,
)

EXIT_FAILED = 1
EXIT_CANNOT_SUBMIT = 2
# A field only that verb's config has, so a job file names its verb without saying so.
_VERB_BY_FIELD = (("input", "detect", DetectConfig), ("train", "train", TrainConfig),
                  ("detections", "evaluate", EvaluateConfig))
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(ValueError):
    """Nothing was submitted; one line naming the input and the problem."""


@dataclass
class Submission:
    address: str
    verb: str
    entrypoint: str
    runtime_env: dict[str, Any]
    submission_id: str
    metadata: dict[str, str] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """What would be sent, for --dry-run (the working dir's files listed, not the token)."""
        env = dict(self.runtime_env)
        if "working_dir" in env:
            env["working_dir"] = {"files": sorted(os.listdir(env["working_dir"]))}
        return {"address": self.address, "submission_id": self.submission_id, "entrypoint": self.entrypoint,
                "runtime_env": env, "metadata": self.metadata}


def verb_of(data: dict[str, Any], source: str) -> tuple[str, type]:
    found = [(verb, cls) for key, verb, cls in _VERB_BY_FIELD if key in data]
    if len(found) != 1:
        keys = ", ".join(key for key, _, _ in _VERB_BY_FIELD)
        raise SubmitError(f"job file {source}: cannot tell its job from its fields; it needs exactly one of "
                          f"{keys} (detect, train, evaluate)")
    return found[0]


def _refuse_plain_secrets(cfg: Any, job_file: str) -> None:
    found = secret_fields(cfg)
    if found:
        raise SubmitError(f"{job_file}: {', '.join(found)} would reach the cluster in plain text; give the cluster "
                          "its credentials from its environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, e.g. "
                          "from a Kubernetes Secret) and leave them out of the job")


def _secret_env_var(name: str, value: str | None) -> str | None:
    """Why NAME=value must not go out in plain text, or None."""
    if is_secret_name(name):
        return "looks like a secret"
    if value is not None and looks_secret_value(value):
        return "holds a secret (a URL with a password, or a private key)"
    return None


def _env_vars(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            shown = pair if not sep or _secret_env_var(name, value) is None else f"{name}=..."
            raise SubmitError(f"--env {shown}: not NAME=VALUE or NAME")
        if not sep:
            if name not in os.environ and not is_secret_name(name):
                raise SubmitError(f"--env {name}: not set here to pass on")
            value = os.environ.get(name, "")
        why = _secret_env_var(name, value)
        if why:
            raise SubmitError(f"--env {name}: {why} and would be shown in plain text on the cluster's "
                              "dashboard; give it to the cluster from a Secret instead")
        env[name] = value
    return env


def _secret_paths(node: Any, path: str = "") -> list[str]:
    """Where in a runtime env a value holds a secret (a pip index URL with a token, ...)."""
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _secret_paths(v, f"{path}.{k}" if path else str(k))]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _secret_paths(v, f"{path}[{i}]")]
    return [path] if looks_secret_value(node) else []


def _runtime_env_file(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise SubmitError(f"runtime env {path}: not found") from None
    except yaml.YAMLError as e:
        raise SubmitError(f"runtime env {path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise SubmitError(f"runtime env {path}: must be a mapping")
    if "working_dir" in data:
        raise SubmitError(f"runtime env {path}: working_dir is where submit ships the job file; "
                          "use py_modules for code")
    env_vars = data.get("env_vars") or {}
    if not isinstance(env_vars, dict):
        raise SubmitError(f"runtime env {path}: env_vars must be a mapping of NAME: value")
    for name, value in env_vars.items():
        why = _secret_env_var(str(name), None if value is None else str(value))
        if why and value not in (None, ""):
            raise SubmitError(f"runtime env {path}: env_vars.{name} {why} in plain text")
    found = _secret_paths({k: v for k, v in data.items() if k != "env_vars"})
    if found:
        raise SubmitError(f"runtime env {path}: {', '.join(found)} holds a secret (a URL with a password) "
                          "in plain text")
    return data


def build_submission(job_file: str, overrides: list[str], *, address: str, env: list[str] | None = None,
                     runtime_env_file: str | None = None, submission_id: str | None = None,
                     ship_code: bool = False, staging_dir: str) -> Submission:
    """Validate the job here and lay out what goes to the cluster (the job file copied into
    `staging_dir`, which becomes the working dir)."""
    data = load_yaml(job_file)
    verb, config_cls = verb_of(data, job_file)
    cfg = build_config(config_cls, file=job_file, overrides=overrides)  # ConfigError names the field
    _refuse_plain_secrets(cfg, job_file)
    name = os.path.basename(job_file)
    shutil.copyfile(job_file, os.path.join(staging_dir, name))
    runtime_env = _runtime_env_file(runtime_env_file)
    runtime_env["working_dir"] = staging_dir
    env_vars = {**(runtime_env.get("env_vars") or {}), **_env_vars(env or [])}
    if env_vars:
        runtime_env["env_vars"] = env_vars
    program = ["platescope"]
    if ship_code:
        # This checkout's package rides along; the cluster needs only its dependencies.
        import platescope

        runtime_env["py_modules"] = [*runtime_env.get("py_modules", []), os.path.dirname(platescope.__file__)]
        program = ["python", "-m", "platescope.cli"]
    entrypoint = shlex.join([*program, verb, "--config", name, *overrides])
    for note in _relative_paths(cfg):
        print(f"platescope submit: note: {note} is a relative path; on the cluster it is read from the job's "
              "own working dir (give an absolute path or s3:// to mean a place)", file=sys.stderr)
    job_id = submission_id or f"platescope-{verb}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    return Submission(address=address, verb=verb, entrypoint=entrypoint, runtime_env=runtime_env,
                      submission_id=job_id, metadata={"platescope_verb": verb, "job_file": name})


_PATH_FIELDS = ("input", "output", "model", "train", "val", "storage", "detections", "ground_truth")


def _relative_paths(cfg: Any) -> list[str]:
    found = []
    for name in _PATH_FIELDS:
        values = getattr(cfg, name, None)
        for value in values if isinstance(values, list) else [values]:
            # A hub id looks like a relative path too; one that starts with a dot or exists here is a path.
            if isinstance(value, str) and value and "://" not in value and not os.path.isabs(value) \
                    and (value.startswith(".") or os.path.exists(value)):
                found.append(f"{name} {value}")
    return found


def find_token(token_file: str | None) -> str | None:
    """Ray's own order: RAY_AUTH_TOKEN, then the file RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token;
    --token-file first of all."""
    if token_file:
        path = token_file
    elif os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    else:
        path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
        if not os.path.exists(path):
            return None
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError as e:
        raise SubmitError(f"token file {path}: cannot be read ({e.strerror})") from None


def _client(address: str, token: str | None):
    import requests
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as e:
        raise SubmitError(_auth_message(address, str(e), token)) from None
    except (ConnectionError, requests.exceptions.RequestException, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SubmitError(f"Ray head {address}: unreachable ({first})") from None


def _auth_message(address: str, error: str, token: str | None) -> str:
    if token is None:
        return (f"Ray head {address}: needs a token (token authentication is on); set RAY_AUTH_TOKEN, "
                "RAY_AUTH_TOKEN_PATH or --token-file")
    reason = "rejected the token" if "403" in error or "invalid" in error.lower() else "refused the request"
    return f"Ray head {address}: {reason} (check RAY_AUTH_TOKEN / --token-file against the cluster's token)"


# A head that has just started answers this until its node's job agent has registered.
_AGENT_NOT_READY = "No available agent to submit job"
AGENT_WAIT_S = 60.0


def submit(sub: Submission, token: str | None):
    from ray.exceptions import AuthenticationError

    client = _client(sub.address, token)
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            client.submit_job(entrypoint=sub.entrypoint, runtime_env=sub.runtime_env,
                              submission_id=sub.submission_id, metadata=sub.metadata)
            return client
        except AuthenticationError as e:
            raise SubmitError(_auth_message(sub.address, str(e), token)) from None
        except RuntimeError as e:  # the head's answer, e.g. a duplicate submission id
            if _AGENT_NOT_READY in str(e) and time.monotonic() < deadline:
                time.sleep(1.0)
                continue
            raise SubmitError(f"Ray head {sub.address}: refused the job ({str(e).strip().splitlines()[-1]})") from None


def follow(client, job_id: str, out=sys.stdout, poll_s: float = 1.0, timeout_s: float | None = None) -> tuple[str, str]:
    """Print the job's logs as they come, until it ends; returns (status, message)."""
    import asyncio

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(asyncio.wait_for(tail(), timeout_s) if timeout_s else tail())
    except Exception as e:  # noqa: BLE001 - the stream can drop (head restart, timeout); the status decides
        print(f"[log stream ended: {type(e).__name__}; waiting for the job's status]", file=sys.stderr)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        info = client.get_job_info(job_id)
        status = str(getattr(info.status, "value", info.status))
        if status in TERMINAL:
            return status, info.message or ""
        if deadline is not None and time.monotonic() > deadline:
            return status, "still running when --timeout ran out"
        time.sleep(poll_s)


def _job_error(message: str, logs: str) -> str:
    """The line that says why: platescope's own one-line error from the logs, else Ray's message."""
    for line in reversed(logs.strip().splitlines()):
        if line.startswith("platescope ") and ": error: " in line:
            return line
    return message.strip().splitlines()[0] if message.strip() else "no message"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("submit", help="run a job file on a Ray cluster (Ray Job Submission API)",
                       description=__doc__.splitlines()[0])
    p.add_argument("job_file", help="a job file of jobs/ (detect, train or evaluate; told apart by its fields)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. run_id=nightly-2026-11-21")
    p.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS"),
                   help="the head's dashboard URL, e.g. http://ray-head:8265 (default: RAY_API_SERVER_ADDRESS, "
                        "then RAY_ADDRESS)")
    p.add_argument("--follow", action="store_true", help="stream the job's logs and exit with its outcome")
    p.add_argument("--dry-run", action="store_true", help="print what would be submitted and stop")
    p.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]",
                   help="environment variable for the job (no secrets); NAME alone passes this shell's value")
    p.add_argument("--runtime-env", dest="runtime_env", help="YAML with more runtime env, e.g. cluster/runtime_env.yaml")
    p.add_argument("--submission-id", dest="submission_id", help="job id (default platescope-<verb>-<time>-<random>)")
    p.add_argument("--token-file", dest="token_file", help="Ray auth token file (default: RAY_AUTH_TOKEN, "
                                                          "RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)")
    p.add_argument("--ship-code", dest="ship_code", action="store_true",
                   help="send this checkout's platescope package along (py_modules) for clusters without it")
    p.add_argument("--timeout", type=float, help="with --follow: give up waiting after this many seconds")
    p.set_defaults(func=_cmd_submit)


def _cmd_submit(args: argparse.Namespace) -> int:
    def fail(message: str, code: int = EXIT_CANNOT_SUBMIT) -> int:
        print(f"platescope submit: error: {message}", file=sys.stderr)
        return code

    if not args.address and not args.dry_run:
        return fail("no Ray head address: give --address http://<head>:8265 (or set RAY_API_SERVER_ADDRESS)")
    with tempfile.TemporaryDirectory(prefix="platescope-submit-") as staging:
        try:
            sub = build_submission(args.job_file, args.overrides, address=args.address or "", env=args.env,
                                   runtime_env_file=args.runtime_env, submission_id=args.submission_id,
                                   ship_code=args.ship_code, staging_dir=staging)
            if args.dry_run:
                print(json.dumps(sub.describe(), indent=2))
                return 0
            token = find_token(args.token_file)
            client = submit(sub, token)
        except (ConfigError, SubmitError) as e:
            return fail(str(e))
    print(f"submitted job {sub.submission_id} ({sub.verb}) to {sub.address}", flush=True)
    if not args.follow:
        print(f"logs: ray job logs --address {sub.address} --follow {sub.submission_id}")
        return 0
    try:
        status, message = follow(client, sub.submission_id, timeout_s=args.timeout)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {sub.submission_id} goes on (ray job stop --address {sub.address} "
              f"{sub.submission_id} stops it)", file=sys.stderr)
        return 130
    if status == "SUCCEEDED":
        print(f"job {sub.submission_id} SUCCEEDED")
        return 0
    logs = client.get_job_logs(sub.submission_id) if status == "FAILED" else ""
    return fail(f"job {sub.submission_id} {status}: {_job_error(message, logs)}", EXIT_FAILED)
