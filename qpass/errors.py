"""Errors qpass raises for bad input: each names the problem and how to fix it."""


class QpassError(Exception):
    """Base class of every error qpass raises on purpose."""


class ModelError(QpassError):
    """The model cannot be read, or holds something qpass cannot handle."""


class CalibrationError(QpassError):
    """Calibration data is missing, empty, non-finite, or does not match the model's inputs."""


class OutputError(QpassError):
    """An output file cannot be written."""
