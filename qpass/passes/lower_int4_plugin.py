"""Lower weight-only 4-bit MatMuls and 1x1 convolutions to qpass's INT4 GEMM TensorRT plugin."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from qpass.graph import attribute, constant, initializer, is_op
from qpass.metadata import PLUGIN_K
from qpass.packing import pack_4bit, packable_group
from qpass.passes.base import Pass
from qpass.passes.groupwise import quantize_rtn
from qpass.passes.matmul_weights import is_packable_weight
from qpass.plugin_spec import DOMAIN, DOMAIN_VERSION, ir_node
from qpass.schemes import QuantScheme

logger = logging.getLogger(__name__)

WEIGHT_INT4_G128 = QuantScheme(dtype="int4", symmetric=True, group_size=128)


class LowerToInt4Plugin(Pass):
    """Replace weight-only 4-bit MatMuls, and 1x1 convolutions, by the `qpass::Int4GroupGemm`
    TensorRT plugin node (node form in `qpass.plugin_spec`; kernel in `qpass.plugins.int4_gemm`).

    TensorRT runs INT4 weights natively only as blockwise DequantizeLinear into MatMul/Gemm;
    convolutions have no INT4 path at all. A 1x1 convolution is a GEMM over the channel axis,
    so the same W4A16 kernel serves both.

    Rewrite rules:

    1. MatMul(x, DequantizeLinear(q [K, N] int4/uint4 constant, s [K/g, N], z; axis=0,
       block_size=g))  ==>  Int4GroupGemm(x, b, s', z'; block_size=g), with (b, s', z') the
       MatMulNBits layout of (q, s, z) (`qpass.packing.pack_4bit`): b uint8 [N, K/g, g/2]
       low nibble first, s' = sᵀ, z' packed zero points (8 where the weight is symmetric).
       The weights the plugin computes with are exactly the DequantizeLinear's.
    2. Conv(x [B, C, H, W], W [F, C, 1, 1] float constant, bias; 1x1, stride 1, no padding,
       dilation 1, group 1)  ==>  Transpose(Int4GroupGemm(Transpose(x, NHWC), pack_4bit(q, s, z))
       + bias, NCHW), with (q, s, z) the round-to-nearest group-wise quantization of the
       [C, F] matrix Wᵀ under `weights` (when `convolutions` is true).
    3. The rule fires for g a power of two >= 16 (the kernel's K tile divides g) and, for
       rule 1, a DequantizeLinear read by MatMuls only; the model imports the domain `qpass`.

    Activations stay in float (W4A16). Group-wise round-to-nearest and the packed layout follow
    Frantar et al. 2022 ("GPTQ", §2 and its 4-bit kernels) and ONNX Runtime's MatMulNBits.
    """

    def __init__(self, weights: QuantScheme = WEIGHT_INT4_G128, *, convolutions: bool = True):
        super().__init__()
        if weights.bits != 4 or weights.is_float:
            raise ValueError("LowerToInt4Plugin quantizes convolutions to int4/uint4 only")
        self.weights = weights
        self.convolutions = convolutions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        counts = {"matmul": 0, "conv": 0}
        for node in list(graph):
            if is_packable_weight(node):
                counts["matmul"] += self._lower_matmuls(graph, node)
            elif self.convolutions and self._is_pointwise_conv(node):
                self._lower_conv(graph, node)
                counts["conv"] += 1
        if any(counts.values()):
            model.opset_imports.setdefault(DOMAIN, DOMAIN_VERSION)
        logger.info("LowerToInt4Plugin: %s", counts)
        return ir.passes.PassResult(model, modified=any(counts.values()))

    def _lower_matmuls(self, graph: ir.Graph, dq: ir.Node) -> int:
        q, scale = constant(dq.inputs[0]), constant(dq.inputs[1])
        zero = constant(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] is not None else None
        g = attribute(dq, "block_size", 0)
        base = dq.name.removesuffix(".weight_dq") if dq.name else dq.inputs[0].name
        weights = self._packed(graph, base, q, scale, zero, g)
        matmuls = [use.node for use in dq.outputs[0].uses()]
        for matmul in matmuls:
            plugin = _plugin(weights, matmul.inputs[0], g, q.shape[0], matmul.name)
            graph.insert_before(matmul, plugin)
            _take_over(graph, matmul, plugin.outputs[0])
        _remove_with_initializers(graph, dq)
        return len(matmuls)

    def _is_pointwise_conv(self, node: ir.Node) -> bool:
        if not is_op(node, "Conv") or len(node.inputs) < 2:
            return False
        w = constant(node.inputs[1])
        if w is None or w.ndim != 4 or w.shape[2:] != (1, 1) or w.dtype != np.float32:
            return False
        if node.inputs[0].shape is not None and len(node.inputs[0].shape) != 4:
            return False
        if any(list(attribute(node, a, [1, 1])) != [1, 1] for a in ("strides", "dilations")):
            return False
        pads = list(attribute(node, "pads", [0, 0, 0, 0]))
        if any(pads) or attribute(node, "group", 1) != 1:
            return False
        if attribute(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            return False
        g = self.weights.group_size or w.shape[1]
        return packable_group(g)

    def _lower_conv(self, graph: ir.Graph, conv: ir.Node) -> None:
        w = constant(conv.inputs[1])
        f, c = w.shape[:2]
        q, scale, zero = quantize_rtn(np.ascontiguousarray(w.reshape(f, c).T), self.weights)
        zero = None if self.weights.symmetric and self.weights.dtype == "int4" else zero
        g = self.weights.group_size or c
        base = conv.name or conv.outputs[0].name or "conv"
        weights = self._packed(graph, base, q, scale, zero, g)
        nhwc = ir.node("Transpose", [conv.inputs[0]], {"perm": [0, 2, 3, 1]},
                       name=f"{base}.to_nhwc")
        plugin = _plugin(weights, nhwc.outputs[0], g, c, base)
        out = plugin.outputs[0]
        added = []
        bias = conv.inputs[2] if len(conv.inputs) > 2 else None
        if bias is not None:
            added = [ir.node("Add", [out, bias], name=f"{base}.bias")]
            out = added[0].outputs[0]
        nchw = ir.node("Transpose", [out], {"perm": [0, 3, 1, 2]}, name=f"{base}.to_nchw")
        graph.insert_before(conv, [nhwc, plugin, *added, nchw])
        _take_over(graph, conv, nchw.outputs[0])

    def _packed(self, graph, base, q, scale, zero, g) -> list[ir.Value]:
        b, scales, zero_points = pack_4bit(q, scale, zero, g)
        return [
            initializer(graph, f"{base}.int4_b", b),
            initializer(graph, f"{base}.int4_scales", scales.astype(np.float32)),
            initializer(graph, f"{base}.int4_zero_points", zero_points),
        ]


def _plugin(weights: list[ir.Value], x: ir.Value, g: int, k: int, name: str | None) -> ir.Node:
    node = ir_node([x, *weights], g, name=name)
    node.metadata_props[PLUGIN_K] = str(k)
    node.outputs[0].dtype = ir.DataType.FLOAT
    return node


def _take_over(graph: ir.Graph, old: ir.Node, new: ir.Value) -> None:
    """`new` replaces `old`'s output everywhere, under its name; `old` and its dead constant
    inputs leave the graph."""
    out = old.outputs[0]
    if out.dtype is not None:
        new.dtype, new.shape = out.dtype, out.shape
    ir.convenience.replace_all_uses_with(out, new, replace_graph_outputs=True)
    name = out.name
    new.metadata_props.update(out.metadata_props)
    _remove_with_initializers(graph, old)
    out.name = None
    new.name = name


def _remove_with_initializers(graph: ir.Graph, node: ir.Node) -> None:
    dead = [v for v in node.inputs if v is not None]
    graph.remove(node, safe=True)
    for value in dead:
        if value.is_initializer() and not value.uses() and not value.is_graph_output():
            graph.initializers.pop(value.name)
