"""`platescope bench`: measured figures, never test assertions.

`bench detect`: does the pipeline waste the model's time? On the same images and model it measures
  1. the detector alone on pre-decoded batches (images already in memory, no Ray), and
  2. the end-to-end `detect` job (list, fetch, decode, Ray actor pool, Parquet),
and prints both throughputs and their ratio. The end-to-end figure is given twice: over the whole
wall time (Ray start-up and model load included) and steady (first result to last).

`bench detect --vs-naive`: what a user gains over the loop they would write themselves
  (platescope.naive_loop: open -> image processor -> model -> post-process, one image at a time). Both
  run as fresh processes on the same images, model and threshold; it prints both whole-process wall
  times and their ratio, both boxes counts (they must agree), both process trees' CPU time, and
  detect's CPU milliseconds per image outside the model forward: decode (the decode tasks),
  preprocess, postprocess and the actor's other work (all three inside the actor), and the rest
  (Ray, the driver, start-up), from the run's summary and the sampled process tree.

`bench evaluate`: time and peak memory of `platescope evaluate` on a generated table of N rows, in
a fresh process, optionally beside pycocotools' COCOeval on the same boxes.

`bench video`: how much of a long video waits between decoding and the detector. One generated
  video, every frame sampled, through the whole `detect` job; after every step of Ray Data's
  scheduling loop it reads the object store bytes Ray Data holds for each operator's output blocks
  (queued, or arguments of running tasks), and keeps the peak, in MiB and in frames as the decoder
  ships them. If waiting frames grew with the video's length this peak would too; it stays at Ray
  Data's backpressure budget however long the video.

`bench video --long`: one long generated video (default ten minutes of 1080p30) through `detect`
  twice on the same Ray: split into time segments (`video_segment_s`), and as one whole-file shard.
  Reports hours of footage per hour of wall time for each: segments spread one video's decoding over
  the cluster's CPUs, where a whole-file shard decodes on one task.

`bench video --decode-options VIDEO...`: FFmpeg's decoder threading and frame skipping, each on the
  given videos: time, and whether the sampled frames stay identical to the default's.

`bench incremental`: time and peak memory of what `--incremental` reads before a nightly run starts,
after R earlier nightly runs of N inputs each under the same output root.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks: detect throughput, evaluate time and memory",
                           description=__doc__.splitlines()[0])
    kinds = bench.add_subparsers(dest="bench", required=True)
    p = kinds.add_parser("detect", help="detect throughput against the detector's own")
    p.add_argument("--images", required=True, help="folder of images (e.g. a dataset's images/)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="model dir (default: the default model)")
    src.add_argument("--preset", help="architecture preset built with random weights, e.g. rtdetr-r18")
    p.add_argument("--num-images", type=int, default=128, help="images to use (first N by name)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threshold", type=float, default=0.3)
    p.add_argument("--vs-naive", dest="vs_naive", action="store_true",
                   help="whole `detect` process against the plain per-image Hugging Face loop, each fresh")
    p.add_argument("--json", dest="json_out", help="also write the figures to this JSON file")
    p.set_defaults(func=_cmd_bench)
    e = kinds.add_parser("evaluate", help="evaluate time and peak memory on N generated rows")
    e.add_argument("--rows", type=int, default=100_000, help="detections rows (one per image)")
    e.add_argument("--pycocotools", action="store_true", help="also time pycocotools' COCOeval on the same boxes")
    e.add_argument("--json", dest="json_out", help="also write the figures to this JSON file")
    e.set_defaults(func=_cmd_bench_evaluate)
    v = kinds.add_parser("video", help="frames waiting between decode and detector, for one long video")
    v.add_argument("--frames", type=int, default=1200, help="frames in the generated video (all sampled)")
    v.add_argument("--size", default="1920x1080", help="frame size WIDTHxHEIGHT")
    v.add_argument("--model", help="model dir (default: the default model)")
    v.add_argument("--batch-size", type=int, default=8)
    v.add_argument("--json", dest="json_out", help="also write the figures to this JSON file")
    v.add_argument("--long", action="store_true",
                   help="one long video, split into time segments and as one shard: footage hours per hour")
    v.add_argument("--seconds", type=float, default=600.0, help="--long: length of the generated 30 fps video")
    v.add_argument("--video-fps", type=float, default=1.0, help="--long: frames sampled per second")
    v.add_argument("--segment-s", type=float, help="--long: video_segment_s (default: detect's)")
    v.add_argument("--decode-options", nargs="+", metavar="VIDEO",
                   help="decode these videos with each FFmpeg threading and frame-skipping setting: time, and "
                        "whether the sampled frames are identical to the default's")
    v.set_defaults(func=_cmd_bench_video)
    i = kinds.add_parser("incremental", help="--incremental's look at earlier runs: time and peak memory")
    i.add_argument("--runs", type=int, default=365, help="earlier nightly runs under the output root")
    i.add_argument("--inputs", type=int, default=10_000, help="inputs per night (tonight lists as many)")
    i.add_argument("--json", dest="json_out", help="also write the figures to this JSON file")
    i.set_defaults(func=_cmd_bench_incremental)


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
    from platescope.pipeline.stage import DetectorSpec
    from platescope.sources.images import decode_image

    images = [decode_image(Path(p).read_bytes(), name=p, max_pixels=cfg.max_pixels) for p in paths]
    detector = build_detector(DetectorSpec.from_config(cfg, cfg.s3.options(), num_gpus=0.0))
    detector.detect(images[: cfg.batch_size])  # warm-up: first call pays for lazy init
    started = time.perf_counter()
    for i in range(0, len(images), cfg.batch_size):
        detector.detect(images[i: i + cfg.batch_size])
    return len(images) / (time.perf_counter() - started)


def _bench_model(args: argparse.Namespace, tmp: str) -> str:
    """The model dir to measure: --model, a --preset built with random weights, or the default model."""
    if args.preset:
        from platescope.detectors.presets import build_model_dir

        return build_model_dir(args.preset, os.path.join(tmp, "model"))
    if args.model:
        return args.model
    from platescope.models import default_model_dir

    return default_model_dir()


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.vs_naive:
        return _cmd_bench_vs_naive(args)
    from platescope.config import DetectConfig
    from platescope.pipeline.run import run_detect

    with tempfile.TemporaryDirectory(prefix="platescope-bench-") as tmp:
        model = _bench_model(args, tmp)
        paths = _pick_images(args.images, args.num_images, os.path.join(tmp, "images"))
        cfg = DetectConfig(input=[os.path.join(tmp, "images")], output=os.path.join(tmp, "out"), model=model,
                           batch_size=args.batch_size, threshold=args.threshold, run_id="bench",
                           progress=False, device="cpu")
        det = detector_throughput(cfg, paths)
        summary = run_detect(cfg).summary
    e2e_total = summary["rows"] / summary["wall_time_s"]
    e2e_steady = summary["rows_per_s_steady"] or e2e_total
    figures = {
        "model": args.preset or args.model or "default", "images": len(paths), "batch_size": args.batch_size,
        "cpu_count": os.cpu_count(),
        "detector_images_per_s": round(det, 3),
        "detect_images_per_s_steady": round(e2e_steady, 3),
        "detect_images_per_s_total": round(e2e_total, 3),
        "ratio_steady": round(e2e_steady / det, 3),
        "ratio_total": round(e2e_total / det, 3),
        "errors": summary["errors"],
    }
    _report(figures, args.json_out)
    return 0


def _cmd_bench_vs_naive(args: argparse.Namespace) -> int:
    """`detect` and the naive loop (platescope.naive_loop), each a fresh process on the same images,
    model and threshold: whole-process wall time, the process tree's CPU time, and where detect's
    CPU outside the model forward goes, from the run's summary."""
    import sys

    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory(prefix="platescope-bench-") as tmp:
        model = _bench_model(args, tmp)
        paths = _pick_images(args.images, args.num_images, os.path.join(tmp, "images"))
        listing = os.path.join(tmp, "images.txt")
        with open(listing, "w") as f:
            f.write("\n".join(paths) + "\n")
        for path in paths:  # both read from the page cache, not the first one from disk
            Path(path).read_bytes()
        naive_rows = os.path.join(tmp, "naive.parquet")
        naive = _tree_timed([sys.executable, "-m", "platescope.naive_loop", "--images", listing, "--model", model,
                             "--threshold", str(args.threshold), "--output", naive_rows])
        out = os.path.join(tmp, "out")
        detect = _tree_timed([sys.executable, "-m", "platescope", "detect", "--input", os.path.join(tmp, "images"),
                              "--output", out, "--model", model, "--threshold", str(args.threshold),
                              "--batch-size", str(args.batch_size), "--run-id", "bench", "--device", "cpu",
                              "--no-progress"])
        with open(os.path.join(out, "bench", "summary.json")) as f:
            summary = json.load(f)
        naive_boxes = sum(len(b) for b in pq.read_table(naive_rows, columns=["scores"]).column("scores").to_pylist())
    n = len(paths)
    cpu = summary.get("cpu_ms_per_row") or {}
    outside = {phase: cpu.get(phase, 0.0) for phase in ("decode", "preprocess", "postprocess", "actor_other")}
    # What no phase accounts for: Ray itself (scheduling, serialising blocks, its own processes), the
    # driver (listing, sink, Parquet), imports and the model's loading, all over the images ...
    phases_ms = sum(outside.values()) + cpu.get("model", 0.0)
    rest = detect["cpu_s"] * 1000 / n - phases_ms
    # The tree's CPU until the first result: Ray's start, the actors' imports and model load, and
    # whatever decoding ran meanwhile.
    cpu_before_first_s = detect["cpu_s_at"](summary.get("first_result_s") or 0.0)
    figures = {
        "model": args.preset or args.model or "default", "images": n, "batch_size": args.batch_size,
        "cpu_count": os.cpu_count(),
        "naive_s": round(naive["wall_s"], 2), "detect_s": round(detect["wall_s"], 2),
        "speedup": round(naive["wall_s"] / detect["wall_s"], 3),
        "naive_boxes": naive_boxes, "detect_boxes": summary["detections"], "detect_errors": summary["errors"],
        "naive_first_result_s": naive["report"].get("first_result_s"),
        "detect_first_result_s": summary.get("first_result_s"),
        "naive_cpu_s": round(naive["cpu_s"], 2), "detect_cpu_s": round(detect["cpu_s"], 2),
        "cpu_ms_per_image_model": round(cpu.get("model", 0.0), 2),
        **{f"cpu_ms_per_image_{phase}": round(ms, 2) for phase, ms in outside.items()},
        "detect_cpu_s_before_first_result": round(cpu_before_first_s, 2),
        "cpu_ms_per_image_rest": round(rest, 2),
        "cpu_ms_per_image_outside_model": round(sum(outside.values()) + rest, 2),
        "cpu_ms_per_image_outside_model_in_actor": round(outside["preprocess"] + outside["postprocess"]
                                                         + outside["actor_other"], 2),
    }
    _report(figures, args.json_out)
    return 0


