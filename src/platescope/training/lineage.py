"""What an export records about the model it was fine-tuned from (`model=`), so that its training record
tells the whole story: a model pretrained here, then fine-tuned, names both runs.

    "base_model": {"model": <as the user named it>, "weights_sha256_12": <its weights' hash>,
                   "training": {<the base's own training_config and val_metrics, with its base_model>}}

"training" is there only when the base is a local or s3:// dir with a `platescope_training.json`.
"""

from __future__ import annotations

import json
import os
from typing import Any

TRAINING_INFO = "platescope_training.json"
BASE_INFO_KEY = "base_model"
# Kept from the base's record: how it was trained and how it scored (its history would repeat what its
# own export already holds, epoch by epoch).
_INHERITED = ("training_config", "val_metrics", BASE_INFO_KEY)


def base_model_record(cfg, s3) -> dict[str, Any]:
    """The base of a run that starts from `cfg.model`, resolved under detect's loading policy (cached:
    training already fetched it)."""
    from platescope.detectors.loading import resolve_model

    weights = resolve_model(cfg.model, s3=s3, allow_unsafe_weights=cfg.allow_unsafe_weights)
    record: dict[str, Any] = {"model": cfg.model, "weights_sha256_12": weights.weights_hash}
    info_path = os.path.join(weights.path, TRAINING_INFO)
    if weights.is_local and os.path.isfile(info_path):
        with open(info_path) as f:
            info = json.load(f)
        record["training"] = {key: info[key] for key in _INHERITED if key in info}
    return record
