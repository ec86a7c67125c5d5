"""The one loading policy for model and adapter weights: where they come from and what may be loaded.

Every loader goes through `resolve_model` or `resolve_adapter`: detect's HFDetector, Florence2Detector
(its base and its LoRA adapter), and both training recipes (the model fine-tuned, and the checkpoint
a run resumes from). What they get back, a `WeightsSource`, is the only place that decides:

- where the weights are: a local dir as it is; an s3:// dir copied once into a local cache keyed by
  its objects' versions; anything else shaped like "name" or "org/name" a Hugging Face hub id;
- that only safetensors load unless `allow_unsafe_weights`: pickle files (pytorch_model.bin,
  adapter_model.bin, *.pt, ...) can run arbitrary code when unpickled. A local (or cached s3) dir is
  looked at before anything loads, and a dir holding only pickle weights is refused with an error
  naming it. A hub model cannot be looked at before download, so from_pretrained gets
  `use_safetensors=True`, which makes transformers refuse a repo without safetensors. PEFT has no
  such switch (it falls back to adapter_model.bin by itself), so a hub adapter is downloaded here,
  safetensors only, and then checked like a local dir;
- that no code from the model dir or hub runs unless `trust_remote_code`: every from_pretrained is
  handed `trust_remote_code` explicitly (transformers then refuses an `auto_map` it would need);
- which weights they are: a content hash (or the hub commit) that `model_id` carries into the table.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from typing import Any

from platescope import storage
from platescope.cache import cache_folder
from platescope.storage import S3Options

SAFE_SUFFIXES = (".safetensors", ".safetensors.index.json")
PICKLE_SUFFIXES = (".bin", ".bin.index.json", ".pt", ".pth", ".ckpt", ".pkl")
# "name" or "org/name" as the hub spells them; anything else that does not exist is a missing path.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
# What a hub adapter download may fetch: configs and safetensors, and pickle only when allowed.
_HUB_ADAPTER_FILES = ["*.json", "*.safetensors"]
_HUB_ADAPTER_PICKLE_FILES = ["*.bin"]


class UnsafeWeightsError(ValueError):
    """A model or adapter whose weights may not load under the policy; the message names its path."""


def weight_files(path: str) -> list[str]:
    """Top-level weight files (from_pretrained never reads weights from subfolders), sorted."""
    return sorted(
        f for f in os.listdir(path)
        if f.endswith(SAFE_SUFFIXES + PICKLE_SUFFIXES) and os.path.isfile(os.path.join(path, f))
    )


def check_weights(path: str, allow_unsafe_weights: bool, *, name: str | None = None,
                  expected: str = "model.safetensors") -> None:
    """Refuse a dir that holds no weights, or only pickle weights without `allow_unsafe_weights`.

    `name` is the source as the user gave it (an s3:// URI, when `path` is its cached copy).
    """
    where = path if name is None or name == path else f"{name} (local copy {path})"
    files = weight_files(path)
    if any(f.endswith(SAFE_SUFFIXES) for f in files):
        return
    if not files:
        raise UnsafeWeightsError(f"{where}: no weights found (expected {expected})")
    if not allow_unsafe_weights:
        raise UnsafeWeightsError(
            f"{where} holds only pickle weights ({', '.join(files)}), which can run arbitrary code when "
            "loaded; convert them to safetensors, or pass allow_unsafe_weights=True if you trust them"
        )


def hash_weights(path: str) -> str:
    """12 hex chars of sha256 over the weight files' names and bytes: the same weights give the same
    id wherever they are stored (local dir, s3 copy), and any change to them gives a new one."""
    files = weight_files(path)
    safe = [f for f in files if f.endswith(SAFE_SUFFIXES)]
    digest = hashlib.sha256()
    for name in safe or files:  # pickle files lying beside safetensors are never loaded
        digest.update(name.encode() + b"\0")
        with open(os.path.join(path, name), "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()[:12]


def _fetch_s3_dir(uri: str, s3: S3Options | None, cache_dir: str | None) -> str:
    """A local copy of an s3:// model dir, reused while none of its objects change.

    Keyed by the objects' URIs, sizes and ETags, so an overwritten model is fetched again. The copy
    lands in a temporary sibling that is renamed into place, so several actors on one node can race
    for the same model without ever loading a half-written dir.
    """
    objects = storage.list_objects(uri, s3)
    key = hashlib.sha256(
        "\n".join([uri.rstrip("/")] + [f"{o.uri}\t{o.size}\t{o.version}" for o in objects]).encode()
    ).hexdigest()[:24]
    root = cache_dir or cache_folder("models")
    dest = os.path.join(root, f"s3-{key}")
    if os.path.isdir(dest):
        return dest
    tmp = os.path.join(root, f".tmp-{key}-{uuid.uuid4().hex}")
    try:
        storage.download_dir(uri.rstrip("/"), tmp, s3)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not os.path.isdir(dest):  # not lost to a concurrent download of the same key
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def local_model_dir(model: str, s3: S3Options | None, cache_dir: str | None = None) -> str | None:
    """The local dir to load `model` from, or None when `model` is a hub id."""
    if storage.is_s3(model):
        return _fetch_s3_dir(model, s3, cache_dir)
    path = os.path.expanduser(model.removeprefix("file://"))
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise NotADirectoryError(f"{model}: is a file; a model is a dir with config.json and weights")
    if not HUB_ID.match(model):
        raise FileNotFoundError(f"{model}: no such model dir")
    return None


def hub_revision(model: str, cache_dir: str | None) -> Any:
    """The hub revision pinned to a commit, so processor and weights come from the same commit and
    model_id can name it. Best effort: transformers returns the request unchanged when offline."""
    try:
        from transformers.utils.hub import resolve_revision
    except ImportError:  # transformers releases before revision pinning
        return None
    return resolve_revision(model, None, cache_dir=cache_dir)


def hub_adapter_patterns(allow_unsafe_weights: bool) -> list[str]:
    """The files a hub adapter download fetches (pickle weights never reach the disk unless allowed)."""
    return _HUB_ADAPTER_FILES + (_HUB_ADAPTER_PICKLE_FILES if allow_unsafe_weights else [])


def _download_hub_adapter(adapter: str, cache_dir: str | None, allow_unsafe_weights: bool) -> str:
    from huggingface_hub import snapshot_download

    return snapshot_download(adapter, allow_patterns=hub_adapter_patterns(allow_unsafe_weights),
                             cache_dir=cache_dir)


@dataclass
class WeightsSource:
    """A model or adapter resolved under the policy: what to hand from_pretrained, and its identity.

    `path` is from_pretrained's first argument (a local dir, or the hub id); `model_kwargs` and
    `processor_kwargs` are the rest. A local dir's weights were checked when it was resolved.
    """

    name: str  # as the user gave it: what model_id starts with
    path: str
    is_local: bool
    allow_unsafe_weights: bool
    trust_remote_code: bool
    cache_dir: str | None = None
    revision: Any = None  # hub only: the requested revision, pinned to its commit where known

    @functools.cached_property
    def weights_hash(self) -> str | None:
        """12 hex of the weights' sha256 for a local dir (computed once, on first use); None for a hub id."""
        return hash_weights(self.path) if self.is_local else None

    @property
    def commit(self) -> str | None:
        return getattr(self.revision, "resolved", None)

    @property
    def model_id(self) -> str:
        """The source as given, @ the weights' hash (local) or the hub commit (where known)."""
        version = self.weights_hash if self.is_local else self.commit
        return f"{self.name}@{version}" if version else self.name

    def _hub_kwargs(self) -> dict[str, Any]:
        return {} if self.is_local else {"cache_dir": self.cache_dir, "revision": self.revision}

    @property
    def model_kwargs(self) -> dict[str, Any]:
        """For `<Model>.from_pretrained(path, **model_kwargs)`: safetensors only unless allowed (None lets
        transformers prefer safetensors and fall back to pickle), remote code only if trusted."""
        return {"use_safetensors": None if self.allow_unsafe_weights else True,
                "trust_remote_code": self.trust_remote_code, **self._hub_kwargs()}

    @property
    def processor_kwargs(self) -> dict[str, Any]:
        """For `Auto*Processor.from_pretrained(path, **processor_kwargs)` (processors hold no weights)."""
        return {"trust_remote_code": self.trust_remote_code, **self._hub_kwargs()}


def resolve_local_model(model: str, *, s3: S3Options | None = None, cache_dir: str | None = None,
                        allow_unsafe_weights: bool = False, trust_remote_code: bool = False) -> WeightsSource | None:
    """`resolve_model` of a local or s3:// dir; None for a hub id (then nothing is fetched or imported)."""
    local = local_model_dir(model, s3, cache_dir)
    if local is None:
        return None
    check_weights(local, allow_unsafe_weights, name=model)
    return WeightsSource(model, local, True, allow_unsafe_weights, trust_remote_code, cache_dir)


def resolve_model(model: str, *, s3: S3Options | None = None, cache_dir: str | None = None,
                  allow_unsafe_weights: bool = False, trust_remote_code: bool = False) -> WeightsSource:
    """A model dir (local, s3:// or hub id) under the policy; a local one's weights are checked here."""
    local = resolve_local_model(model, s3=s3, cache_dir=cache_dir, allow_unsafe_weights=allow_unsafe_weights,
                                trust_remote_code=trust_remote_code)
    if local is not None:
        return local
    return WeightsSource(model, model, False, allow_unsafe_weights, trust_remote_code, cache_dir,
                         revision=hub_revision(model, cache_dir))


def resolve_adapter(adapter: str, *, s3: S3Options | None = None, cache_dir: str | None = None,
                    allow_unsafe_weights: bool = False) -> WeightsSource:
    """A PEFT adapter dir (local, s3:// or hub id), always resolved to a checked local dir: PEFT
    itself would load adapter_model.bin whenever no safetensors file is there."""
    local = local_model_dir(adapter, s3, cache_dir)
    if local is None:
        local = _download_hub_adapter(adapter, cache_dir, allow_unsafe_weights)
        if not allow_unsafe_weights and not any(f.endswith(SAFE_SUFFIXES) for f in weight_files(local)):
            raise UnsafeWeightsError(
                f"{adapter}: the hub adapter has no adapter_model.safetensors; pickle weights "
                "(adapter_model.bin) are not downloaded unless allow_unsafe_weights=True")
    check_weights(local, allow_unsafe_weights, name=adapter, expected="adapter_model.safetensors")
    return WeightsSource(adapter, local, True, allow_unsafe_weights, trust_remote_code=False, cache_dir=cache_dir)
