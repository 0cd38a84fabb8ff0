"""Fold inference-mode BatchNormalization into the preceding linear layer."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from qpass.graph import attribute, constant, initializer, is_op, set_constant, sole_consumer
from qpass.metadata import BN_STATISTICS
from qpass.passes.base import Pass, refuse

logger = logging.getLogger(__name__)

class FoldBatchNorm(Pass):
    """Fold BatchNormalization into the Conv, ConvTranspose, Gemm or MatMul that feeds it.

    With a = gamma / sqrt(var + eps) and b = beta - a * mean, the rewrite rules are:

    1. Conv(x, W, c) -> BN  ==>  Conv(x, a[o] * W[o], a * c + b)
    2. ConvTranspose(x, W, c) -> BN  ==>  the same, scaling W along its output-channel axis 1
       (per group).
    3. Gemm(x, B, C) -> BN  ==>  Gemm(x, a * B (output columns), a * C + b / beta)
    4. MatMul(x, W[K, N]) -> BN on a 2-D output  ==>  Add(MatMul(x, a * W), b)

    A rule fires only when the BN is in inference mode with constant parameters, the layer's weight
    and bias are constants, and the layer's output feeds nothing but the BN. The folded layer keeps
    the BN's gamma and beta in `node.meta[BN_STATISTICS]`. The float function is unchanged up to
    rounding (Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient
    Integer-Arithmetic-Only Inference", §3.2).
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        folded = 0
        for node in list(model.graph):
            if is_op(node, "BatchNormalization") and self._try_fold(model.graph, node):
                folded += 1
        if folded:
            logger.info("folded %d BatchNormalization nodes", folded)
        return ir.passes.PassResult(model, modified=folded > 0)

    def _try_fold(self, graph: ir.Graph, bn: ir.Node) -> bool:
        layer = bn.inputs[0].producer()
        if not self._is_foldable(layer, bn):
            return False
        gamma, beta, mean, var = (constant(v).astype(np.float64) for v in bn.inputs[1:5])
        a = gamma / np.sqrt(var + attribute(bn, "epsilon", 1e-5))
        b = beta - a * mean
        if layer.op_type == "MatMul":
            result = self._fold_into_matmul(graph, layer, bn, a, b)
        else:
            self._fold_into_layer(graph, layer, a, b)
            result = layer.outputs[0]
        # The folded output computes what the BN output did, so it takes the BN output's name.
        name = bn.outputs[0].name
        ir.convenience.replace_all_uses_with(bn.outputs[0], result, replace_graph_outputs=True)
        graph.remove(bn, safe=True)
        bn.outputs[0].name = None
        result.name = name
        layer.meta[BN_STATISTICS] = {"gamma": gamma, "beta": beta}
        return True

    def _is_foldable(self, layer: ir.Node | None, bn: ir.Node) -> bool:
        if not is_op(layer, "Conv", "ConvTranspose", "Gemm", "MatMul"):
            return refuse(self, bn, "its input is not a Conv, ConvTranspose, Gemm or MatMul")
        if sole_consumer(layer.outputs[0]) is not bn or attribute(bn, "training_mode", 0):
            return refuse(self, bn, "the layer has other readers, or BN is in training mode")
        if any(constant(v) is None for v in bn.inputs[1:5]) or len(bn.outputs) != 1:
            return refuse(self, bn, "its statistics are computed, or it has several outputs")
        if constant(layer.inputs[1]) is None:
            return refuse(self, bn, "the layer's weight is computed")
        if (
            len(layer.inputs) > 2
            and layer.inputs[2] is not None
            and constant(layer.inputs[2]) is None
        ):
            return refuse(self, bn, "the layer's bias is computed")
        if layer.op_type == "Gemm" and attribute(layer, "beta", 1.0) == 0.0:
            return refuse(self, bn, "the Gemm ignores its bias (beta 0)")
        if layer.op_type == "MatMul":
            shape = layer.outputs[0].shape
            if constant(layer.inputs[1]).ndim != 2 or shape is None or len(shape) != 2:
                return refuse(self, bn, "the MatMul is not [N, K] x [K, M]")
        return True

    def _fold_into_layer(self, graph: ir.Graph, layer: ir.Node, a: np.ndarray, b: np.ndarray):
        weight = constant(layer.inputs[1])
        dtype = weight.dtype
        if layer.op_type == "Conv":
            scaled = weight * a.reshape(-1, *[1] * (weight.ndim - 1))
        elif layer.op_type == "ConvTranspose":
            groups = attribute(layer, "group", 1)
            w = weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:])
            scaled = (w * a.reshape(groups, 1, -1, *[1] * (weight.ndim - 2))).reshape(weight.shape)
        elif attribute(layer, "transB", 0):
            scaled = weight * a[:, None]
        else:
            scaled = weight * a[None, :]
        bias_value = layer.inputs[2] if len(layer.inputs) > 2 else None
        bias = constant(bias_value)
        bias = np.zeros_like(a) if bias is None else bias.astype(np.float64)
        if layer.op_type == "Gemm":
            beta = attribute(layer, "beta", 1.0)
            new_bias = a * bias + b / beta
        else:
            new_bias = a * bias + b
        layer.replace_input_with(1, set_constant(graph, layer.inputs[1], scaled.astype(dtype)))
        new_bias = new_bias.astype(dtype)
        if bias_value is None:
            name = f"{layer.name or layer.outputs[0].name}.bias"
            bias_value = initializer(graph, name, new_bias)
            if len(layer.inputs) < 3:
                layer.resize_inputs(3)
            layer.replace_input_with(2, bias_value)
        else:
            layer.replace_input_with(2, set_constant(graph, bias_value, new_bias))

    def _fold_into_matmul(self, graph, layer: ir.Node, bn: ir.Node, a, b) -> ir.Value:
        weight = constant(layer.inputs[1])
        layer.replace_input_with(
            1, set_constant(graph, layer.inputs[1], (weight * a[None, :]).astype(weight.dtype))
        )
        shift = initializer(graph, f"{layer.name or 'matmul'}.bn_shift", b.astype(weight.dtype))
        add = ir.node("Add", [layer.outputs[0], shift], name=f"{bn.name}.folded")
        graph.insert_after(layer, add)
        add.outputs[0].dtype, add.outputs[0].shape = bn.outputs[0].dtype, bn.outputs[0].shape
        return add.outputs[0]
