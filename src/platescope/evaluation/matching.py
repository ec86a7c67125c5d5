"""Which ground-truth image a detections row is about.

Rows name their object by full URI (s3://bucket/2026/cam1/a.jpg or /data/cam1/a.jpg); labels name
images by a path relative to the dataset (cam1/a.jpg, images/a.jpg). A row's path is first made
relative to the input root it was listed from, then matched to the label key that equals it or of
which one is a whole-component suffix of the other. So the same labels work for a local copy and an
S3 copy of a dataset, whether `detect` was pointed at the dataset folder or at its images/ folder.
"""

from __future__ import annotations

import os
import posixpath
from collections import defaultdict
from urllib.parse import unquote

from platescope import storage


def _normalise(path: str) -> str:
    # surrogateescape: a non-UTF-8 local name (escaped as file://...%FF) comes back as os.listdir gives it
    path = unquote(path, errors="surrogateescape") if path.startswith("file://") else path
    path = path.removeprefix("file://").replace("\\", "/")
    while path.startswith("./"):
        path = path[2:]
    return path


def _root_prefix(root: str) -> str:
    root = _normalise(root)
    if not storage.is_s3(root):
        root = os.path.abspath(root).replace("\\", "/")
    return root.rstrip("/") + "/"


def _is_suffix(short: str, long: str) -> bool:
    return long == short or long.endswith("/" + short)


class ImageMatcher:
    """Maps row URIs to indices of ground-truth images by relative path."""

    def __init__(self, keys: list[str], input_roots: list[str]) -> None:
        self.keys = [_normalise(k).lstrip("/") for k in keys]
        # Longest root first, so nested inputs take the most specific one.
        self.roots = sorted((_root_prefix(r) for r in input_roots), key=len, reverse=True)
        self._by_name: dict[str, list[int]] = defaultdict(list)
        for i, key in enumerate(self.keys):
            self._by_name[posixpath.basename(key)].append(i)
        self.ambiguous = 0  # rows whose relative path fits several label keys

    def relative(self, uri: str) -> str:
        path = _normalise(uri)
        for root in self.roots:
            if path.startswith(root):
                return path[len(root):]
            if path == root.rstrip("/"):  # the input was this very file
                return posixpath.basename(path)
        return path.split("://", 1)[-1].lstrip("/")

    def match(self, uri: str) -> int | None:
        rel = self.relative(uri)
        candidates = self._by_name.get(posixpath.basename(rel), [])
        # A label key inside the row's path (labels relative to a deeper folder): longest wins.
        inside = [i for i in candidates if _is_suffix(self.keys[i], rel)]
        if inside:
            return max(inside, key=lambda i: len(self.keys[i]))
        # The row's path inside a label key (detect ran on a deeper folder): must be unique.
        around = [i for i in candidates if _is_suffix(rel, self.keys[i])]
        if len(around) == 1:
            return around[0]
        if len(around) > 1:
            self.ambiguous += 1
        return None
