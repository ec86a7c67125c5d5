"""`platescope submit --ship-code` against a real local Ray head (the `ray_head` fixture: the
repository's cluster/start-local-head.sh with every port a free loopback one and its own temp dir,
stopped when the tests end): the job runs this checkout's package as shipped in the runtime env's
py_modules, not the copy the cluster has installed, and writes its table."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import yaml

import platescope

MARKER = "platescope-shipped-copy-loaded-from"


def test_ship_code_runs_the_shipped_package_on_the_cluster(ray_head, scenes, tiny_model, tmp_path):
    # A checkout whose package says where it was imported from: only that copy prints the marker, so
    # the marker in the job's logs proves the job ran the package submit shipped.
    checkout = tmp_path / "checkout"
    shutil.copytree(Path(platescope.__file__).parent, checkout / "platescope",
                    ignore=shutil.ignore_patterns("__pycache__"))
    init = checkout / "platescope" / "__init__.py"
    init.write_text(init.read_text() + f"\nimport sys as _sys\nprint('{MARKER}', __file__, file=_sys.stderr)\n")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"input": [str(scenes)], "output": str(tmp_path / "out"), "model": tiny_model,
                                   "threshold": 0.0, "progress": False}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(HOME=str(tmp_path), RAY_AUTH_TOKEN=ray_head.token, PYTHONPATH=str(checkout))
    proc = subprocess.run([sys.executable, "-m", "platescope.cli", "submit", str(job), "--ship-code",
                           "--address", ray_head.dashboard_url, "--follow", "--timeout", "300", "run_id=shipped"],
                          capture_output=True, text=True, timeout=420, env=env, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert f"job {proc.stdout.split('submitted job ', 1)[1].split()[0]} SUCCEEDED" in proc.stdout
    assert "platescope detect: run shipped" in proc.stdout  # the job's own logs, streamed
    # The job imported the shipped package, from Ray's unpacked copy of py_modules, not this checkout
    # itself nor the installed package (which has no marker).
    loaded_from = re.findall(rf"{MARKER} (\S+)", proc.stdout)
    assert loaded_from, proc.stdout[-4000:]
    assert all("py_modules_files" in path and str(checkout) not in path for path in loaded_from), loaded_from
    assert ray_head.token not in out
    rows = pq.read_table(tmp_path / "out" / "shipped" / "data").to_pylist()
    assert len(rows) == 8 and not any(r["error"] for r in rows)
