"""How a detector batch is divided: into groups of one image size, and a group into slices that run at
once, one per thread, each single-threaded.

On CPU a small image's ops leave a multi-threaded model's threads waiting on each other; a slice of the
batch per thread keeps every core busy, and one slice's Python between ops runs while the others
compute (measured on the default model on 2 cores: see README, "Benchmark").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np

from platescope.cputime import PhaseClock

T = TypeVar("T")


def slice_indices(indices: list[int], slices: int) -> list[list[int]]:
    """indices cut into at most `slices` runs of near-equal length, in order."""
    return [part.tolist() for part in np.array_split(np.asarray(indices), max(1, min(slices, len(indices))))]


def run_slices(pool: ThreadPoolExecutor, clock: PhaseClock, parts: list[list[int]],
               run: Callable[[list[int]], list[T]]) -> list[T]:
    """run(part) for every part at once on the pool, each part's CPU counted on its own thread; the
    results of all parts in order."""

    def run_slice(part: list[int]) -> list[T]:
        with clock.own_thread():
            return run(part)

    return [result for part in pool.map(run_slice, parts) for result in part]


def resized_groups(images: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]]) -> dict[tuple[int, int], list[int]]:
    """The indices of model-size uint8 images (as the decode tasks make them) by image size, each
    checked; `sizes` are the originals' (height, width). A detector runs one size at a time so that no
    image's boxes depend on the padding its batch neighbours bring (see HFDetector.detect)."""
    if len(images) != len(sizes):
        raise ValueError(f"{len(images)} images but {len(sizes)} sizes")
    groups: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image {i}: expected H x W x 3 uint8 RGB, got {image.dtype} {image.shape}")
        groups.setdefault(image.shape[:2], []).append(i)
    return groups
