"""The detect job: preflight -> manifest -> Ray Data graph -> shard sink -> summary.

    manifest shards --flat_map(decode_shard, CPU tasks)--> rows with images
                    --map_batches(DetectorActor, actor pool)--> detection rows
                    --iter_batches (driver)--> ShardSink: Parquet part + marker per whole shard

Nothing materialises the dataset: Ray Data streams blocks with backpressure, and only small detection
rows come back to the driver.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

from platescope import storage
from platescope.config import DetectConfig
from platescope.pipeline.history import finished_inputs
from platescope.pipeline.summary import build_summary, write_summary
from platescope.sources import manifest as manifest_mod
from platescope.storage import S3Options

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
EVALUATION_DIR = "evaluation"
DECODED_BLOCK_BYTES = 8 * 1024 * 1024
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class PreflightError(ValueError):
    """The run cannot start; the message is one line naming the input and the problem."""


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
        raise PreflightError(f"output {output}: cannot be written ({type(e).__name__}: {e})") from None


def detector_spec(cfg: DetectConfig, s3: S3Options, num_gpus: float) -> dict[str, Any]:
    """What an actor needs to build its detector. Nothing here is measured on the driver, which on a
    cluster is not the node the actors run on: torch's thread count is decided in each actor from
    its own node (pipeline.actor.decide_num_threads); `num_threads` is only what the config says."""
    return {
        "detector": cfg.detector, "model": cfg.model, "threshold": cfg.threshold,
        "device": cfg.device if num_gpus > 0 or cfg.device != "auto" else "cpu", "dtype": cfg.dtype,
        "trust_remote_code": cfg.trust_remote_code, "allow_unsafe_weights": cfg.allow_unsafe_weights,
        "s3": s3, "num_threads": cfg.num_threads_per_actor, "num_gpus": num_gpus,
        "num_cpus_per_actor": cfg.num_cpus_per_actor, "num_actors_max": cfg.num_actors_max,
        "prompt": cfg.prompt, "adapter": cfg.adapter, "max_new_tokens": cfg.max_new_tokens,
    }


def run_detect(cfg: DetectConfig) -> RunResult:
    started = time.monotonic()
    s3 = cfg.s3.options()
    # Preflight, cheapest first and writing nothing until inputs are known good: model, inputs, output.
    check_model(cfg.model, s3, cfg.trust_remote_code)
    if cfg.adapter and not _check_dir("adapter", cfg.adapter, "adapter_config.json", "a PEFT adapter dir", s3):
        raise PreflightError(f"adapter {cfg.adapter}: no such directory")
    ground_truth = _read_ground_truth(cfg, s3) if cfg.evaluate else None
    run_dir = storage.join(cfg.output, cfg.run_id)

    def create_manifest() -> manifest_mod.Manifest:
        exclude = partial(finished_inputs, cfg.output, cfg.run_id, s3) if cfg.incremental else None
        listed = manifest_mod.list_inputs(cfg.input, s3=s3, strict=cfg.strict,
                                          num_inputs_per_shard=cfg.num_inputs_per_shard, exclude=exclude)
        check_output(cfg.output, s3)
        return listed

    try:
        manifest, resumed = manifest_mod.load_or_create(run_dir, create_manifest, s3)
    except PreflightError:
        raise
    except ValueError as e:
        raise PreflightError(str(e)) from None
    if resumed:
        check_output(cfg.output, s3)
    storage.write_bytes_atomic(storage.join(run_dir, CONFIG_FILE),
                               json.dumps(cfg.resolved(), indent=2).encode(), s3)
    done_before = manifest_mod.done_shards(run_dir, s3) if resumed else {}
    shards = manifest.shards()
    todo = [{"shard": k, "entries": v} for k, v in shards.items() if k not in done_before]
    if resumed:
        log.warning("resuming run %s: %d of %d shards already done", cfg.run_id, len(done_before), len(shards))

    stats = (_execute(cfg, s3, run_dir, todo) if todo
             else {"rows": 0, "steady_rows_per_s": None, "num_gpus_per_actor": None})
    done = manifest_mod.done_shards(run_dir, s3)
    summary = build_summary(
        run_id=cfg.run_id, run_dir=run_dir, manifest=manifest, done=done,
        num_resumed_shards=len(done_before), wall_time_s=time.monotonic() - started,
        rows_this_attempt=stats["rows"], max_error_fraction=cfg.max_error_fraction,
    )
    summary["rows_per_s_steady"] = stats["steady_rows_per_s"]
    summary["num_gpus_per_actor"] = stats["num_gpus_per_actor"]  # as resolved against the cluster
    write_summary(summary, run_dir, s3)
    if cfg.evaluate is None:
        return RunResult(summary)
    from platescope.config import EvaluateConfig
    from platescope.evaluation.run import evaluate_and_report

    eval_cfg = EvaluateConfig(**cfg.evaluate.model_dump(), detections=run_dir,
                              output=storage.join(run_dir, EVALUATION_DIR), s3=cfg.s3)
    evaluation, reports = evaluate_and_report(eval_cfg, ground_truth)
    return RunResult(summary, evaluation, reports)


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


def _execute(cfg: DetectConfig, s3: S3Options, run_dir: str, todo: list[dict]) -> dict[str, Any]:
    """Run the graph over the shards still to do; returns rows processed and steady throughput.

    Steady throughput counts from the first result to the last, leaving out Ray start-up and model
    loading, which a long run amortises.
    """
    from platescope.ray_session import start_ray

    started_ray = start_ray(cfg.address)  # before any `import ray`: see ray_session
    import ray
    from tqdm import tqdm

    from platescope.pipeline.actor import DetectorActor
    from platescope.pipeline.decode import decode_shard
    from platescope.pipeline.sink import ShardSink

    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # ours below counts shards and rows, Ray's would interleave
        from ray.util.debug import log_once

        log_once("ray_data_progress_manager_disabled")  # spends Ray's one "bars disabled" warning
        # Small decoded blocks (a few frames each): the actor pool then gets bundles of about one
        # batch (Ray bundles blocks up to batch_size rows), so detection starts after the first batch
        # is decoded instead of a whole shard, and results stream back batch by batch.
        ctx.target_max_block_size = DECODED_BLOCK_BYTES
        num_gpus = cfg.num_gpus_per_actor
        if num_gpus is None:
            num_gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 and cfg.device != "cpu" else 0.0
        ds = ray.data.from_items(todo, override_num_blocks=len(todo))
        ds = ds.flat_map(decode_shard, fn_kwargs={"s3": s3, "video_fps": cfg.video_fps,
                                                  "max_pixels": cfg.max_pixels},
                         num_cpus=cfg.num_cpus_per_decoder)
        ds = ds.map_batches(
            DetectorActor, fn_constructor_kwargs={"spec": detector_spec(cfg, s3, num_gpus)},
            batch_size=cfg.batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=cfg.num_actors_min, max_size=cfg.num_actors_max),
            num_cpus=cfg.num_cpus_per_actor, num_gpus=num_gpus,
        )
        sink = ShardSink(run_dir, cfg.run_id, s3)
        rows = 0
        first_at = first_rows = None
        with tqdm(total=len(todo), unit="shard", disable=not cfg.progress, desc=f"detect {cfg.run_id}") as bar:
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                rows += batch.num_rows
                if first_at is None:
                    first_at, first_rows = time.monotonic(), batch.num_rows
                completed = sink.add(batch)
                bar.update(len(completed))
                bar.set_postfix(rows=rows, refresh=False)
        if sink.pending:
            raise RuntimeError(f"shards left incomplete: {sorted(sink.pending)[:5]}")
        elapsed = time.monotonic() - first_at if first_at is not None else 0.0
        steady = (rows - first_rows) / elapsed if elapsed > 0 else None
        return {"rows": rows, "steady_rows_per_s": round(steady, 3) if steady else None,
                "num_gpus_per_actor": num_gpus}
    finally:
        if started_ray:
            ray.shutdown()
