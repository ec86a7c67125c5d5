"""Model dirs that ship inside the package, so the main job runs offline on a fresh machine.

`plates-rtdetr-slim`: a licence-plate detector (RT-DETR, `rtdetr-slim` preset, 5M parameters,
float16 weights) trained from scratch with `platescope train` on the plates data set, then fine-tuned
from those weights 20 epochs more; its `platescope_training.json` records the command's config, the
per-epoch history and the val metrics, and its base's config and metrics (`base_model`).
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_NAME = "plates-rtdetr-slim"
# What `detect` does after the bundled model unless nms_iou or nms_merge is given: its queries often find
# one plate two or three times with slightly different boxes, and merging them gives one tighter box
# (val AP 0.466 -> 0.474, AP50 0.830 -> 0.855; chosen on the earlier default, AP 0.428 -> 0.467, AP75
# 0.391 -> 0.467; IoU 0.4 chosen on val; README, "Duplicate boxes").
DEFAULT_MODEL_NMS = {"nms_iou": 0.4, "nms_merge": True}


def default_model_dir() -> str:
    """The bundled licence-plate model: the default of `detect` and `demo`."""
    return str(Path(__file__).resolve().parent / DEFAULT_MODEL_NAME)
