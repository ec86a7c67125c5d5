"""The detect job: preflight -> ownership -> manifest -> Ray Data graph -> shard sink -> summary.

    manifest shards --decode_stage (CPU tasks)--> rows with images at model size
                    --detect_stage (DetectorActor pool)--> detection rows
                    --iter_batches (driver)--> ShardSink: Parquet part + marker per whole shard

Nothing materialises the dataset: Ray Data streams blocks with backpressure, and only small detection
rows come back to the driver.

The run's lifecycle, in order; nothing is written until the inputs are known good:
  1. preflight (read only): model, adapter, labels; the fingerprint of what the rows depend on
     (weights hashed); for a new run the input listing and an output write probe.
  2. ownership: the driver takes the run's lease (pipeline.ownership) or refuses, naming the owner.
  3. a new run: Ray starts and the resource requests are checked against the cluster, then the
     fingerprint and the manifest are written. A resumed run: the recorded fingerprint must equal
     this config's (pipeline.fingerprint), else it refuses before any work.
  4. the shards without a completion marker run; the summary is written; the lease is released.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from platescope import storage
from platescope.config import DetectConfig
from platescope.cputime import process_started
from platescope.pipeline import fingerprint as fingerprint_mod
from platescope.pipeline.errors import (
    PreflightError,
    RunOwnedError,
    StorageFailure,
    StorageUnreachable,
    find,
    is_unreachable,
    storage_step,
)
from platescope.pipeline.history import finished_inputs
from platescope.pipeline.ownership import RunLease
from platescope.pipeline.sightings import RunTracks
from platescope.pipeline.stage import DetectorSpec, decode_stage, detect_stage, model_geometry, shards_dataset
from platescope.pipeline.summary import SUMMARY_FILE, build_summary, write_summary
from platescope.sources import manifest as manifest_mod
from platescope.storage import S3Options

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
EVALUATION_DIR = "evaluation"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Fields a resume keeps from the run's first start: they defined its manifest, which is fixed.
MANIFEST_FIELDS = ("input", "num_inputs_per_shard", "incremental", "video_segment_s")

__all__ = ["PreflightError", "RunOwnedError", "StorageFailure", "RunResult", "run_detect"]


@dataclass
class RunResult:
    summary: dict[str, Any]
    evaluation: Any = None  # EvaluationResult when the run was scored against ground truth
    reports: dict[str, str] | None = None  # report name -> uri

    @property
    def failed_error_budget(self) -> bool:
        return self.summary["error_fraction"] > self.summary["max_error_fraction"]


def _check_dir(field: str, uri: str, marker: str, what: str, s3: S3Options | None) -> bool:
    """For an s3:// or existing local `uri`: fail unless `marker` is in it (True: checked)."""
    if storage.is_s3(uri):
        try:
            ok = storage.exists(storage.join(uri, marker), s3)
        except Exception as e:  # noqa: BLE001
            if is_unreachable(e):
                raise StorageUnreachable.of(f"reading {field}", uri, e) from None
            raise PreflightError(f"{field} {uri}: cannot be read ({type(e).__name__}: {e})") from None
        if not ok:
            raise PreflightError(f"{field} {uri}: no {marker} there (not {what})")
        return True
    if os.path.exists(uri):
        if not os.path.isfile(os.path.join(uri, marker)):
            raise PreflightError(f"{field} {uri}: not {what} (no {marker} in it)")
        return True
    return False


def check_model(model: str, s3: S3Options | None, trust_remote_code: bool) -> None:
    """Fail fast on a model that cannot load, without loading its weights."""
    if _check_dir("model", model, "config.json", "a model dir", s3):
        return
    if model.startswith((".", "/", "~")) or not HUB_ID.match(model):
        raise PreflightError(f"model {model}: no such directory")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - offline, unknown id, gated: say which
        raise PreflightError(f"model {model}: not a local dir, and not loadable as a hub id ({e})") from None


def check_output(output: str, s3: S3Options | None) -> None:
    try:
        storage.check_writable(output, s3)
    except Exception as e:  # noqa: BLE001
        if is_unreachable(e):
            raise StorageUnreachable.of("writing a probe under output", output, e) from None
        raise PreflightError(f"output {output}: cannot be written ({type(e).__name__}: {e})") from None


