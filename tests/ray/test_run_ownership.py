"""The run lease on local disk and against a real S3 server (SeaweedFS on loopback).

SeaweedFS enforces `If-None-Match: *` and `If-Match` on PUT and DELETE (HTTP 412 otherwise), so the
lease needs no fallback there; these tests would fail on a server that ignored them.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time

import pytest

from platescope import storage
from platescope.pipeline.errors import RunOwnedError
from platescope.pipeline.ownership import LOCK_FILE, Owner, RunLease, host_id, read_owner


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    """Where the run folders go: a local folder, or a fresh bucket on the real S3 server."""
    if request.param == "local":
        return str(tmp_path)
    request.getfixturevalue("s3_env")
    return request.getfixturevalue("s3_bucket")


def test_conditional_writes_hold(root):
    uri = f"{root}/runs/r/lock.json"
    v1 = storage.create_exclusive(uri, b"one")
    with pytest.raises(FileExistsError):
        storage.create_exclusive(uri, b"two")
    assert storage.read_versioned(uri) == (b"one", v1)
    with pytest.raises(storage.PreconditionFailed):
        storage.replace_if_version(uri, b"three", '"0123456789abcdef0123456789abcdef"')
    v2 = storage.replace_if_version(uri, b"three", v1)
    assert v2 != v1 and storage.read_versioned(uri) == (b"three", v2)
    with pytest.raises(storage.PreconditionFailed):
        storage.delete_if_version(uri, v1)
    assert storage.read_bytes(uri) == b"three"
    storage.delete_if_version(uri, v2)
    assert not storage.exists(uri)
    with pytest.raises(storage.PreconditionFailed):
        storage.replace_if_version(uri, b"four", v2)


def test_a_second_driver_is_refused_and_a_dead_ones_lease_is_taken_over(s3_env, s3_bucket):
    run_dir = f"{s3_bucket}/out/nightly"
    first = RunLease(run_dir, "nightly", None).acquire()
    try:
        with pytest.raises(RunOwnedError, match=r"run nightly \(s3://.*/out/nightly\) is being run by another "
                                                r"driver \(host .*, pid \d+, since 20"):
            RunLease(run_dir, "nightly", None).acquire()
    finally:
        first.release()
    assert read_owner(run_dir, None) is None

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    now = time.time()
    stale = Owner(owner="crashed", run_id="nightly", host="me", host_id=host_id(), pid=dead.pid,
                  pid_start=None, since=now - 60, heartbeat_at=now, expires_after_s=120)
    storage.write_bytes_atomic(f"{run_dir}/{LOCK_FILE}", stale.to_json())
    lease = RunLease(run_dir, "nightly", None).acquire()
    try:
        assert lease.took_over is not None and lease.took_over.owner == "crashed"
    finally:
        lease.release()


def test_losing_the_lease_is_noticed_at_the_next_heartbeat(s3_env, s3_bucket):
    run_dir = f"{s3_bucket}/out/r"
    lease = RunLease(run_dir, "r", None, heartbeat_s=3600).acquire()
    lease.heartbeat()
    lease.check()
    now = time.time()
    other = Owner(owner="other", run_id="r", host="elsewhere", host_id="x", pid=7, pid_start=None,
                  since=now, heartbeat_at=now, expires_after_s=120)
    storage.write_bytes_atomic(f"{run_dir}/{LOCK_FILE}", other.to_json())
    lease.heartbeat()
    with pytest.raises(RunOwnedError, match="lost its lease to another driver"):
        lease.check()
    lease.release()
    assert read_owner(run_dir, None).owner == "other"


def _race(run_dir: str, env: dict, barrier, results) -> None:
    os.environ.update(env)
    barrier.wait()
    try:
        lease = RunLease(run_dir, "race", None).acquire()
    except RunOwnedError:
        results.put("refused")
        return
    except Exception as e:  # noqa: BLE001
        results.put(f"error {type(e).__name__}: {e}")
        return
    results.put("owner")
    time.sleep(3)
    lease.release()


@pytest.mark.parametrize("stale", [False, True])
def test_of_drivers_starting_together_exactly_one_owns_the_run(root, stale):
    """Separate processes race for a fresh lease, or to take over one a dead driver left."""
    run_dir = f"{root}/out/race"
    if stale:
        now = time.time()
        dead = Owner(owner="dead", run_id="race", host="elsewhere", host_id="x", pid=7, pid_start=None,
                     since=now - 2000, heartbeat_at=now - 1000, expires_after_s=120)
        storage.write_bytes_atomic(f"{run_dir}/{LOCK_FILE}", dead.to_json())
    ctx = multiprocessing.get_context("spawn")  # each its own S3 client, as separate drivers have
    n = 6
    barrier, results = ctx.Barrier(n), ctx.Queue()
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}  # s3_env's, for an s3 root
    procs = [ctx.Process(target=_race, args=(run_dir, env, barrier, results)) for _ in range(n)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert sorted(outcomes) == ["owner"] + ["refused"] * (n - 1), outcomes
