"""`qpass.compile`: capture, run the passes, and hand back a runnable, saveable result."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from qpass import checks, presets, targets
from qpass.calibration import CalibrationData, Context
from qpass.capture import capture
from qpass.errors import CalibrationError, LintError, QpassError
from qpass.files import replacing, write_model
from qpass.graph import raise_opset
from qpass.metadata import SOURCE_FLOAT_TYPE
from qpass.passes.base import CalibratedPass
from qpass.passes.cast_float_parts import FLOAT_TYPES, LOW_TYPES, CastFloatParts
from qpass.runtime import onnxruntime as ort_runtime

logger = logging.getLogger(__name__)

EXTERNAL_DATA_BYTES = 1_800_000_000


class CompiledModel:
    """A compiled model: the IR, a file writer, an ONNX Runtime session (the numerics of every
    target's graph are checked in ONNX Runtime), the target's deployment step and a report."""

    def __init__(
        self,
        model: ir.Model,
        float_model: bytes | None,
        context: Context | None,
        target: targets.Target | None = None,
    ):
        self.model = model
        self.float_model = float_model
        self.context = context
        self.target = target or targets.get("onnxruntime")
        self.findings: list = []  # the target's check: its warnings (e.g. qpass.lint's)
        self._session = None

    def to_bytes(self) -> bytes:
        return ir.to_proto(self.model).SerializeToString()

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model to `path` atomically (temporary files renamed into place); a model
        whose tensors pass 2 GB (protobuf's limit) keeps them in `<file>.data` beside it, and
        the two are written together: both in place, or neither."""
        path = Path(path)
        if _tensor_bytes(self.model) <= EXTERNAL_DATA_BYTES:
            return write_model(path, self.model)
        data = path.parent / f"{path.name}.data"
        with replacing(data, path) as (_, temporary):  # the data first: the model points at it
            ir.save(self.model, temporary, external_data=data.name)
        return path

    def save_gguf(self, path: str | os.PathLike, config, tokenizer=None, **options) -> Path:
        """Write a Llama-family decoder captured from transformers as a GGUF file: the weights
        a ggml preset quantized as their ggml bytes, the rest in float; `config` the source's
        transformers config, `tokenizer` a GGUF file to copy the tokenizer from
        (`qpass.export_gguf.save_gguf`)."""
        from qpass.export_gguf import save_gguf

        return save_gguf(self.model, path, config, tokenizer, **options)

    def session(self, threads: int | None = None):
        """An ONNX Runtime session running the compiled model (cached for the default settings)."""
        if threads is not None:
            return ort_runtime.session(self.to_bytes(), threads=threads)
        if self._session is None:
            self._session = ort_runtime.session(self.to_bytes())
        return self._session

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session().run(None, feed)

    def deploy(self, path: str | os.PathLike, out: str | os.PathLike | None = None, **options):
        """Save the model to `path`, then hand it to the target's deployment step: an ONNX
        Runtime session, or a TensorRT engine written to `out` (`Target.deploy`)."""
        return self.target.deploy(self.save(path), out, **options)

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
    exclude: list[str] | tuple[str, ...] = (),
    batch_size: int = 8,
    progress: bool = True,
    keep_reference: bool = True,
    custom_op_libraries: list[str] | tuple[str, ...] = (),
    float_type: str | None = None,
    **options: Any,
) -> CompiledModel:
    """Compile a float model into a quantized one.

    Args:
        model: an ONNX path, `onnx.ModelProto`, `onnx_ir.Model` (copied, never changed) or a
            `torch.nn.Module` (then `example_inputs` is required).
        passes: the passes to run, in order; default: the preset's for the target.
        preset: a name in `qpass.presets` (`qpass compile --help` lists them); default: the
            target's (`int8`).
        calibration: an .npz file whose keys are input names (first axis = samples), a dict of
            stacked arrays, or an iterable of input dicts or arrays.
        target: a name in `qpass.targets`: "onnxruntime" (the CPU default) or "tensorrt". The
            target decides the legal form of the preset's format and checks the compiled graph:
            a graph TensorRT would refuse raises `LintError` (placement warnings are logged and
            kept in `CompiledModel.findings`).
        exclude: node names to leave in float.
        batch_size: calibration batch size (used when the model's batch dimension is dynamic).
        keep_reference: keep a serialized copy of the float model for `report()` (costs its size in
            memory; the CLI keeps it only when a report is asked for).
        custom_op_libraries: ONNX Runtime custom-op libraries implementing the model's ops of
            other domains, loaded into every session of this process (calibration included).
        float_type: the type of the compiled model's float parts (weights left float,
            scales, activations between quantized ops): "float32", "float16" (TensorRT runs
            what the ONNX types say; reductions, Softmax, normalizations and exp stay float32,
            see `CastFloatParts`) or "bfloat16" (ONNX Runtime's CPU provider cannot run it).
            Default: float16 for a float16 model, float32 otherwise (bfloat16 models too). The
            model's inputs and outputs keep their types.
        options: the preset's typed options (e.g. calibrator, group_size, format); an option the
            preset does not take, or out of its range, is refused before any work.
    """
    if batch_size < 1:
        raise CalibrationError(f"the calibration batch size must be >= 1, not {batch_size}")
    target = targets.get(target)
    preset = preset or target.default_preset
    preset_pipeline = passes is None
    if preset_pipeline:
        passes = presets.get(preset).passes(target, exclude, **options)
    elif options:
        raise QpassError(f"options {sorted(options)} are a preset's: give them without passes=")
    calibrated = [p for p in passes if isinstance(p, CalibratedPass) and p.context is None]
    needing = [p for p in calibrated if not p.calibration_optional]
    if needing and calibration is None:
        raise CalibrationError(
            f"{needing[0]!r} needs calibration data: pass calibration=... (an .npz file with "
            "one array per model input, or an iterable of input dicts)"
        )
    for library in custom_op_libraries:
        ort_runtime.use_custom_ops(library)
    if isinstance(model, ir.Model):
        model = model.clone()
    model = capture(model, example_inputs)
    float_type = _float_type(model, float_type)
    if float_type in LOW_TYPES:
        raise_opset(model, FLOAT16_SCALES_OPSET)
    if preset_pipeline:
        checks.refuse_quantized(model.graph)
    checks.check_graph(model.graph)
    checks.check_exclude(model.graph, exclude)
    checks.check_domains(model.graph)
    float_model = ir.to_proto(model).SerializeToString() if keep_reference else None
    context = None
    if calibration is not None:
        data = CalibrationData(calibration, model.graph, batch_size=batch_size)
        context = Context(data, progress=progress)
    for p in calibrated:
        p.context = context
    _run(passes, model)
    if float_type in LOW_TYPES:
        CastFloatParts(float_type)(model)
    RemoveUnusedNodesPass()(model)  # e.g. the float weights that quantized copies replaced
    checks.check_scales(model)
    compiled = CompiledModel(model, float_model, context, target)
    compiled.findings = check_target(target, model)
    return compiled


