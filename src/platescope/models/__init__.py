"""Model dirs that ship inside the package, so the main job runs offline on a fresh machine.

`plates-rtdetr-slim`: a licence-plate detector (RT-DETR, `rtdetr-slim` preset, 5M parameters,
float16 weights, 448x448 stretched) trained from scratch with `platescope train` on the plates data
set at 384x384, then fine-tuned from those weights three times (20 epochs more; at 512x512; at
448x448). Its `platescope_training.json` records the last run's config, per-epoch history and val
metrics, and its base's config and metrics, generation by generation (`base_model`).
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_NAME = "plates-rtdetr-slim"
# What `detect` does after the bundled model unless nms_iou or nms_merge is given: its queries often find
# one plate two or three times with slightly different boxes, and merging them gives one box (chosen on
# the first default, val AP 0.428 -> 0.467, AP75 0.391 -> 0.467; IoU 0.4 chosen on val). On the default
# AP stays (0.551 -> 0.550) and precision at score 0.5 goes 0.852 -> 0.920 (README, "Duplicate boxes").
DEFAULT_MODEL_NMS = {"nms_iou": 0.4, "nms_merge": True}


def default_model_dir() -> str:
    """The bundled licence-plate model: the default of `detect` and `demo`."""
    return str(Path(__file__).resolve().parent / DEFAULT_MODEL_NAME)
