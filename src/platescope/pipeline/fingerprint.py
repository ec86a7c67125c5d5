"""What a run's rows depend on, recorded at its first start so a resume cannot mix two configs.

`<run>/fingerprint.json` holds every setting that changes the rows a shard gets (the detector,
the model as named and a hash of its weights, the adapter likewise, threshold, prompt, sampling,
limits), written before the manifest. A rerun of the run id computes the same from its own config
and refuses, naming each field that differs, before any work. Settings that only change how fast
or where the run goes (batch size, actors, CPUs/GPUs, address, progress, the error budget,
evaluation, S3 credentials) are not in it, nor are those the manifest already fixed (input,
num_inputs_per_shard, incremental, video_segment_s): a resume reads the manifest, not the inputs.
`device` is left out too: `auto` already resolves per cluster, and CPU and GPU differ only in float
rounding; so are what runs the model (`onnx_runtime`, `compile`, `slice_batches`), for the same reason.

Weights are named as the detector's `model` column names them (`<model>@<hash12>`): for a local or
s3:// dir the first 12 hex digits of SHA-256 over the weight files' names and bytes
(`detectors.loading.hash_weights`), for a hub id the commit it resolves to (unknown offline: then
only the id is compared; a hub adapter is named by its commit too, where the detector hashes its
download). An s3:// dir is hashed by streaming its weight objects once; the result is
cached on this machine keyed by the objects' URIs, sizes and ETags, so a nightly run with an
unchanged model costs one listing.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import posixpath
from typing import Any

from platescope import storage
from platescope.cache import cache_folder
from platescope.config import DetectConfig
from platescope.pipeline.errors import PreflightError, StorageUnreachable, is_unreachable
from platescope.sources.images import DRAFT_SLACK
from platescope.storage import S3Options

log = logging.getLogger(__name__)

FINGERPRINT_FILE = "fingerprint.json"
FORMAT = 1
# Config fields whose values go into the fingerprint as they are (plus the weights hashes).
ROW_FIELDS = ("detector", "model", "adapter", "prompt", "threshold", "video_fps", "max_pixels",
              "max_new_tokens", "dtype", "strict", "trust_remote_code", "jpeg_draft", "nms_iou")
WEIGHTS_FIELDS = {"model": "model_weights", "adapter": "adapter_weights"}


def _s3_weights_hash(uri: str, s3: S3Options | None) -> str:
    """hash_weights of an s3:// dir, exactly as the detector computes it on its downloaded copy."""
    from platescope.detectors.loading import PICKLE_SUFFIXES, SAFE_SUFFIXES

    root = uri.rstrip("/")
    top = {}
    for obj in storage.list_objects(root, s3):
        rel = obj.uri[len(root) + 1:] if obj.uri.startswith(root + "/") else posixpath.basename(obj.uri)
        if "/" not in rel and rel.endswith(SAFE_SUFFIXES + PICKLE_SUFFIXES):
            top[rel] = obj  # from_pretrained reads weights from the top level only
    names = sorted(top)
    safe = [n for n in names if n.endswith(SAFE_SUFFIXES)]
    names = safe or names
    key = hashlib.sha256("\n".join(f"{top[n].uri}\t{top[n].size}\t{top[n].version}" for n in names)
                         .encode()).hexdigest()[:32]
    cached = os.path.join(cache_folder("weight-hashes"), key)
    try:
        with open(cached) as f:
            value = f.read().strip()
        if len(value) == 12:
            return value
    except OSError:
        pass
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode() + b"\0")
        with storage.open_read(top[name].uri, s3) as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    value = digest.hexdigest()[:12]
    try:
        os.makedirs(cache_folder("weight-hashes"), exist_ok=True)
        tmp = f"{cached}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(value)
        os.replace(tmp, cached)
    except OSError:
        pass  # an unwritable cache only costs the next run a re-read
    return value


def weights_id(field: str, uri: str, s3: S3Options | None) -> str | None:
    """The weights part of the detector's model id for `uri`; None for a hub id whose commit is
    unknown (offline)."""
    from platescope.detectors.loading import hash_weights, hub_revision, local_model_dir

    try:
        if storage.is_s3(uri):
            return _s3_weights_hash(uri, s3)
        local = local_model_dir(uri, s3)
        if local is not None:
            return hash_weights(local)
        return getattr(hub_revision(uri, None), "resolved", None) or None
    except PreflightError:
        raise
    except Exception as e:  # noqa: BLE001 - one line naming the model, as the other preflight checks
        if is_unreachable(e):
            raise StorageUnreachable.of("hashing the weights of", uri, e) from None
        raise PreflightError(f"{field} {uri}: its weights cannot be read ({type(e).__name__}: {e})") from None


def compute(cfg: DetectConfig) -> dict[str, Any]:
    """The fingerprint of `cfg`: the row-relevant fields and the weights they name."""
    s3 = cfg.s3.options()
    values = cfg.model_dump(mode="json")
    fields: dict[str, Any] = {name: values[name] for name in ROW_FIELDS}
    if cfg.detector != "florence2":
        fields["max_new_tokens"] = None  # only a generating detector reads it
    # How small a JPEG draft may decode is platescope's rule, not a setting, but it changes the
    # pixels: a run started under another rule must not resume under this one.
    fields["jpeg_draft_slack"] = DRAFT_SLACK if cfg.jpeg_draft else None
    # Recorded only when on, so that a run recorded before the field existed (plain NMS or none) resumes.
    fields["nms_merge"] = True if cfg.nms_merge else None
    for field, weights_field in WEIGHTS_FIELDS.items():
        uri = getattr(cfg, field)
        fields[weights_field] = weights_id(field, uri, s3) if uri else None
    return fields


def differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`field old -> new` for each field that differs. A weights hash missing on one side (a hub id
    resolved offline) is not compared when the model it belongs to is the same."""
    out = []
    for name in sorted(set(recorded) | set(current)):
        old, new = recorded.get(name), current.get(name)
        owner = next((k for k, v in WEIGHTS_FIELDS.items() if v == name), None)
        if owner and (old is None or new is None) and recorded.get(owner) == current.get(owner):
            continue
        if old != new:
            out.append(f"{name} {json.dumps(old, ensure_ascii=False)} -> {json.dumps(new, ensure_ascii=False)}")
    return out


def uri(run_dir: str) -> str:
    return storage.join(run_dir, FINGERPRINT_FILE)


def read(run_dir: str, s3: S3Options | None) -> dict[str, Any] | None:
    """The recorded fields, or None for a run that has none (started before fingerprints)."""
    try:
        data = storage.read_bytes(uri(run_dir), s3)
    except FileNotFoundError:
        return None
    return json.loads(data)["fields"]


def write(run_dir: str, fields: dict[str, Any], s3: S3Options | None,
          about: str = "settings the rows depend on, from the run's first start; a rerun that differs refuses",
          ) -> None:
    from platescope import __version__

    doc = {"format": FORMAT, "fields": fields, "platescope": __version__,
           "recorded_at": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "about": about}
    storage.write_bytes_atomic(uri(run_dir), json.dumps(doc, indent=2).encode(), s3)


def check_resume(run_id: str, run_dir: str, recorded: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse (PreflightError, one line) to resume with settings that would change the rows."""
    diffs = differences(recorded, current)
    if diffs:
        raise PreflightError(
            f"run {run_id} ({run_dir}) was started with other settings that change its rows; resuming "
            f"it with these would mix two configs in one table: {'; '.join(diffs)}. Rerun with the "
            "first start's settings, or give a new run id")