def run_detect(cfg: DetectConfig) -> RunResult:
    started = time.monotonic()
    s3 = cfg.s3.options()
    # 1. Preflight, cheapest first and writing nothing until inputs are known good.
    check_model(cfg.model, s3, cfg.trust_remote_code)
    if cfg.adapter and not _check_dir("adapter", cfg.adapter, "adapter_config.json", "a PEFT adapter dir", s3):
        raise PreflightError(f"adapter {cfg.adapter}: no such directory")
    ground_truth = _read_ground_truth(cfg, s3) if cfg.evaluate else None
    fingerprint = fingerprint_mod.compute(cfg)
    run_dir = storage.join(cfg.output, cfg.run_id)
    listed = None
    if not _manifest_exists(run_dir, s3):
        listed = _list_inputs(cfg, s3)
    check_output(cfg.output, s3)
    # 2. Ownership: one driver per run from here to the end.
    lease = RunLease(run_dir, cfg.run_id, s3).acquire()
    ray_session = _RaySession(cfg)
    try:
        return _run_owned(cfg, s3, run_dir, lease, ray_session, fingerprint, listed, ground_truth, started)
    finally:
        ray_session.shutdown()
        lease.release()


def _manifest_exists(run_dir: str, s3: S3Options) -> bool:
    uri = storage.join(run_dir, manifest_mod.MANIFEST_FILE)
    with storage_step("reading", uri, started=False):
        try:
            return storage.exists(uri, s3)
        except NotADirectoryError:
            raise PreflightError(f"output {run_dir}: the run's folder is a file") from None


def _list_inputs(cfg: DetectConfig, s3: S3Options) -> manifest_mod.Manifest:
    exclude = partial(finished_inputs, cfg.output, cfg.run_id, s3) if cfg.incremental else None
    try:
        with storage_step("reading earlier runs under", cfg.output, started=False):
            return manifest_mod.list_inputs(cfg.input, s3=s3, strict=cfg.strict,
                                            num_inputs_per_shard=cfg.num_inputs_per_shard, exclude=exclude,
                                            video_segment_s=cfg.video_segment_s, video_fps=cfg.video_fps)
    except ValueError as e:
        if isinstance(e, (PreflightError, StorageFailure)):
            raise
        if e.__cause__ is not None and is_unreachable(e.__cause__):
            root = str(e).split(":", 1)[0].removeprefix("input ")
            raise StorageUnreachable.of("listing input", root, e.__cause__) from None
        raise PreflightError(str(e)) from None


