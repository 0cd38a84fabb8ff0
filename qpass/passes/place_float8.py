"""Place FP8 activation Q/DQ pairs where ONNX Runtime's CPU fusions keep their numbers."""

from __future__ import annotations

import logging

import onnx_ir as ir

from qpass.graph import constant, is_op, sole_consumer
from qpass.metadata import QUANTIZES
from qpass.passes.base import Pass, refuse

logger = logging.getLogger(__name__)

FLOAT8_TYPES = (ir.DataType.FLOAT8E4M3FN, ir.DataType.FLOAT8E5M2)


class PlaceFloat8ForOnnxRuntime(Pass):
    """Rewrite FP8 activation pairs into the equivalent form ONNX Runtime 1.32 runs correctly.

    Rewrite rules, for each QuantizeLinear to FP8 read by one DequantizeLinear:

    1. A scalar scale and zero point  ==>  one-element 1-D tensors (still per tensor): ORT's
       ClipQuantFusion throws on a scalar FP8 zero point after a Clip ("Unexpected data type for
       QuantizeLinear input y_zero_point") and skips non-scalar ones.
    2. r -> Relu -> Q -> DQ -> readers, the Relu r's sole reader and Q the Relu's  ==>
       r -> Q -> DQ -> Relu -> readers: the same numbers (a symmetric Q maps negatives to <= 0
       and commutes with Relu); ORT's ReluQuantFusion would drop the Relu in front of an FP8
       QuantizeLinear, as if the type were unsigned.

    Both are workarounds of ONNX Runtime's graph optimizations, not quantization choices: every
    graph qpass runs in ONNX Runtime (calibration included) needs them right after FP8 Q/DQ
    insertion.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        moved = reshaped = 0
        for q in [n for n in graph if is_op(n, "QuantizeLinear")]:
            if q.outputs[0].dtype not in FLOAT8_TYPES:
                continue
            reshaped += sum(_to_one_element(value) for value in q.inputs[1:3] if value is not None)
            moved += self._try_move_before_relu(graph, q)
        logger.info("FP8 pairs: %d scales made 1-D, %d moved before a Relu", reshaped, moved)
        return ir.passes.PassResult(model, modified=moved + reshaped > 0)

    def _try_move_before_relu(self, graph: ir.Graph, q: ir.Node) -> bool:
        dq, relu = sole_consumer(q.outputs[0]), q.inputs[0].producer()
        if not is_op(dq, "DequantizeLinear") or not is_op(relu, "Relu"):
            return False
        if sole_consumer(relu.inputs[0]) is not relu or sole_consumer(relu.outputs[0]) is not q:
            return refuse(self, relu, "its input or output has other readers")
        source, out, dequantized = relu.inputs[0], relu.outputs[0], dq.outputs[0]
        for usage in list(dequantized.uses()):
            usage.node.replace_input_with(usage.idx, out)
        if dequantized.is_graph_output():
            index = next(i for i, o in enumerate(graph.outputs) if o is dequantized)
            graph.outputs[index] = out
            name = dequantized.name
            dequantized.name = f"{name}_dequantized"
            out.name = name
        q.replace_input_with(0, source)
        relu.replace_input_with(0, dequantized)
        q.outputs[0].shape = dequantized.shape = source.shape
        dq.metadata_props[QUANTIZES] = source.name
        graph.remove([q, dq])
        graph.insert_before(relu, [q, dq])
        return True


def _to_one_element(value: ir.Value) -> bool:
    array = constant(value)
    if array is None or array.ndim != 0 or not value.is_initializer():
        return False
    value.const_value = ir.tensor(array.reshape(1), name=value.name)
    value.shape = ir.Shape((1,))
    return True
