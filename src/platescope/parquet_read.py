"""Reading Parquet from a Python file object or bytes, with nothing of the read left on Arrow's threads.

Why not Arrow's defaults: a read through a Python object hands Arrow buffers that Python owns, and
releasing one takes the GIL. With threads (`use_threads`; `pre_buffer`, which reads ahead on Arrow's I/O
threads; or `pq.read_table`, whose dataset scanner does both) a pool thread may drop the last reference
to such a buffer just after the call returned; if the interpreter is finalising by then, that thread
exits inside Arrow's C++ and the process aborts after its work is done ("terminate called without an
active exception", exit -6; apache/arrow#33975 and #34314). Reading on the calling thread leaves nothing
behind. What is read this way is small, or read batch by batch, so one thread costs little.
"""

from __future__ import annotations

import io
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq


def open_parquet(source: BinaryIO | bytes) -> pq.ParquetFile:
    """A reader of `source` (a seekable binary file object, or the file's bytes) that reads nothing
    ahead; pass `use_threads=False` to what reads from it (`read`, `iter_batches`)."""
    return pq.ParquetFile(io.BytesIO(source) if isinstance(source, bytes) else source, pre_buffer=False)


def read_parquet(source: BinaryIO | bytes, columns: list[str] | None = None) -> pa.Table:
    """The table in `source` (a seekable binary file object, or the file's bytes); `columns` only if given."""
    return open_parquet(source).read(columns=columns, use_threads=False)
