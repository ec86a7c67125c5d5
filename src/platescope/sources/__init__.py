"""Sources: what inputs a run has (manifest) and how each becomes RGB frames (images, video)."""

from __future__ import annotations

import os

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".mkv", ".avi", ".mov"})


class InputError(Exception):
    """A bad input: becomes an error row `"<kind>: <message>"`, never a crash.

    `kind` is a short stable word (empty_file, not_an_image, truncated_image, too_many_pixels,
    corrupt_video, no_video_stream, read_failed, ...) that summaries count errors by.
    """

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


def media_kind(uri: str) -> str | None:
    """"image", "video", or None for an extension platescope does not read."""
    ext = os.path.splitext(uri)[1].lower()
    if ext in IMAGE_EXTENSIONS:
        return "image"
    if ext in VIDEO_EXTENSIONS:
        return "video"
    return None
