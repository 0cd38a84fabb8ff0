"""A static TensorRT legality linter for QDQ ONNX graphs.

TensorRT cannot be installed on the machines qpass is developed on, so what qpass emits for
TensorRT is checked here, statically, against what TensorRT's documentation states; numerics are
checked by running the same graph in ONNX Runtime. Sources: TensorRT Developer Guide ("Working with
Quantized Types", "Explicit Quantization" and its Q/DQ layer-placement recommendations), the
TensorRT Operators reference (Quantize, Dequantize), the ONNX opset guide of TensorRT 11 and the
ONNX-TensorRT operator support matrix (operators.md).

Rules with severity "error" describe graphs TensorRT's parser or builder refuses, or runs with
other numbers than ONNX Runtime (where qpass checks the numerics); "warning" rules describe Q/DQ
placement TensorRT accepts but does not fuse as intended (an op left in float, an extra rounding,
a requantization), and what the linter cannot check (another project's plugin, a form TensorRT's
documentation does not describe); "info" says there is nothing to check.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
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
    reads_dequantized,
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

FP4_BLOCK = 16
"""NVFP4's block: TensorRT's DynamicQuantize takes blocks of 16 only (TensorRT Operators
reference, DynamicQuantize)."""
DYNAMIC_FP4_QUANTIZE = "TRT_FP4DynamicQuantize"
"""The ONNX node (domain `trt`, as TensorRT Model Optimizer writes NVFP4 activations) that
TensorRT's parser imports as a DynamicQuantize layer: (x, double-quantization scale) -> (FP4
data, FP8 E4M3 block scales computed at run time)."""

RULES: dict[str, tuple[str, str]] = {
    "opset": ("error", f"opset {MIN_OPSET}-{MAX_OPSET}; FP8 needs {FP8_OPSET}, INT4 {INT4_OPSET}"),
    "qdq-dtype": ("error", "Q/DQ types INT8, FP8 E4M3, INT4, FP4 E2M1 only (no UINT8, INT32)"),
    "implicit-type": ("error", "Q states its type: untyped, ORT runs UINT8 and TensorRT INT8"),
    "zero-point": ("error", "zero points constant and zero: TensorRT is symmetric only"),
    "scale": ("error", "scales constant (build-time; NVFP4: FP8 block scales x one), finite, > 0"),
    "activation-per-tensor": ("error", "activations have one scale (per tensor)"),
    "weight-axis": ("error", "per-channel weight scales on the output-channel axis only"),
    "blockwise": ("error", "block quantization (block_size) is for INT4 and FP4 weights only"),
    "int4": ("error", "INT4: weight-only blockwise DQ into MatMul/Gemm, even last dimension"),
    "fp4": ("error", "FP4 E2M1: blockwise MatMul/Gemm weights; activations dynamic, blocks of 16"),
    "fp4-activation": ("warning", "FP4 activations dynamic: a static FP4 Q is undocumented"),
    "weighted-op-inputs": ("warning", "Q/DQ on data and weight of Conv/ConvTranspose/Gemm/MatMul"),
    "residual-add": ("warning", "Q/DQ on the residual input of an Add fused into a convolution"),
    "epilogue": ("warning", "no Q/DQ between a convolution and the residual Add it feeds"),
    "unused-qdq": ("warning", "no activation Q/DQ that no INT8 consumer reads (e.g. on outputs)"),
    "concat-scales": ("warning", "dequantized Concat inputs share one scale"),
    "plugin": ("error", "qpass's plugin nodes name its plugin and version; packed weights"),
    "plugin-unchecked": ("warning", "other namespaces' plugins load if registered: not checked"),
    "plugin-qdq": ("warning", "no Q/DQ on a plugin's inputs: TensorRT cannot fuse Q/DQ into it"),
    "no-qdq": ("info", "nothing to check: no Q/DQ or plugin node, TensorRT builds it in float"),
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
    findings in rule order, then graph order; an empty list means the graph is clean, a single
    "no-qdq" finding (severity "info") that it holds nothing quantized to check.
    """
    model = _as_ir(model)
    return [finding for check in CHECKS for finding in check(model)]


def errors(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == "error"]


