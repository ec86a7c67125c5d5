"""platescope.storage on local disk (the S3 side is tests/ray/test_s3_storage.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from platescope import storage

AWKWARD_KEY = "a b#c%20d/ümlaut 車.jpg"


def _tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def test_list_objects_is_recursive_and_sorted(tmp_path: Path):
    files = {"b.jpg": b"bb", "a/z.jpg": b"z" * 5, "a/deep/er/x.png": b"", "c/y.mp4": b"yyy"}
    _tree(tmp_path, files)

    objs = storage.list_objects(str(tmp_path))

    assert [o.uri for o in objs] == sorted(str(tmp_path / rel) for rel in files)
    for o in objs:
        rel = os.path.relpath(o.uri, tmp_path)
        assert o.size == len(files[rel])
        assert o.version  # mtime locally: something that changes when the file does


def test_list_objects_version_changes_when_file_changes(tmp_path: Path):
    f = tmp_path / "x.jpg"
    f.write_bytes(b"1")
    os.utime(f, (1_000_000, 1_000_000))
    before = storage.list_objects(str(f))[0].version
    f.write_bytes(b"22")
    os.utime(f, (2_000_000, 2_000_000))
    after = storage.list_objects(str(f))[0]
    assert after.version != before and after.size == 2


def test_list_objects_of_missing_path_names_it(tmp_path: Path):
    missing = tmp_path / "nope" / "here"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        storage.list_objects(str(missing))


def test_list_objects_of_a_file_lists_that_file(tmp_path: Path):
    f = tmp_path / "one.jpg"
    f.write_bytes(b"abc")
    (tmp_path / "other.jpg").write_bytes(b"x")

    (obj,) = storage.list_objects(str(f))
    assert obj.uri == str(f) and obj.size == 3


def test_file_uri_scheme_is_a_local_path(tmp_path: Path):
    _tree(tmp_path, {"d/e.jpg": b"e"})
    objs = storage.list_objects(f"file://{tmp_path}/d")
    assert [o.uri for o in objs] == [str(tmp_path / "d" / "e.jpg")]
    assert storage.read_bytes(f"file://{tmp_path}/d/e.jpg") == b"e"


def test_write_bytes_atomic_creates_parents_and_leaves_no_temp_files(tmp_path: Path):
    target = tmp_path / "out" / "run-1" / "part-0.parquet"
    storage.write_bytes_atomic(str(target), b"first")
    storage.write_bytes_atomic(str(target), b"second, longer")

    assert target.read_bytes() == b"second, longer"
    assert sorted(p.name for p in target.parent.iterdir()) == ["part-0.parquet"]
    assert storage.read_bytes(str(target)) == b"second, longer"
    assert storage.exists(str(target))


def test_open_read_is_seekable(tmp_path: Path):
    f = tmp_path / "v.bin"
    f.write_bytes(bytes(range(256)))
    with storage.open_read(str(f)) as fh:
        fh.seek(250)
        assert fh.read() == bytes(range(250, 256))


def test_check_writable_passes_on_a_writable_dir(tmp_path: Path):
    storage.check_writable(str(tmp_path / "new" / "dir"))
    # The probe is removed again; only the folder it needed remains.
    assert list((tmp_path / "new" / "dir").iterdir()) == []


def test_check_writable_fails_under_a_regular_file(tmp_path: Path):
    # Tests may run as root, whom chmod does not stop; nothing can create a folder inside a file.
    f = tmp_path / "plain-file"
    f.write_bytes(b"")
    with pytest.raises(OSError):
        storage.check_writable(str(f / "sub"))


def test_join():
    assert storage.join("s3://bucket/prefix/", "a", "b.jpg") == "s3://bucket/prefix/a/b.jpg"
    assert storage.join("s3://bucket", "x") == "s3://bucket/x"
    assert storage.join("/data/in", "a", "b.jpg") == os.path.join("/data/in", "a", "b.jpg")
    assert storage.join("file:///data/in", "b.jpg") == os.path.join("/data/in", "b.jpg")


def test_awkward_key_names_list_and_read_back(tmp_path: Path):
    files = {AWKWARD_KEY: b"awkward", "plain.jpg": b"plain", "100% #1/x y.png": b"pct"}
    for rel, data in files.items():
        storage.write_bytes_atomic(storage.join(str(tmp_path), rel), data)

    objs = storage.list_objects(str(tmp_path))

    assert [o.uri for o in objs] == sorted(str(tmp_path / rel) for rel in files)
    for o in objs:
        assert storage.read_bytes(o.uri) == files[os.path.relpath(o.uri, tmp_path)]
    assert storage.exists(str(tmp_path / AWKWARD_KEY))
    assert not storage.exists(str(tmp_path / "a b#c%20d" / "missing.jpg"))


def test_remove_is_recursive_and_tolerates_missing(tmp_path: Path):
    _tree(tmp_path, {"r/a/b.jpg": b"1", "r/c.jpg": b"2"})
    storage.remove(str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()
    storage.remove(str(tmp_path / "r"))  # already gone: no error


@pytest.mark.parametrize("form", ["absolute", "trailing slash", "file://", "relative"])
def test_download_dir_copies_a_local_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, form: str):
    src = tmp_path / "src"
    _tree(src, {"m/config.json": b"{}", "m/w/model.safetensors": b"w", AWKWARD_KEY: b"k"})
    dest = tmp_path / "dest"
    monkeypatch.chdir(tmp_path)
    uri = {"absolute": str(src), "trailing slash": f"{src}/", "file://": f"file://{src}/",
           "relative": "src"}[form]

    assert storage.download_dir(uri, str(dest)) == str(dest)

    got = {str(p.relative_to(dest)): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert got == {"m/config.json": b"{}", "m/w/model.safetensors": b"w", AWKWARD_KEY: b"k"}


@pytest.mark.parametrize("uri", ["http://example.com/x.jpg", "https://h/a", "gs://bucket/key", "hf://org/m"])
def test_unsupported_scheme_raises_value_error(uri: str):
    with pytest.raises(ValueError, match="unsupported"):
        storage.list_objects(uri)
    with pytest.raises(ValueError):
        storage.read_bytes(uri)


@pytest.mark.shared_data
def test_lists_the_shared_plate_images(shared_data_dir: Path):
    images = shared_data_dir / "plates" / "images"
    objs = storage.list_objects(str(images))
    assert objs and all(o.uri.startswith(str(images) + os.sep) and o.size > 0 for o in objs)
    assert [o.uri for o in objs] == sorted(o.uri for o in objs)


def test_a_write_killed_before_its_rename_leaves_only_a_hidden_file(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = pa.table({"x": [1, 2]})
    sink = pa.BufferOutputStream()
    pq.write_table(good, sink)
    storage.write_bytes_atomic(str(tmp_path / "part-0.parquet"), sink.getvalue().to_pybytes())

    def killed(*_args, **_kwargs):
        raise KeyboardInterrupt("killed before the rename")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        storage.write_bytes_atomic(str(tmp_path / "part-1.parquet"), b"PAR1 half written")
    monkeypatch.undo()
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != "part-0.parquet")
    assert leftovers and all(name.startswith(".") for name in leftovers)
    assert pq.read_table(tmp_path).num_rows == 2  # a Parquet reader of the folder skips it


def test_s3_options_never_show_their_keys_yet_pickle_whole():
    """S3Options rides in Ray task and actor arguments and Ray Train's loop config: printed in a log
    line or a traceback (alone or inside the dicts that carry it) it must not show the keys."""
    import pickle
    import pprint

    opts = storage.S3Options(endpoint_url="http://minio:hunter2-in-url@127.0.0.1:9000", region="us-east-1",
                             access_key_id="AKIAEXAMPLEKEYID", secret_access_key="wJalrXUtnFEMI-secret")
    for shown in (repr(opts), str(opts), f"{opts}", pprint.pformat(opts), repr({"s3": opts}), str([opts])):
        assert "wJalrXUtnFEMI-secret" not in shown and "AKIAEXAMPLEKEYID" not in shown, shown
        assert "hunter2-in-url" not in shown, shown
        assert "127.0.0.1:9000" in shown and "us-east-1" in shown  # what is not secret still helps
    assert repr(storage.S3Options()).count("None") == 4  # unset keys say so
    back = pickle.loads(pickle.dumps(opts))  # Ray pickles it to the workers: the keys must arrive
    assert back == opts and back.secret_access_key == "wJalrXUtnFEMI-secret"
    assert back.fs_kwargs()["secret"] == "wJalrXUtnFEMI-secret"
