"""decode_shard on real files: which failures become error rows, which fail the Ray task, and how far
ahead of decoding it fetches."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from PIL import ImageFile

from platescope import samples, storage
from platescope.pipeline import decode
from platescope.pipeline.decode import FETCH_WINDOW, decode_shard


def shard(*uris: str, kind: str = "image") -> dict:
    return {"shard": "s0", "entries": [{"uri": u, "kind": kind} for u in uris]}


def rows_of(item: dict, **kw) -> list[dict]:
    return list(decode_shard(item, s3=None, video_fps=1.0, max_pixels=10**8, **kw))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("decode")
    samples.write_image_dataset(str(folder), 3, seed=2, size=(64, 48))
    return sorted(str(p) for p in Path(folder).glob("*.jpg"))


@pytest.fixture(scope="module")
def many_images(tmp_path_factory) -> list[str]:
    """200 small PNGs: a shard far larger than the fetch window."""
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("many")
    paths = []
    for i in range(200):
        path = folder / f"img-{i:03d}.png"
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(path)
        paths.append(str(path))
    return paths


# -- bad inputs and failed reads are rows ------------------------------------------------------


def test_missing_and_unreadable_objects_become_read_failed_rows(tmp_path, images):
    a_dir = tmp_path / "folder.jpg"  # listed once, a folder by the time it is read: IsADirectoryError
    a_dir.mkdir()
    missing = str(tmp_path / "gone.jpg")
    rows = rows_of(shard(images[0], missing, str(a_dir), images[1]))
    assert [r["source_uri"] for r in rows] == [images[0], missing, str(a_dir), images[1]]
    assert rows[0]["error"] is None and rows[3]["error"] is None
    assert rows[1]["error"] == f"read_failed: {missing} no longer exists"
    assert rows[2]["error"].startswith("read_failed: IsADirectoryError")
    assert [r["seq"] for r in rows] == [0, 1, 2, 3] and rows[-1]["shard_rows"] == 4


def test_bad_image_bytes_become_rows_of_their_kind(tmp_path, images):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "text.jpg"
    text.write_text("not an image")
    rows = rows_of(shard(str(empty), str(text), images[0]))
    assert rows[0]["error"].startswith("empty_file:") and rows[1]["error"].startswith("not_an_image:")
    assert rows[2]["error"] is None and rows[2]["image"].shape == (48, 64, 3)


def test_a_refused_s3_connection_is_a_row(images):
    """What s3fs really raises when the endpoint is not there, after its retries (one here, to be
    quick): botocore's EndpointConnectionError, which is no OSError."""
    import socket

    import s3fs

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fs = s3fs.S3FileSystem(endpoint_url=f"http://127.0.0.1:{port}", key="k", secret="s", skip_instance_cache=True,
                           config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": 1},
                           client_kwargs={"region_name": "us-east-1"})
    fs.retries = 1  # s3fs's own retries (a class attribute; 5 by default)

    def read(uri: str, s3) -> bytes:
        if storage.is_s3(uri):
            return fs.cat_file(uri[len("s3://"):])
        return storage.read_bytes(uri, s3)

    rows = rows_of(shard("s3://bucket/a.jpg", images[0]), read=read)
    assert rows[0]["error"].startswith("read_failed: EndpointConnectionError"), rows[0]["error"]
    assert rows[1]["error"] is None


def test_a_missing_s3_object_is_a_row(s3_server, s3_bucket, images):
    storage.write_bytes_atomic(f"{s3_bucket}/there.jpg", Path(images[0]).read_bytes(), s3_server.options())
    item = shard(f"{s3_bucket}/there.jpg", f"{s3_bucket}/not-there.jpg")
    rows = list(decode_shard(item, s3=s3_server.options(), video_fps=1.0, max_pixels=10**8))
    assert rows[0]["error"] is None
    assert rows[1]["error"] == f"read_failed: {s3_bucket}/not-there.jpg no longer exists"