def _run_owned(cfg: DetectConfig, s3: S3Options, run_dir: str, lease: RunLease, ray_session: _RaySession,
               fingerprint: dict[str, Any], listed: manifest_mod.Manifest | None, ground_truth: Any,
               started: float) -> RunResult:
    manifest_uri = storage.join(run_dir, manifest_mod.MANIFEST_FILE)
    with storage_step("reading", manifest_uri, started=True):
        manifest = manifest_mod.load(run_dir, s3)
    resumed = manifest is not None
    # 3. Settings the rows depend on: recorded at the first start, enforced on every resume.
    previous_config = _read_config(run_dir, s3)
    if resumed:
        with storage_step("reading", fingerprint_mod.uri(run_dir), started=True):
            recorded = fingerprint_mod.read(run_dir, s3)
        if recorded is not None:
            fingerprint_mod.check_resume(cfg.run_id, run_dir, recorded, fingerprint)
        else:
            _adopt_unfingerprinted(cfg, run_dir, previous_config, fingerprint, s3)
    else:
        if listed is None:  # the manifest went away between the first look and taking the lease
            listed = _list_inputs(cfg, s3)
        ray_session.start()  # requests no node can grant fail here, before the manifest
        with storage_step("writing", fingerprint_mod.uri(run_dir), started=True):
            fingerprint_mod.write(run_dir, fingerprint, s3)
        with storage_step("writing", manifest_uri, started=True):
            manifest_mod.write(run_dir, listed, s3)
        manifest = listed
        previous_config = None  # a folder without a manifest holds no run to keep settings of
    config_uri = storage.join(run_dir, CONFIG_FILE)
    with storage_step("writing", config_uri, started=True):
        storage.write_bytes_atomic(config_uri, json.dumps(_saved_config(cfg, previous_config), indent=2).encode(), s3)
    with storage_step("listing the completion markers under", run_dir, started=True):
        done_before = manifest_mod.done_shards(run_dir, s3) if resumed else {}
    shards = manifest.shards()
    todo = [{"shard": k, "entries": v} for k, v in shards.items() if k not in done_before]
    if resumed:
        log.warning("resuming run %s: %d of %d shards already done", cfg.run_id, len(done_before), len(shards))

    # 4. The work; with track, each video's tracks once all its shards are done (pipeline.sightings).
    tracks = RunTracks(cfg, s3, run_dir, manifest, set(done_before)) if cfg.track else None
    if todo:
        num_gpus = ray_session.start()
        stats = _execute(cfg, s3, run_dir, todo, num_gpus, lease, tracks.shards_done if tracks else None)
    else:
        stats = {"rows": 0, "steady_rows_per_s": None, "num_gpus_per_actor": None, "first_result_s": None,
                 "cpu_ms_per_row": {}}
    lease.check()
    num_tracks = tracks.finish(ray_session.start) if tracks else None
    with storage_step("listing the completion markers under", run_dir, started=True):
        done = manifest_mod.done_shards(run_dir, s3)
    summary = build_summary(
        run_id=cfg.run_id, run_dir=run_dir, manifest=manifest, done=done,
        num_resumed_shards=len(done_before), wall_time_s=time.monotonic() - started,
        rows_this_attempt=stats["rows"], max_error_fraction=cfg.max_error_fraction, tracks=num_tracks,
    )
    summary["rows_per_s_steady"] = stats["steady_rows_per_s"]
    summary["num_gpus_per_actor"] = stats["num_gpus_per_actor"]  # as resolved against the cluster
    # Seconds from this process's start (imports included) to the first detection rows.
    summary["first_result_s"] = stats["first_result_s"]
    # CPU milliseconds per row by phase: decode (in the decode tasks); preprocess, model, postprocess
    # and actor_other (the detector actor's rest: the batch's columns in and out).
    summary["cpu_ms_per_row"] = stats["cpu_ms_per_row"]
    with storage_step("writing", storage.join(run_dir, SUMMARY_FILE), started=True):
        write_summary(summary, run_dir, s3)
    if cfg.evaluate is None:
        return RunResult(summary)
    from platescope.config import EvaluateConfig
    from platescope.evaluation.run import evaluate_and_report

    eval_cfg = EvaluateConfig(**cfg.evaluate.model_dump(), detections=run_dir,
                              output=storage.join(run_dir, EVALUATION_DIR), s3=cfg.s3)
    evaluation, reports = evaluate_and_report(eval_cfg, ground_truth)
    return RunResult(summary, evaluation, reports)


def _read_config(run_dir: str, s3: S3Options) -> dict[str, Any] | None:
    uri = storage.join(run_dir, CONFIG_FILE)
    with storage_step("reading", uri, started=True):
        try:
            return json.loads(storage.read_bytes(uri, s3))
        except FileNotFoundError:
            return None
        except ValueError:
            log.warning("%s is not valid JSON; it is written anew", uri)
            return None


def _saved_config(cfg: DetectConfig, previous: dict[str, Any] | None) -> dict[str, Any]:
    """config.json: this attempt's config, but the fields that defined the manifest as the first
    start had them (the row-relevant ones are equal, or the resume was refused)."""
    resolved = cfg.resolved()
    if previous:
        for name in MANIFEST_FIELDS:
            if name in previous:
                resolved[name] = previous[name]
    return resolved


