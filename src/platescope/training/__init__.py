"""Fine-tuning detectors with Ray Train: data, the per-worker loop, export of the best model."""
