"""Checks of qpass's TensorRT plugin nodes, and their ONNX Runtime stand-in.

The node form itself (op type, namespace, version, domain, attributes) is in `qpass.plugin_spec`.
ONNX Runtime has no such op; `to_matmulnbits` swaps each node for `com.microsoft.MatMulNBits`
(the same inputs in the same layout) so the lowered graph's numbers can be checked on CPU.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from qpass.graph import MS_DOMAIN, constant
from qpass.metadata import PLUGIN_K
from qpass.plugin_spec import PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION, is_plugin_node


def to_matmulnbits(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` in which every Int4GroupGemm node is `com.microsoft.MatMulNBits`
    with the same inputs: the form ONNX Runtime runs (accuracy level 0 keeps float32 math)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    shapes = {init.name: tuple(init.dims) for init in out.graph.initializer}
    for node in out.graph.node:
        if not is_plugin_node(node):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        n, blocks, half = shapes[node.input[1]]
        g = attrs["block_size"]
        if 2 * half != g:
            raise ValueError(f"{node.name}: b's last dimension {half} is not block_size/2")
        k = _k_of(out, node, blocks * g)
        del node.attribute[:]
        node.op_type, node.domain = "MatMulNBits", MS_DOMAIN
        node.attribute.extend(
            [
                onnx.helper.make_attribute("K", k),
                onnx.helper.make_attribute("N", n),
                onnx.helper.make_attribute("bits", 4),
                onnx.helper.make_attribute("block_size", g),
            ]
        )
    if not any(o.domain == MS_DOMAIN for o in out.opset_import):
        out.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    return out


def _k_of(model: onnx.ModelProto, node: onnx.NodeProto, padded: int) -> int:
    """K of a plugin node: the `PLUGIN_K` metadata the lowering writes, else the padded size."""
    for prop in node.metadata_props:
        if prop.key == PLUGIN_K:
            return int(prop.value)
    return padded


def check_node(node: ir.Node, opset_imports: dict[str, int]) -> list[str]:
    """What is wrong with a plugin node of an onnx_ir graph (empty: nothing): the plugin is
    known (name, namespace, version), its domain is imported, and its weights are constants
    in the packed layout with block_size = 2 x b's last dimension."""
    attrs = {name: attr.value for name, attr in node.attributes.items()}
    namespace, version = attrs.get("plugin_namespace"), attrs.get("plugin_version", "1")
    if (node.op_type, namespace, version) != (PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION):
        return [
            f"plugin {namespace}::{node.op_type} version {version} is not one qpass provides "
            f"(it provides {PLUGIN_NAMESPACE}::{PLUGIN_NAME} version {PLUGIN_VERSION})"
        ]
    problems = []
    if node.domain not in opset_imports:
        problems.append(f"the model does not import the node's domain {node.domain!r}")
    if len(node.inputs) != 4 or any(v is None for v in node.inputs):
        return [*problems, "Int4GroupGemm takes 4 inputs: x, b, scales, zero_points"]
    weights = [constant(v) for v in node.inputs[1:]]
    if any(w is None for w in weights):
        return [*problems, "b, scales and zero_points must be constants (initializers)"]
    b, scales, zero_points = weights
    if not inputs_are_consistent(b, scales, zero_points):
        problems.append(
            f"packed weights of shapes b {list(b.shape)} {b.dtype}, scales {list(scales.shape)},"
            f" zero_points {list(zero_points.shape)} {zero_points.dtype} do not fit together"
        )
    elif attrs.get("block_size") != 2 * b.shape[2]:
        problems.append(f"block_size {attrs.get('block_size')} != 2 x {b.shape[2]} (b's last dim)")
    return problems


def inputs_are_consistent(b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray) -> bool:
    """Shapes and types of the weight inputs agree with each other (see `qpass.packing`)."""
    if b.dtype != np.uint8 or zero_points.dtype != np.uint8 or b.ndim != 3:
        return False
    n, blocks, _ = b.shape
    return scales.shape == (n, blocks) and zero_points.shape == (n, (blocks + 1) // 2)
