"""summary.json: a run's counts (added up from its shard markers), errors by kind, time and throughput."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from platescope import storage
from platescope.sources.manifest import Manifest
from platescope.storage import S3Options

SUMMARY_FILE = "summary.json"


def build_summary(
    *,
    run_id: str,
    run_dir: str,
    manifest: Manifest,
    done: dict[str, dict],
    num_resumed_shards: int,
    wall_time_s: float,
    rows_this_attempt: int,
    max_error_fraction: float,
    tracks: int | None = None,
) -> dict[str, Any]:
    """`tracks`: the number of tracks in the run's finished videos (detect --track), else None."""
    totals: Counter = Counter()
    by_kind: Counter = Counter()
    for counts in done.values():
        for key in ("rows", "images", "frames", "detections", "errors"):
            totals[key] += counts[key]
        by_kind.update(counts["errors_by_kind"])
    rows = totals["rows"]
    error_fraction = totals["errors"] / rows if rows else 0.0
    shards = manifest.shards()
    return {
        "run_id": run_id,
        "output": run_dir,
        "inputs": manifest.num_inputs,  # a video split into segments is one input (and several shards)
        "inputs_skipped_unsupported": manifest.num_skipped,
        "shards": len(shards),
        "shards_done": sum(1 for s in shards if s in done),
        "shards_resumed": num_resumed_shards,
        "rows": rows,
        "images": totals["images"],
        "frames": totals["frames"],
        "detections": totals["detections"],
        "errors": totals["errors"],
        "errors_by_kind": dict(sorted(by_kind.items())),
        "error_fraction": round(error_fraction, 6),
        "max_error_fraction": max_error_fraction,
        "wall_time_s": round(wall_time_s, 3),
        # Throughput counts what this attempt processed, not shards a resumed run found done.
        "rows_per_s": round(rows_this_attempt / wall_time_s, 3) if wall_time_s > 0 else None,
        "complete": len(done) >= len(shards),
        "tracks": tracks,
    }


def write_summary(summary: dict[str, Any], run_dir: str, s3: S3Options | None) -> None:
    storage.write_bytes_atomic(storage.join(run_dir, SUMMARY_FILE),
                               json.dumps(summary, indent=2).encode(), s3)


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"platescope detect: run {summary['run_id']} -> {summary['output']}"]
    keys = ["inputs", "inputs_skipped_unsupported", "shards", "shards_resumed", "rows", "images", "frames",
            "detections", "errors", "error_fraction", "wall_time_s", "rows_per_s"]
    if summary.get("tracks") is not None:
        keys.insert(keys.index("detections") + 1, "tracks")
    width = max(len(k) for k in keys)
    lines += [f"  {k:<{width}}  {summary[k]}" for k in keys]
    for kind, n in summary["errors_by_kind"].items():
        lines.append(f"  {'  error ' + kind:<{width}}  {n}")
    return "\n".join(lines)
