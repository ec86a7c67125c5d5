"""read_parquet: the whole table from bytes or an open file, read on the calling thread only."""

from __future__ import annotations

import io
import threading

import pyarrow as pa
import pyarrow.parquet as pq

from platescope.parquet_read import read_parquet

TABLE = pa.table({"uri": [f"s3://b/{i}.jpg" for i in range(350)], "shard": [f"i{i // 64}" for i in range(350)],
                  "version": [f"etag-{i}" for i in range(350)], "size": list(range(350))})


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=100)  # several row groups: a read that spans them
    return buf.getvalue()


class _ThreadRecordingFile(io.BytesIO):
    """A file object that notes which threads read it."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self.readers: set[int] = set()

    def read(self, *args):
        self.readers.add(threading.get_ident())
        return super().read(*args)


def test_bytes_and_an_open_file_give_the_same_table_and_columns_select(tmp_path):
    data = _parquet_bytes(TABLE)
    path = tmp_path / "t.parquet"
    path.write_bytes(data)
    assert read_parquet(data).equals(TABLE)
    with open(path, "rb") as f:
        got = read_parquet(f, columns=["uri", "shard"])
    # The file is closed by now: the table owns what it holds.
    assert got.column_names == ["uri", "shard"]
    assert got.equals(TABLE.select(["uri", "shard"]))


def test_only_the_calling_thread_touches_the_python_file():
    """An Arrow pool thread that holds Python-owned data can outlive the call and abort the process
    at exit; so no pool thread may read the file object."""
    f = _ThreadRecordingFile(_parquet_bytes(TABLE))
    assert read_parquet(f, columns=["uri", "shard", "version"]).num_rows == TABLE.num_rows
    assert f.readers == {threading.get_ident()}
