"""The calibration context: runs the current graph on the calibration set and streams statistics."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import numpy as np
import onnx
import onnx_ir as ir
from tqdm.auto import tqdm

from qpass.calibration.data import CalibrationData, CalibrationSource
from qpass.runtime import onnxruntime as ort_runtime

logger = logging.getLogger(__name__)


class Context:
    """Calibration data plus the machinery to observe any tensor of the current graph.

    `observe` adds the requested values as extra graph outputs of a copy of the model, runs it batch
    by batch in ONNX Runtime and feeds each batch to one observer per value, so memory is bounded by
    one batch of activations and the observers' running statistics. After the first run, batches
    are cut so that one run fetches at most `fetch_bytes` (when the batch axis is dynamic).
    """

    fetch_bytes = 64 << 20

    def __init__(
        self,
        data: CalibrationSource | CalibrationData,
        graph: ir.Graph | None = None,
        batch_size: int = 8,
        progress: bool = True,
    ):
        if not isinstance(data, CalibrationData):
            if graph is None:
                raise ValueError("Context needs the model graph to check raw calibration data")
            data = CalibrationData(data, graph, batch_size=batch_size)
        self.data = data
        self.progress = progress
        self.rows_per_run: int | None = None

    def observe(
        self,
        model: ir.Model,
        values: Iterable[str],
        make_observer: Callable[[str], object],
        description: str = "calibrating",
    ) -> dict:
        """Run the model on the calibration set; return {value name: observer fed every batch}."""
        names = list(dict.fromkeys(values))
        observers = {name: make_observer(name) for name in names}
        for outputs in self.run(model, names, description):
            for name, array in outputs.items():
                observers[name].update(array)
        return observers

    def run(
        self,
        model: ir.Model | bytes,
        names: list[str],
        description: str = "running",
        progress: bool = True,
    ):
        """Yield {name: array} for each calibration batch, with `names` fetched from the graph."""
        # ORT keeps every requested tensor; it may still fuse what nobody asked to see.
        session = ort_runtime.session(with_outputs(model, names), arena=False)
        show = self.progress and progress
        for feed in tqdm(self.data, desc=description, unit="batch", disable=not show, leave=False):
            for part in self._cut(feed):
                arrays = session.run(names, part)
                self._learn_rows_per_run(part, arrays)
                yield dict(zip(names, arrays, strict=True))

    def _cut(self, feed: dict[str, np.ndarray]):
        rows = len(next(iter(feed.values())))
        step = self.rows_per_run or (1 if self.data.splittable else rows)  # 1: a probe run
        if not self.data.splittable or step >= rows:
            yield feed
            return
        for start in range(0, rows, step):
            yield {k: v[start : start + step] for k, v in feed.items()}

    def _learn_rows_per_run(self, feed: dict[str, np.ndarray], arrays: list[np.ndarray]) -> None:
        if self.rows_per_run is None and self.data.splittable:
            per_row = sum(a.nbytes for a in arrays) / len(next(iter(feed.values())))
            self.rows_per_run = max(1, int(self.fetch_bytes // max(per_row, 1)))


def with_outputs(model: ir.Model | bytes, names: list[str]) -> bytes:
    """A serialized copy of `model` (IR or serialized) whose graph also outputs `names`."""
    proto = onnx.load_from_string(model) if isinstance(model, bytes) else ir.to_proto(model)
    existing = {o.name for o in proto.graph.output}
    for name in names:
        if name not in existing:
            proto.graph.output.add().name = name
    return proto.SerializeToString()
