"""Detectors: Ray-agnostic models that turn RGB images into Detections."""
