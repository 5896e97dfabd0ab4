"""Calibration: data, the KL-Top loss and the transform trainer."""