def format_findings(findings: list[Finding]) -> str:
    """A summary (rule, severity and count of each violated rule, in RULES order), then a table
    of findings: severity, rule and node, then the problem and its fix."""
    counts = Counter(f.rule for f in findings)
    lines = [f"{'rule':<22} {'severity':<8} count"]
    lines += [f"{rule:<22} {RULES[rule][0]:<8} {counts[rule]:>5}" for rule in RULES if counts[rule]]
    lines.append("")
    width = max([len(f.node) for f in findings] + [4])
    lines.append(f"{'severity':<8} {'rule':<22} {'node':<{width}} problem / fix")
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
        if dtype is None or dtype in QUANTIZED_TYPES or _untyped_quantize(node) is not None:
            continue  # a QuantizeLinear without a type: rule implicit-type says why
        fix = "quantize to int8 (symmetric) or fp8 e4m3, or int4 for MatMul/Gemm weights"
        if dtype == ir.DataType.INT32:
            fix = "keep the bias in float: TensorRT quantizes it (LowerForTensorRT rule 1)"
        elif dtype == ir.DataType.UINT8:
            fix = "use signed int8 activations with zero point 0 (`--target tensorrt`)"
        yield Finding(
            "qdq-dtype",
            _name(node),
            f"{node.op_type} to/from {dtype.name}: TensorRT reads INT8, FP8 E4M3, INT4 and FP4 "
            "E2M1 only",
            fix,
        )


