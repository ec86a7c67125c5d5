"""The one seam between the pipeline and any model: `Detector.detect`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from platescope.schema import Detections


@runtime_checkable
class Detector(Protocol):
    """Finds objects in RGB images. Knows nothing of Ray, storage or the table.

    `model_id` is what goes in the table's `model` column: where the model came from plus a content
    hash, so two runs can tell whether they used the same weights.
    """

    model_id: str

    def detect(self, images: Sequence[np.ndarray], prompts: Sequence[str] | None = None) -> list[Detections]:
        """One Detections per image (H x W x 3 uint8 RGB), boxes in that image's pixels."""
        ...
