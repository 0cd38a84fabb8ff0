"""Per-input-channel scaling of MatMul/Gemm weights, with the inverse folded into the producer
of their input, so that the float function is unchanged: the rewrite SmoothQuant and AWQ share.

For an activation X read by a group of layers with constant weights W [K, N], and factors s [K]:
each W becomes diag(s) W (`scale_weight_rows`) and X becomes X diag(1/s), folded into X's
producer where one can take it (`try_absorb_into_producer`).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qpass.graph import attribute, constant, is_op, set_constant


def is_float_activation(value: ir.Value | None) -> bool:
    """A computed (non-constant) float tensor, or one of unknown type."""
    return (
        value is not None and value.dtype in (ir.DataType.FLOAT, None) and constant(value) is None
    )


def has_scalable_weight(node: ir.Node | None) -> bool:
    """A MatMul with a constant 2-D weight, or a Gemm (transA=0) with a constant weight, reading
    a float activation."""
    if is_op(node, "MatMul"):
        weight = constant(node.inputs[1])
        return weight is not None and weight.ndim == 2 and is_float_activation(node.inputs[0])
    if is_op(node, "Gemm") and not attribute(node, "transA", 0):
        return constant(node.inputs[1]) is not None and is_float_activation(node.inputs[0])
    return False


def only_read_by(x: ir.Value, group: list[ir.Node]) -> bool:
    """x is not a graph output and every reader of x is in `group`."""
    readers = {id(n) for n in group}
    return not x.is_graph_output() and all(id(u.node) in readers for u in x.uses())


def scale_weight_rows(graph: ir.Graph, node: ir.Node, s: np.ndarray) -> None:
    """W ==> diag(s) W for the layer's weight W [K, N] (a Gemm with transB: W diag(s))."""
    weight = constant(node.inputs[1])
    transposed = is_op(node, "Gemm") and attribute(node, "transB", 0)
    scaled = weight.astype(np.float64) * (s[None, :] if transposed else s[:, None])
    node.replace_input_with(1, set_constant(graph, node.inputs[1], scaled.astype(weight.dtype)))


def scale_weight_columns(graph: ir.Graph, node: ir.Node, factors: np.ndarray) -> None:
    """W ==> W diag(factors) for a MatMul's weight W [K, N]: scales the layer's outputs."""
    weight = constant(node.inputs[1])
    scaled = (weight.astype(np.float64) * factors[None, :]).astype(weight.dtype)
    node.replace_input_with(1, set_constant(graph, node.inputs[1], scaled))


def is_layernorm_with_constant_affine(node: ir.Node | None) -> bool:
    """A LayerNormalization over the last axis with constant scale (and bias)."""
    if not is_op(node, "LayerNormalization") or attribute(node, "axis", -1) != -1:
        return False
    return all(constant(v) is not None for v in node.inputs[1:] if v is not None)


def try_absorb_into_producer(
    graph: ir.Graph, x: ir.Value, group: list[ir.Node], inverse: np.ndarray
) -> bool:
    """Fold diag(1/s) (`inverse`) into the producer of x: a LayerNormalization's scale and
    bias, or the output columns (and bias) of a MatMul (+ constant Add). False, changing
    nothing, if x has readers outside `group` or no such producer."""
    if not only_read_by(x, group):
        return False
    producer = x.producer()
    if is_layernorm_with_constant_affine(producer):
        for i in (1, 2):
            if len(producer.inputs) > i and producer.inputs[i] is not None:
                value = constant(producer.inputs[i]).astype(np.float64)
                producer.replace_input_with(
                    i, set_constant(graph, producer.inputs[i], (value * inverse).astype(np.float32))
                )
        return True
    bias = None
    if is_op(producer, "Add") and constant(producer.inputs[1]) is not None:
        bias, producer = producer, producer.inputs[0].producer()
        if len(bias.inputs[0].uses()) != 1 or constant(bias.inputs[1]).shape[-1:] != inverse.shape:
            return False
    if not has_scalable_weight(producer) or is_op(producer, "Gemm"):
        return False
    scale_weight_columns(graph, producer, inverse)
    if bias is not None:
        value = constant(bias.inputs[1])
        scaled = (value.astype(np.float64) * inverse).astype(value.dtype)
        bias.replace_input_with(1, set_constant(graph, bias.inputs[1], scaled))
    return True