def _tree_timed(argv: list[str]) -> dict:
    """Run argv; its wall seconds, the CPU seconds of it and of every process it started (a local
    Ray's included), how those grew over time (`cpu_s_at`), and the JSON object it printed last.

    Waiting on the child alone (rusage) would miss most of Ray's processes: their parents do not
    all reap them in a way that hands their CPU time on. So the tree is sampled (_TreeCpuSampler)."""
    import subprocess

    started = time.perf_counter()
    # Its output goes to a file: a pipe would stay open as long as any process of the tree held it.
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(argv, stdout=out)
        sampler = _TreeCpuSampler(proc.pid, started)
        sampler.start()
        proc.wait()
        wall = time.perf_counter() - started
        sampler.stop()
        out.seek(0)
        output = out.read()
    if proc.returncode != 0:
        raise SystemExit(f"platescope bench: error: {' '.join(argv[1:4])} exited {proc.returncode}")
    report = {}
    for line in reversed(output.splitlines()):
        if line.startswith("{"):
            report = json.loads(line)
            break
    return {"wall_s": wall, "cpu_s": sampler.cpu_s_at(float("inf")), "report": report, "cpu_s_at": sampler.cpu_s_at}


class _TreeCpuSampler:
    """CPU seconds of a process tree over time, sampled every `interval_s` from its start (psutil), so
    a figure can also be split at a moment, e.g. the first result: what came before it is start-up.
    Each process counts with its latest sample, so one that ended between two samples loses what it
    used in at most `interval_s` (the processes that end are Ray's, mostly idle by then)."""

    def __init__(self, pid: int, started: float, interval_s: float = 0.1) -> None:
        import threading

        self.pid, self.started, self.interval_s = pid, started, interval_s
        self.samples: list[tuple[float, float]] = []  # (seconds since started, CPU seconds so far)
        self._latest: dict[tuple[int, float], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for p in tree:
                try:
                    t = p.cpu_times()
                    self._latest[(p.pid, p.create_time())] = t.user + t.system
                except psutil.NoSuchProcess:
                    pass
            self.samples.append((time.perf_counter() - self.started, sum(self._latest.values())))
            self._stop.wait(self.interval_s)

    def cpu_s_at(self, seconds: float) -> float:
        """The tree's CPU seconds at the last sample taken before `seconds` from its start."""
        return max((cpu for at, cpu in self.samples if at <= seconds), default=0.0)


def _report(figures: dict, json_out: str | None) -> None:
    width = max(len(k) for k in figures)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in figures.items()))
    if json_out:
        with open(json_out, "w") as f:
            json.dump(figures, f, indent=2)


