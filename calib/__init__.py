"""Calibration: text sources, token windows, block inputs and per-Linear statistics. Knows no method."""