class DroppingS3:
    """An endpoint on 127.0.0.1 that answers every GET with its headers and a few bytes of a JPEG,
    then drops the connection: what a reset mid-download looks like to s3fs."""

    def __init__(self):
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.endpoint_url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    @staticmethod
    def _answer(conn):
        head = (b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\nContent-Type: image/jpeg\r\nETag: \"e\"\r\n"
                b"Last-Modified: Wed, 21 Oct 2026 07:28:00 GMT\r\n\r\n")
        buf = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                request, buf = buf.split(b"\r\n\r\n", 1)
                if request.startswith(b"HEAD "):
                    conn.sendall(head)
                    continue
                conn.sendall(head + b"\xff\xd8\xff\xe0" * 8)
                return  # closed long before the promised 100000 bytes

    def close(self):
        self.sock.close()


def test_a_connection_dropped_mid_download_is_a_row(images):
    """What s3fs really raises when the connection drops mid-body, once its retries are spent:
    aiohttp's ClientPayloadError, which is no OSError."""
    from platescope.storage import S3Options

    server = DroppingS3()
    try:
        s3 = S3Options(endpoint_url=server.endpoint_url, region="us-east-1", access_key_id="k",
                       secret_access_key="s")
        rows = list(decode_shard(shard("s3://bucket/a.jpg", images[0]), s3=s3, video_fps=1.0, max_pixels=10**8))
    finally:
        server.close()
    assert rows[0]["error"].startswith("read_failed: ClientPayloadError"), rows[0]["error"]
    assert rows[1]["error"] is None


def test_denied_s3_access_is_a_row(s3_server, s3_bucket, images):
    from platescope.storage import S3Options

    storage.write_bytes_atomic(f"{s3_bucket}/a.jpg", Path(images[0]).read_bytes(), s3_server.options())
    wrong = S3Options(endpoint_url=s3_server.endpoint_url, region=s3_server.region,
                      access_key_id=s3_server.access_key_id, secret_access_key="not-the-secret")
    (row,) = list(decode_shard(shard(f"{s3_bucket}/a.jpg"), s3=wrong, video_fps=1.0, max_pixels=10**8))
    assert row["error"].startswith("read_failed: PermissionError"), row["error"]


