"""Model dirs that ship inside the package, so the main job runs offline on a fresh machine.

`plates-rtdetr-slim`: a licence-plate detector (RT-DETR, `rtdetr-slim` preset, 5M parameters,
float16 weights) trained from scratch with `platescope train` on the plates data set; its
`platescope_training.json` records the command's config, the per-epoch history and the val metrics.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_NAME = "plates-rtdetr-slim"


def default_model_dir() -> str:
    """The bundled licence-plate model: the default of `detect` and `demo`."""
    return str(Path(__file__).resolve().parent / DEFAULT_MODEL_NAME)
