"""The ONNX node form of qpass's TensorRT plugins: what the lowering pass writes, the TensorRT
linter checks, and `qpass.plugins` implements.

TensorRT's ONNX parser imports a node it has no built-in importer for as a plugin: the node's
op type is the plugin name, the attribute `plugin_namespace` its namespace and `plugin_version`
its version; the other attributes become the plugin's fields (TensorRT Developer Guide,
"Extending TensorRT with Custom Layers", plugins from the ONNX parser). The INT4 GEMM node:

    y = qpass.Int4GroupGemm(x, b, scales, zero_points;
                            plugin_namespace="qpass", plugin_version="1", block_size=g)

with the weight inputs in the packed 4-bit layout of `qpass.packing` (`pack_4bit`: the
MatMulNBits layout, zero points always present). The node lives in the ONNX domain `qpass`
(opset 1), which models import next to the default one, so `onnx.checker` accepts it.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir

PLUGIN_NAME = "Int4GroupGemm"
PLUGIN_NAMESPACE = "qpass"
PLUGIN_VERSION = "1"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
"""TensorRT plugin id: "{namespace}::{name}" (the form `tensorrt.plugin.register` takes)."""

DOMAIN = "qpass"
"""ONNX domain of the plugin nodes (any custom domain works for TensorRT's parser)."""
DOMAIN_VERSION = 1


def _attributes(block_size: int) -> dict[str, object]:
    return {
        "plugin_namespace": PLUGIN_NAMESPACE,
        "plugin_version": PLUGIN_VERSION,
        "block_size": block_size,
    }


def make_node(
    inputs: list[str], output: str, block_size: int, name: str | None = None
) -> onnx.NodeProto:
    """The INT4 GEMM plugin node: inputs [x, b, scales, zero_points] -> output y."""
    if len(inputs) != 4:
        raise ValueError("Int4GroupGemm takes x, b, scales and zero_points")
    return onnx.helper.make_node(
        PLUGIN_NAME, inputs, [output], name=name, domain=DOMAIN, **_attributes(block_size)
    )


def ir_node(inputs: list[ir.Value], block_size: int, name: str | None = None) -> ir.Node:
    """`make_node` for an onnx_ir graph."""
    return ir.node(PLUGIN_NAME, inputs, _attributes(block_size), domain=DOMAIN, name=name)


def is_plugin_node(node) -> bool:
    """An Int4GroupGemm plugin node (onnx.NodeProto or onnx_ir.Node)."""
    return node.op_type == PLUGIN_NAME and node.domain == DOMAIN
