"""Errors qpass raises for bad input: each names the problem and how to fix it."""


class QpassError(Exception):
    """Base class of every error qpass raises on purpose."""


class ModelError(QpassError):
    """The model cannot be read, or holds something qpass cannot handle."""


class CalibrationError(QpassError):
    """Calibration data is missing, empty, non-finite, or does not match the model's inputs."""


class OutputError(QpassError):
    """An output file cannot be written."""


class LintError(QpassError):
    """A compiled graph breaks its target's rules (`qpass.lint`); `findings` lists them."""

    def __init__(self, message: str, findings: list) -> None:
        super().__init__(message)
        self.findings = list(findings)
