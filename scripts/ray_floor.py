"""The floor under any local Ray Data job's first result on this machine: Ray's start and one no-op actor.

    python scripts/ray_floor.py [--runs 3]

Each run is a fresh process that starts a local Ray exactly as `detect` does (platescope.ray_session),
maps 32 tiny rows through an actor pool of one actor that does nothing, and prints when `ray.init`
returned and when the first batch came back, in seconds since the process started. Whatever
`detect` takes before its first result beyond this is its own (imports, model, decoding); this
part belongs to Ray (its servers, agents and worker processes starting on the same cores).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time


def _one_run() -> None:
    from platescope.cputime import process_started
    from platescope.ray_session import start_ray

    started = process_started()
    start_ray(None)
    ray_up = time.monotonic() - started
    import ray

    class Nothing:
        def __call__(self, batch):
            return batch

    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ray.data.from_items([{"x": i} for i in range(32)]).map_batches(
        Nothing, batch_size=8, compute=ray.data.ActorPoolStrategy(size=1))
    for _ in ds.iter_batches(batch_size=None):
        print(f"ray.init returned {ray_up:.2f} s, first batch {time.monotonic() - started:.2f} s after the process started",
              flush=True)
        break
    ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a run's own process
    args = parser.parse_args()
    if args.one:
        _one_run()
        return
    for _ in range(args.runs):
        done = subprocess.run([sys.executable, __file__, "--one"], capture_output=True, text=True, check=True)
        print(next(line for line in done.stdout.splitlines() if line.startswith("ray.init")))


if __name__ == "__main__":
    main()
