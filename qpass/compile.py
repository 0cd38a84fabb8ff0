"""`qpass.compile`: capture, run the passes, and hand back a runnable, saveable result."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from qpass.calibration import CalibrationData, Context
from qpass.capture import capture
from qpass.errors import CalibrationError, OutputError, QpassError
from qpass.presets import PRESETS
from qpass.runtime import onnxruntime as ort_runtime

logger = logging.getLogger(__name__)

TARGETS = ("onnxruntime",)


class CompiledModel:
    """A compiled model: the IR, a file writer, an ONNX Runtime session and a report."""

    def __init__(self, model: ir.Model, float_model: bytes, context: Context | None):
        self.model = model
        self.float_model = float_model
        self.context = context
        self._session = None

    def to_bytes(self) -> bytes:
        return ir.to_proto(self.model).SerializeToString()

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model to `path` atomically (a temporary file renamed into place)."""
        return write_atomically(Path(path), self.to_bytes())

    def session(self, threads: int | None = None):
        """An ONNX Runtime session running the compiled model (cached for the default settings)."""
        if threads is not None:
            return ort_runtime.session(self.to_bytes(), threads=threads)
        if self._session is None:
            self._session = ort_runtime.session(self.to_bytes())
        return self._session

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session().run(None, feed)

    def report(self):
        """Per-layer SQNR against the float model on the calibration data (see `qpass.report`)."""
        from qpass.report import Report

        if self.context is None:
            raise CalibrationError("a report needs calibration data: compile with calibration=...")
        return Report.measure(self.float_model, self.model, self.context)


def compile(
    model: Any,
    passes: list[ir.passes.PassBase] | None = None,
    *,
    preset: str = "int8",
    calibration: Any = None,
    example_inputs: Any = None,
    target: str = "onnxruntime",
    calibrator: str | None = None,
    exclude: list[str] | tuple[str, ...] = (),
    batch_size: int = 8,
    progress: bool = True,
) -> CompiledModel:
    """Compile a float model into a quantized one.

    Args:
        model: an ONNX path, `onnx.ModelProto`, `onnx_ir.Model` (copied, never changed) or a
            `torch.nn.Module` (then `example_inputs` is required).
        passes: the passes to run, in order; default: the preset's.
        preset: a name in `qpass.presets.PRESETS` ("int8").
        calibration: an .npz file whose keys are input names (first axis = samples), a dict of
            stacked arrays, or an iterable of input dicts or arrays.
        target: "onnxruntime" (the CPU default).
        calibrator: activation range method of the preset: minmax, percentile, entropy or mse.
        exclude: node names to leave in float.
        batch_size: calibration batch size (used when the model's batch dimension is dynamic).
    """
    if target not in TARGETS:
        raise QpassError(f"target {target!r} is not supported; choose one of {TARGETS}")
    if passes is None:
        if preset not in PRESETS:
            raise QpassError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        passes = PRESETS[preset](calibrator=calibrator, exclude=frozenset(exclude))
    if isinstance(model, ir.Model):
        model = model.clone()
    model = capture(model, example_inputs)
    float_model = ir.to_proto(model).SerializeToString()
    context = None
    if calibration is not None:
        data = CalibrationData(calibration, model.graph, batch_size=batch_size)
        context = Context(data, progress=progress)
    for p in passes:
        if getattr(p, "context", False) is None:
            if context is None:
                raise CalibrationError(
                    f"{type(p).__name__} needs calibration data: pass calibration=... (an .npz "
                    "file with one array per model input, or an iterable of input dicts)"
                )
            p.context = context
    for p in passes:
        model = p(model).model
    return CompiledModel(model, float_model, context)


def write_atomically(path: Path, data: bytes) -> Path:
    """Write bytes to `path` through a temporary file in the same folder, then rename."""
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"cannot write {path}: folder {folder} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise OutputError(
            f"cannot write {path}: {e.strerror} (check the folder's permissions)"
        ) from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {e.strerror}") from e
    return path
