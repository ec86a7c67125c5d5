"""One driver per run on local disk: the conditional-write primitives and the run lease (no Ray).

The primitives and drivers racing for one lease, on local disk and on the real S3 server, are in
tests/ray/test_run_ownership.py; two real `detect` drivers on one run id in tests/e2e/test_cli_detect.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from platescope.pipeline.errors import RunOwnedError
from platescope.pipeline.ownership import LOCK_FILE, Owner, RunLease, host_id, read_owner


def test_a_second_driver_is_refused_naming_the_owner(tmp_path):
    run_dir = str(tmp_path / "out" / "nightly")
    first = RunLease(run_dir, "nightly", None).acquire()
    try:
        owner = read_owner(run_dir, None)
        assert owner is not None and owner.pid == os.getpid() and owner.owner == first.me.owner
        with pytest.raises(RunOwnedError) as refused:
            RunLease(run_dir, "nightly", None).acquire()
        message = str(refused.value)
        assert "\n" not in message
        assert f"run nightly ({run_dir})" in message and f"pid {os.getpid()}" in message
        assert "host " in message and "since 20" in message
        first.check()  # still the owner
    finally:
        first.release()
    assert read_owner(run_dir, None) is None
    assert not os.path.exists(run_dir)  # the lease was all it held: no empty folder left
    RunLease(run_dir, "nightly", None).acquire().release()  # free again


def _write_lease(run_dir, **fields):
    now = time.time()
    owner = Owner(owner="someone-else", run_id="r", host=fields.pop("host", "elsewhere"),
                  host_id=fields.pop("host_id", "elsewhere|boot|pidns"), pid=fields.pop("pid", 4242),
                  pid_start=None, since=now - 3600, heartbeat_at=fields.pop("heartbeat_at", now),
                  expires_after_s=fields.pop("expires_after_s", 120.0))
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, LOCK_FILE), "wb") as f:
        f.write(owner.to_json())


def test_a_crashed_driver_on_this_host_does_not_block_a_rerun(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run_dir = str(tmp_path / "r")
    _write_lease(run_dir, host="me", host_id=host_id(), pid=dead.pid)  # heartbeat fresh, process gone
    lease = RunLease(run_dir, "r", None).acquire()
    try:
        assert lease.took_over is not None and lease.took_over.pid == dead.pid
        assert read_owner(run_dir, None).owner == lease.me.owner
    finally:
        lease.release()


def test_a_live_driver_elsewhere_blocks_until_its_heartbeat_expires(tmp_path):
    run_dir = str(tmp_path / "r")
    _write_lease(run_dir, heartbeat_at=time.time() - 30)
    with pytest.raises(RunOwnedError, match=r"host elsewhere, pid 4242, .*last heartbeat \d+ s ago"):
        RunLease(run_dir, "r", None).acquire()
    _write_lease(run_dir, heartbeat_at=time.time() - 121)  # silent longer than its expires_after_s
    lease = RunLease(run_dir, "r", None).acquire()
    lease.release()
    assert lease.took_over is not None and lease.took_over.host == "elsewhere"


def test_a_driver_that_lost_its_lease_stops_and_leaves_the_new_one(tmp_path):
    run_dir = str(tmp_path / "r")
    lease = RunLease(run_dir, "r", None, heartbeat_s=3600).acquire()
    lease.heartbeat()
    lease.check()
    _write_lease(run_dir)  # another driver took the run over (as after a long stall)
    lease.heartbeat()
    with pytest.raises(RunOwnedError, match="lost its lease to another driver .*host elsewhere"):
        lease.check()
    lease.release()
    assert read_owner(run_dir, None).owner == "someone-else"  # not deleted by the loser


def test_heartbeats_refresh_the_lease(tmp_path):
    run_dir = str(tmp_path / "r")
    lease = RunLease(run_dir, "r", None, heartbeat_s=0.2).acquire()
    try:
        first = read_owner(run_dir, None).heartbeat_at
        deadline = time.time() + 10
        while read_owner(run_dir, None).heartbeat_at == first and time.time() < deadline:
            time.sleep(0.05)
        assert read_owner(run_dir, None).heartbeat_at > first
        lease.check()
    finally:
        lease.release()


def test_lease_file_names_owner_and_expiry(tmp_path):
    run_dir = str(tmp_path / "r")
    with RunLease(run_dir, "r", None):
        doc = json.loads((tmp_path / "r" / LOCK_FILE).read_text())
    assert {"owner", "host", "pid", "since", "heartbeat", "expires_after_s", "run_id"} <= set(doc)
