"""A static TensorRT legality linter for QDQ ONNX graphs.

TensorRT cannot be installed on the machines qpass is developed on, so what qpass emits for
TensorRT is checked here, statically, against what TensorRT's documentation states; numerics are
checked by running the same graph in ONNX Runtime. Sources: TensorRT Developer Guide ("Working with
Quantized Types", "Explicit Quantization" and its Q/DQ layer-placement recommendations), the
TensorRT Operators reference (Quantize, Dequantize), the ONNX opset guide of TensorRT 11 and the
ONNX-TensorRT operator support matrix (operators.md).

Rules with severity "error" describe graphs TensorRT's parser or builder refuses, or runs with
other numbers than ONNX Runtime; "warning" rules describe Q/DQ placement TensorRT accepts but
does not fuse as intended (an op left in float, an extra rounding, a requantization).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import onnx_ir as ir

from qpass.graph import attribute, constant, is_op, output_channel_axis
from qpass.passes.tensorrt_rules import (
    WEIGHTED_OPS,
    epilogue_input,
    feeds_int8,
    fused_input,
    is_dequantized,
    is_weight,
)

MIN_OPSET, MAX_OPSET = 9, 24
"""Opsets accepted for TensorRT: 9-24, as the project's design notes state. TensorRT 11's "ONNX
Opset Guide" lists 25 as its maximum; raise MAX_OPSET once a build confirms it."""
FP8_OPSET, INT4_OPSET, PER_AXIS_OPSET, FP4_OPSET = 19, 21, 13, 23

QUANTIZED_TYPES = {
    ir.DataType.INT8: "INT8",
    ir.DataType.FLOAT8E4M3FN: "FP8 E4M3",
    ir.DataType.INT4: "INT4",
    ir.DataType.FLOAT4E2M1: "FP4 E2M1",
}
"""Types TensorRT's Quantize/Dequantize read and write (TensorRT Operators reference)."""

RULES: dict[str, tuple[str, str]] = {
    "opset": ("error", f"opset {MIN_OPSET}-{MAX_OPSET}; FP8 needs {FP8_OPSET}, INT4 {INT4_OPSET}"),
    "qdq-dtype": ("error", "Q/DQ types INT8, FP8 E4M3, INT4, FP4 E2M1 only (no UINT8, INT32)"),
    "zero-point": ("error", "zero points constant and zero: TensorRT is symmetric only"),
    "scale": ("error", "scales constant (build-time), finite and positive"),
    "activation-per-tensor": ("error", "activations have one scale (per tensor)"),
    "weight-axis": ("error", "per-channel weight scales on the output-channel axis only"),
    "blockwise": ("error", "block quantization (block_size) is for INT4 and FP4 weights only"),
    "int4": ("error", "INT4: weight-only blockwise DQ into MatMul/Gemm, even last dimension"),
    "fp4": ("error", "FP4 E2M1: weight-only blockwise DQ into MatMul/Gemm (NVFP4, Blackwell)"),
    "weighted-op-inputs": ("warning", "Q/DQ on data and weight of Conv/ConvTranspose/Gemm/MatMul"),
    "residual-add": ("warning", "Q/DQ on the residual input of an Add fused into a convolution"),
    "epilogue": ("warning", "no Q/DQ between a convolution and the residual Add it feeds"),
    "unused-qdq": ("warning", "no activation Q/DQ that no INT8 consumer reads (e.g. on outputs)"),
    "concat-scales": ("warning", "dequantized Concat inputs share one scale"),
    "plugin": ("error", "plugin nodes name a known plugin, namespace and version; packed weights"),
    "plugin-qdq": ("warning", "no Q/DQ on a plugin's inputs: TensorRT cannot fuse Q/DQ into it"),
}
"""Rule id -> (severity, what it requires)."""


@dataclasses.dataclass(frozen=True)
class Finding:
    """One violated rule: which node, what is wrong, and a one-line fix."""

    rule: str
    node: str
    message: str
    fix: str

    @property
    def severity(self) -> str:
        return RULES[self.rule][0]

    def __str__(self) -> str:
        return f"{self.severity} [{self.rule}] {self.node}: {self.message}; fix: {self.fix}"


