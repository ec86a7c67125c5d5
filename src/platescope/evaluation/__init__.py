"""Scoring detections against ground truth: readers, streaming COCO metrics, reports."""
