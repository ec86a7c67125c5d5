"""Where platescope keeps what it can make again on a machine: copies of s3:// models, weight hashes,
compiled and exported models. All under ~/.cache/platescope, one folder per kind."""

from __future__ import annotations

import os


def cache_folder(kind: str) -> str:
    """The folder for one kind of cached thing (made by whoever writes there first)."""
    return os.path.join(os.path.expanduser("~"), ".cache", "platescope", kind)