def _timed_child(argv: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of a fresh Python process running argv."""
    import subprocess
    import sys

    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)  # ru_maxrss: the child's own peak, KiB on Linux
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"platescope bench: error: {' '.join(argv[:3])} exited {proc.returncode}")
    return time.perf_counter() - started, usage.ru_maxrss / 1024


_SIMULATED_ROOT = "s3://footage/2026-11-21"

# pycocotools on the same table: the reference, with every box as a dict in memory as it requires.
_PYCOCOTOOLS = """
import contextlib, io, sys, pyarrow.parquet as pq, glob
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
gt = COCO(sys.argv[1]); ids = {im["file_name"]: im["id"] for im in gt.dataset["images"]}
cats = {c["name"]: c["id"] for c in gt.dataset["categories"]}; dets = []
for part in sorted(glob.glob(sys.argv[2] + "/data/*.parquet")):
    for r in pq.read_table(part).to_pylist():
        if r["error"] is None:
            for b, s, l in zip(r["boxes"], r["scores"], r["labels"]):
                dets.append({"image_id": ids[r["source_uri"].removeprefix(sys.argv[3])], "category_id": cats[l],
                             "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": s})
with contextlib.redirect_stdout(io.StringIO()):
    ev = COCOeval(gt, gt.loadRes(dets), "bbox"); ev.evaluate(); ev.accumulate(); ev.summarize()
"""


def _cmd_bench_evaluate(args: argparse.Namespace) -> int:
    from platescope.evaluation.simulate import simulate_rows, synthetic_coco, write_coco, write_detections

    with tempfile.TemporaryDirectory(prefix="platescope-bench-") as tmp:
        coco = synthetic_coco(args.rows, seed=0, categories=("licence_plate", "car"))
        gt = write_coco(coco, os.path.join(tmp, "gt.json"))
        run = os.path.join(tmp, "run")
        write_detections(simulate_rows(coco, root=_SIMULATED_ROOT, seed=1, error_rate=0.01), run)
        del coco
        seconds, peak = _timed_child(["-m", "platescope", "evaluate", "--detections", run, "--ground-truth",
                                      str(gt), "--output", os.path.join(tmp, "report")])
        with open(os.path.join(tmp, "report", "metrics.json")) as f:
            metrics = json.load(f)
        figures = {"rows": args.rows, "boxes": metrics["counts"]["boxes"],
                   "detections": metrics["counts"]["detections"], "map": round(metrics["map"], 6),
                   "evaluate_s": round(seconds, 2), "evaluate_rows_per_s": round(args.rows / seconds),
                   "evaluate_peak_rss_mib": round(peak)}
        if args.pycocotools:
            seconds, peak = _timed_child(["-c", _PYCOCOTOOLS, str(gt), run, _SIMULATED_ROOT + "/"])
            figures.update({"pycocotools_s": round(seconds, 2), "pycocotools_peak_rss_mib": round(peak)})
    _report(figures, args.json_out)
    return 0


_FINISHED_INPUTS = """
import sys
from platescope.pipeline.history import finished_inputs
root, n = sys.argv[1], int(sys.argv[2])
among = {f"s3://footage/night-{sys.argv[3]}/frame-{i:08d}.jpg" for i in range(n)}
open(sys.argv[4], "w").write(str(len(finished_inputs(root, "tonight", None, among))))
"""


def _cmd_bench_incremental(args: argparse.Namespace) -> int:
    """Earlier nights each hold N new objects; tonight's listing is last night's N again (a rerun)."""
    from platescope.pipeline.summary import SUMMARY_FILE
    from platescope.sources.manifest import DONE_DIR, MANIFEST_FILE, Manifest

    with tempfile.TemporaryDirectory(prefix="platescope-bench-") as root:
        for night in range(args.runs):
            run = os.path.join(root, f"night-{night}")
            os.makedirs(os.path.join(run, DONE_DIR))
            uris = (f"s3://footage/night-{night}/frame-{i:08d}.jpg" for i in range(args.inputs))
            entries = [{"uri": u, "kind": "image", "size": 1, "version": f"etag-{night}", "input_root": "in",
                        "shard": f"i{i // 64:06d}"} for i, u in enumerate(uris)]
            with open(os.path.join(run, MANIFEST_FILE), "wb") as f:
                f.write(Manifest(entries=entries).to_parquet_bytes())
            with open(os.path.join(run, SUMMARY_FILE), "w") as f:
                json.dump({"complete": True}, f)
        count = os.path.join(root, "found")
        seconds, peak = _timed_child(["-c", _FINISHED_INPUTS, root, str(args.inputs), str(args.runs - 1), count])
        with open(count) as f:
            found = int(f.read())
    figures = {"earlier_runs": args.runs, "inputs_per_run": args.inputs, "inputs_seen_before": found,
               "seconds": round(seconds, 2), "peak_rss_mib": round(peak)}
    _report(figures, args.json_out)
    return 0


class _ObjectStorePeaks:
    """The most object store memory held by each Ray Data operator's output blocks (name -> bytes,
    in topology order: the decoder first), by all of them together (`total`), and each operator's
    mean bytes per output row; `callback()` is the execution callback class that fills them in.

    Ray Data counts a block from the step its producing task hands it over until it is freed (no
    reference left, and the tasks it was an argument of finished), and the callback runs after every
    step of the scheduling loop: a block is always in the count at the end of the step that produced
    it, so no frame that waited escapes the peak, however busy the machine. (A thread sampling Ray's
    store every half second could see nothing on a short run, and Ray's `memory_summary` fails
    outright when several Rays run on the machine.) These are blocks that exist, not Ray Data's
    reservation for outputs a running task has yet to yield."""

    def __init__(self) -> None:
        self.by_operator: dict[str, int] = {}
        self.bytes_per_row: dict[str, float] = {}
        self.total = 0
        self.steps = 0

    def observe(self, executor) -> None:
        # Ray 2.60's executor keeps its operators in _topology (no public accessor);
        # estimate_object_store_usage() is the bytes of the operator's live output blocks.
        total = 0
        for op in getattr(executor, "_topology", None) or {}:
            if not op.input_dependencies:  # the input buffer: the listing's items, made before
                continue
            used = int(op.estimate_object_store_usage())
            self.by_operator[op.name] = max(self.by_operator.get(op.name, 0), used)
            rows = op.metrics.rows_task_outputs_generated
            if rows:
                self.bytes_per_row[op.name] = op.metrics.bytes_task_outputs_generated / rows
            total += used
        self.total = max(self.total, total)
        self.steps += 1

    def callback(self) -> type:
        from ray.data._internal.execution.execution_callback import ExecutionCallback

        observe = self.observe

        class ObjectStorePeaks(ExecutionCallback):
            def on_execution_step(self, executor) -> None:
                observe(executor)

        return ObjectStorePeaks


def _cmd_bench_video(args: argparse.Namespace) -> int:
    if args.long:
        return _cmd_bench_long_video(args)
    if args.decode_options:
        return _cmd_bench_decode_options(args)
    import resource

    from platescope import samples
    from platescope.config import DetectConfig
    from platescope.pipeline.run import run_detect
    from platescope.ray_session import start_ray

    width, height = (int(v) for v in args.size.lower().split("x"))
    with tempfile.TemporaryDirectory(prefix="platescope-bench-") as tmp:
        fps = 30
        samples.write_video(os.path.join(tmp, "in", "long.mp4"), num_frames=args.frames, fps=fps,
                            size=(width, height))
        values = {"input": [os.path.join(tmp, "in")], "output": os.path.join(tmp, "out"), "run_id": "bench",
                  "video_fps": fps, "batch_size": args.batch_size, "progress": False, "device": "cpu"}
        cfg = DetectConfig(**values, **({"model": args.model} if args.model else {}))
        # Ray is started here (as detect would start it) so that the callback can be registered on
        # Ray Data's context before the job builds its dataset; detect then runs on this Ray.
        started_ray = start_ray(cfg.address)
        import ray

        ctx = ray.data.DataContext.get_current()
        peaks = _ObjectStorePeaks()
        callback = peaks.callback()
        ctx.custom_execution_callback_classes.append(callback)
        try:
            summary = run_detect(cfg).summary
        finally:
            ctx.custom_execution_callback_classes.remove(callback)
            if started_ray:
                ray.shutdown()
    if not peaks.steps or not peaks.by_operator:
        raise SystemExit("platescope bench: error: Ray Data reported no execution step to measure")
    frame_mib = width * height * 3 / 2**20
    # Frames travel as the decoder ships them (resized to the model's input where detect does so).
    decoder = next(iter(peaks.by_operator))
    shipped_mib = peaks.bytes_per_row.get(decoder, 0.0) / 2**20
    waiting = round(peaks.by_operator[decoder] / 2**20 / shipped_mib) if shipped_mib else 0
    by_operator = {name: round(v / 2**20, 1) for name, v in peaks.by_operator.items()}
    figures = {"frames": summary["frames"], "frame_size": f"{width}x{height}", "frame_mib": round(frame_mib, 2),
               "shipped_frame_mib": round(shipped_mib, 3),
               "detect_s": summary["wall_time_s"], "frames_per_s": summary["rows_per_s"],
               "object_store_peak_mib": round(peaks.total / 2**20, 1),
               "frames_waiting_at_peak": waiting, "object_store_peak_mib_by_operator": by_operator,
               "video_if_held_whole_mib": round(summary["frames"] * frame_mib),
               "driver_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    _report(figures, args.json_out)
    return 0


# FFmpeg decoder settings measured by --decode-options, the default (what detect uses) first.
DECODE_OPTIONS = [
    {"thread_type": "AUTO", "skip_frame": "DEFAULT"},
    {"thread_type": "SLICE", "skip_frame": "DEFAULT"},
    {"thread_type": "FRAME", "skip_frame": "DEFAULT"},
    {"thread_type": "NONE", "skip_frame": "DEFAULT"},
    {"thread_type": "AUTO", "skip_frame": "NONREF"},
    {"thread_type": "AUTO", "skip_frame": "BIDIR"},
]


def _cmd_bench_decode_options(args: argparse.Namespace) -> int:
    """Each video decoded (sampled at --video-fps) once per setting in this process: wall and CPU
    seconds, and whether every sampled frame (index, timestamp and pixels) equals the default's."""
    import hashlib
    import resource

    from platescope.sources.video import iter_video_frames

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)  # all threads: FFmpeg's decoder threads too
        return usage.ru_utime + usage.ru_stime

    figures: dict = {"video_fps": args.video_fps}
    for video in args.decode_options:
        reference = None
        for options in DECODE_OPTIONS:
            name = f"{os.path.basename(video)} {options['thread_type']}/{options['skip_frame']}"
            wall, used = time.perf_counter(), cpu()
            frames = [(f.frame_index, f.timestamp_s, hashlib.sha1(f.image.tobytes()).hexdigest())
                      for f in iter_video_frames(video, name=video, fps=args.video_fps, **options)]
            wall, used = time.perf_counter() - wall, cpu() - used
            reference = reference if reference is not None else frames
            figures[name] = {"wall_s": round(wall, 2), "cpu_s": round(used, 2), "frames": len(frames),
                             "identical": frames == reference}
    _report(figures, args.json_out)
    return 0