def _run(passes: list[ir.passes.PassBase], model: ir.Model) -> None:
    """Run the pipeline through onnx-ir's `Sequential`: an unexpected failure names the pass and
    the passes before it; qpass's own errors (bad input) pass through as they are."""
    if not passes:
        return
    try:
        ir.passes.Sequential(*passes)(model)
    except ir.passes.PassError as e:
        cause = e.__cause__
        if isinstance(cause, QpassError):
            raise cause from None
        if isinstance(cause, ir.passes.PreconditionError):
            raise QpassError(str(cause)) from None
        raise


FLOAT16_SCALES_OPSET = 19
"""QuantizeLinear / DequantizeLinear take float16 and bfloat16 scales from opset 19."""


def _float_type(model: ir.Model, float_type: str | None) -> str:
    """The float type of the compiled model: `float_type`, else the source model's float16."""
    if float_type is not None and float_type not in FLOAT_TYPES:
        raise QpassError(f"float type {float_type!r}: choose one of {', '.join(FLOAT_TYPES)}")
    source = model.meta.get(SOURCE_FLOAT_TYPE)
    if float_type is None and source == "bfloat16":
        logger.warning("bfloat16 model: computed in float32 inside (ONNX Runtime's CPU provider "
                       "has no bfloat16 kernels); its inputs and outputs keep their types")
    return float_type or ("float16" if source == "float16" else "float32")


_LISTED = 10


def check_target(target: targets.Target, model: ir.Model) -> list:
    """The target's findings; raise LintError if the target would refuse the graph."""
    findings = target.check(model)
    refused = [f for f in findings if f.severity == "error"]
    if refused:
        listed = "\n  ".join(str(f) for f in refused[:_LISTED])
        if len(refused) > _LISTED:
            listed += f"\n  ... and {len(refused) - _LISTED} more"
        raise LintError(
            f"{target.title} would refuse the compiled graph ({len(refused)} errors):\n  {listed}",
            refused,
        )
    for finding in findings:
        level = logging.INFO if finding.severity == "info" else logging.WARNING
        logger.log(level, "%s check: %s", target.title, finding)
    return findings


def _tensor_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value)
