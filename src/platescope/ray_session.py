"""Joining a Ray cluster or starting a local one, the same way for every job.

A local Ray binds every server to 127.0.0.1 only when RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and Ray
reads that when it is first imported: so this module sets it before importing ray, and callers must
not import ray before calling `start_ray`.
"""

from __future__ import annotations

import logging
import os

LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray treats this machine as the whole cluster
_TOKEN_SETUP_LOGGER = "ray._private.authentication.authentication_token_setup"


def _drop_token_auth_enabled_notice(record: logging.LogRecord) -> bool:
    """A new local Ray turns token authentication on by itself and warns on every start that it did.
    Only that notice is dropped: the protection stays, and every other auth message (a token missing
    or wrong, auth turned off) still shows. Setting RAY_AUTH_MODE=token instead would also silence it,
    but breaks a local start in a process that imported ray first (Ray's cached config disagrees)."""
    return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def start_ray(address: str | None, *, num_cpus: int | None = None, dashboard: bool = False) -> bool:
    """Join the cluster at address (or RAY_ADDRESS), else start a local Ray on loopback; True if we
    started it (the caller then shuts it down)."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        os.environ.setdefault(LOCAL_ONLY_ENV, "0")
    # Ray Data's per-execution INFO lines (plans, log paths) drown the job's own output; warnings stay.
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        logging.getLogger(_TOKEN_SETUP_LOGGER).addFilter(_drop_token_auth_enabled_notice)
        # "local" rather than None: never attach by accident to a `ray start` head on this machine.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard,
                 dashboard_host="127.0.0.1", logging_level=logging.WARNING)
    return True
