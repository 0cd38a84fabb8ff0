"""Lower MatMulInteger -> Cast -> Mul(weight scales) to ONNX Runtime's MatMulIntegerToFloat."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from qpass.passes._graph import attribute, constant, initializer, is_op, sole_consumer

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"


class LowerIntegerMatMul(ir.passes.InPlacePass):
    """Turn integer MatMuls with float rescaling into ONNX Runtime's fused CPU kernel.

    Rewrite rules:

    1. MatMulInteger(a, b, a_zero, b_zero) -> Cast(float) -> Mul(c), with b, a_zero, b_zero and c
       constant, a_zero a scalar and c a scalar or a vector over the output columns
       ==> com.microsoft.MatMulIntegerToFloat(a, b, 1, c, a_zero, b_zero): the same values in one
       kernel (prepacked int8 weights, scaling in the GEMM epilogue). ONNX Runtime's own
       MatMulIntegerToFloatFusion needs the scale as a Mul of two inputs, which its constant
       folding removes first when both are constants.
    2. Anything else is left as it is (it still runs, unfused).

    The result needs ONNX Runtime (contrib domain com.microsoft); keep the standard form for other
    runtimes.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        lowered = sum(self._try_lower(graph, n) for n in list(graph))
        if lowered:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        logger.info("lowered %d MatMulInteger chains to MatMulIntegerToFloat", lowered)
        return ir.passes.PassResult(model, modified=lowered > 0)

    def _try_lower(self, graph: ir.Graph, matmul: ir.Node) -> bool:
        if not is_op(matmul, "MatMulInteger") or len(matmul.inputs) != 4:
            return False
        cast = sole_consumer(matmul.outputs[0])
        if not is_op(cast, "Cast") or attribute(cast, "to", None) != ir.DataType.FLOAT:
            return False
        mul = sole_consumer(cast.outputs[0])
        if not is_op(mul, "Mul") or not _has_column_scale(mul, cast.outputs[0], matmul):
            return False
        a_zero = constant(matmul.inputs[2])
        if any(constant(v) is None for v in matmul.inputs[1:]) or a_zero.size != 1:
            return False
        scale = mul.inputs[1] if mul.inputs[0] is cast.outputs[0] else mul.inputs[0]
        one = initializer(graph, f"{matmul.name}_unit_scale", np.array(1.0, np.float32))
        a, b, a_zero_v, b_zero_v = matmul.inputs
        fused = ir.node(
            "MatMulIntegerToFloat",
            [a, b, one, scale, a_zero_v, b_zero_v],
            domain=MS_DOMAIN,
            name=f"{matmul.name}_ToFloat",
        )
        out = mul.outputs[0]
        fused.outputs[0].dtype, fused.outputs[0].shape = ir.DataType.FLOAT, out.shape
        graph.insert_before(matmul, fused)
        ir.convenience.replace_all_uses_with(out, fused.outputs[0], replace_graph_outputs=True)
        name = out.name
        graph.remove([mul, cast, matmul], safe=True)
        fused.outputs[0].name = name
        return True


def _has_column_scale(mul: ir.Node, cast_out: ir.Value, matmul: ir.Node) -> bool:
    """The Mul's other input is a constant scalar or a vector over the MatMul's output columns."""
    other = mul.inputs[1] if mul.inputs[0] is cast_out else mul.inputs[0]
    scale = constant(other)
    weight = constant(matmul.inputs[1])
    if scale is None or weight is None or scale.dtype != np.float32:
        return False
    return scale.size == 1 or (scale.ndim == 1 and scale.shape[0] == weight.shape[-1])
