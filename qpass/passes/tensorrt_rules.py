"""What TensorRT accepts and fuses around Q/DQ, shared by `LowerForTensorRT` and `qpass.lint`.

Sources: TensorRT Developer Guide ("Explicit Quantization" and its Q/DQ layer-placement
recommendations) and the TensorRT Operators reference (Quantize, Dequantize).
"""

from __future__ import annotations

import onnx_ir as ir

from qpass.graph import constant, is_op, sole_consumer
from qpass.passes.fuse_requant import SCALE_PRESERVING_OPS

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
"""Ops whose data and weight inputs should both be quantized (TensorRT Developer Guide, Explicit
Quantization, Q/DQ layer-placement recommendations)."""

EPILOGUE_OPS = ("Conv", "ConvTranspose")
"""Ops into whose epilogue TensorRT fuses a following residual Add (same guide)."""

PASS_THROUGH_OPS = (*SCALE_PRESERVING_OPS, "Concat", "AveragePool", "GlobalAveragePool")
"""Ops a DequantizeLinear moves past (data movement, max and average pooling): their output runs
in INT8 when something after them does."""


def is_weight(node: ir.Node) -> bool:
    """A Q or DQ whose float side is a constant: DQ(const), Q(const), or DQ(Q(const))."""
    if is_op(node, "QuantizeLinear"):
        return constant(node.inputs[0]) is not None
    if not is_op(node, "DequantizeLinear"):
        return False
    if constant(node.inputs[0]) is not None:
        return True
    source = node.inputs[0].producer()
    return is_op(source, "QuantizeLinear") and constant(source.inputs[0]) is not None


def is_dequantized(value: ir.Value | None) -> bool:
    return value is not None and is_op(value.producer(), "DequantizeLinear")


def is_quantized_weighted(node: ir.Node | None) -> bool:
    """A Conv, ConvTranspose, Gemm or MatMul whose data and weight inputs are both dequantized."""
    return (
        is_op(node, *WEIGHTED_OPS)
        and len(node.inputs) >= 2
        and all(is_dequantized(v) for v in node.inputs[:2])
    )


def reads_dequantized(value: ir.Value | None) -> bool:
    """A value a DequantizeLinear produces, directly or through the ops it moves past
    (PASS_THROUGH_OPS; every input of a Concat): TensorRT reads it quantized."""
    node = value.producer() if value is not None else None
    if is_op(node, "DequantizeLinear"):
        return True
    if is_op(node, "Concat"):
        return bool(node.inputs) and all(map(reads_dequantized, node.inputs))
    if not is_op(node, *PASS_THROUGH_OPS) or not node.inputs:
        return False
    return reads_dequantized(node.inputs[0])


def feeds_int8(value: ir.Value, _seen: set[int] | None = None) -> bool:
    """Whether a reader of `value` runs in INT8 under TensorRT: a data or weight input of a
    weighted op whose other input is dequantized too, an Add, a QuantizeLinear, or a
    pooling/data-movement op whose output does. A weighted op with a float weight (or float
    data) runs in float: a Q/DQ that reaches only such ops is an extra rounding."""
    seen = set() if _seen is None else _seen
    for node, index in value.uses():
        if is_op(node, "QuantizeLinear", "Add") or _is_quantized_input(node, index):
            return True
        if is_op(node, *PASS_THROUGH_OPS) and id(node) not in seen and node.outputs:
            seen.add(id(node))
            if feeds_int8(node.outputs[0], seen):
                return True
    return False


def _is_quantized_input(node: ir.Node, index: int) -> bool:
    """Input `index` (data or weight) of a weighted op whose other one is dequantized."""
    return (
        is_op(node, *WEIGHTED_OPS)
        and index < 2
        and len(node.inputs) >= 2
        and reads_dequantized(node.inputs[1 - index])
    )


def epilogue_input(add: ir.Node) -> int | None:
    """The input of a residual Add whose Q/DQ pair keeps it out of a Conv epilogue, or None.

    That is an input read through Q -> DQ straight from a quantized Conv/ConvTranspose, the pair
    serving this Add alone, while the other input is dequantized too (the residual)."""
    if not is_op(add, "Add") or len(add.inputs) != 2 or not all(map(is_dequantized, add.inputs)):
        return None
    for index, value in enumerate(add.inputs):
        dq = value.producer()
        q = dq.inputs[0].producer()
        if not is_op(q, "QuantizeLinear") or sole_consumer(value) is not add:
            continue
        if sole_consumer(q.outputs[0]) is not dq:
            continue
        layer = q.inputs[0].producer()
        if _is_epilogue_layer(layer) and sole_consumer(layer.outputs[0]) is q:
            return index
    return None


def fused_input(add: ir.Node) -> int | None:
    """The input of an Add produced directly by a quantized Conv/ConvTranspose that feeds this Add
    alone (TensorRT fuses the Add into that convolution's epilogue), or None."""
    if not is_op(add, "Add") or len(add.inputs) != 2:
        return None
    for index, value in enumerate(add.inputs):
        layer = value.producer() if value is not None else None
        if _is_epilogue_layer(layer) and sole_consumer(value) is add:
            return index
    return None


def _is_epilogue_layer(node: ir.Node | None) -> bool:
    return is_op(node, *EPILOGUE_OPS) and is_quantized_weighted(node)