def _cmd_bench_long_video(args: argparse.Namespace) -> int:
    from platescope import samples
    from platescope.config import DetectConfig
    from platescope.pipeline.run import run_detect
    from platescope.ray_session import start_ray

    width, height = (int(v) for v in args.size.lower().split("x"))
    segment_s = args.segment_s or DetectConfig.model_fields["video_segment_s"].default
    summaries = {}
    with tempfile.TemporaryDirectory(prefix="platescope-bench-") as tmp:
        samples.write_long_video(os.path.join(tmp, "in", "long.mp4"), seconds=args.seconds, size=(width, height),
                                 fps=30)
        values = {"input": [os.path.join(tmp, "in")], "output": os.path.join(tmp, "out"),
                  "video_fps": args.video_fps, "batch_size": args.batch_size, "progress": False, "device": "cpu",
                  **({"model": args.model} if args.model else {})}
        # One Ray for both runs, started before either, so neither pays its start-up; each run loads
        # the model in its own actors. The whole file goes first: any warming up favours it.
        started_ray = start_ray(None)
        try:
            for name, seconds in (("whole", args.seconds * 2), ("segments", segment_s)):
                summaries[name] = run_detect(DetectConfig(**values, run_id=name, video_segment_s=seconds)).summary
        finally:
            if started_ray:
                import ray

                ray.shutdown()
    figures = {"video_s": args.seconds, "frame_size": f"{width}x{height}", "video_fps": args.video_fps,
               "segment_s": segment_s, "frames": summaries["segments"]["frames"]}
    for name, summary in summaries.items():
        figures[f"{name}_shards"] = summary["shards"]
        figures[f"{name}_wall_s"] = summary["wall_time_s"]
        figures[f"{name}_footage_hours_per_hour"] = round(args.seconds / summary["wall_time_s"], 2)
    figures["speedup"] = round(summaries["whole"]["wall_time_s"] / summaries["segments"]["wall_time_s"], 3)
    _report(figures, args.json_out)
    return 0
