"""The detector's own work on model-size images, with the model in PyTorch and in ONNX Runtime, in turns.

    python scripts/bench_runtime.py [--model DIR] [--threads 2] [--batch 8] [--batches 6] [--reps 3]

Builds the same HF detector twice (`onnx_runtime=False` and `True`, each with `--threads` threads and
its batch slices, as a detector actor has them), exports the ONNX graph first if it is not cached,
then times `detect_resized` on random model-size images, alternating the two for `--reps` rounds so
that a machine whose speed drifts treats both alike. Prints wall milliseconds per image for each
round and the ratio of the medians. What `detect` gains as a whole is `platescope bench detect`'s to
say; this isolates the forward pass (plus the small preprocess and postprocess around it).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main() -> None:
    from platescope.detectors.hf import HFDetector
    from platescope.models import default_model_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model dir (default: the packaged default model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=6, help="batches per timed round")
    parser.add_argument("--reps", type=int, default=3, help="rounds of each, in turns")
    args = parser.parse_args()

    model = args.model or default_model_dir()
    detectors = {name: HFDetector(model, num_threads=args.threads, onnx_runtime=name == "onnxruntime")
                 for name in ("torch", "onnxruntime")}
    geometry = detectors["torch"].geometry
    if geometry is None:
        raise SystemExit(f"{model}: its processor has no geometry the fast path knows")
    # 720p frames resized to the model's input as the decode tasks resize them
    rng = np.random.default_rng(0)
    images = [geometry.resize(rng.integers(0, 256, (720, 1280, 3), dtype=np.uint8)) for _ in range(args.batch)]
    sizes = [(720, 1280)] * args.batch
    height, width = images[0].shape[:2]
    for detector in detectors.values():  # the export (or cache load) and first-call costs, untimed
        detector.detect_resized(images, sizes)
    print(f"model {model}: runtimes {[d.runtime for d in detectors.values()]}, {args.threads} threads, "
          f"batches of {args.batch} at {height}x{width}")
    times: dict[str, list[float]] = {name: [] for name in detectors}
    for rep in range(args.reps):
        for name, detector in detectors.items():
            started = time.perf_counter()
            for _ in range(args.batches):
                detector.detect_resized(images, sizes)
            times[name].append(1000 * (time.perf_counter() - started) / (args.batches * args.batch))
            print(f"round {rep + 1} {name:12s} {times[name][-1]:7.1f} ms/image")
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"medians: torch {medians['torch']:.1f} ms/image, onnxruntime {medians['onnxruntime']:.1f} ms/image: "
          f"{medians['torch'] / medians['onnxruntime']:.2f}x")


if __name__ == "__main__":
    main()
