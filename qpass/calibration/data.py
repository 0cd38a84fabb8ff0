"""Calibration data: read, check against the model's inputs, and cut into batches."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx_ir as ir

from qpass.errors import CalibrationError

logger = logging.getLogger(__name__)

FLOAT32_MAX = float(np.finfo(np.float32).max)

CalibrationSource = str | os.PathLike | Mapping[str, np.ndarray] | Iterable


class CalibrationData:
    """Checked calibration samples for one model, served as input feeds.

    Accepts an `.npz` file (keys are input names, first axis is samples), a mapping of input name
    to stacked samples, or one array of stacked samples (single-input models), all cut into
    batches of `batch_size` when the model's batch dimension is dynamic (else one sample per
    run); or an iterable whose items are input dicts or arrays (single-input models), each run as
    given. An item one rank below the model input is a single sample and gets a batch axis.
    """

    def __init__(self, source: CalibrationSource, graph: ir.Graph, batch_size: int = 8):
        self.inputs = {v.name: v for v in graph.inputs}
        dynamic = all(_batch_dim_is_dynamic(v) for v in self.inputs.values())
        # Feeds cut from stacked samples along a dynamic batch axis may be cut finer.
        stacked = isinstance(source, str | os.PathLike | Mapping | np.ndarray)
        self.splittable = dynamic and stacked
        size = batch_size if dynamic else _fixed_batch(graph)
        feeds = self._read(source, size)
        if stacked and not dynamic and size > 1 and feeds and _rows(feeds[-1]) < size:
            logger.warning(
                "the model's batch size is fixed at %d: the last %d calibration samples are left "
                "out", size, _rows(feeds[-1]),
            )
            feeds = feeds[:-1]
            if not feeds:
                raise CalibrationError(
                    f"the model's batch size is fixed at {size}: give at least {size} "
                    "calibration samples"
                )
        self._ranges: dict[str, tuple[float, float]] = {}  # float inputs: (min, max) seen
        self.feeds = [
            {name: self._check(name, array) for name, array in feed.items()} for feed in feeds
        ]
        if not self.feeds:
            raise CalibrationError("calibration data is empty: give at least one sample")
        first = next(iter(self.inputs))
        self.num_samples = sum(len(feed[first]) for feed in self.feeds)
        self._warn_constant_inputs()

    def __len__(self) -> int:
        return len(self.feeds)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.feeds)

    def _read(self, source: CalibrationSource, batch_size: int) -> list[dict[str, np.ndarray]]:
        if source is None:
            raise CalibrationError(
                "calibration data is required to set activation ranges: pass calibration=... "
                "(an .npz file with one array per model input, or an iterable of input dicts)"
            )
        if isinstance(source, str | os.PathLike):
            return _batches(self._as_feed(self._read_npz(Path(source))), batch_size)
        if isinstance(source, Mapping | np.ndarray):
            return _batches(self._as_feed(source), batch_size)
        return [self._as_feed(item) for item in source]

    def _read_npz(self, path: Path) -> dict[str, np.ndarray]:
        if not path.is_file():
            raise CalibrationError(f"calibration file {path} does not exist")
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        except Exception as e:
            raise CalibrationError(
                f"calibration file {path} is not a readable .npz file ({e}); write it with "
                "numpy.savez(path, **{input_name: samples})"
            ) from e

    def _as_feed(self, item) -> dict[str, np.ndarray]:
        if isinstance(item, Mapping):
            feed = {str(k): np.asarray(v) for k, v in item.items()}
        elif len(self.inputs) == 1:
            feed = {next(iter(self.inputs)): np.asarray(item)}
        else:
            raise CalibrationError(
                f"the model has {len(self.inputs)} inputs {list(self.inputs)}: give each "
                "calibration item as a dict of input name to array"
            )
        missing = set(self.inputs) - set(feed)
        unknown = set(feed) - set(self.inputs)
        if missing or unknown:
            raise CalibrationError(
                f"calibration input names {sorted(feed)} do not match the model inputs "
                f"{sorted(self.inputs)} (missing: {sorted(missing)}, unknown: {sorted(unknown)})"
            )
        for name, array in feed.items():
            if array.ndim == _rank(self.inputs[name]) - 1:
                feed[name] = array[None]
            elif array.ndim == 0:
                raise CalibrationError(
                    f"calibration input {name!r} is a single number: give samples on the first "
                    "axis, each shaped as the model's input"
                )
        return feed

    def _check(self, name: str, array: np.ndarray) -> np.ndarray:
        value = self.inputs[name]
        expected = value.dtype.numpy() if value.dtype is not None else array.dtype
        if np.issubdtype(expected, np.floating) and array.dtype.kind in "biu":
            raise CalibrationError(
                f"calibration input {name!r} holds {array.dtype} values; the model's input is "
                f"{expected}: give the float data the model reads (cast it first if the integers "
                "are meant)"
            )
        if array.dtype != expected:
            if not np.can_cast(array.dtype, expected, "same_kind"):
                raise CalibrationError(
                    f"calibration input {name!r} has dtype {array.dtype}; the model expects "
                    f"{expected}"
                )
            array = array.astype(expected)
        if value.shape is not None:
            if array.ndim != len(value.shape):
                raise CalibrationError(
                    f"calibration input {name!r} has shape {array.shape}, the model expects "
                    f"rank {len(value.shape)} ({value.shape}) with samples on the first axis"
                )
            for axis, dim in enumerate(value.shape):
                if axis > 0 and isinstance(dim, int) and array.shape[axis] != dim:
                    raise CalibrationError(
                        f"calibration input {name!r} has shape {array.shape}, the model expects "
                        f"{value.shape} (axis {axis} must be {dim})"
                    )
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
            raise CalibrationError(
                f"calibration input {name!r} holds {bad} NaN or Inf values: clean the data first"
            )
        if np.issubdtype(array.dtype, np.floating) and array.size:
            low, high = float(array.min()), float(array.max())
            if high - low > FLOAT32_MAX:
                raise CalibrationError(
                    f"calibration input {name!r} spans {low:.3g} to {high:.3g}: its range "
                    "overflows float32 scales; rescale the data"
                )
            seen = self._ranges.get(name, (low, high))
            self._ranges[name] = (min(low, seen[0]), max(high, seen[1]))
        return array

    def _warn_constant_inputs(self) -> None:
        """Log a warning for each float input that holds one value in every sample."""
        for name, (low, high) in self._ranges.items():
            if low == high:
                logger.warning(
                    "calibration input %r holds the value %g in every sample: the ranges it "
                    "gives describe no real data", name, low,
                )


def _batches(columns: dict[str, np.ndarray], size: int) -> list[dict[str, np.ndarray]]:
    count = min(len(v) for v in columns.values())
    if any(len(v) != count for v in columns.values()):
        raise CalibrationError(
            "calibration arrays hold different numbers of samples: "
            + ", ".join(f"{k}: {len(v)}" for k, v in columns.items())
        )
    return [{k: v[i : i + size] for k, v in columns.items()} for i in range(0, count, size)]


def _rows(feed: dict[str, np.ndarray]) -> int:
    return len(next(iter(feed.values())))


def _fixed_batch(graph: ir.Graph) -> int:
    """The fixed batch size all inputs share (their first dimension), else 1."""
    sizes = {v.shape[0] if v.shape is not None and len(v.shape) else 1 for v in graph.inputs}
    return sizes.pop() if len(sizes) == 1 and isinstance(next(iter(sizes)), int) else 1


def _rank(value: ir.Value) -> int:
    return len(value.shape) if value.shape is not None else -1


def _batch_dim_is_dynamic(value: ir.Value) -> bool:
    return value.shape is not None and len(value.shape) > 0 and not isinstance(value.shape[0], int)
