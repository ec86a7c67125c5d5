"""Joining a Ray cluster or starting a local one, the same way for every job.

A local Ray binds every server to 127.0.0.1 only when RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and Ray
reads that when it is first imported: so this module sets it before importing ray, and callers must
not import ray before calling `start_ray`.
"""

from __future__ import annotations

import logging
import os

LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray treats this machine as the whole cluster


def start_ray(address: str | None, *, num_cpus: int | None = None, dashboard: bool = False) -> bool:
    """Join the cluster at address (or RAY_ADDRESS), else start a local Ray on loopback; True if we
    started it (the caller then shuts it down)."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        os.environ.setdefault(LOCAL_ONLY_ENV, "0")
        # A new local Ray turns token authentication on by itself, and warns that it did; saying so
        # explicitly keeps the same protection (a token is made if none exists) without the warning.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    # Ray Data's per-execution INFO lines (plans, log paths) drown the job's own output; warnings stay.
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        # "local" rather than None: never attach by accident to a `ray start` head on this machine.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard,
                 dashboard_host="127.0.0.1", logging_level=logging.WARNING)
    return True
