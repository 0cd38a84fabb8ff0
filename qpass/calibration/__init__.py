"""Calibration: data checking, streaming observers, and the Context that runs the graph."""

from qpass.calibration.context import Context
from qpass.calibration.data import CalibrationData
from qpass.calibration.observers import (
    HistogramObserver,
    MinMaxObserver,
    Observer,
    make_observer,
)

__all__ = [
    "CalibrationData",
    "Context",
    "HistogramObserver",
    "MinMaxObserver",
    "Observer",
    "make_observer",
]
