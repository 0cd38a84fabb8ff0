"""Lower a QDQ graph to the form ONNX Runtime's CPU integer kernels fuse."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from qpass.graph import constant, initializer, is_op
from qpass.metadata import UNFUSED
from qpass.passes.base import Pass

logger = logging.getLogger(__name__)

FUSED_KERNELS = {
    "Conv": "QLinearConv",
    "Gemm": "QGemm",
    "MatMul": "QLinearMatMul/MatMulIntegerToFloat",
    "Add": "QLinearAdd",
    "GlobalAveragePool": "QLinearGlobalAveragePool",
    "AveragePool": "QLinearAveragePool",
}
_OUTPUT_OPTIONAL = ("Gemm", "MatMul")


class LowerForOnnxRuntime(Pass):
    """Make every quantized op match one of ONNX Runtime's QDQ fusion patterns (CPU provider).

    Rewrite rules:

    1. Activation Q/DQ in int8 with zero point z  ==>  uint8 with zero point z + 128 and the same
       scale: identical real values, and ORT's x86 kernels (QLinearConv, QGemm) want u8
       activations with s8 weights; s8 x s8 convolutions mostly stay unfused and run slower than
       float.
    2. Check, per op, that every float input comes from a DequantizeLinear and (except Gemm and
       MatMul, whose integer kernels may output float) the output goes to a QuantizeLinear; ops
       that will not fuse are listed in a warning and in `model.meta[UNFUSED]`.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        shifted = sum(self._try_shift_to_uint8(graph, node) for node in list(graph))
        unfused = [f"{n.op_type} {n.name}: {why}" for n in graph if (why := _why_unfused(n))]
        model.meta[UNFUSED] = unfused
        if unfused:
            logger.warning(
                "%d quantized ops will not fuse in ONNX Runtime:\n  %s",
                len(unfused),
                "\n  ".join(unfused),
            )
        return ir.passes.PassResult(model, modified=shifted > 0)

    def _try_shift_to_uint8(self, graph: ir.Graph, q: ir.Node) -> bool:
        if not is_op(q, "QuantizeLinear") or len(q.inputs) < 3:
            return False
        zero = constant(q.inputs[2])
        if zero is None or zero.dtype != np.int8 or constant(q.inputs[0]) is not None:
            return False
        readers = q.outputs[0].consumers()
        if q.outputs[0].is_graph_output() or not all(is_op(r, "DequantizeLinear") for r in readers):
            return False
        shifted = initializer(
            graph, f"{q.inputs[2].name}_u8", (zero.astype(np.int16) + 128).astype(np.uint8)
        )
        for node in (q, *readers):
            node.replace_input_with(2, shifted)
        q.outputs[0].dtype = ir.DataType.UINT8
        return True


def _why_unfused(node: ir.Node) -> str | None:
    """Why a quantized op will not become ORT's integer kernel, or None if it will (or is float)."""
    if not is_op(node, *FUSED_KERNELS):
        return None
    producers = [v.producer() if v is not None else None for v in node.inputs]
    dequantized = [is_op(p, "DequantizeLinear") for p in producers]
    if not any(dequantized):
        return None  # a float op
    if not all(d for v, d in zip(node.inputs, dequantized, strict=True) if v is not None):
        return "some inputs are float"
    if node.op_type not in _OUTPUT_OPTIONAL:
        readers = node.outputs[0].consumers()
        if len(readers) != 1 or not is_op(readers[0], "QuantizeLinear"):
            return "output is not quantized"
    activation_types = {
        p.inputs[0].dtype for p in producers if p is not None and constant(p.inputs[0]) is None
    }
    if ir.DataType.INT8 in activation_types:
        return "int8 activations"
    return None
