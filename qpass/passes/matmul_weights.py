"""The constant-weight MatMuls of weight-only quantization: which ones a pass quantizes, in
which stages, and how their weights come to be read through blockwise DequantizeLinear.

A MatMul weight W is [K, N] (y = x @ W); its quantized form is described in
`qpass.passes.groupwise`.
"""

from __future__ import annotations

import re

import numpy as np
import onnx_ir as ir

from qpass.graph import attribute, constant, initializer, is_op, module_path, raise_opset
from qpass.packing import packable_group
from qpass.passes.base import is_kept_float
from qpass.passes.groupwise import grouped
from qpass.schemes import QuantScheme

WEIGHT_OPSET = 21
"""INT4/UINT4 and blockwise scales in DequantizeLinear need opset 21."""

FOUR_BIT = (ir.DataType.INT4, ir.DataType.UINT4)
EIGHT_BIT = (ir.DataType.INT8, ir.DataType.UINT8)

_BLOCK_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


def ensure_weight_opset(model: ir.Model) -> None:
    """Raise the model to opset 21 (INT4 and blockwise DequantizeLinear) if it is below."""
    raise_opset(model, WEIGHT_OPSET)


def is_final_projection(node: ir.Node) -> bool:
    """lm_head: a node of a module path ending in lm_head, or one writing a graph output."""
    return module_path(node).endswith("lm_head") or node.outputs[0].is_graph_output()


def weight_matmuls(
    graph: ir.Graph, exclude: frozenset[str] = frozenset(), lm_head: bool = False
) -> list[ir.Node]:
    """MatMuls with a constant float 2-D weight [K, N], in graph order, minus the excluded ones.

    The final projection (module path ending in lm_head, or a MatMul writing a graph output) is
    left out unless `lm_head` is true; embeddings are Gathers and never match.
    """
    found = []
    for node in graph:
        if not is_op(node, "MatMul") or is_kept_float(node, exclude):
            continue
        if module_path(node) in exclude:
            continue
        weight = node.inputs[1]
        if weight is None or weight.dtype != ir.DataType.FLOAT or constant(weight) is None:
            continue
        if weight.shape is None or len(weight.shape) != 2:
            continue
        if not lm_head and is_final_projection(node):
            continue
        found.append(node)
    return found


def untie_final_projection(graph: ir.Graph) -> None:
    """Give a final projection that reads a transposed constant (tied embeddings: MatMul(x,
    Transpose(E)), E [vocab, K] also read by the embedding Gather) its own weight Eᵀ, so that a
    weight pass can quantize it; the Gather keeps reading E."""
    for node in list(graph):
        if not is_op(node, "MatMul") or not is_final_projection(node) or node.inputs[1] is None:
            continue
        transpose = node.inputs[1].producer()
        if transpose is None or not is_op(transpose, "Transpose"):
            continue
        table = constant(transpose.inputs[0])
        perm = list(attribute(transpose, "perm", [1, 0]))
        if table is None or table.ndim != 2 or perm != [1, 0]:
            continue
        base = node.name or "lm_head"
        node.replace_input_with(1, initializer(graph, f"{base}.weight", table.T.copy()))
        if not transpose.outputs[0].uses() and not transpose.outputs[0].is_graph_output():
            graph.remove(transpose, safe=True)


def block_index(node: ir.Node) -> int | None:
    """The transformer block a captured node belongs to (`layers.N` in its module path)."""
    match = _BLOCK_INDEX.search(module_path(node))
    return int(match.group(1)) if match else None


def quantization_stages(targets: list[ir.Node], sequential: str = "block") -> list[list[ir.Node]]:
    """`targets` cut into stages, in graph order: one transformer block each (`layers.N` in the
    module path) or, with `sequential="layer"` or without that metadata, the MatMuls that read
    one tensor."""
    if sequential not in ("block", "layer"):
        raise ValueError(f"sequential must be 'block' or 'layer', not {sequential!r}")
    stages: dict[tuple, list[ir.Node]] = {}
    for node in targets:
        block = block_index(node) if sequential == "block" else None
        key = ("block", block) if block is not None else ("input", node.inputs[0].name)
        stages.setdefault(key, []).append(node)
    return list(stages.values())


def replace_weight(
    graph: ir.Graph,
    matmul: ir.Node,
    q: np.ndarray,
    scale: np.ndarray,
    zero: np.ndarray,
    scheme: QuantScheme,
) -> ir.Node:
    """Read the MatMul's weight through DequantizeLinear(q, scale, zero point; axis 0, block g)."""
    old = matmul.inputs[1]
    base = matmul.name or old.name or "weight"
    g = grouped(scheme, q.shape[0])
    inputs = [
        initializer(graph, f"{base}.weight_q", q),
        initializer(graph, f"{base}.weight_scale", scale.astype(np.float32)),
    ]
    if not (scheme.symmetric and scheme.dtype in ("int4", "int3")):  # zero point 0
        inputs.append(initializer(graph, f"{base}.weight_zero_point", zero))
    dq = ir.node(
        "DequantizeLinear", inputs, {"axis": 0, "block_size": g}, name=f"{base}.weight_dq"
    )
    dq.outputs[0].name = f"{base}.weight_dequantized"
    dq.outputs[0].dtype, dq.outputs[0].shape = ir.DataType.FLOAT, ir.Shape(q.shape)
    graph.insert_before(matmul, dq)
    matmul.replace_input_with(1, dq.outputs[0])
    if old.is_initializer() and not old.uses() and not old.is_graph_output():
        graph.initializers.pop(old.name)
    return dq


def is_packable_weight(dq: ir.Node, dtypes=FOUR_BIT) -> bool:
    """A DequantizeLinear of a constant [K, N] weight of one of `dtypes` (4-bit unless told),
    blockwise on axis 0 with a packable block size (`qpass.packing.packable_group`), constant
    scales (and zero points), read only as the weight of MatMuls."""
    if not is_op(dq, "DequantizeLinear") or dq.inputs[0].dtype not in dtypes:
        return False
    q = constant(dq.inputs[0])
    if q is None or q.ndim != 2 or attribute(dq, "axis", 1) != 0:
        return False
    if not packable_group(attribute(dq, "block_size", 0)) or constant(dq.inputs[1]) is None:
        return False
    if len(dq.inputs) > 2 and dq.inputs[2] is not None and constant(dq.inputs[2]) is None:
        return False
    readers = dq.outputs[0].uses()
    return (
        bool(readers)
        and not dq.outputs[0].is_graph_output()
        and all(is_op(use.node, "MatMul") and use.idx == 1 for use in readers)
    )