def _adopt_unfingerprinted(cfg: DetectConfig, run_dir: str, previous_config: dict[str, Any] | None,
                           fingerprint: dict[str, Any], s3: S3Options) -> None:
    """A run folder from before fingerprints: accepted, and this config's fingerprint recorded. Its
    config.json (the last attempt's) is all there is to compare with: differences are warned of."""
    if previous_config:
        old = {k: previous_config.get(k) for k in fingerprint_mod.ROW_FIELDS if k in previous_config}
        new = {k: v for k, v in fingerprint.items() if k in old}
        if cfg.detector != "florence2":
            old.pop("max_new_tokens", None)
            new.pop("max_new_tokens", None)
        diffs = fingerprint_mod.differences(old, new)
        if diffs:
            log.warning("run %s has no fingerprint (it started before platescope recorded one) and its "
                        "config.json differs from this config: %s; its earlier rows may have been made with "
                        "those settings", cfg.run_id, "; ".join(diffs))
    log.warning("run %s: recording the fingerprint of this config (the run had none)", cfg.run_id)
    with storage_step("writing", fingerprint_mod.uri(run_dir), started=True):
        fingerprint_mod.write(run_dir, fingerprint, s3)


class _RaySession:
    """Ray, started (or joined) the first time the run needs it, and the requests checked once."""

    def __init__(self, cfg: DetectConfig):
        self.cfg = cfg
        self.started_ray = False
        self.num_gpus: float | None = None

    def start(self) -> float:
        """GPUs per detector actor, as resolved against the cluster; PreflightError when a request
        can never be granted there."""
        if self.num_gpus is not None:
            return self.num_gpus
        from platescope.ray_session import start_ray

        self.started_ray = start_ray(self.cfg.address)  # before any `import ray`: see ray_session
        import ray

        from platescope.pipeline.resources import check_requests

        cfg = self.cfg
        num_gpus = cfg.num_gpus_per_actor
        if num_gpus is None:
            num_gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 and cfg.device != "cpu" else 0.0
        check_requests(num_cpus_per_actor=cfg.num_cpus_per_actor, num_gpus_per_actor=num_gpus,
                       num_cpus_per_decoder=cfg.num_cpus_per_decoder, num_actors_min=cfg.num_actors_min)
        self.num_gpus = num_gpus
        return num_gpus

    def shutdown(self) -> None:
        if not self.started_ray:
            return
        self.started_ray = False
        try:
            import ray

            _wait_for_ray_data_threads()
            ray.shutdown()
        except Exception as e:  # noqa: BLE001 - must not hide the error the run is failing with
            log.warning("ray.shutdown failed: %s", e)


# Ray Data's threads that fetch batches (and wind the iteration's generators down, calling into Ray)
# notice a closed iteration within a fraction of a second. One still in Ray when ray.shutdown() runs
# makes Ray end the whole process ("core worker has already been shutdown"), with exit code 1 and
# before the run's error is printed. The block prefetcher only calls Ray when handed blocks; parked
# (as a closed iteration leaves it) it is left alone after a short wait.
_RAY_DATA_FETCH_THREADS = ("iter_threaded", "map_tp_")
RAY_DATA_THREADS_TIMEOUT_S = 10.0


def _wait_for_ray_data_threads() -> None:
    import gc
    import threading

    gc.collect()  # an iteration nothing refers to any more stops its threads when it is freed
    deadline = time.monotonic() + RAY_DATA_THREADS_TIMEOUT_S
    for thread in threading.enumerate():
        if thread is threading.current_thread():
            continue
        if thread.name.startswith(_RAY_DATA_FETCH_THREADS):
            thread.join(max(0.0, deadline - time.monotonic()))
        elif thread.name == "Prefetcher":
            thread.join(0.2)


def _read_ground_truth(cfg: DetectConfig, s3: S3Options):
    """Labels are read before any work, so a bad labels file fails the run at once, and so does a
    model none of whose labels can be scored against them (which evaluate would refuse at the end)."""
    from platescope.evaluation.groundtruth import GroundTruthError, read_ground_truth
    from platescope.evaluation.run import LabelMismatchError, check_labels

    try:
        ground_truth = read_ground_truth(cfg.evaluate.ground_truth, format=cfg.evaluate.ground_truth_format, s3=s3)
    except GroundTruthError as e:
        raise PreflightError(str(e)) from None
    labels = _model_labels(cfg, s3)  # empty when not known up front: then only label_map is checked
    categories = set(ground_truth.categories.values())
    label_map = cfg.evaluate.label_map
    try:
        check_labels(labels, categories, label_map)
    except LabelMismatchError as e:
        if not {label_map.get(label, label) for label in labels} & categories:
            raise PreflightError(f"model {cfg.model}: {e}") from None
        # Some labels fit: the run goes on, and fails its evaluation only if it finds one that does not.
        log.warning("model %s: %s", cfg.model, e)
    return ground_truth