def test_storage_failures_and_bad_inputs_are_rows_and_nothing_else_is():
    import aiohttp
    import botocore.exceptions

    from platescope.pipeline.decode import is_input_failure
    from platescope.sources import InputError

    for err in (InputError("corrupt_image", "x"), FileNotFoundError(), PermissionError(), ConnectionResetError(),
                TimeoutError(), OSError(5, "EIO"), botocore.exceptions.EndpointConnectionError(endpoint_url="u"),
                botocore.exceptions.ConnectionClosedError(endpoint_url="u"),
                aiohttp.ClientPayloadError("payload"), aiohttp.ServerDisconnectedError()):
        assert is_input_failure(err), err
    for err in (TypeError(), AttributeError(), KeyError("k"), MemoryError(),
                RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True"), ValueError(), AssertionError()):
        assert not is_input_failure(err), err


# -- bugs fail the Ray task --------------------------------------------------------------------


@pytest.mark.parametrize("error", [TypeError("a bug"), AttributeError("a bug"), KeyError("uri"), MemoryError()])
def test_programming_errors_propagate_instead_of_becoming_rows(images, error):
    def read(uri, s3):
        if uri == images[1]:
            raise error
        return storage.read_bytes(uri, s3)

    with pytest.raises(type(error)):
        rows_of(shard(*images), read=read)


def test_pil_accepting_truncated_files_fails_the_task(images, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        rows_of(shard(*images))


def test_a_bug_in_the_video_path_propagates(tmp_path):
    video = tmp_path / "clip.mp4"
    samples.write_video(str(video), num_frames=5, fps=5, seed=0)
    item = shard(str(video), kind="video")
    assert len(rows_of(item)) == 1  # 1 fps over a second of video: one frame, no error
    with pytest.raises(ValueError, match="fps"):
        list(decode_shard(item, s3=None, video_fps=float("nan"), max_pixels=10**8))


def test_a_video_that_cannot_be_read_is_a_row(tmp_path):
    missing = str(tmp_path / "gone.mp4")
    (row,) = rows_of(shard(missing, kind="video"))
    assert row["error"] == f"read_failed: {missing} no longer exists"


# -- bounded prefetch --------------------------------------------------------------------------


class CountingReader:
    """storage.read_bytes, counting the objects fetched and not yet consumed (the consumer reports
    each row it takes) and the most there ever were."""

    def __init__(self):
        self.lock = threading.Lock()
        self.fetched = 0
        self.consumed = 0
        self.max_outstanding = 0
        self.order: list[str] = []

    def __call__(self, uri: str, s3) -> bytes:
        data = storage.read_bytes(uri, s3)
        with self.lock:
            self.fetched += 1
            self.max_outstanding = max(self.max_outstanding, self.fetched - self.consumed)
        return data

    def took_one(self) -> None:
        with self.lock:
            self.consumed += 1


def test_fetches_stay_within_the_window_while_the_consumer_is_slow(many_images):
    reader = CountingReader()
    taken = []
    for row in decode_shard(shard(*many_images), s3=None, video_fps=1.0, max_pixels=10**8, read=reader):
        reader.took_one()
        taken.append(row)
        if len(taken) <= 40:
            time.sleep(0.005)  # a slow consumer: the fetch threads would run ahead if they could
    assert [r["source_uri"] for r in taken] == many_images  # order kept
    assert [int(r["image"][0, 0, 0]) for r in taken] == list(range(200))
    assert reader.fetched == 200
    # The window, plus the row decode_shard holds back to mark the shard's last one.
    assert reader.max_outstanding <= FETCH_WINDOW + 1, reader.max_outstanding


def test_prefetch_keeps_order_and_the_window_with_uneven_fetch_times():
    in_flight = 0
    most = 0
    lock = threading.Lock()

    def fetch(i: int) -> int:
        nonlocal in_flight, most
        with lock:
            in_flight += 1
            most = max(most, in_flight)
        time.sleep(0.001 * (i % 5))
        return i * i

    out = []
    for i, future in decode.prefetch(range(100), fetch, window=6, num_threads=4):
        out.append((i, future.result()))
        with lock:
            in_flight -= 1
    assert out == [(i, i * i) for i in range(100)]
    assert most <= 6


def test_prefetch_passes_a_fetch_error_to_its_item():
    def fetch(i: int) -> int:
        if i == 2:
            raise OSError("boom")
        return i

    got = []
    for i, future in decode.prefetch(range(4), fetch, window=2):
        try:
            got.append(future.result())
        except OSError as e:
            got.append(str(e))
    assert got == [0, 1, "boom", 3]


# -- CPU time per row ----------------------------------------------------------------------------


def test_each_row_carries_the_cpu_its_decode_took(tmp_path):
    """A large image costs measurably more decode CPU than a tiny one; a read failure costs ~none."""
    import numpy as np
    from PIL import Image

    big, small = tmp_path / "big.png", tmp_path / "small.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (2000, 2000, 3), np.uint8)).save(big)  # noise: slow to inflate
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(small)
    item = shard(str(big), str(small), str(tmp_path / "gone.png"))
    rows_of(item)  # the first failure imports the storage clients' error classes: not decode work
    ms = [r["cpu_ms_decode"] for r in rows_of(item)]
    assert all(isinstance(v, float) and v >= 0 for v in ms)
    assert ms[0] > 10 * max(ms[1], ms[2], 0.1)


def test_a_phase_clock_adds_up_cpu_by_phase_until_taken():
    from platescope.cputime import PhaseClock

    clock = PhaseClock()
    with clock.phase("busy"):
        deadline = time.process_time() + 0.05
        while time.process_time() < deadline:
            pass
    with clock.phase("idle"):
        time.sleep(0.05)  # waiting costs no CPU
    taken = clock.take()
    assert taken["busy"] >= 50 and taken["idle"] < 10
    assert clock.take() == {}
