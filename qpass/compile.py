"""`qpass.compile`: capture, run the passes, and hand back a runnable, saveable result."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from qpass.calibration import CalibrationData, Context
from qpass.capture import capture
from qpass.errors import CalibrationError, LintError, OutputError, QpassError
from qpass.presets import PRESETS
from qpass.runtime import onnxruntime as ort_runtime

logger = logging.getLogger(__name__)

TARGETS = ("onnxruntime", "tensorrt")
DEFAULT_PRESETS = {"onnxruntime": "int8", "tensorrt": "int8-tensorrt"}
EXTERNAL_DATA_BYTES = 1_800_000_000


class CompiledModel:
    """A compiled model: the IR, a file writer, an ONNX Runtime session and a report."""

    def __init__(self, model: ir.Model, float_model: bytes | None, context: Context | None):
        self.model = model
        self.float_model = float_model
        self.context = context
        self.findings: list = []  # target tensorrt: the linter's warnings (qpass.lint)
        self._session = None

    def to_bytes(self) -> bytes:
        return ir.to_proto(self.model).SerializeToString()

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model to `path` atomically (a temporary file renamed into place); a model
        whose tensors pass 2 GB (protobuf's limit) keeps them in `<file>.data` beside it."""
        if _tensor_bytes(self.model) > EXTERNAL_DATA_BYTES:
            path = Path(path)
            if not path.parent.is_dir():
                raise OutputError(f"cannot write {path}: folder {path.parent} does not exist")
            ir.save(self.model, path, external_data=f"{path.name}.data")
            return path
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
        if self.float_model is None:
            raise QpassError("a report needs the float model: compile with keep_reference=True")
        return Report.measure(self.float_model, self.model, self.context)


def compile(
    model: Any,
    passes: list[ir.passes.PassBase] | None = None,
    *,
    preset: str | None = None,
    calibration: Any = None,
    example_inputs: Any = None,
    target: str = "onnxruntime",
    calibrator: str | None = None,
    exclude: list[str] | tuple[str, ...] = (),
    batch_size: int = 8,
    progress: bool = True,
    keep_reference: bool = True,
    **options: Any,
) -> CompiledModel:
    """Compile a float model into a quantized one.

    Args:
        model: an ONNX path, `onnx.ModelProto`, `onnx_ir.Model` (copied, never changed) or a
            `torch.nn.Module` (then `example_inputs` is required).
        passes: the passes to run, in order; default: the preset's.
        preset: a name in `qpass.presets.PRESETS`; default: the target's ("int8" for
            onnxruntime, "int8-tensorrt" for tensorrt).
        calibration: an .npz file whose keys are input names (first axis = samples), a dict of
            stacked arrays, or an iterable of input dicts or arrays.
        target: "onnxruntime" (the CPU default) or "tensorrt": the compiled graph is then
            checked by `qpass.lint.lint_tensorrt`; a graph TensorRT would refuse raises
            `LintError` (placement warnings are logged and kept in `CompiledModel.findings`).
        calibrator: activation range method of the preset: minmax, percentile, entropy or mse.
        exclude: node names to leave in float.
        batch_size: calibration batch size (used when the model's batch dimension is dynamic).
        keep_reference: keep a serialized copy of the float model for `report()` (costs its size in
            memory; the CLI keeps it only when a report is asked for).
        options: keyword options of the preset (w4a16-*: group_size, format, symmetric, ...).
    """
    if target not in TARGETS:
        raise QpassError(f"target {target!r} is not supported; choose one of {TARGETS}")
    preset = preset or DEFAULT_PRESETS[target]
    explicit_passes = passes is not None
    if passes is None:
        if preset not in PRESETS:
            raise QpassError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        try:
            passes = PRESETS[preset](calibrator=calibrator, exclude=frozenset(exclude), **options)
        except (TypeError, ValueError) as e:
            raise QpassError(f"preset {preset!r}: {e}") from e
    if isinstance(model, ir.Model):
        model = model.clone()
    model = capture(model, example_inputs)
    float_model = ir.to_proto(model).SerializeToString() if keep_reference else None
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
    RemoveUnusedNodesPass()(model)  # e.g. the float weights that quantized copies replaced
    compiled = CompiledModel(model, float_model, context)
    if target == "tensorrt":
        compiled.findings = _lint_for_tensorrt(model, None if explicit_passes else preset)
    return compiled


_LISTED = 10


def _lint_for_tensorrt(model: ir.Model, preset: str | None) -> list:
    """Findings of the TensorRT linter; raise LintError if TensorRT would refuse the graph."""
    from qpass.lint import errors, lint_tensorrt

    findings = lint_tensorrt(model)
    refused = errors(findings)
    if refused:
        hint = ""
        if preset != DEFAULT_PRESETS["tensorrt"]:
            hint = f"\nuse preset {DEFAULT_PRESETS['tensorrt']!r} (the default for this target)"
        listed = "\n  ".join(str(f) for f in refused[:_LISTED])
        if len(refused) > _LISTED:
            listed += f"\n  ... and {len(refused) - _LISTED} more"
        raise LintError(
            f"TensorRT would refuse the compiled graph ({len(refused)} errors):\n  {listed}{hint}",
            refused,
        )
    for finding in findings:
        logger.warning("TensorRT placement: %s", finding)
    return findings


def _tensor_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value)


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
