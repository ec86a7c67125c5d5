"""How a detect run fails, as the CLI tells them apart (each is one line on stderr and an exit code).

- PreflightError: the run cannot start as configured (exit 2): fix the config, inputs or output.
- RunOwnedError: another driver owns the run (exit 2): wait for it, or use another run id.
- StorageFailure: storage was unreachable or failed (exit 3): a rerun resumes once it is back.
  StorageUnreachable is the same found before any work, and is also a PreflightError, so callers
  that only know PreflightError (train's model check) still give one line.

Storage errors are classified here too: "unreachable" (connection refused or reset, timeouts, DNS,
HTTP 5xx) is a property of the storage, not of the config; anything else (access denied, no such
bucket) is a config problem before the run starts, and a storage failure once it runs.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager

# HTTP codes and S3 error codes that say "the server is failing", not "your request is wrong".
_SERVER_FAILING_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "503", "500"}
_UNREACHABLE_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ETIMEDOUT, errno.EHOSTUNREACH,
                       errno.ENETUNREACH, errno.ECONNABORTED, errno.EPIPE}


class PreflightError(ValueError):
    """The run cannot start; the message is one line naming the input and the problem."""


class RunOwnedError(PreflightError):
    """Another driver holds the run's lease (or took it over while this one ran)."""


class StorageFailure(Exception):
    """A storage operation on `uri` failed: `action` says which (reading, writing, listing...), `reason`
    the error in one line."""

    def __init__(self, action: str, uri: str, reason: str):
        super().__init__(action, uri, reason)  # args only: pickles through Ray as it is
        self.action, self.uri, self.reason = action, uri, reason

    def __str__(self) -> str:
        return f"storage failed {self.action} {self.uri}: {self.reason}"

    @classmethod
    def of(cls, action: str, uri: str, err: BaseException) -> StorageFailure:
        return cls(action, uri, describe(err))


class StorageUnreachable(StorageFailure, PreflightError):
    """Storage could not be reached before the run started."""

    def __str__(self) -> str:
        return f"storage unreachable {self.action} {self.uri}: {self.reason}"


def _chain(err: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        # Ray's RayTaskError keeps the task's own exception as .cause
        nxt = getattr(err, "cause", None)
        err = nxt if isinstance(nxt, BaseException) else (err.__cause__ or err.__context__)


def is_unreachable(err: BaseException) -> bool:
    """Whether err (or what caused it) says the storage could not be reached or is failing."""
    import asyncio
    import socket

    kinds: list[type] = [ConnectionError, TimeoutError, asyncio.TimeoutError, socket.gaierror]
    try:
        import botocore.exceptions as bex

        kinds += [bex.ConnectionError, bex.HTTPClientError]
    except ImportError:  # pragma: no cover - s3fs brings botocore
        pass
    try:
        import aiohttp

        kinds += [aiohttp.ClientConnectionError, aiohttp.ServerTimeoutError]
    except ImportError:  # pragma: no cover
        pass
    try:
        from fsspec.exceptions import FSTimeoutError

        kinds.append(FSTimeoutError)
    except ImportError:  # pragma: no cover
        pass
    for e in _chain(err):
        if isinstance(e, tuple(kinds)):
            return True
        if isinstance(e, OSError) and e.errno in _UNREACHABLE_ERRNOS:
            return True
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = str((response.get("Error") or {}).get("Code", ""))
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0
            if code in _SERVER_FAILING_CODES or status >= 500:
                return True
    return False


def is_storage_error(err: BaseException) -> bool:
    """Whether err came from storage at all (I/O, S3 client or HTTP), as opposed to a bug."""
    kinds: list[type] = [OSError]
    try:
        import botocore.exceptions as bex

        kinds += [bex.BotoCoreError, bex.ClientError]
    except ImportError:  # pragma: no cover
        pass
    try:
        import aiohttp

        kinds.append(aiohttp.ClientError)
    except ImportError:  # pragma: no cover
        pass
    return any(isinstance(e, tuple(kinds)) for e in _chain(err)) or is_unreachable(err)


def _is_ray_wrapper(err: BaseException) -> bool:
    return any(k.__module__.startswith("ray.") for k in type(err).__mro__[:-2])


def describe(err: BaseException) -> str:
    """One line: the error's type and message; for an error Ray or Ray Data wrapped, the task's own
    (their traceback and wrapping left out)."""
    shown = err
    for e in _chain(err):
        shown = e
        if not _is_ray_wrapper(e):
            break
    text = str(shown).strip()
    if "Traceback (most recent call last)" in text:
        text = text.splitlines()[-1]
    text = " ".join(text.split())
    if len(text) > 500:
        text = text[:497] + "..."
    return f"{type(shown).__name__}: {text}" if text else type(shown).__name__


def find(err: BaseException, kind: type) -> BaseException | None:
    """The first exception of `kind` in err's chain (Ray and Ray Data wrap a task's own error)."""
    for e in _chain(err):
        if isinstance(e, kind) and not _is_ray_wrapper(e):
            return e
    return None


@contextmanager
def storage_step(action: str, uri: str, *, started: bool) -> Iterator[None]:
    """Turn a storage error inside the block into one line naming `uri`.

    started=False (before any work): unreachable storage is StorageUnreachable (exit 3), any other
    storage error propagates as it is for the caller's own preflight wording. started=True: every
    storage error is a StorageFailure.
    """
    try:
        yield
    except (PreflightError, StorageFailure):
        raise
    except Exception as e:
        if not started:
            if is_unreachable(e):
                raise StorageUnreachable.of(action, uri, e) from None
            raise
        if is_storage_error(e):
            raise StorageFailure.of(action, uri, e) from None
        raise
