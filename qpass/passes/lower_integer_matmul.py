"""Lower integer MatMuls with float outputs, and their biases, to ORT's MatMulIntegerToFloat."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from qpass.graph import MS_DOMAIN, attribute, constant, initializer, is_op, sole_consumer
from qpass.passes.base import Pass

logger = logging.getLogger(__name__)


class LowerIntegerMatMul(Pass):
    """Turn integer MatMuls with float rescaling into ONNX Runtime's fused CPU kernel.

    Rewrite rules:

    1. MatMulInteger(a, b, a_zero, b_zero) -> Cast(float) -> Mul(c), with b, a_zero, b_zero and c
       constant, a_zero a scalar and c a scalar or a vector over the output columns
       ==> com.microsoft.MatMulIntegerToFloat(a, b, 1, c, a_zero, b_zero): the same values in one
       kernel (prepacked int8 weights, scaling in the GEMM epilogue). ONNX Runtime's own
       MatMulIntegerToFloatFusion needs the scale as a Mul of two inputs, which its constant
       folding removes first when both are constants.
    2. MatMul(DQ(a, sa, za), DQ(b, sb, zb)) with a per-tensor, b a constant 2-D integer weight
       (per-tensor or per-column scales)  ==>  MatMulIntegerToFloat(a, b, sa, sb, za, zb): what
       ONNX Runtime's QDQ fusion makes of it, written out so that rule 3 can apply.
    3. MatMulIntegerToFloat(...) -> Add(bias), bias a constant vector over the output columns and
       the product read by the Add alone  ==>  MatMulIntegerToFloat(..., bias): the bias is
       added in the GEMM epilogue instead of by a pass over the output.
    4. Anything else is left as it is (it still runs, unfused).

    The result needs ONNX Runtime (contrib domain com.microsoft); keep the standard form for other
    runtimes.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        lowered = sum(
            self._try_lower(graph, n) or _try_lower_qdq_matmul(graph, n) for n in list(graph)
        )
        biases = sum(_try_fuse_bias(graph, n) for n in list(graph))
        if lowered:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        logger.info(
            "lowered %d integer MatMuls to MatMulIntegerToFloat, %d with their bias",
            lowered,
            biases,
        )
        return ir.passes.PassResult(model, modified=lowered + biases > 0)

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
        _replace(graph, fused, mul.outputs[0], [matmul, cast, mul])
        return True


def _has_column_scale(mul: ir.Node, cast_out: ir.Value, matmul: ir.Node) -> bool:
    """The Mul's other input is a constant scalar or a vector over the MatMul's output columns."""
    other = mul.inputs[1] if mul.inputs[0] is cast_out else mul.inputs[0]
    scale = constant(other)
    weight = constant(matmul.inputs[1])
    if scale is None or weight is None or scale.dtype != np.float32:
        return False
    return scale.size == 1 or (scale.ndim == 1 and scale.shape[0] == weight.shape[-1])


def _try_lower_qdq_matmul(graph: ir.Graph, matmul: ir.Node) -> bool:
    if not is_op(matmul, "MatMul"):
        return False
    dq_a, dq_b = (v.producer() for v in matmul.inputs)
    if not (is_op(dq_a, "DequantizeLinear") and is_op(dq_b, "DequantizeLinear")):
        return False
    if len(dq_a.inputs) < 3 or len(dq_b.inputs) < 3 or "block_size" in dq_b.attributes:
        return False
    if any(constant(v) is None for v in (*dq_a.inputs[1:], *dq_b.inputs)):
        return False
    weight, scale = constant(dq_b.inputs[0]), constant(dq_b.inputs[1])
    if weight.ndim != 2 or weight.dtype.itemsize != 1 or constant(dq_a.inputs[1]).size != 1:
        return False
    per_column = attribute(dq_b, "axis", 1) % 2 == 1 and scale.shape == (weight.shape[1],)
    if not (scale.size == 1 or per_column):
        return False
    fused = ir.node(
        "MatMulIntegerToFloat",
        [
            dq_a.inputs[0],
            dq_b.inputs[0],
            dq_a.inputs[1],
            dq_b.inputs[1],
            dq_a.inputs[2],
            dq_b.inputs[2],
        ],
        domain=MS_DOMAIN,
        name=f"{matmul.name}_Integer",
    )
    _replace(graph, fused, matmul.outputs[0], [matmul])
    for dq in (dq_a, dq_b):
        if not dq.outputs[0].uses() and not dq.outputs[0].is_graph_output():
            graph.remove(dq, safe=True)
    return True


def _try_fuse_bias(graph: ir.Graph, matmul: ir.Node) -> bool:
    if matmul.op_type != "MatMulIntegerToFloat" or matmul.domain != MS_DOMAIN:
        return False
    add = sole_consumer(matmul.outputs[0])
    if not is_op(add, "Add") or len(matmul.inputs) > 6:
        return False
    other = add.inputs[1] if add.inputs[0] is matmul.outputs[0] else add.inputs[0]
    bias, weight = constant(other), constant(matmul.inputs[1])
    if bias is None or weight is None or bias.dtype != np.float32:
        return False
    if bias.ndim != 1 or bias.shape[0] != weight.shape[-1]:
        return False
    inputs = [*matmul.inputs, *[None] * (6 - len(matmul.inputs)), other]
    fused = ir.node("MatMulIntegerToFloat", inputs, domain=MS_DOMAIN, name=matmul.name)
    _replace(graph, fused, add.outputs[0], [matmul, add])
    return True


def _replace(graph: ir.Graph, fused: ir.Node, out: ir.Value, chain: list[ir.Node]) -> None:
    """Put `fused` in place of `chain` (in graph order), its output taking over `out`."""
    fused.outputs[0].dtype, fused.outputs[0].shape = ir.DataType.FLOAT, out.shape
    graph.insert_before(chain[0], fused)
    ir.convenience.replace_all_uses_with(out, fused.outputs[0], replace_graph_outputs=True)
    name = out.name
    graph.remove(chain, safe=True)
    fused.outputs[0].name = name
