"""The tracks table of a run (`detect --track`), made per video once every shard of it is done.

    <run>/tracks/part-<video>.parquet    one per video, named by its shard id (a segmented video's
                                         without the -sNNNN): all its tracks (schema.TRACKS_SCHEMA),
                                         possibly none
    <run>/crops/<video>/track-NNNN.jpg   with --crops: each track's best view

A video's part is made by a Ray task from the video's finished rows, read back from its shards' parts
(boxes only): linked across the whole video (pipeline.tracks), so a track never breaks where two
segments meet; its crops are cut (pipeline.crops) and written first, then the part in one atomic
write. The driver submits a video's task as its sink completes the video's last shard, so linking and
cropping run on the cluster's CPUs beside the detection of other videos, never in the driver's loop;
the run waits for them at its end.

Tracks are derived data. Each part records the settings it was made with (tracker, crops, video fps)
in its Parquet metadata; at the end of every attempt a video whose shards are all done gets a task
when its part is missing or was made with other settings, and is left alone otherwise. A crash
between a video's last shard and its tracks is mended by the rerun; a rerun with other tracker
settings remakes the tracks from the same rows without detecting again; a rerun with the same
settings writes nothing.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq

from platescope import storage
from platescope.config import DetectConfig, TrackOptions
from platescope.parquet_read import read_parquet
from platescope.pipeline.errors import StorageFailure, find, storage_step
from platescope.pipeline.sink import DATA_DIR
from platescope.sources.manifest import Manifest, is_video_shard, open_uri, video_id
from platescope.storage import S3Options

log = logging.getLogger(__name__)

TRACKS_DIR = "tracks"
CROPS_DIR = "crops"
SETTINGS_KEY = b"platescope.tracks"  # the part's Parquet metadata entry holding its settings
ROW_COLUMNS = ["frame_index", "timestamp_s", "boxes", "scores", "label_ids", "labels"]
# Parts whose footers are read at once at the end of a run (each a small read; on S3, mostly latency).
NUM_FOOTER_THREADS = 16


@dataclass(frozen=True)
class VideoTracksJob:
    """What one video's task needs: where its rows and outputs are, and how to link them."""

    run_dir: str
    run_id: str
    video: str  # its id: v000003
    source_uri: str  # as the manifest and the detections table name it
    shards: tuple[str, ...]
    tracker: TrackOptions
    video_fps: float
    crops: bool
    max_pixels: int

    @property
    def settings(self) -> dict[str, Any]:
        """What the part depends on besides the rows (which the run's fingerprint fixes)."""
        return {"tracker": self.tracker.model_dump(), "crops": self.crops, "video_fps": self.video_fps}

    @property
    def part_uri(self) -> str:
        return part_uri(self.run_dir, self.video)


def part_uri(run_dir: str, video: str) -> str:
    return storage.join(run_dir, TRACKS_DIR, f"part-{video}.parquet")


def make_video_tracks(job: VideoTracksJob, s3: S3Options | None) -> int:
    """Link one video's rows into tracks, cut their crops, write its part; returns its track count.
    The body of the Ray task (no Ray in it)."""
    import pyarrow as pa

    from platescope.pipeline.crops import write_crops
    from platescope.pipeline.tracks import link_tracks, tracks_table

    parts = []
    for shard in job.shards:
        data = storage.read_bytes(storage.join(job.run_dir, DATA_DIR, f"part-{shard}.parquet"), s3)
        parts.append(read_parquet(data, columns=ROW_COLUMNS))
    rows = pa.concat_tables(parts).to_pylist() if parts else []
    tracks = link_tracks(rows, job.tracker, job.video_fps)
    crop_uris = None
    if job.crops:
        # Absolute (a local run folder may be given relative): the table's URIs open from anywhere.
        crop_dir = storage.to_uri(*storage.filesystem(storage.join(job.run_dir, CROPS_DIR, job.video), s3))
        uris = [storage.join(crop_dir, f"track-{i:04d}.jpg") for i in range(len(tracks))]
        crop_uris = write_crops(tracks, video=open_uri(job.source_uri), uris=uris, margin=job.tracker.crop_margin,
                                max_pixels=job.max_pixels, s3=s3)
    table = tracks_table(tracks, run_id=job.run_id, source_uri=job.source_uri, crop_uris=crop_uris)
    table = table.replace_schema_metadata({SETTINGS_KEY: json.dumps(job.settings, sort_keys=True).encode()})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes_atomic(job.part_uri, buf.getvalue(), s3)
    _remove_other_crops(job, {u for u in crop_uris or [] if u}, s3)
    return len(tracks)


def _remove_other_crops(job: VideoTracksJob, keep: set[str], s3: S3Options | None) -> None:
    """Remove crops of the video's earlier tracks that this part does not name (a remake with other
    settings found fewer tracks, or asked for no crops)."""
    try:
        found = storage.list_objects(storage.join(job.run_dir, CROPS_DIR, job.video), s3)
    except FileNotFoundError:
        return
    names = {uri.rsplit("/", 1)[-1] for uri in keep}
    for obj in found:
        if obj.uri.rsplit("/", 1)[-1] not in names:
            storage.remove(obj.uri, s3)


