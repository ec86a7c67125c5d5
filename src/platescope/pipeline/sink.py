"""The driver-side sink: gathers rows per shard and writes a shard only when it is whole.

A shard is written as one Parquet part (`data/part-<shard>.parquet`), then its completion marker
(`_done/<shard>.json`, holding the shard's counts) is written last. A shard without a marker is redone
on resume and its part overwritten, so a crash at any point leaves exactly one row per input.
Rows are deduplicated by (shard, seq) in case Ray retried a task.

Why not Ray Data's own checkpointing: it records finished rows by an ID column of the *input* and
filters those inputs on restart, so a video whose first frames were written would be skipped whole on
resume and lose its remaining frames. Markers per shard (a video, or one time segment of it) have no
such gap.

A shard with no rows (a video's segment past its last frame) arrives as one completion row with
`shard_rows` 0 (pipeline.decode): it is not kept, and the shard is written as an empty part (the
table's schema, no rows) and its marker, so it counts as done and adds nothing.

Only detection rows reach the driver (images stay on the workers), and only rows of unfinished shards
are held, so the driver's memory is bounded by the shards in flight.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from platescope import storage
from platescope.pipeline.decode import CPU_PREFIX
from platescope.schema import DETECTIONS_SCHEMA
from platescope.sources.manifest import DONE_DIR, is_video_shard
from platescope.storage import S3Options

DATA_DIR = "data"


def error_kind(error: str) -> str:
    return error.split(":", 1)[0].strip() or "unknown"


def shard_counts(table: pa.Table, *, video: bool) -> dict:
    """What a shard's marker records; summaries add these up without reading the parts.

    images counts rows of still images (error rows included); frames counts decoded video frames.
    """
    errors = [e for e in table.column("error").to_pylist() if e is not None]
    frames = pc.sum(pc.is_valid(table.column("frame_index"))).as_py() or 0
    return {
        "rows": table.num_rows,
        "images": 0 if video else table.num_rows,
        "frames": frames,
        "detections": pc.sum(pc.list_value_length(table.column("scores"))).as_py() or 0,
        "errors": len(errors),
        "errors_by_kind": dict(Counter(error_kind(e) for e in errors)),
    }


@dataclass
class _Pending:
    parts: list[pa.Table] = field(default_factory=list)
    seqs: set[int] = field(default_factory=set)
    expected: int | None = None


class ShardSink:
    def __init__(self, run_dir: str, run_id: str, s3: S3Options | None):
        self.run_dir = run_dir
        self.run_id = run_id
        self.s3 = s3
        self.pending: dict[str, _Pending] = {}
        self.finished: dict[str, dict] = {}
        # CPU milliseconds by phase over the rows taken (their cpu_ms_* columns, never written)
        self.cpu_ms: Counter[str] = Counter()
        self.cpu_rows = 0

    def _count_cpu(self, rows: pa.Table) -> None:
        names = [name for name in rows.column_names if name.startswith(CPU_PREFIX)]
        for name in names:
            self.cpu_ms[name.removeprefix(CPU_PREFIX)] += pc.sum(rows.column(name)).as_py() or 0.0
        self.cpu_rows += rows.num_rows if names else 0

    def cpu_ms_per_row(self) -> dict[str, float]:
        """Mean CPU milliseconds per row taken, by phase (decode, preprocess, model, ...)."""
        return {phase: round(ms / self.cpu_rows, 3) for phase, ms in self.cpu_ms.items()} if self.cpu_rows else {}

    def add(self, batch: pa.Table) -> list[str]:
        """Take one output batch; returns the shards it completed (and wrote)."""
        completed = []
        shards = batch.column("shard")
        for shard in pc.unique(shards).to_pylist():
            if shard in self.finished:
                continue  # a retried task's rows of a shard already written
            part = batch.filter(pc.equal(shards, shard))
            state = self.pending.setdefault(shard, _Pending())
            keep = []
            for i, (seq, total) in enumerate(zip(part.column("seq").to_pylist(),
                                                 part.column("shard_rows").to_pylist())):
                if total == 0:  # the completion row of a shard with no rows: not a row of the table
                    state.expected = 0
                    continue
                if seq in state.seqs:
                    continue
                state.seqs.add(seq)
                keep.append(i)
                if total >= 0:
                    state.expected = total
            if keep:
                kept = part.take(keep)
                state.parts.append(kept)
                self._count_cpu(kept)
            if state.expected is not None and len(state.seqs) == state.expected:
                self._write(shard, pa.concat_tables(state.parts) if state.parts else None)
                del self.pending[shard]
                completed.append(shard)
        return completed

    def _write(self, shard: str, rows: pa.Table | None) -> None:
        """Write the shard's part, then its marker; `rows` None for a shard with no rows."""
        if rows is None:
            table = DETECTIONS_SCHEMA.empty_table()
        else:
            rows = rows.sort_by([("seq", "ascending")])
            table = rows.append_column("run_id", pa.array([self.run_id] * rows.num_rows, pa.string()))
            table = table.select(DETECTIONS_SCHEMA.names).cast(DETECTIONS_SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        storage.write_bytes_atomic(storage.join(self.run_dir, DATA_DIR, f"part-{shard}.parquet"),
                                   buf.getvalue(), self.s3)
        counts = shard_counts(table, video=is_video_shard(shard))
        storage.write_bytes_atomic(storage.join(self.run_dir, DONE_DIR, f"{shard}.json"),
                                   json.dumps(counts).encode(), self.s3)
        self.finished[shard] = counts
