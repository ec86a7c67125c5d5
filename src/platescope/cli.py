"""The `platescope` command: one verb per job.

Flags and `key=value` overrides both set config fields; a YAML job file (--config) gives the rest.
Precedence: job file < flags < key=value. Exit codes of `detect` (README.md, "Exit codes"):
0 done; 1 the run finished above its error budget; 2 the job could not start (bad config,
unreadable input, unwritable output, missing model, unreadable labels, settings that differ from
the run's first start, resources no node can grant, another driver running the run id) or its
detections could not be evaluated; 3 storage was unreachable or failed (a rerun resumes); 4 the run
stopped on an unexpected error (a rerun resumes). Each error is one line on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

EXIT_ERROR_BUDGET = 1
EXIT_CANNOT_START = 2
EXIT_STORAGE_FAILED = 3
EXIT_FAILED = 4
TRACEBACK_ENV = "PLATESCOPE_TRACEBACK"  # "1": an unexpected error also prints its traceback

# flag -> config field; flags left unset do not override the job file.
DETECT_FLAGS = {
    "input": "input", "output": "output", "model": "model", "run_id": "run_id", "detector": "detector",
    "threshold": "threshold", "video_fps": "video_fps", "batch_size": "batch_size",
    "max_error_fraction": "max_error_fraction", "max_pixels": "max_pixels", "address": "address",
    "num_actors_min": "num_actors_min", "num_actors_max": "num_actors_max",
    "num_gpus_per_actor": "num_gpus_per_actor", "device": "device", "prompt": "prompt", "adapter": "adapter",
    "nms_iou": "nms_iou",
}
DETECT_SWITCHES = {"strict": "strict", "incremental": "incremental", "no_progress": "progress",
                   "track": "track", "crops": "crops", "nms_merge": "nms_merge"}
EVALUATE_FLAGS = {
    "detections": "detections", "ground_truth": "ground_truth", "output": "output",
    "ground_truth_format": "ground_truth_format", "input_root": "input_root",
    "score_threshold": "score_threshold", "num_worst_images": "num_worst_images",
}


def _label_map(pairs: list[str] | None) -> dict[str, str] | None:
    """--label-map license-plate=licence_plate (repeatable); `label=` leaves that label out."""
    from platescope.config import ConfigError

    if not pairs:
        return None
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--label-map {pair!r} is not detector_label=category")
        label, category = pair.split("=", 1)
        out[label] = category
    return out


def _add_label_map(p: argparse.ArgumentParser) -> None:
    p.add_argument("--label-map", dest="label_map", action="append", metavar="LABEL=CATEGORY",
                   help="detector label to ground-truth category; repeat for more; LABEL= leaves it out")


def _add_detect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("detect", help="detect objects in images and videos into Parquet",
                       description="Stream images and video frames through a detector into Parquet.")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. run_id=x")
    p.add_argument("--config", help="YAML job file (local or s3://)")
    p.add_argument("--input", nargs="+", help="local folders/files or s3:// prefixes")
    p.add_argument("--output", help="output root; the run writes <output>/<run_id>/")
    p.add_argument("--model", help="model dir (local or s3://) or hub id")
    p.add_argument("--run-id", dest="run_id", help="run name; rerun the same to resume")
    p.add_argument("--detector", choices=["hf", "florence2"], help="detector family (default hf)")
    p.add_argument("--prompt", help="florence2 task and phrase, e.g. '<CAPTION_TO_PHRASE_GROUNDING> licence plate'")
    p.add_argument("--adapter", help="florence2 PEFT LoRA adapter dir (local or s3://)")
    p.add_argument("--threshold", type=float, help="minimum box score (default 0.3)")
    p.add_argument("--nms-iou", dest="nms_iou", type=float,
                   help="drop a box overlapping a higher-scored one of its label above this IoU "
                   "(default off; the bundled model: 0.4 with --nms-merge)")
    p.add_argument("--nms-merge", dest="nms_merge", action="store_true", default=None,
                   help="with --nms-iou: move each kept box to the score-weighted mean of itself and those it drops")
    p.add_argument("--video-fps", dest="video_fps", type=float, help="video frames sampled per second (default 1)")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="images per detector call (default 8)")
    p.add_argument("--max-error-fraction", dest="max_error_fraction", type=float,
                   help="exit non-zero above this share of error rows (default 0.1)")
    p.add_argument("--max-pixels", dest="max_pixels", type=int, help="larger images are error rows")
    p.add_argument("--address", help="Ray cluster address (default RAY_ADDRESS, else a local Ray)")
    p.add_argument("--num-actors-min", dest="num_actors_min", type=int, help="fewest detector actors")
    p.add_argument("--num-actors-max", dest="num_actors_max", type=int, help="most detector actors")
    p.add_argument("--num-gpus-per-actor", dest="num_gpus_per_actor", type=float, help="GPUs per actor")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where the model runs")
    p.add_argument("--strict", action="store_true", default=None,
                   help="unsupported file types become error rows instead of being skipped")
    p.add_argument("--incremental", action="store_true", default=None,
                   help="only inputs no earlier run under --output has finished")
    p.add_argument("--track", action="store_true", default=None,
                   help="link each video's detections into tracks: <run>/tracks/ (tracker.* overrides tune it)")
    p.add_argument("--crops", action="store_true", default=None,
                   help="with --track: a JPEG of each track's best view under <run>/crops/")
    p.add_argument("--no-progress", dest="no_progress", action="store_true", default=None,
                   help="no progress bar")
    p.add_argument("--ground-truth", dest="ground_truth",
                   help="labels to evaluate the run against when it ends (report in <run>/evaluation/)")
    _add_label_map(p)
    p.set_defaults(func=_cmd_detect)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="COCO metrics and a report of detections against ground truth",
                       description="Score a detections table against labels: metrics.json, report.md, report.html.")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--config", help="YAML job file (local or s3://)")
    p.add_argument("--detections", help="a detect run folder, a folder of Parquet files or one file")
    p.add_argument("--ground-truth", dest="ground_truth", help="COCO JSON, YOLO labels folder or VOC XML folder")
    p.add_argument("--output", help="report folder (default <detections>/evaluation)")
    p.add_argument("--format", dest="ground_truth_format", choices=["auto", "coco", "yolo", "voc"],
                   help="ground-truth format (default: from the file names)")
    p.add_argument("--input-root", dest="input_root", nargs="+",
                   help="roots the detections' URIs are relative to (default: the run's inputs)")
    _add_label_map(p)
    p.add_argument("--score-threshold", dest="score_threshold", type=float,
                   help="score for precision, recall, F1 and the gallery (default 0.5)")
    p.add_argument("--num-worst-images", dest="num_worst_images", type=int, help="gallery size (default 12)")
    p.set_defaults(func=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from platescope.config import ConfigError, EvaluateConfig, build_config
    from platescope.evaluation.run import EVALUATION_ERRORS, evaluate_and_report, format_result

    try:
        values = {f: getattr(args, flag) for flag, f in EVALUATE_FLAGS.items() if getattr(args, flag) is not None}
        label_map = _label_map(args.label_map)
        if label_map is not None:
            values["label_map"] = label_map
        cfg = build_config(EvaluateConfig, file=args.config, values=values, overrides=args.overrides)
        result, written = evaluate_and_report(cfg)
    except (ConfigError, *EVALUATION_ERRORS) as e:
        print(f"platescope evaluate: error: {e}", file=sys.stderr)
        return EXIT_CANNOT_START
    print(format_result(result, written))
    return 0


def detect_config_from_args(args: argparse.Namespace):
    from platescope.config import DetectConfig, build_config

    values = {field: getattr(args, flag) for flag, field in DETECT_FLAGS.items() if getattr(args, flag) is not None}
    for flag, field in DETECT_SWITCHES.items():
        if getattr(args, flag):
            values[field] = flag != "no_progress"
    if args.ground_truth is not None:
        values["evaluate.ground_truth"] = args.ground_truth
    label_map = _label_map(args.label_map)
    if label_map is not None:
        values["evaluate.label_map"] = label_map
    return build_config(DetectConfig, file=args.config, values=values, overrides=args.overrides)


def _error_line(message: str) -> str:
    return " ".join(str(message).split())  # one line, whatever the message held


def run_detect_command(prog: str, make_config: Callable[[], Any]) -> tuple[int | None, Any]:
    """`run_detect` on the config `make_config` builds, every failure one line on stderr: (exit code,
    None) when it failed, (None, the run's result) when it ran. Shared by `detect` and `demo`."""
    from platescope.config import ConfigError
    from platescope.evaluation.run import EVALUATION_ERRORS
    from platescope.pipeline.errors import StorageFailure, describe
    from platescope.pipeline.run import PreflightError, run_detect

    try:
        return None, run_detect(make_config())
    except StorageFailure as e:  # before PreflightError: StorageUnreachable is both
        print(f"{prog}: error: {_error_line(e)}", file=sys.stderr)
        return EXIT_STORAGE_FAILED, None
    except (ConfigError, PreflightError) as e:
        print(f"{prog}: error: {_error_line(e)}", file=sys.stderr)
        return EXIT_CANNOT_START, None
    except EVALUATION_ERRORS as e:  # the detections are written; only scoring them failed
        print(f"{prog}: error: the run finished but cannot be evaluated: {_error_line(e)}", file=sys.stderr)
        return EXIT_CANNOT_START, None
    except Exception as e:  # noqa: BLE001 - a bug or a lost cluster: still one line, and an exit code
        if os.environ.get(TRACEBACK_ENV) == "1":
            traceback.print_exc()
        print(f"{prog}: error: the run stopped: {describe(e)} (rerun the same command to "
              f"resume; {TRACEBACK_ENV}=1 shows the traceback)", file=sys.stderr)
        return EXIT_FAILED, None


def _cmd_detect(args: argparse.Namespace) -> int:
    from platescope.evaluation.run import format_result
    from platescope.pipeline.summary import format_summary

    code, result = run_detect_command("platescope detect", lambda: detect_config_from_args(args))
    if code is not None:
        return code
    print(format_summary(result.summary))
    if result.evaluation is not None:
        print(format_result(result.evaluation, result.reports or {}))
    if result.failed_error_budget:
        s = result.summary
        print(f"platescope detect: error: {s['errors']} of {s['rows']} rows are errors "
              f"({s['error_fraction']:.1%}), above --max-error-fraction {s['max_error_fraction']:.1%}",
              file=sys.stderr)
        return EXIT_ERROR_BUDGET
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune a detector with Ray Train and export the best model",
                       description="Fine-tune a detector on COCO data across Ray Train workers.")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config fields, e.g. num_workers=4 use_gpu=true storage=s3://checkpoints/ name=plates-1")
    p.add_argument("--config", help="YAML job file (local or s3://)")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from platescope.config import ConfigError, TrainConfig, build_config
    from platescope.training.run import TrainPreflightError, run_train

    try:
        cfg = build_config(TrainConfig, file=args.config, overrides=args.overrides)
        result = run_train(cfg)
    except (ConfigError, TrainPreflightError) as e:
        print(f"platescope train: error: {e}", file=sys.stderr)
        return EXIT_CANNOT_START
    m = result.best_metrics
    summary = ", ".join(f"{k} {m[k]:.4f}" for k in ("map", "map_50", "loss") if isinstance(m.get(k), float))
    print(f"best checkpoint: epoch {m.get('epoch')}: {summary}")
    print(f"model: {result.export}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="platescope", description=__doc__.splitlines()[0])
    from platescope import __version__

    parser.add_argument("--version", action="version", version=f"platescope {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_detect(sub)
    _add_evaluate(sub)
    _add_train(sub)
    from platescope import bench, demo, submit

    bench.add_parser(sub)
    demo.add_parser(sub)
    submit.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse takes a command's key=value overrides only in one run; ones after options (`submit
    # job.yaml --follow run_id=x`) come back unparsed and are overrides all the same.
    stray = [a for a in extra if not (hasattr(args, "overrides") and "=" in a and not a.startswith("-"))]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