def recorded_parts(run_dir: str, s3: S3Options | None) -> dict[str, tuple[dict[str, Any] | None, int]]:
    """The tracks parts a run folder holds: video -> (the settings it was made with, its track count)."""
    folder = storage.join(run_dir, TRACKS_DIR)
    try:
        objects = [o for o in storage.list_objects(folder, s3) if o.uri.endswith(".parquet")]
    except FileNotFoundError:
        return {}

    def footer(uri: str) -> tuple[str, tuple[dict[str, Any] | None, int]]:
        with storage.open_read(uri, s3) as f:
            meta = pq.read_metadata(f)
        settings = (meta.metadata or {}).get(SETTINGS_KEY)
        video = uri.rsplit("/", 1)[-1].removeprefix("part-").removesuffix(".parquet")
        return video, (json.loads(settings) if settings else None, meta.num_rows)

    with ThreadPoolExecutor(min(NUM_FOOTER_THREADS, max(1, len(objects)))) as pool:
        return dict(pool.map(lambda o: footer(o.uri), objects))


class RunTracks:
    """A run's tracks: which videos are finished, their tasks, and the count for the summary.

    `shards_done` (from the driver's loop) submits a video's task when its last shard is written;
    `finish` submits the rest that need one (missing or made with other settings), waits for all,
    and returns the run's number of tracks. The driver checks its lease before submitting (the loop
    does for each batch); a task already running when another driver takes the run over may still
    write its part: whole (atomically), from the same rows, with the settings it used recorded."""

    def __init__(self, cfg: DetectConfig, s3: S3Options | None, run_dir: str, manifest: Manifest,
                 done: set[str]):
        self.s3 = s3
        self.run_dir = run_dir
        self.num_cpus = cfg.num_cpus_per_decoder
        shards: dict[str, list[str]] = {}
        uris: dict[str, str] = {}
        for entry in manifest.entries:
            if entry["kind"] == "video" and is_video_shard(entry["shard"]):
                video = video_id(entry["shard"])
                shards.setdefault(video, []).append(entry["shard"])
                uris[video] = entry["uri"]
        self.jobs = {video: VideoTracksJob(run_dir=run_dir, run_id=cfg.run_id, video=video, source_uri=uris[video],
                                           shards=tuple(sorted(s)), tracker=cfg.tracker, video_fps=cfg.video_fps,
                                           crops=cfg.crops, max_pixels=cfg.max_pixels)
                     for video, s in shards.items()}
        self.remaining = {video: set(job.shards) - done for video, job in self.jobs.items()}
        self.submitted: dict[str, Any] = {}  # video -> the ObjectRef of its task's track count
        self._task: Any = None

    def shards_done(self, shards: list[str]) -> None:
        """Shards the sink just wrote; a video whose last one this is gets its task."""
        for shard in shards:
            if not is_video_shard(shard):
                continue
            video = video_id(shard)
            remaining = self.remaining.get(video)
            if remaining is None:
                continue
            remaining.discard(shard)
            if not remaining and video not in self.submitted:
                self._submit(video)

    def finish(self, start_ray: Callable[[], Any]) -> int:
        """Submit every finished video whose part is missing or stale, wait for all tasks, and return
        the number of tracks in the run's finished videos."""
        with storage_step("reading the tracks parts under", storage.join(self.run_dir, TRACKS_DIR), started=True):
            recorded = recorded_parts(self.run_dir, self.s3)
        counts: dict[str, int] = {}
        for video, job in self.jobs.items():
            if self.remaining[video] or video in self.submitted:
                continue
            settings, num_tracks = recorded.get(video, (None, 0))
            if settings == job.settings:
                counts[video] = num_tracks
                continue
            start_ray()
            self._submit(video)
        if self.submitted:
            import ray

            log.info("tracks: waiting for %d videos", len(self.submitted))
            try:
                counts.update(zip(self.submitted, ray.get(list(self.submitted.values()))))
            except Exception as e:
                failure = find(e, StorageFailure)  # a task's StorageFailure comes wrapped by Ray
                if failure is not None:
                    raise StorageFailure(failure.action, failure.uri, failure.reason) from None
                raise
        return sum(counts.values())

    def _submit(self, video: str) -> None:
        if self._task is None:
            import ray

            self._task = ray.remote(_video_tracks_task).options(num_cpus=self.num_cpus)
        self.submitted[video] = self._task.remote(self.jobs[video], self.s3)


def _video_tracks_task(job: VideoTracksJob, s3: S3Options | None) -> int:
    """make_video_tracks, with storage errors named (StorageFailure: the run fails, a rerun redoes it)."""
    from platescope.pipeline.errors import is_storage_error

    try:
        return make_video_tracks(job, s3)
    except Exception as e:
        if not is_storage_error(e):
            raise
        raise StorageFailure.of("making the tracks of", f"{job.source_uri} ({job.part_uri})", e) from None
