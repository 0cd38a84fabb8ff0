"""Lower a QDQ graph to TensorRT's explicit-quantization form."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from qpass.graph import (
    attribute,
    constant,
    initializer,
    is_op,
    sole_consumer,
)
from qpass.passes.base import Pass
from qpass.passes.tensorrt_rules import (
    epilogue_input,
    feeds_int8,
    is_weight,
)

logger = logging.getLogger(__name__)

class LowerForTensorRT(Pass):
    """Put a QDQ graph in the explicit-quantization form TensorRT fuses.

    What upstream passes must already have chosen (`int8` for `--target tensorrt` does):
    symmetric S8 activations with calibrated per-tensor scales, symmetric S8 weights per output
    channel, and Q/DQ on the inputs of every Conv, ConvTranspose, Gemm, MatMul, Add and average
    pool. This pass never recalibrates; it moves and removes Q/DQ (TensorRT Developer Guide,
    "Explicit Quantization", Q/DQ layer-placement recommendations).

    Rewrite rules:

    1. DQ(int32 constant q, s) -> op  ==>  the float constant (q - z) * s: TensorRT's
       DequantizeLinear reads INT8, FP8 and INT4 only (TensorRT Operators reference, Dequantize)
       and keeps biases in float itself.
    2. Conv -> Q -> DQ -> Add(., DQ(residual))  ==>  Conv -> Add(., DQ(residual)) when the Conv is
       quantized and the pair serves this Add alone: with the residual input quantized and the
       convolution output left float, TensorRT fuses the Add into the convolution's epilogue (the
       guide recommends quantizing the residual input of skip connections). With two such
       inputs, the first one is unwrapped and the other stays the quantized residual.
    3. Q -> DQ on an activation whose dequantized value no INT8 consumer reads (a graph output, a
       float op, a Conv/Gemm/MatMul whose other input stays float), looking through pooling and
       data movement  ==>  the float tensor itself (the guide advises against quantizing the
       outputs of weighted ops by default).
    4. Concat of per-tensor dequantized activations with unequal scales  ==>  every input, and a
       QuantizeLinear that is the Concat's sole reader, takes the largest scale: the Concat then
       joins INT8 tensors without requantizing each input (TensorRT Model Optimizer's
       `concat_elimination` does the same). FuseRequant rule 5 already covers the Concat whose
       output is quantized and whose inputs have no other reader.

    Relu and Clip stay: with symmetric ranges the quantizer's saturation does not replace them,
    and TensorRT fuses them into the convolution itself. Weights stay pre-quantized integer
    initializers read by DequantizeLinear, one of the two weight forms TensorRT accepts (the
    other is Q(float weight) -> DQ; Developer Guide, Explicit Quantization, "Quantized Weights"):
    the file holds a quarter of the bytes and TensorRT has nothing to requantize.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        counts = {"bias": 0, "epilogue": 0, "unused": 0, "concat": 0}
        for node in list(graph):
            if self._try_fold_int32_dequantize(graph, node):
                counts["bias"] += 1
            elif self._try_unwrap_epilogue_input(graph, node):
                counts["epilogue"] += 1
        for node in reversed(list(graph)):  # consumers first: one sweep reaches the fixpoint
            if node.graph is not None and self._try_remove_unused_pair(graph, node):
                counts["unused"] += 1
        for node in list(graph):
            if self._try_share_concat_scale(graph, node):
                counts["concat"] += 1
        logger.info("LowerForTensorRT: %s", counts)
        return ir.passes.PassResult(model, modified=any(counts.values()))

    def _try_fold_int32_dequantize(self, graph: ir.Graph, dq: ir.Node) -> bool:
        if not is_op(dq, "DequantizeLinear"):
            return False
        q = constant(dq.inputs[0])
        scale = constant(dq.inputs[1])
        if q is None or q.dtype != np.int32 or scale is None:
            return False
        zero = _zero_point(dq)
        axis = attribute(dq, "axis", 1)
        if scale.size > 1:
            shape = [1] * q.ndim
            shape[axis] = -1
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        values = ((q.astype(np.float64) - zero) * scale).astype(np.float32)
        folded = initializer(graph, f"{dq.outputs[0].name or 'bias'}_float", values)
        ir.convenience.replace_all_uses_with(dq.outputs[0], folded, replace_graph_outputs=True)
        graph.remove(dq, safe=True)
        return True

    def _try_unwrap_epilogue_input(self, graph: ir.Graph, add: ir.Node) -> bool:
        index = epilogue_input(add)
        if index is None:
            return False
        dq = add.inputs[index].producer()
        q = dq.inputs[0].producer()
        add.replace_input_with(index, q.inputs[0])
        graph.remove([dq, q], safe=True)
        return True

    def _try_remove_unused_pair(self, graph: ir.Graph, dq: ir.Node) -> bool:
        if not is_op(dq, "DequantizeLinear") or is_weight(dq):
            return False
        q = dq.inputs[0].producer()
        if not is_op(q, "QuantizeLinear") or feeds_int8(dq.outputs[0]):
            return False
        source, out = q.inputs[0], dq.outputs[0]
        was_output, name = out.is_graph_output(), out.name
        if was_output and (source.is_graph_input() or source.is_graph_output()):
            return False
        ir.convenience.replace_all_uses_with(out, source, replace_graph_outputs=True)
        graph.remove(dq, safe=True)
        if was_output:  # the float tensor takes back the output's name
            out.name = None
            source.name = name
        if not q.outputs[0].uses() and not q.outputs[0].is_graph_output():
            graph.remove(q, safe=True)
        return True

    def _try_share_concat_scale(self, graph: ir.Graph, concat: ir.Node) -> bool:
        if not is_op(concat, "Concat"):
            return False
        sources = [_per_tensor_activation_pair(v) for v in concat.inputs]
        if len(sources) < 2 or any(q is None for q in sources):
            return False
        scales = [float(constant(q.inputs[1]).reshape(())) for q in sources]
        if len(set(scales)) == 1:
            return False
        reader = sole_consumer(concat.outputs[0])
        if is_op(reader, "QuantizeLinear") and _per_tensor_symmetric(reader):
            sources.append(reader)
        shared = initializer(
            graph,
            f"{concat.outputs[0].name or 'concat'}_scale",
            np.asarray(max(scales), np.float32),
        )
        for q in sources:
            for node in (q, *q.outputs[0].consumers()):
                if node is q or is_op(node, "DequantizeLinear"):
                    node.replace_input_with(1, shared)
        return True


def _zero_point(node: ir.Node) -> np.ndarray:
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        zero = constant(node.inputs[2])
        if zero is not None:
            return zero.astype(np.float64)
    return np.zeros(1)


def _per_tensor_symmetric(q: ir.Node) -> bool:
    """A QuantizeLinear on an activation with one constant scale and a zero zero point."""
    scale = constant(q.inputs[1])
    if is_weight(q) or scale is None or scale.size != 1:
        return False
    zero = constant(q.inputs[2]) if len(q.inputs) > 2 and q.inputs[2] is not None else None
    return len(q.inputs) < 3 or q.inputs[2] is None or (zero is not None and not zero.any())


def _per_tensor_activation_pair(value: ir.Value | None) -> ir.Node | None:
    """The QuantizeLinear of a symmetric per-tensor Q -> DQ pair producing `value`, or None."""
    dq = value.producer() if value is not None else None
    if not is_op(dq, "DequantizeLinear"):
        return None
    q = dq.inputs[0].producer()
    if not is_op(q, "QuantizeLinear") or not _per_tensor_symmetric(q):
        return None
    if dq.inputs[1] is not q.inputs[1] and not np.array_equal(
        constant(dq.inputs[1]), constant(q.inputs[1])
    ):
        return None
    return q
