"""platescope.storage against a real S3 server (SeaweedFS on loopback, see tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from platescope import storage

AWKWARD_KEY = "a b#c%20d/ümlaut 車.jpg"
FILES = {
    "plain.jpg": b"plain",
    AWKWARD_KEY: b"awkward",
    "100% #1/x y.png": b"pct",
    "deep/er/still/frame.mp4": b"v" * 1000,
}


def _upload(prefix: str, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        storage.write_bytes_atomic(storage.join(prefix, rel), data)


def test_list_objects_is_recursive_sorted_and_reads_back(s3_env, s3_bucket):
    prefix = f"{s3_bucket}/in/put"
    _upload(prefix, FILES)
    storage.write_bytes_atomic(f"{s3_bucket}/in/putter.jpg", b"not under the prefix")

    objs = storage.list_objects(prefix)

    assert [o.uri for o in objs] == sorted(f"{prefix}/{rel}" for rel in FILES)
    for o in objs:
        data = FILES[o.uri[len(prefix) + 1:]]
        assert o.size == len(data)
        assert storage.read_bytes(o.uri) == data
        with storage.open_read(o.uri) as fh:
            assert fh.read() == data
    # A trailing slash names the same prefix.
    assert [o.uri for o in storage.list_objects(prefix + "/")] == [o.uri for o in objs]


def test_version_is_the_etag(s3_env, s3_bucket):
    uri = f"{s3_bucket}/{AWKWARD_KEY}"
    storage.write_bytes_atomic(uri, b"one")
    head = s3_env.client().head_object(Bucket=s3_bucket[len("s3://"):], Key=AWKWARD_KEY)

    (obj,) = storage.list_objects(uri)  # a single object lists itself
    assert obj.uri == uri and obj.size == 3
    assert obj.version == head["ETag"].strip('"')
    assert storage.list_objects(s3_bucket)[0].version == obj.version  # same from a listing

    storage.write_bytes_atomic(uri, b"two!")
    assert storage.list_objects(uri)[0].version != obj.version


def test_open_read_seeks(s3_env, s3_bucket):
    uri = f"{s3_bucket}/blob.bin"
    storage.write_bytes_atomic(uri, bytes(range(256)) * 4)
    with storage.open_read(uri) as fh:
        fh.seek(1020)
        assert fh.read() == bytes(range(252, 256))


def test_missing_prefix_raises_file_not_found(s3_env, s3_bucket):
    with pytest.raises(FileNotFoundError, match="nothing/here"):
        storage.list_objects(f"{s3_bucket}/nothing/here")
    assert not storage.exists(f"{s3_bucket}/nothing/here")


def test_missing_bucket_raises_file_not_found(s3_env):
    with pytest.raises(FileNotFoundError, match="no-such-bucket-platescope"):
        storage.list_objects("s3://no-such-bucket-platescope/x")


def test_check_writable(s3_env, s3_bucket):
    storage.check_writable(f"{s3_bucket}/out/run-1")
    # The probe is deleted again. (SeaweedFS may keep the empty "folder" as a common prefix, so
    # ask for objects rather than whether the prefix exists.)
    listed = s3_env.client().list_objects_v2(Bucket=s3_bucket[len("s3://"):], Prefix="out/")
    assert listed.get("Contents", []) == []
    storage.check_writable(s3_bucket)


def test_check_writable_fails_on_a_missing_bucket(s3_env):
    with pytest.raises(Exception):  # noqa: B017 - any error with its reason will do
        storage.check_writable("s3://no-such-bucket-platescope/out")


def test_remove_deletes_a_prefix(s3_env, s3_bucket):
    _upload(f"{s3_bucket}/r", {"a/b.jpg": b"1", "c.jpg": b"2"})
    _upload(f"{s3_bucket}/keep", {"k.jpg": b"3"})
    storage.remove(f"{s3_bucket}/r")
    assert [o.uri for o in storage.list_objects(s3_bucket)] == [f"{s3_bucket}/keep/k.jpg"]


def test_download_dir_copies_a_nested_prefix(s3_env, s3_bucket, tmp_path: Path):
    _upload(f"{s3_bucket}/models/m1", FILES)
    _upload(f"{s3_bucket}/models", {"m1.txt": b"sibling, not inside m1"})
    dest = tmp_path / "cache" / "m1"

    assert storage.download_dir(f"{s3_bucket}/models/m1/", str(dest)) == str(dest)

    got = {str(p.relative_to(dest)): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert got == FILES


def test_explicit_s3_options_need_no_environment(s3_server, s3_bucket, monkeypatch):
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    opts = storage.S3Options(endpoint_url=s3_server.endpoint_url, region="us-east-1",
                             access_key_id=s3_server.access_key_id,
                             secret_access_key=s3_server.secret_access_key)
    uri = f"{s3_bucket}/{AWKWARD_KEY}"

    storage.write_bytes_atomic(uri, b"explicit", opts)
    assert [o.uri for o in storage.list_objects(s3_bucket, opts)] == [uri]
    assert storage.read_bytes(uri, opts) == b"explicit"
    storage.check_writable(s3_bucket, opts)


@pytest.mark.parametrize("what", ["listing the bucket", "listing a prefix", "reading", "writing"])
def test_wrong_credentials_fail(s3_server, s3_bucket, monkeypatch, what):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    s3_server.make_bucket(s3_bucket[len("s3://"):])
    uri = f"{s3_bucket}/x.jpg"
    storage.write_bytes_atomic(uri, b"x", storage.S3Options(
        endpoint_url=s3_server.endpoint_url, access_key_id=s3_server.access_key_id,
        secret_access_key=s3_server.secret_access_key))
    bad = storage.S3Options(endpoint_url=s3_server.endpoint_url, region="us-east-1",
                            access_key_id=s3_server.access_key_id, secret_access_key="wrong-secret")

    # A refused request must say so, not pass for a missing object.
    with pytest.raises(PermissionError):
        if what == "listing the bucket":
            storage.list_objects(s3_bucket, bad)
        elif what == "listing a prefix":
            storage.list_objects(f"{s3_bucket}/x", bad)
        elif what == "reading":
            storage.read_bytes(uri, bad)
        else:
            storage.write_bytes_atomic(f"{s3_bucket}/y.jpg", b"y", bad)
