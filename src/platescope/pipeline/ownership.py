"""One driver per run: a lease object `<run>/lock.json` that the running driver owns.

    acquire   create lock.json only if absent (os.link locally, `If-None-Match: *` on S3), then read
              it back. If it exists: refuse, naming the owner (host, pid, since), unless that owner
              is dead: then replace it only if it is still the dead owner's version (If-Match /
              compare-and-rename under flock), so of several drivers taking over one wins.
    heartbeat every HEARTBEAT_S a background thread reads the lease back and rewrites it if it is
              still ours at the version we wrote (If-Match), with a fresh heartbeat time. Reading
              someone else's lease means this driver lost the run: the work loop stops at its next
              `check()`, before writing anything more.
    release   delete the lease if it is still ours at our version.

An owner is dead when
  - it ran on this machine (same boot and pid namespace) and its process (pid and start time) is
    gone: a crashed or killed driver never blocks a rerun on the same host, or
  - its last heartbeat is older than its `expires_after_s` (EXPIRES_AFTER_S): a driver on another
    machine that died blocks the run at most that long.

Limits: expiry compares the lease's heartbeat time with this machine's clock, so drivers' clocks
must agree to well within EXPIRES_AFTER_S - HEARTBEAT_S. A driver that stalls longer than that
(suspended, or storage unreachable) can be taken over; it notices at its next heartbeat and stops,
but a write already under way when the takeover happened still lands (a lease without fencing
tokens cannot prevent that). Storage that ignores conditional requests cannot guarantee one owner:
acquire checks that a second exclusive create of the lease fails, and warns when it does not.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from platescope import storage
from platescope.pipeline.errors import RunOwnedError, StorageFailure, describe, storage_step
from platescope.storage import S3Options

log = logging.getLogger(__name__)

LOCK_FILE = "lock.json"
HEARTBEAT_S = 15.0
EXPIRES_AFTER_S = 120.0
_ACQUIRE_ATTEMPTS = 5


def _now_iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _read_first_line(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.readline().strip() or None
    except OSError:
        return None


def host_id() -> str:
    """This machine and pid namespace: a pid means the same process only where this is equal."""
    boot = _read_first_line("/proc/sys/kernel/random/boot_id") or ""
    try:
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = ""
    return f"{socket.gethostname()}|{boot}|{pid_ns}"


def process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    line = _read_first_line(f"/proc/{pid}/stat")
    if line is None:
        return None
    fields = line[line.rfind(")") + 2:].split()  # after "pid (comm) ": state, ppid, ...
    return fields[19] if len(fields) > 19 else None


def process_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    line = _read_first_line(f"/proc/{pid}/stat")
    if line is not None:
        fields = line[line.rfind(")") + 2:].split()
        if fields and fields[0] in ("Z", "X"):  # a zombie left by a parent that did not reap it
            return False
    current = process_start(pid)
    return not (start and current and current != start)


@dataclass
class Owner:
    """What a lease says about the driver holding it."""

    owner: str
    run_id: str
    host: str
    host_id: str
    pid: int
    pid_start: str | None
    since: float
    heartbeat_at: float
    expires_after_s: float

    @classmethod
    def from_json(cls, data: bytes) -> Owner | None:
        try:
            d = json.loads(data)
            return cls(owner=str(d["owner"]), run_id=str(d.get("run_id", "")), host=str(d.get("host", "?")),
                       host_id=str(d.get("host_id", "")), pid=int(d.get("pid", -1)),
                       pid_start=d.get("pid_start"), since=float(d["since_epoch"]),
                       heartbeat_at=float(d["heartbeat_epoch"]),
                       expires_after_s=float(d.get("expires_after_s", EXPIRES_AFTER_S)))
        except (ValueError, KeyError, TypeError):
            return None

    def to_json(self) -> bytes:
        return json.dumps({
            "owner": self.owner, "run_id": self.run_id, "host": self.host, "host_id": self.host_id,
            "pid": self.pid, "pid_start": self.pid_start,
            "since": _now_iso(self.since), "since_epoch": self.since,
            "heartbeat": _now_iso(self.heartbeat_at), "heartbeat_epoch": self.heartbeat_at,
            "expires_after_s": self.expires_after_s,
        }, indent=1).encode()

    def dead_because(self, now: float) -> str | None:
        """Why this owner is known dead, or None while it may be alive."""
        if self.host_id == host_id() and self.pid > 0 and not process_alive(self.pid, self.pid_start):
            return f"its process {self.pid} on this host is gone"
        silent = now - self.heartbeat_at
        if silent > self.expires_after_s:
            return f"no heartbeat for {silent:.0f} s (expires after {self.expires_after_s:.0f} s)"
        return None

    def describe(self, now: float) -> str:
        return (f"host {self.host}, pid {self.pid}, since {_now_iso(self.since)}, "
                f"last heartbeat {max(0.0, now - self.heartbeat_at):.0f} s ago")


class RunLease:
    """The lease on one run folder. Use acquire() ... release(), or as a context manager."""

    def __init__(self, run_dir: str, run_id: str, s3: S3Options | None, *,
                 heartbeat_s: float = HEARTBEAT_S, expires_after_s: float = EXPIRES_AFTER_S):
        self.run_dir, self.run_id, self.s3 = run_dir, run_id, s3
        self.uri = storage.join(run_dir, LOCK_FILE)
        self.heartbeat_s, self.expires_after_s = heartbeat_s, expires_after_s
        now = time.time()
        self.me = Owner(owner=uuid.uuid4().hex, run_id=run_id, host=socket.gethostname(), host_id=host_id(),
                        pid=os.getpid(), pid_start=process_start(os.getpid()), since=now, heartbeat_at=now,
                        expires_after_s=expires_after_s)
        self.version: str | None = None
        self.took_over: Owner | None = None
        self._lost: str | None = None
        self._last_ok = now
        self._last_error: BaseException | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one lease request at a time (heartbeat thread vs release)
        self._thread: threading.Thread | None = None
        self._created_dir = False

    # -- acquire -------------------------------------------------------------------------------------

    def acquire(self) -> RunLease:
        """Own the run, or raise RunOwnedError naming the live owner (StorageFailure if storage fails)."""
        self._created_dir = not storage.is_s3(self.run_dir) and not os.path.isdir(self.run_dir)
        with storage_step("creating the run's lease", self.uri, started=True):
            for _ in range(_ACQUIRE_ATTEMPTS):
                if self._try_acquire():
                    break
            else:
                raise RunOwnedError(f"run {self.run_id} ({self.run_dir}): its lease {self.uri} kept changing "
                                    "while this driver tried to take it; another driver is starting it")
            self._check_enforced()
        if self.took_over is not None:
            log.warning("run %s: took over the lease of a dead driver (%s; %s)", self.run_id,
                        self.took_over.describe(time.time()), self.took_over.dead_because(time.time()))
        self._thread = threading.Thread(target=self._heartbeats, name=f"lease-{self.run_id}", daemon=True)
        self._thread.start()
        return self

    def _try_acquire(self) -> bool:
        body = self._body()
        try:
            self.version = storage.create_exclusive(self.uri, body, self.s3)
            return self._read_back()
        except FileExistsError:
            pass
        try:
            data, version = storage.read_versioned(self.uri, self.s3)
        except FileNotFoundError:
            return False  # released meanwhile: try to create it again
        other = Owner.from_json(data)
        now = time.time()
        if other is not None and other.owner == self.me.owner:
            self.version = version
            return True
        if other is not None and other.dead_because(now) is None:
            raise RunOwnedError(f"run {self.run_id} ({self.run_dir}) is being run by another driver "
                                f"({other.describe(now)}); not starting a second one (if that driver "
                                f"died, its lease {self.uri} expires {other.expires_after_s:.0f} s after its "
                                "last heartbeat, or at once for a rerun on its host)")
        try:
            self.version = storage.replace_if_version(self.uri, body, version, self.s3)
        except storage.PreconditionFailed:
            return False  # another driver took it over first, or the owner's heartbeat came in
        self.took_over = other
        return self._read_back()

    def _read_back(self) -> bool:
        """The lease as stored now names us (a server that ignored a condition shows here)."""
        data, version = storage.read_versioned(self.uri, self.s3)
        stored = Owner.from_json(data)
        if stored is None or stored.owner != self.me.owner:
            return False
        self.version = version
        return True

    def _check_enforced(self) -> None:
        try:
            storage.create_exclusive(self.uri, self._body(), self.s3)
        except FileExistsError:
            return
        # The server overwrote an existing object despite If-None-Match: ownership is best effort.
        self.version = storage.read_versioned(self.uri, self.s3)[1]
        log.warning("storage at %s ignores conditional writes: two drivers started at the same moment "
                    "could both own run %s; use one driver per run id", self.uri, self.run_id)

    def _body(self) -> bytes:
        self.me.heartbeat_at = time.time()
        return self.me.to_json()

    # -- heartbeat -----------------------------------------------------------------------------------

    def _heartbeats(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.heartbeat()
            if self._lost:
                return

    def heartbeat(self) -> None:
        """Refresh the lease once (the background thread calls this every heartbeat_s)."""
        with self._lock:
            if self._lost or self.version is None:
                return
            try:
                data, version = storage.read_versioned(self.uri, self.s3)
                stored = Owner.from_json(data)
                if stored is None or stored.owner != self.me.owner or version != self.version:
                    self._lose(stored)
                    return
                self.version = storage.replace_if_version(self.uri, self._body(), version, self.s3)
                self._last_ok, self._last_error = time.time(), None
            except FileNotFoundError:
                self._lose(None)
            except storage.PreconditionFailed:
                try:
                    self._lose(Owner.from_json(storage.read_versioned(self.uri, self.s3)[0]))
                except Exception:  # noqa: BLE001
                    self._lose(None)
            except Exception as e:  # noqa: BLE001 - storage trouble: check() decides when it matters
                self._last_error = e
                log.info("run %s: lease heartbeat failed (%s)", self.run_id, describe(e))

    def _lose(self, other: Owner | None) -> None:
        now = time.time()
        who = f"another driver ({other.describe(now)})" if other else "nobody (the lease was deleted)"
        self._lost = f"run {self.run_id} ({self.run_dir}): this driver lost its lease to {who}; it stopped"
        log.error("%s", self._lost)

    def check(self) -> None:
        """Raise unless this driver still owns the run: before each write of the work loop."""
        if self._lost:
            raise RunOwnedError(self._lost)
        silent = time.time() - self._last_ok
        if self._last_error is not None and silent > self.expires_after_s - self.heartbeat_s:
            # Others may call the lease dead soon; stop writing before they can.
            raise StorageFailure.of("renewing the run's lease", self.uri, self._last_error)

    # -- release -------------------------------------------------------------------------------------

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours; never raises."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        with self._lock:
            if self.version is None or self._lost:
                return
            try:
                storage.delete_if_version(self.uri, self.version, self.s3)
            except storage.PreconditionFailed:
                pass  # not ours any more
            except Exception as e:  # noqa: BLE001 - the run's own error, if any, is the one to print
                log.info("run %s: could not remove its lease %s (%s); a rerun on this host takes it "
                         "over at once, one elsewhere after %.0f s", self.run_id, self.uri, describe(e),
                         self.expires_after_s)
                return
            finally:
                self.version = None
        if self._created_dir:
            try:  # a run that stopped before writing anything leaves no empty folder behind
                os.rmdir(self.run_dir)
            except OSError:
                pass

    def __enter__(self) -> RunLease:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def read_owner(run_dir: str, s3: S3Options | None) -> Owner | None:
    """Who holds a run's lease now (None when nobody does)."""
    try:
        return Owner.from_json(storage.read_versioned(storage.join(run_dir, LOCK_FILE), s3)[0])
    except FileNotFoundError:
        return None
