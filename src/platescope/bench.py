"""`platescope bench`: does the pipeline waste the model's time?

On the same images and model it measures
  1. the detector alone on pre-decoded batches (images already in memory, no Ray), and
  2. the end-to-end `detect` job (list, fetch, decode, Ray actor pool, Parquet),
and prints both throughputs and their ratio. The end-to-end figure is given twice: over the whole
wall time (Ray start-up and model load included) and steady (first result to last).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure detect throughput against the detector's own",
                       description=__doc__.splitlines()[0])
    p.add_argument("--images", required=True, help="folder of images (e.g. a dataset's images/)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model dir")
    src.add_argument("--preset", help="architecture preset built with random weights, e.g. rtdetr-r18")
    p.add_argument("--num-images", type=int, default=128, help="images to use (first N by name)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threshold", type=float, default=0.3)
    p.add_argument("--json", dest="json_out", help="also write the figures to this JSON file")
    p.set_defaults(func=_cmd_bench)


def _pick_images(folder: str, n: int, dest: str) -> list[str]:
    """The first n images by name, linked into dest so `detect` sees exactly these."""
    from platescope.sources import media_kind

    names = sorted(f for f in os.listdir(folder) if media_kind(f) == "image")[:n]
    if not names:
        raise SystemExit(f"platescope bench: error: --images {folder}: no images there")
    os.makedirs(dest, exist_ok=True)
    for name in names:
        os.symlink(os.path.abspath(os.path.join(folder, name)), os.path.join(dest, name))
    return [os.path.join(dest, name) for name in names]


def detector_throughput(cfg, paths: list[str]) -> float:
    """Images per second of Detector.detect alone, built exactly as a pipeline actor builds it."""
    from platescope.pipeline.actor import build_detector
    from platescope.pipeline.run import detector_spec
    from platescope.sources.images import decode_image

    images = [decode_image(Path(p).read_bytes(), name=p, max_pixels=cfg.max_pixels) for p in paths]
    detector = build_detector(detector_spec(cfg, cfg.s3.options(), num_gpus=0.0))
    detector.detect(images[: cfg.batch_size])  # warm-up: first call pays for lazy init
    started = time.perf_counter()
    for i in range(0, len(images), cfg.batch_size):
        detector.detect(images[i: i + cfg.batch_size])
    return len(images) / (time.perf_counter() - started)


def _cmd_bench(args: argparse.Namespace) -> int:
    from platescope.config import DetectConfig
    from platescope.pipeline.run import run_detect

    with tempfile.TemporaryDirectory(prefix="platescope-bench-") as tmp:
        model = args.model
        if args.preset:
            from platescope.detectors.presets import build_model_dir

            model = build_model_dir(args.preset, os.path.join(tmp, "model"))
        paths = _pick_images(args.images, args.num_images, os.path.join(tmp, "images"))
        cfg = DetectConfig(input=[os.path.join(tmp, "images")], output=os.path.join(tmp, "out"), model=model,
                           batch_size=args.batch_size, threshold=args.threshold, run_id="bench",
                           progress=False, device="cpu")
        det = detector_throughput(cfg, paths)
        summary = run_detect(cfg).summary
    e2e_total = summary["rows"] / summary["wall_time_s"]
    e2e_steady = summary["rows_per_s_steady"] or e2e_total
    figures = {
        "model": args.preset or args.model, "images": len(paths), "batch_size": args.batch_size,
        "cpu_count": os.cpu_count(),
        "detector_images_per_s": round(det, 3),
        "detect_images_per_s_steady": round(e2e_steady, 3),
        "detect_images_per_s_total": round(e2e_total, 3),
        "ratio_steady": round(e2e_steady / det, 3),
        "ratio_total": round(e2e_total / det, 3),
        "errors": summary["errors"],
    }
    width = max(len(k) for k in figures)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in figures.items()))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(figures, f, indent=2)
    return 0
