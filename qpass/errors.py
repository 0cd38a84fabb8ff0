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


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (at most 300 characters), or its type's name:
    how a library's multi-line error is quoted in qpass's one-line messages."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
