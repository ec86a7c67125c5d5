"""The local Ray that `detect` and `train` start when given no cluster address."""

from __future__ import annotations

import os
import subprocess
import sys

START_AND_REPORT = """
import os
from platescope.ray_session import start_ray
assert start_ray(None, num_cpus=1)
import ray
print("auth mode:", os.environ.get("RAY_AUTH_MODE"))
print("node ip:", ray.util.get_node_ip_address())
ray.shutdown()
"""


def test_local_ray_has_token_auth_on_loopback_without_the_notice(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    proc = subprocess.run([sys.executable, "-c", START_AND_REPORT], check=False, capture_output=True, text=True,
                          timeout=120, env={**env, "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "auth mode: token" in proc.stdout and "node ip: 127.0.0.1" in proc.stdout
    assert "Token authentication is enabled" not in proc.stderr
    assert (tmp_path / ".ray" / "auth_token").is_file()  # made for this Ray, as Ray does by default