def _check_implicit_type(model: ir.Model) -> Iterator[Finding]:
    """A QuantizeLinear with neither a zero point nor output_dtype: ONNX (and ONNX Runtime) make
    it UINT8, TensorRT's ONNX importer INT8. Negative values saturate to 0 in ONNX Runtime and
    not in TensorRT, so the numbers qpass checks in ONNX Runtime are not TensorRT's: an error."""
    for node in _qdq_nodes(model):
        if is_op(node, "QuantizeLinear") and _untyped_quantize(node) is node:
            yield Finding(
                "implicit-type",
                _name(node),
                "QuantizeLinear without a zero point or output_dtype: TensorRT's importer reads "
                "it as INT8, ONNX Runtime as UINT8 (the ONNX default), so the two compute "
                "different numbers",
                "add an INT8 zero point 0 (symmetric), as the int8 preset writes for TensorRT",
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
        if scale is None and _two_level_scale(node) is not None:
            continue  # NVFP4: FP8 block scales times one scale, checked on that DequantizeLinear
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
    for node in _qdq_nodes(model):
        if _quantized_type(node) == ir.DataType.INT4:
            yield from _weight_only_findings(node, "int4", "INT4")


def _check_fp4(model: ir.Model) -> Iterator[Finding]:
    """FP4 E2M1 (NVFP4, Blackwell): weights as INT4's; activations in TensorRT's dynamic form
    (TensorRT Operators reference, DynamicQuantize; "Working with Quantized Types")."""
    for node in _qdq_nodes(model):
        if _quantized_type(node) != ir.DataType.FLOAT4E2M1:
            continue
        if is_weight(node):
            yield from _weight_only_findings(node, "fp4", "FP4")
            continue
        quantizer = _dynamic_fp4_quantizer(node.inputs[0])
        if is_op(node, "DequantizeLinear") and quantizer is not None:
            yield from _dynamic_fp4_findings(node, quantizer)


def _check_fp4_activation(model: ir.Model) -> Iterator[Finding]:
    """FP4 activations in another form than the dynamic one. TensorRT's documentation describes
    FP4 activation quantization as dynamic, per block (the DynamicQuantize layer; "When quantizing
    activations, Dynamic Quantization is required" is stated for MXFP8) and lists no FP4 output
    for its static Quantize layer; whether a build accepts a static FP4 QuantizeLinear on an
    activation is not verified here, so it is a warning, not an error."""
    fix = (
        f"quantize the activation with {DYNAMIC_FP4_QUANTIZE} (blocks of {FP4_BLOCK}) and "
        "dequantize its FP8 block scales, then its data, as TensorRT Model Optimizer does"
    )
    for node in _qdq_nodes(model):
        if _quantized_type(node) != ir.DataType.FLOAT4E2M1 or is_weight(node):
            continue
        source = node.inputs[0]
        if is_op(node, "QuantizeLinear"):
            message = (
                "static FP4 QuantizeLinear on an activation; TensorRT documents FP4 activations "
                f"as dynamic block quantization (DynamicQuantize, blocks of {FP4_BLOCK}, FP8 E4M3 "
                "block scales)"
            )
        elif is_op(source.producer(), "QuantizeLinear") or _dynamic_fp4_quantizer(source):
            continue  # reported on its QuantizeLinear, or checked by rule fp4
        else:
            message = (
                f"FP4 tensor {source.name!r} comes from neither a QuantizeLinear nor TensorRT's "
                "dynamic block quantizer"
            )
        yield Finding("fp4-activation", _name(node), message, fix)


def _weight_only_findings(node: ir.Node, rule: str, label: str) -> Iterator[Finding]:
    """A low-bit weight (TensorRT Developer Guide, "Working with Quantized Types"): a constant
    read by DequantizeLinear, block-quantized, into the weight of a MatMul/Gemm, even last
    dimension (two values per byte)."""
    weight = constant(node.inputs[0]) if is_op(node, "DequantizeLinear") else None
    if weight is None:
        if is_weight(node):
            message = f"{label} weight quantized in the graph; TensorRT reads {label} weights as "
            message += "constants"
        else:
            message = f"{label} on a computed tensor; TensorRT's {label} is weight-only"
        fix = f"store the weight as a constant {label} initializer read by DequantizeLinear"
        yield Finding(rule, _name(node), message, fix)
        return
    readers = node.outputs[0].uses()
    if not readers or any(not is_op(r, "MatMul", "Gemm") or i != 1 for r, i in readers):
        yield Finding(
            rule,
            _name(node),
            f"{label} weight not read as the weight of a MatMul/Gemm",
            f"use {label} for MatMul/Gemm weights only (int8 or fp8 for convolutions)",
        )
    scale = constant(node.inputs[1])
    if scale is None and _two_level_scale(node) is not None:
        scale = constant(_two_level_scale(node).inputs[0])
    if not attribute(node, "block_size", 0) or (scale is not None and scale.ndim != weight.ndim):
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


def _dynamic_fp4_findings(dq: ir.Node, quantizer: ir.Node) -> Iterator[Finding]:
    """TensorRT's DynamicQuantize (TensorRT Operators reference): blocks of 16 along the last or
    second-to-last axis of a 2-D or 3-D input, FP8 E4M3 block scales, a build-time scalar
    double-quantization scale; the data is dequantized with the block scales, themselves
    dequantized by that scalar (NVFP4's two-level scaling)."""
    problems = []
    block = attribute(quantizer, "block_size", 0)
    if block != FP4_BLOCK:
        problems.append(
            f"{_describe(quantizer)} has block_size {block}; TensorRT's DynamicQuantize takes "
            f"blocks of {FP4_BLOCK} only"
        )
    if attribute(dq, "block_size", 0) != block:
        problems.append(f"block_size {attribute(dq, 'block_size', 0)} is not its quantizer's")
    rank, axis = _rank(quantizer.inputs[0]), attribute(quantizer, "axis", -1)
    if rank is not None and rank not in (2, 3):
        problems.append(f"the quantized tensor is {rank}-D; DynamicQuantize takes 2-D or 3-D")
    elif rank is not None and (axis + rank if axis < 0 else axis) < rank - 2:
        problems.append(f"blocks along axis {axis}; DynamicQuantize blocks one of the last two")
    double = constant(quantizer.inputs[1]) if len(quantizer.inputs) > 1 else None
    if double is None or double.size != 1:
        problems.append("the double-quantization scale is not a build-time scalar")
    if attribute(quantizer, "scale_type", ir.DataType.FLOAT8E4M3FN) != ir.DataType.FLOAT8E4M3FN:
        problems.append("the block scales are not FP8 E4M3")
    scales = _two_level_scale(dq)
    if scales is None or scales.inputs[0] is not quantizer.outputs[1]:
        problems.append("its scale is not the quantizer's FP8 block scales times one scale")
    for problem in problems:
        yield Finding(
            "fp4",
            _name(dq),
            f"dynamic FP4 activation: {problem}",
            f"quantize with {DYNAMIC_FP4_QUANTIZE}(block_size={FP4_BLOCK}, axis=-1), dequantize "
            "its FP8 block scales by one constant scale, then the data with the same block size",
        )


def _check_weighted_op_inputs(model: ir.Model) -> Iterator[Finding]:
    for node in model.graph:
        index = _one_sided_input(node)
        if index is None:
            continue
        missing = ("data", "weight")[index]
        yield Finding(
            "weighted-op-inputs",
            _name(node),
            f"{node.op_type} has Q/DQ on one input but not on its {missing} (input {index}); "
            "TensorRT runs it in float",
            f"quantize the {missing} input too, or neither",
        )


def _one_sided_input(node: ir.Node) -> int | None:
    """The float input (0 data, 1 weight) of a Conv/ConvTranspose/Gemm/MatMul with a Q/DQ right
    on its other input, or None. An input dequantized through data movement or pooling counts as
    quantized (TensorRT moves the DequantizeLinear past those ops)."""
    if not is_op(node, *WEIGHTED_OPS) or len(node.inputs) < 2 or _reads_int4_weight(node):
        return None
    direct = [is_dequantized(v) for v in node.inputs[:2]]
    quantized = [reads_dequantized(v) for v in node.inputs[:2]]
    if not any(direct) or all(quantized):
        return None
    return quantized.index(False)


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
        if not is_op(node, "DequantizeLinear") or is_weight(node) or _is_block_scale(node):
            continue
        readers = node.outputs[0].consumers()
        if feeds_int8(node.outputs[0]) or any(map(_is_plugin, readers)):
            continue  # a Q/DQ into a plugin: rule plugin-qdq says why
        if any(_one_sided_input(reader) is not None for reader in readers):
            continue  # a weighted op quantized on one side: rule weighted-op-inputs says why
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


def _foreign_namespace(node: ir.Node) -> str | None:
    """The plugin namespace of a plugin node that is not qpass's, or None."""
    from qpass.plugin_spec import PLUGIN_NAMESPACE

    namespace = attribute(node, "plugin_namespace", None)
    return namespace if _is_plugin(node) and namespace not in (None, PLUGIN_NAMESPACE) else None


def _check_plugin(model: ir.Model) -> Iterator[Finding]:
    from qpass.plugins.onnx_node import check_node

    for node in model.graph:
        if not _is_plugin(node) or _foreign_namespace(node) is not None:
            continue  # another project's plugin: rule plugin-unchecked
        for problem in check_node(node, model.opset_imports):
            yield Finding(
                "plugin",
                _name(node),
                problem,
                "emit plugin nodes with qpass.plugins.onnx_node (LowerToInt4Plugin)",
            )


def _check_plugin_unchecked(model: ir.Model) -> Iterator[Finding]:
    """TensorRT's parser imports a node with `plugin_namespace` as that plugin if a library
    registered it (TensorRT Developer Guide, "Extending TensorRT with Custom Layers"): legal, but
    its inputs, attributes and numbers are not the linter's to check."""
    for node in model.graph:
        namespace = _foreign_namespace(node)
        if namespace is None:
            continue
        version = attribute(node, "plugin_version", "1")
        yield Finding(
            "plugin-unchecked",
            _name(node),
            f"plugin {namespace}::{node.op_type} version {version} is not qpass's; TensorRT loads "
            "it if its library registers it, the linter cannot check it",
            "load the plugin's library when building the engine (trtexec --dynamicPlugins, "
            "build_engine(plugins=...))",
        )


def _check_no_qdq(model: ir.Model) -> Iterator[Finding]:
    if next(_qdq_nodes(model), None) is None and not any(map(_is_plugin, model.graph)):
        yield Finding(
            "no-qdq",
            "(model)",
            "nothing to check: no QuantizeLinear, DequantizeLinear or plugin node; TensorRT "
            "builds the graph in float",
            "quantize it first (qpass compile --target tensorrt)",
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
    _check_implicit_type,
    _check_zero_point,
    _check_scale,
    _check_activation_per_tensor,
    _check_weight_axis,
    _check_blockwise,
    _check_int4,
    _check_fp4,
    _check_fp4_activation,
    _check_weighted_op_inputs,
    _check_residual_add,
    _check_epilogue,
    _check_unused_qdq,
    _check_concat_scales,
    _check_plugin,
    _check_plugin_unchecked,
    _check_plugin_qdq,
    _check_no_qdq,
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
        quantizer = _dynamic_fp4_quantizer(source)
        if quantizer is not None and source.index() == 0:
            return ir.DataType.FLOAT4E2M1
        if quantizer is not None:
            return ir.DataType(attribute(quantizer, "scale_type", ir.DataType.FLOAT8E4M3FN))
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


def _untyped_quantize(node: ir.Node) -> ir.Node | None:
    """The QuantizeLinear that states no type (no zero point, no output_dtype) this Q is, or
    this DQ reads; else None."""
    if is_op(node, "DequantizeLinear"):
        node = node.inputs[0].producer()
    if not is_op(node, "QuantizeLinear"):
        return None
    zero = node.inputs[2] if len(node.inputs) > 2 else None
    return node if zero is None and not attribute(node, "output_dtype", 0) else None


def _dynamic_fp4_quantizer(value: ir.Value | None) -> ir.Node | None:
    """The DYNAMIC_FP4_QUANTIZE node producing `value`, or None."""
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == DYNAMIC_FP4_QUANTIZE else None


def _two_level_scale(node: ir.Node) -> ir.Node | None:
    """The DequantizeLinear computing an FP4 Q/DQ's scales from FP8 block scales (constant, or
    a dynamic quantizer's) and one constant scale (NVFP4's two-level scaling), or None."""
    if _quantized_type(node) != ir.DataType.FLOAT4E2M1 or len(node.inputs) < 2:
        return None
    scales = node.inputs[1].producer() if node.inputs[1] is not None else None
    if not is_op(scales, "DequantizeLinear") or constant(scales.inputs[1]) is None:
        return None
    source = scales.inputs[0]
    if constant(source) is None and _dynamic_fp4_quantizer(source) is None:
        return None
    return scales


def _is_block_scale(node: ir.Node) -> bool:
    """A DequantizeLinear whose output is only ever another DequantizeLinear's scale."""
    uses = node.outputs[0].uses()
    return (
        bool(uses)
        and not node.outputs[0].is_graph_output()
        and all(is_op(reader, "DequantizeLinear") and index == 1 for reader, index in uses)
    )


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
