"""Reading a detections table in batches: a run folder of `detect`, a folder of Parquet, or one file.

The table is never held whole: files are read one at a time, a few thousand rows per batch, and only
the columns evaluation needs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from platescope import storage
from platescope.parquet_read import open_parquet
from platescope.storage import S3Options

COLUMNS = ["source_uri", "frame_index", "width", "height", "boxes", "scores", "labels", "error"]
BATCH_ROWS = 4096
RUN_DATA_DIR = "data"
RUN_CONFIG_FILE = "config.json"


class DetectionsError(ValueError):
    """The detections table cannot be read or is empty; one line naming it."""


@dataclass
class DetectionsTable:
    uri: str
    files: list[str]
    input_roots: list[str]  # what the run listed (its config.json), empty when unknown
    s3: S3Options | None = None

    @classmethod
    def open(cls, uri: str, s3: S3Options | None = None) -> DetectionsTable:
        """A `detect` run folder (its data/ parts; the manifest is not detections) or Parquet files."""
        base = uri.rstrip("/") if storage.is_s3(uri) else uri
        data_dir = storage.join(base, RUN_DATA_DIR)
        try:
            objects = storage.list_objects(data_dir if storage.exists(data_dir, s3) else base, s3)
        except FileNotFoundError:
            raise DetectionsError(f"detections {uri}: not found") from None
        except Exception as e:  # noqa: BLE001 - credentials, DNS, permissions: one clear line
            raise DetectionsError(f"detections {uri}: cannot be listed ({type(e).__name__}: {e})") from None
        files = [o.uri for o in objects if o.uri.endswith(".parquet") and not o.uri.endswith("manifest.parquet")]
        if not files:
            raise DetectionsError(f"detections {uri}: no Parquet files there")
        return cls(uri=uri, files=files, input_roots=_run_inputs(base, s3), s3=s3)

    def batches(self, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        for file in self.files:
            try:
                with storage.open_read(file, self.s3) as f:
                    parquet = open_parquet(f)  # read on this thread only: see platescope.parquet_read
                    missing = [c for c in (columns or COLUMNS) if c not in parquet.schema_arrow.names]
                    if missing:
                        raise DetectionsError(f"detections {file}: not a detections table (no column "
                                              f"{', '.join(missing)})")
                    yield from parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns or COLUMNS,
                                                    use_threads=False)
            except DetectionsError:
                raise
            except (OSError, pa.ArrowInvalid) as e:
                raise DetectionsError(f"detections {file}: cannot be read ({e})") from None

    def distinct_labels(self) -> tuple[set[str], int]:
        """Every label any row uses, and the number of rows: one pass over two narrow columns."""
        labels: set[str] = set()
        rows = 0
        for batch in self.batches(["labels", "error"]):
            rows += batch.num_rows
            flat = pc.list_flatten(batch.column("labels"))
            labels.update(v for v in pc.unique(flat).to_pylist() if v is not None)
        return labels, rows


def _run_inputs(run_dir: str, s3: S3Options | None) -> list[str]:
    config = storage.join(run_dir, RUN_CONFIG_FILE)
    try:
        data = json.loads(storage.read_bytes(config, s3))
    except (FileNotFoundError, ValueError):
        return []
    inputs = data.get("input") if isinstance(data, dict) else None
    return [str(i) for i in inputs] if isinstance(inputs, list) else []
