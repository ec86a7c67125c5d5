"""URIs for local paths and s3:// objects, through fsspec.

Everything that touches inputs, outputs or model dirs goes through here, so local disk and object
storage behave the same (keys with spaces, '#', '%' and non-ASCII characters included).
S3 endpoint and credentials come from the usual AWS environment variables unless `S3Options` sets
them; botocore does the retries.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


@dataclass(frozen=True)
class S3Options:
    """How to reach S3; None means "take it from the AWS environment" (AWS_ENDPOINT_URL, ...).

    It travels in Ray task and actor arguments and in Ray Train's loop config (pickled whole: the
    workers need the keys), where any log line or traceback that prints it would show them. So its
    repr (and str) says only whether a key is set, and masks a password in the endpoint URL.
    """

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    anon: bool = False

    MASK = "**********"  # as pydantic's SecretStr shows a secret

    def __repr__(self) -> str:
        def key(value: str | None) -> str:
            return "None" if value is None else repr(self.MASK)

        return (f"S3Options(endpoint_url={self._masked_url(self.endpoint_url)!r}, region={self.region!r}, "
                f"access_key_id={key(self.access_key_id)}, secret_access_key={key(self.secret_access_key)}, "
                f"anon={self.anon!r})")

    __str__ = __repr__

    @classmethod
    def _masked_url(cls, url: str | None) -> str | None:
        """`scheme://user:password@host/...` with the password masked; any other URL as it is."""
        import urllib.parse

        if not url or "@" not in url:
            return url
        try:
            parts = urllib.parse.urlsplit(url)
            password = parts.password
        except ValueError:  # unparseable: show nothing of it
            return cls.MASK
        if password is None:
            return url
        userinfo, _, host = parts.netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:{cls.MASK}@{host}"))

    def fs_kwargs(self) -> dict[str, Any]:
        endpoint = self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
            "AWS_ENDPOINT_URL"
        )
        kwargs: dict[str, Any] = {"anon": self.anon, "use_listings_cache": False}
        if endpoint:
            kwargs["endpoint_url"] = endpoint
        if self.region:
            kwargs["client_kwargs"] = {"region_name": self.region}
        if self.access_key_id:
            kwargs["key"] = self.access_key_id
        if self.secret_access_key:
            kwargs["secret"] = self.secret_access_key
        return kwargs


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def _local_path(uri: str) -> str:
    return uri.removeprefix("file://")


def absolute(uri: str) -> str:
    """The same place from any working directory: a local path (or file://) made absolute, s3:// as it is."""
    return uri if is_s3(uri) else os.path.abspath(_local_path(uri))


def filesystem(uri: str, s3: S3Options | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem that holds `uri` and the path to hand it."""
    if is_s3(uri):
        import s3fs

        return s3fs.S3FileSystem(**(s3 or S3Options()).fs_kwargs()), uri[len("s3://"):]
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"{uri}: unsupported URI scheme (use a local path or s3://bucket/prefix)")
    return LocalFileSystem(), os.path.abspath(_local_path(uri))


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return path if isinstance(fs, LocalFileSystem) else "s3://" + path.lstrip("/")


def join(uri: str, *parts: str) -> str:
    if is_s3(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(_local_path(uri), *parts)


@dataclass(frozen=True)
class ObjectInfo:
    uri: str
    size: int
    version: str  # what changes when the object changes: ETag on S3, mtime locally


def _info(fs: fsspec.AbstractFileSystem, path: str, info: dict[str, Any]) -> ObjectInfo:
    version = info.get("ETag") or info.get("mtime") or info.get("LastModified") or ""
    return ObjectInfo(uri=to_uri(fs, path), size=int(info.get("size") or 0), version=str(version).strip('"'))


def list_objects(uri: str, s3: S3Options | None = None) -> list[ObjectInfo]:
    """Every file at or under `uri`, recursively, sorted by URI. Raises FileNotFoundError if none."""
    fs, path = filesystem(uri, s3)
    # info() rather than exists(): s3fs's exists() answers False for a bucket it may not read,
    # which would turn wrong credentials into "not found"; info() raises PermissionError.
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: no such file, folder or prefix") from None
    if info.get("type") != "directory":
        return [_info(fs, path, info)]
    found = fs.find(path, detail=True)
    return sorted((_info(fs, p, i) for p, i in found.items() if i.get("type") != "directory"),
                  key=lambda o: o.uri)


def read_bytes(uri: str, s3: S3Options | None = None) -> bytes:
    fs, path = filesystem(uri, s3)
    with fs.open(path, "rb") as f:
        return f.read()


def open_read(uri: str, s3: S3Options | None = None, *, block_size: int | None = None):
    """A seekable binary file object (streams from S3 in blocks rather than reading it whole).

    `block_size` is what one S3 range read fetches (s3fs's default is 50 MiB, read ahead of each
    miss): smaller for a reader that seeks around and reads little, like a video's header probe or
    one time segment of it."""
    fs, path = filesystem(uri, s3)
    return fs.open(path, "rb") if block_size is None else fs.open(path, "rb", block_size=block_size)


def exists(uri: str, s3: S3Options | None = None) -> bool:
    fs, path = filesystem(uri, s3)
    return fs.exists(path)


def write_bytes_atomic(uri: str, data: bytes, s3: S3Options | None = None) -> None:
    """Readers see either the old object or the whole new one, never a part.

    An S3 PUT is atomic already; on local disk we write a temporary sibling and rename it.
    """
    fs, path = filesystem(uri, s3)
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # Hidden name: a writer killed mid-write leaves a file that Parquet readers (pyarrow, Spark)
        # and the run's own marker scan skip, instead of a half-written part.
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def remove(uri: str, s3: S3Options | None = None) -> None:
    fs, path = filesystem(uri, s3)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def check_writable(uri: str, s3: S3Options | None = None) -> None:
    """Write and delete a probe object under `uri`; raises with the reason if that fails."""
    probe = join(uri, f".platescope-write-probe-{uuid.uuid4().hex}")
    write_bytes_atomic(probe, b"ok", s3)
    remove(probe, s3)


def download_dir(uri: str, dest: str, s3: S3Options | None = None) -> str:
    """Copy a remote folder to local `dest` (kept as a cache keyed by the caller); returns dest."""
    fs, root = filesystem(uri, s3)
    root = root.rstrip("/")
    dest_abs = os.path.abspath(dest)
    os.makedirs(dest, exist_ok=True)
    for obj in list_objects(uri, s3):
        # Relative to the filesystem path, not to `uri`: "file://", relative local paths and
        # trailing slashes make the URI and the listed paths differ in length.
        path = filesystem(obj.uri, s3)[1]
        rel = path[len(root) + 1:] if path != root else posixpath.basename(path)
        target = os.path.abspath(os.path.join(dest, rel))
        if not target.startswith(dest_abs + os.sep):
            raise ValueError(f"{obj.uri}: key escapes the destination folder {dest}")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fs.get_file(path, target)
    return dest


def upload_dir(local: str, uri: str, s3: S3Options | None = None) -> str:
    """Copy the local folder `local` to `uri` (local or s3://), file by file; returns uri."""
    fs, root = filesystem(uri, s3)
    for folder, _, files in os.walk(local):
        for name in files:
            rel = os.path.relpath(os.path.join(folder, name), local).replace(os.sep, "/")
            target = posixpath.join(root, rel) if not isinstance(fs, LocalFileSystem) else os.path.join(root, rel)
            if isinstance(fs, LocalFileSystem):
                os.makedirs(os.path.dirname(target), exist_ok=True)
            fs.put_file(os.path.join(folder, name), target)
    return uri


def arrow_filesystem(uri: str, s3: S3Options | None = None):
    """(pyarrow filesystem, path) for libraries that take pyarrow's (Ray Train's storage): S3 goes
    through the same s3fs client, so endpoint and credentials resolve exactly as everywhere else."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri, s3)
    if isinstance(fs, LocalFileSystem):
        return pafs.LocalFileSystem(), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


# -- Conditional writes: the primitive a run's ownership lease is built on -------------------------
#
# A version is an opaque string that changes whenever the object changes: the ETag on S3, a hash of
# the content on local disk. On S3 the conditions are the server's (`If-None-Match: *`, `If-Match`),
# so they hold across machines; AWS S3, SeaweedFS and MinIO enforce them. On local disk a create is
# os.link of a complete temporary file (atomic, fails if the name exists) and a compare-and-replace
# holds an flock on the folder while it reads, compares and renames, so it is atomic among
# processes of any host whose filesystem honours flock (local disks; NFSv4).


class PreconditionFailed(Exception):
    """The object is not at the version the caller named (changed, replaced or removed meanwhile)."""


def _content_version(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()[:32]


class _FolderLock:
    """flock on a local folder: serialises read-compare-write sequences on the files in it."""

    def __init__(self, folder: str):
        self.folder = folder
        self.fd: int | None = None

    def __enter__(self) -> _FolderLock:
        import fcntl

        self.fd = os.open(self.folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the flock
            self.fd = None


def _s3_precondition_failed(err: BaseException) -> bool:
    """Whether err (as s3fs raises it, the botocore error as its cause) is HTTP 412."""
    seen: BaseException | None = err
    while seen is not None:
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            code = (response.get("Error") or {}).get("Code")
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "412") or status == 412:
                return True
        seen = seen.__cause__ or seen.__context__
    return False


def _s3_call(uri: str, s3: S3Options | None, method: str, **kwargs: Any) -> dict[str, Any]:
    fs, path = filesystem(uri, s3)
    bucket, key, _ = fs.split_path(path)
    return fs.call_s3(method, Bucket=bucket, Key=key, **kwargs)


def create_exclusive(uri: str, data: bytes, s3: S3Options | None = None) -> str:
    """Create the object only if nothing is there; returns its version. Raises FileExistsError if
    something is (a concurrent creator included: exactly one of them succeeds)."""
    fs, path = filesystem(uri, s3)
    if isinstance(fs, LocalFileSystem):
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        tmp = _write_hidden_sibling(path, data)
        try:
            with _FolderLock(folder):
                os.link(tmp, path)  # FileExistsError when the name is taken
        finally:
            os.unlink(tmp)
        return _content_version(data)
    try:
        out = _s3_call(uri, s3, "put_object", Body=data, IfNoneMatch="*")
    except Exception as e:
        if _s3_precondition_failed(e) or isinstance(e, FileExistsError):
            raise FileExistsError(f"{uri}: already exists") from None
        raise
    return str(out.get("ETag", ""))


def read_versioned(uri: str, s3: S3Options | None = None) -> tuple[bytes, str]:
    """The object's bytes and their version, read in one request. Raises FileNotFoundError."""
    fs, path = filesystem(uri, s3)
    if isinstance(fs, LocalFileSystem):
        with open(path, "rb") as f:
            data = f.read()
        return data, _content_version(data)
    from fsspec.asyn import sync

    bucket, key, _ = fs.split_path(path)

    async def get() -> tuple[bytes, str]:
        response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        body = response["Body"]
        try:
            return await body.read(), str(response.get("ETag", ""))
        finally:
            body.close()

    return sync(fs.loop, get)


def replace_if_version(uri: str, data: bytes, version: str, s3: S3Options | None = None) -> str:
    """Overwrite the object only if it is still at `version`; returns the new version. Raises
    PreconditionFailed if it changed or is gone."""
    fs, path = filesystem(uri, s3)
    if isinstance(fs, LocalFileSystem):
        tmp = _write_hidden_sibling(path, data)
        try:
            with _FolderLock(os.path.dirname(path)):
                _check_version(uri, version)
                os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return _content_version(data)
    return str(_s3_if_match(uri, s3, "put_object", version, Body=data).get("ETag", ""))


def delete_if_version(uri: str, version: str, s3: S3Options | None = None) -> None:
    """Delete the object only if it is still at `version`. Raises PreconditionFailed otherwise."""
    fs, path = filesystem(uri, s3)
    if isinstance(fs, LocalFileSystem):
        with _FolderLock(os.path.dirname(path)):
            _check_version(uri, version)
            os.unlink(path)
        return
    _s3_if_match(uri, s3, "delete_object", version)


def _write_hidden_sibling(path: str, data: bytes) -> str:
    """`data` in a hidden temporary file beside `path`, flushed to disk; returns its path."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def _check_version(uri: str, version: str) -> None:
    """Raise PreconditionFailed unless the local file is at `version` (call under its _FolderLock)."""
    try:
        current = read_versioned(uri)[1]
    except FileNotFoundError:
        raise PreconditionFailed(f"{uri}: gone") from None
    if current != version:
        raise PreconditionFailed(f"{uri}: changed")


def _s3_if_match(uri: str, s3: S3Options | None, method: str, version: str, **kwargs: Any) -> dict[str, Any]:
    try:
        return _s3_call(uri, s3, method, IfMatch=version, **kwargs)
    except FileNotFoundError:
        raise PreconditionFailed(f"{uri}: gone") from None
    except Exception as e:
        if _s3_precondition_failed(e):
            raise PreconditionFailed(f"{uri}: changed") from None
        raise