def lint_tensorrt(model: Any) -> list[Finding]:
    """Check a QDQ model against TensorRT's explicit-quantization rules (see RULES).

    `model`: an `onnx_ir.Model`, an `onnx.ModelProto` or the path of an ONNX file. Returns the
    findings in rule order, then graph order; an empty list means the graph is clean.
    """
    model = _as_ir(model)
    return [finding for check in CHECKS for finding in check(model)]


def errors(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == "error"]


def format_findings(findings: list[Finding]) -> str:
    """A table of findings: severity, rule and node, then the problem and its fix."""
    width = max([len(f.node) for f in findings] + [4])
    lines = [f"{'severity':<8} {'rule':<22} {'node':<{width}} problem / fix"]
    for f in findings:
        lines.append(f"{f.severity:<8} {f.rule:<22} {f.node:<{width}} {f.message}")
        lines.append(f"{'':<8} {'':<22} {'':<{width}} fix: {f.fix}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- rule checks


def _check_opset(model: ir.Model) -> Iterator[Finding]:
    version = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if version is None:
        yield Finding("opset", "(model)", "no default-domain opset import", "export with opset 17+")
        return
    if not MIN_OPSET <= version <= MAX_OPSET:
        yield Finding(
            "opset",
            "(model)",
            f"opset {version} is outside the {MIN_OPSET}-{MAX_OPSET} TensorRT's parser reads",
            "convert the model (onnx.version_converter / onnxscript) to an opset in that range",
        )
    for node in _qdq_nodes(model):
        dtype = _quantized_type(node)
        requirements = [(0, "")]
        if dtype == ir.DataType.FLOAT8E4M3FN:
            requirements.append((FP8_OPSET, "FP8 Q/DQ"))
        if dtype == ir.DataType.INT4 or attribute(node, "block_size", 0):
            requirements.append((INT4_OPSET, "INT4 or blockwise Q/DQ"))
        if dtype == ir.DataType.FLOAT4E2M1:
            requirements.append((FP4_OPSET, "FP4 Q/DQ"))
        if _scale_size(node) > 1:
            requirements.append((PER_AXIS_OPSET, "per-channel Q/DQ"))
        needed, why = max(requirements)
        if version < needed:
            yield Finding(
                "opset",
                _name(node),
                f"{why} needs opset {needed}, the model has {version}",
                f"raise the model's opset to {needed} or more",
            )


def _check_dtype(model: ir.Model) -> Iterator[Finding]:
    for node in _qdq_nodes(model):
        dtype = _quantized_type(node)
        if dtype is None or dtype in QUANTIZED_TYPES:
            continue
        fix = "quantize to int8 (symmetric) or fp8 e4m3, or int4 for MatMul/Gemm weights"
        if dtype == ir.DataType.INT32:
            fix = "keep the bias in float: TensorRT quantizes it (LowerForTensorRT rule 1)"
        elif dtype == ir.DataType.UINT8:
            fix = "use signed int8 activations with zero point 0 (the int8-tensorrt preset)"
        yield Finding(
            "qdq-dtype",
            _name(node),
            f"{node.op_type} to/from {dtype.name}: TensorRT reads INT8, FP8 E4M3 and INT4 only",
            fix,
        )


def _check_zero_point(model: ir.Model) -> Iterator[Finding]:
    for node in _qdq_nodes(model):
        if len(node.inputs) < 3 or node.inputs[2] is None:
            continue
        zero = constant(node.inputs[2])
        if zero is None:
            message = "zero point is computed, not a constant"
        elif np.any(zero.astype(np.float64) != 0):
            shown = ", ".join(f"{v:g}" for v in np.unique(zero.astype(np.float64))[:4])
            message = f"zero point {shown} is not 0: TensorRT quantizes symmetrically only"
        else:
            continue
        yield Finding("zero-point", _name(node), message, "requantize symmetrically (zero point 0)")


def _check_scale(model: ir.Model) -> Iterator[Finding]:
    for node in _qdq_nodes(model):
        scale = constant(node.inputs[1])
        if scale is None:
            message = "scale is computed at run time; TensorRT needs a build-time constant"
            fix = "calibrate and store the scale as an initializer"
        elif not np.all(np.isfinite(scale.astype(np.float64))):
            message, fix = "scale holds NaN or Inf", "recalibrate: every scale finite and > 0"
        elif np.any(scale.astype(np.float64) <= 0):
            message, fix = "scale is zero or negative", "recalibrate: every scale finite and > 0"
        else:
            continue
        yield Finding("scale", _name(node), message, fix)


def _check_activation_per_tensor(model: ir.Model) -> Iterator[Finding]:
    for node in _qdq_nodes(model):
        if is_weight(node) or _scale_size(node) <= 1 or _is_int4_dq(node):
            continue
        yield Finding(
            "activation-per-tensor",
            _name(node),
            f"activation quantized with {_scale_size(node)} scales; TensorRT quantizes "
            "activations per tensor only",
            "use one scale for the activation",
        )


def _check_weight_axis(model: ir.Model) -> Iterator[Finding]:
    for node in _qdq_nodes(model):
        if not is_op(node, "DequantizeLinear") or not is_weight(node):
            continue
        if _scale_size(node) <= 1 or attribute(node, "block_size", 0):
            continue
        if _quantized_type(node) not in QUANTIZED_TYPES:
            continue  # an int32 bias and the like: the qdq-dtype rule reports it
        ndim = _rank(node.inputs[0])
        axis = attribute(node, "axis", 1)
        axis = axis + ndim if ndim is not None and axis < 0 else axis
        for reader, index in node.outputs[0].uses():
            if not is_op(reader, *WEIGHTED_OPS) or index != 1:
                yield Finding(
                    "weight-axis",
                    _name(node),
                    f"per-channel scales on a tensor read by {reader.op_type} input {index}; "
                    "TensorRT has per-channel scales only for Conv/ConvTranspose/Gemm/MatMul "
                    "weights",
                    "quantize this tensor per tensor",
                )
            elif ndim is not None and axis != output_channel_axis(reader, ndim):
                expected = output_channel_axis(reader, ndim)
                yield Finding(
                    "weight-axis",
                    _name(node),
                    f"per-channel axis {axis} of the weight of "
                    f"{_describe(reader)}; its output channels are axis {expected}",
                    f"quantize the weight per channel along axis {expected}",
                )
            elif reader.op_type == "MatMul" and ndim != 2:
                yield Finding(
                    "weight-axis",
                    _name(node),
                    f"per-channel scales on a {ndim}-D MatMul weight; TensorRT takes them on "
                    "2-D constant weights only",
                    "reshape the weight to 2-D or quantize it per tensor",
                )


_BLOCK_TYPES = (ir.DataType.INT4, ir.DataType.FLOAT4E2M1)


def _check_blockwise(model: ir.Model) -> Iterator[Finding]:
    for node in _qdq_nodes(model):
        if attribute(node, "block_size", 0) and _quantized_type(node) not in _BLOCK_TYPES:
            yield Finding(
                "blockwise",
                _name(node),
                f"block quantization of {_type_name(node)}; TensorRT blocks INT4 and FP4 "
                "weights only",
                "quantize per channel, or use INT4 / FP4 weights (w4a8-fp: storage='float4')",
            )


def _check_int4(model: ir.Model) -> Iterator[Finding]:
    return _check_weight_only(model, ir.DataType.INT4, "int4", "INT4")


def _check_fp4(model: ir.Model) -> Iterator[Finding]:
    return _check_weight_only(model, ir.DataType.FLOAT4E2M1, "fp4", "FP4")


def _check_weight_only(
    model: ir.Model, dtype: ir.DataType, rule: str, label: str
) -> Iterator[Finding]:
    """INT4 and FP4 (TensorRT Developer Guide, "Working with Quantized Types": weight-only
    block quantization of MatMul/Gemm weights)."""
    for node in _qdq_nodes(model):
        if _quantized_type(node) != dtype:
            continue
        if is_op(node, "QuantizeLinear") or constant(node.inputs[0]) is None:
            yield Finding(
                rule,
                _name(node),
                f"{label} on a computed tensor; TensorRT's {label} is weight-only",
                f"store the weight as a constant {label} initializer read by DequantizeLinear",
            )
            continue
        weight = constant(node.inputs[0])
        readers = node.outputs[0].uses()
        if not readers or any(not is_op(r, "MatMul", "Gemm") or i != 1 for r, i in readers):
            yield Finding(
                rule,
                _name(node),
                f"{label} weight not read as the weight of a MatMul/Gemm",
                f"use {label} for MatMul/Gemm weights only (int8 or fp8 for convolutions)",
            )
        scale = constant(node.inputs[1])
        if not attribute(node, "block_size", 0) or (
            scale is not None and scale.ndim != weight.ndim
        ):
            yield Finding(
                rule,
                _name(node),
                f"{label} weight without blockwise scales; TensorRT's {label} is block-quantized",
                "quantize with a group size (DequantizeLinear block_size, opset 21)",
            )
        if weight.ndim == 0 or weight.shape[-1] % 2:
            yield Finding(
                rule,
                _name(node),
                f"{label} weight of shape {list(weight.shape)}: the last dimension must be even "
                "(two values per byte)",
                "pad the weight's last dimension to an even size",
            )


def _check_weighted_op_inputs(model: ir.Model) -> Iterator[Finding]:
    for node in model.graph:
        if not is_op(node, *WEIGHTED_OPS) or len(node.inputs) < 2:
            continue
        quantized = [is_dequantized(v) for v in node.inputs[:2]]
        if not any(quantized) or all(quantized) or _reads_int4_weight(node):
            continue
        missing = "data" if not quantized[0] else "weight"
        yield Finding(
            "weighted-op-inputs",
            _name(node),
            f"{node.op_type} has Q/DQ on one input but not on its {missing} (input "
            f"{quantized.index(False)}); TensorRT runs it in float",
            f"quantize the {missing} input too, or neither",
        )


def _check_residual_add(model: ir.Model) -> Iterator[Finding]:
    for node in model.graph:
        fused = fused_input(node)
        if fused is None:
            continue
        residual = node.inputs[1 - fused]
        if residual is None or constant(residual) is not None or is_dequantized(residual):
            continue
        layer = node.inputs[fused].producer()
        yield Finding(
            "residual-add",
            _name(node),
            f"residual input {residual.name!r} is float, so the Add cannot fuse into "
            f"{_describe(layer)}'s INT8 epilogue",
            "quantize the residual input (Q/DQ), as InsertQDQ does for Add",
        )


def _check_epilogue(model: ir.Model) -> Iterator[Finding]:
    for node in model.graph:
        index = epilogue_input(node)
        if index is None:
            continue
        layer = node.inputs[index].producer().inputs[0].producer().inputs[0].producer()
        yield Finding(
            "epilogue",
            _name(node),
            f"Q/DQ between {_describe(layer)} and this residual Add keeps the Add "
            "out of the convolution's epilogue",
            "remove that Q/DQ pair, keep the one on the residual (LowerForTensorRT rule 2)",
        )


def _check_unused_qdq(model: ir.Model) -> Iterator[Finding]:
    for node in model.graph:
        if not is_op(node, "DequantizeLinear") or is_weight(node):
            continue
        if feeds_int8(node.outputs[0]) or any(map(_is_plugin, node.outputs[0].consumers())):
            continue  # a Q/DQ into a plugin: rule plugin-qdq says why
        where = "a graph output" if node.outputs[0].is_graph_output() else "float ops only"
        yield Finding(
            "unused-qdq",
            _name(node),
            f"dequantized activation {node.outputs[0].name!r} feeds {where}; TensorRT runs the "
            "Q/DQ standalone, an extra rounding",
            "remove the Q/DQ pair (LowerForTensorRT rule 3)",
        )


def _check_concat_scales(model: ir.Model) -> Iterator[Finding]:
    for node in model.graph:
        if not is_op(node, "Concat") or len(node.inputs) < 2:
            continue
        if not all(is_dequantized(v) for v in node.inputs):
            continue
        scales = [constant(v.producer().inputs[1]) for v in node.inputs]
        if any(s is None or s.size != 1 for s in scales):
            continue
        values = sorted({float(s.reshape(())) for s in scales})
        if len(values) > 1:
            yield Finding(
                "concat-scales",
                _name(node),
                f"dequantized inputs have {len(values)} different scales "
                f"({values[0]:.3g}..{values[-1]:.3g}); TensorRT requantizes each input",
                "give every input the same scale (LowerForTensorRT rule 4)",
            )


def _is_plugin(node: ir.Node) -> bool:
    """A node TensorRT's parser imports as a plugin (qpass's, or any with plugin_namespace)."""
    from qpass.plugin_spec import is_plugin_node

    return is_plugin_node(node) or "plugin_namespace" in node.attributes


def _check_plugin(model: ir.Model) -> Iterator[Finding]:
    from qpass.plugins.onnx_node import check_node

    for node in model.graph:
        if not _is_plugin(node):
            continue
        for problem in check_node(node, model.opset_imports):
            yield Finding(
                "plugin",
                _name(node),
                problem,
                "emit plugin nodes with qpass.plugins.onnx_node (LowerToInt4Plugin)",
            )


def _check_plugin_qdq(model: ir.Model) -> Iterator[Finding]:
    for node in model.graph:
        if not _is_plugin(node):
            continue
        for index, value in enumerate(node.inputs):
            if is_dequantized(value):
                yield Finding(
                    "plugin-qdq",
                    _name(node),
                    f"input {index} is dequantized; TensorRT runs that DequantizeLinear on its "
                    "own (Q/DQ never fuse into a plugin)",
                    "feed the plugin float activations and its own packed weights",
                )


CHECKS: list[Callable[[ir.Model], Iterator[Finding]]] = [
    _check_opset,
    _check_dtype,
    _check_zero_point,
    _check_scale,
    _check_activation_per_tensor,
    _check_weight_axis,
    _check_blockwise,
    _check_int4,
    _check_fp4,
    _check_weighted_op_inputs,
    _check_residual_add,
    _check_epilogue,
    _check_unused_qdq,
    _check_concat_scales,
    _check_plugin,
    _check_plugin_qdq,
]


# ----------------------------------------------------------------------------- helpers


def _as_ir(model: Any) -> ir.Model:
    if isinstance(model, ir.Model):
        return model
    import onnx

    if isinstance(model, onnx.ModelProto):
        return ir.from_proto(model)
    if isinstance(model, str | os.PathLike):
        from pathlib import Path

        from qpass.capture import load_onnx

        return load_onnx(Path(model))
    from qpass.errors import ModelError

    raise ModelError(
        f"cannot lint a {type(model).__name__}: give an ONNX file path, an onnx.ModelProto "
        "or an onnx_ir.Model"
    )


def _qdq_nodes(model: ir.Model) -> Iterator[ir.Node]:
    return (n for n in model.graph if is_op(n, "QuantizeLinear", "DequantizeLinear"))


def _quantized_type(node: ir.Node) -> ir.DataType | None:
    """The low-precision type a Q writes or a DQ reads (ONNX: the zero point's type decides,
    else Q's output_dtype attribute, else uint8)."""
    if is_op(node, "DequantizeLinear"):
        source = node.inputs[0]
        if source.dtype is not None:
            return source.dtype
        if is_op(source.producer(), "QuantizeLinear"):
            return _quantized_type(source.producer())
    zero = node.inputs[2] if len(node.inputs) > 2 else None
    if zero is not None:
        tensor = constant(zero)
        return zero.dtype or (None if tensor is None else ir.DataType.from_numpy(tensor.dtype))
    if is_op(node, "QuantizeLinear"):
        if node.outputs[0].dtype is not None:
            return node.outputs[0].dtype
        output_dtype = attribute(node, "output_dtype", 0)
        return ir.DataType(output_dtype) if output_dtype else ir.DataType.UINT8
    return None


def _type_name(node: ir.Node) -> str:
    dtype = _quantized_type(node)
    return "an unknown type" if dtype is None else dtype.name


def _scale_size(node: ir.Node) -> int:
    scale = constant(node.inputs[1])
    return 1 if scale is None else int(scale.size)


def _rank(value: ir.Value) -> int | None:
    tensor = constant(value)
    if tensor is not None:
        return tensor.ndim
    return None if value.shape is None else len(value.shape)


def _is_int4_dq(node: ir.Node) -> bool:
    return is_op(node, "DequantizeLinear") and _quantized_type(node) == ir.DataType.INT4


def _reads_int4_weight(node: ir.Node) -> bool:
    """A MatMul/Gemm with a weight-only INT4 weight (W4A16): float data is expected."""
    weight = node.inputs[1].producer() if node.inputs[1] is not None else None
    return is_op(weight, "DequantizeLinear") and _quantized_type(weight) == ir.DataType.INT4


def _name(node: ir.Node) -> str:
    if node.name:
        return node.name
    output = node.outputs[0].name if node.outputs and node.outputs[0].name else "?"
    return f"{node.op_type}({output})"


def _describe(node: ir.Node) -> str:
    return f"{node.op_type} {node.name}" if node.name else _name(node)