def _model_labels(cfg: DetectConfig, s3: S3Options) -> set[str]:
    """What a detector model can name (its config's id2label); empty where that is not known up front:
    Florence-2 names what its answer says, and a hub id's config is only fetched when it loads."""
    if cfg.detector != "hf":
        return set()
    try:
        config = json.loads(storage.read_bytes(storage.join(cfg.model, "config.json"), s3))
    except (OSError, ValueError):
        return set()
    return {str(name) for name in (config.get("id2label") or {}).values()}


def _execute(cfg: DetectConfig, s3: S3Options, run_dir: str, todo: list[dict], num_gpus: float,
             lease: RunLease, on_shards_done: Callable[[list[str]], None] | None = None) -> dict[str, Any]:
    """Run the graph over the shards still to do, on the Ray the session started; returns rows
    processed and steady throughput. `on_shards_done` hears of the shards as they are written.

    Steady throughput counts from the first result to the last, leaving out Ray start-up and model
    loading, which a long run amortises.
    """
    import ray
    from tqdm import tqdm

    from platescope.pipeline.guard import GuardedSink

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours below counts shards and rows, Ray's would interleave
    from ray.util.debug import log_once

    log_once("ray_data_progress_manager_disabled")  # spends Ray's one "bars disabled" warning
    geometry = model_geometry(cfg.detector, cfg.model, s3)
    ds = shards_dataset(todo, geometry=geometry, batch_size=cfg.batch_size)
    ds = decode_stage(ds, s3=s3, video_fps=cfg.video_fps, max_pixels=cfg.max_pixels, geometry=geometry,
                      draft=cfg.jpeg_draft, num_cpus=cfg.num_cpus_per_decoder)
    ds = detect_stage(ds, DetectorSpec.from_config(cfg, s3, num_gpus, geometry), batch_size=cfg.batch_size,
                      num_actors_min=cfg.num_actors_min)
    sink = GuardedSink(run_dir, cfg.run_id, s3)
    rows = 0
    first_at = first_rows = None
    batches = iter(ds.iter_batches(batch_format="pyarrow", batch_size=None))
    try:
        with tqdm(total=len(todo), unit="shard", disable=not cfg.progress, desc=f"detect {cfg.run_id}") as bar:
            for batch in batches:
                rows += batch.num_rows
                if first_at is None:
                    first_at, first_rows = time.monotonic(), batch.num_rows
                lease.check()  # never write for a run another driver took over
                completed = sink.add(batch)
                if completed and on_shards_done is not None:
                    on_shards_done(completed)
                bar.update(len(completed))
                bar.set_postfix(rows=rows, refresh=False)
    except (StorageFailure, PreflightError):
        raise
    except Exception as e:
        # A task's StorageFailure reaches the driver wrapped by Ray and Ray Data: unwrap it.
        failure = find(e, StorageFailure)
        if failure is not None:
            raise StorageFailure(failure.action, failure.uri, failure.reason) from None
        raise
    finally:
        # Stop Ray Data's executor and prefetch threads now, whatever ended the loop: one still
        # running when Ray shuts down touches the dead core worker, and Ray then exits the process
        # before the run's error is printed.
        close = getattr(batches, "close", None)
        if close is not None:
            close()
    if sink.pending:
        raise RuntimeError(f"shards left incomplete: {sorted(sink.pending)[:5]}")
    elapsed = time.monotonic() - first_at if first_at is not None else 0.0
    steady = (rows - first_rows) / elapsed if elapsed > 0 else None
    return {"rows": rows, "steady_rows_per_s": round(steady, 3) if steady else None,
            "num_gpus_per_actor": num_gpus, "cpu_ms_per_row": sink.cpu_ms_per_row(),
            "first_result_s": round(first_at - process_started(), 3) if first_at is not None else None}
