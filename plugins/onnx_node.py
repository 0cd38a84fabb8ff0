"""The ONNX node form of qpass's TensorRT plugins, and its ONNX Runtime stand-in.

TensorRT's ONNX parser imports a node it has no built-in importer for as a plugin: the node's
op type is the plugin name, the attribute `plugin_namespace` its namespace and `plugin_version`
its version; the other attributes become the plugin's fields (TensorRT Developer Guide,
"Extending TensorRT with Custom Layers", plugins from the ONNX parser). The INT4 GEMM node:

    y = qpass.Int4GroupGemm(x, b, scales, zero_points;
                            plugin_namespace="qpass", plugin_version="1", block_size=g)

with the inputs of `qpass.plugins.int4_gemm` (MatMulNBits layout, zero points always present).
The node lives in the ONNX domain `qpass` (opset 1), which models import next to the default one,
so `onnx.checker` accepts it.

ONNX Runtime has no such op; `to_matmulnbits` swaps each node for `com.microsoft.MatMulNBits`
(the same inputs in the same layout) so the lowered graph's numbers can be checked on CPU.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from qpass.plugins.int4_gemm import PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION

DOMAIN = "qpass"
"""ONNX domain of the plugin nodes (any custom domain works for TensorRT's parser)."""
DOMAIN_VERSION = 1
ATTRIBUTES = ("plugin_namespace", "plugin_version", "block_size")


def make_node(
    inputs: list[str], output: str, block_size: int, name: str | None = None
) -> onnx.NodeProto:
    """The INT4 GEMM plugin node: inputs [x, b, scales, zero_points] -> output y."""
    if len(inputs) != 4:
        raise ValueError("Int4GroupGemm takes x, b, scales and zero_points")
    return onnx.helper.make_node(
        PLUGIN_NAME,
        inputs,
        [output],
        name=name,
        domain=DOMAIN,
        plugin_namespace=PLUGIN_NAMESPACE,
        plugin_version=PLUGIN_VERSION,
        block_size=block_size,
    )


def ir_node(inputs: list[ir.Value], block_size: int, name: str | None = None) -> ir.Node:
    """`make_node` for an onnx_ir graph."""
    attributes = {
        "plugin_namespace": PLUGIN_NAMESPACE,
        "plugin_version": PLUGIN_VERSION,
        "block_size": block_size,
    }
    return ir.node(PLUGIN_NAME, inputs, attributes, domain=DOMAIN, name=name)


def is_plugin_node(node) -> bool:
    """An Int4GroupGemm plugin node (onnx.NodeProto or onnx_ir.Node)."""
    return node.op_type == PLUGIN_NAME and node.domain == DOMAIN


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
        node.op_type, node.domain = "MatMulNBits", "com.microsoft"
        node.attribute.extend(
            [
                onnx.helper.make_attribute("K", k),
                onnx.helper.make_attribute("N", n),
                onnx.helper.make_attribute("bits", 4),
                onnx.helper.make_attribute("block_size", g),
            ]
        )
    if not any(o.domain == "com.microsoft" for o in out.opset_import):
        out.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return out


def _k_of(model: onnx.ModelProto, node: onnx.NodeProto, padded: int) -> int:
    """K of a plugin node: the `qpass.K` metadata the lowering writes, else the padded size."""
    for prop in node.metadata_props:
        if prop.key == "qpass.K":
            return int(prop.value)
    return padded


def check_node(node: ir.Node, opset_imports: dict[str, int]) -> list[str]:
    """What is wrong with a plugin node of an onnx_ir graph (empty: nothing): the plugin is
    known (name, namespace, version), its domain is imported, and its weights are constants
    in the packed layout with block_size = 2 x b's last dimension."""
    from qpass.passes._graph import constant

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
    """Shapes and types of the weight inputs agree with each other (see int4_gemm's layout)."""
    if b.dtype != np.uint8 or zero_points.dtype != np.uint8 or b.ndim != 3:
        return False
    n, blocks, _ = b.shape
    return scales.shape == (n, blocks) and zero_points.shape == (n, (blocks + 1) // 2)
