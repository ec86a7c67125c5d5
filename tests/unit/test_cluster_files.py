"""cluster/: the image pins the Ray the project is built against and runs as a non-root user; the
runtime env file is one `submit` accepts."""

from __future__ import annotations

import re
from pathlib import Path

import ray
import tomllib

from platescope.submit import _runtime_env_file

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"


def test_the_image_pins_the_projects_ray_and_is_not_root():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^ARG RAY_IMAGE=rayproject/ray:(\S+)$", dockerfile, re.MULTILINE)
    assert base, "the base image is not a pinned rayproject/ray tag"
    pinned = base.group(1).split("-")[0]
    pyproject = tomllib.loads((CLUSTER.parent / "pyproject.toml").read_text())
    ray_pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("ray["))
    assert ray_pin.endswith(f"=={'.'.join(pinned.split('.')[:2])}.*"), (pinned, ray_pin)
    assert ray.__version__.startswith(ray_pin.split("==")[1].rstrip("*")), ray.__version__
    users = re.findall(r"^USER (\S+)$", dockerfile, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert "latest" not in base.group(1)


def test_runtime_env_file_is_accepted_by_submit_and_holds_no_secret():
    env = _runtime_env_file(str(CLUSTER / "runtime_env.yaml"))
    assert env["env_vars"]["PYTHONUNBUFFERED"] == "1"
    assert "working_dir" not in env
