"""Empirical bias correction: remove the mean output error that weight quantization causes."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from qpass.calibration import Context
from qpass.graph import attribute, constant, initializer, is_op, set_constant
from qpass.passes.base import CalibratedPass, ReadsFloatModel

logger = logging.getLogger(__name__)

CORRECTED_OPS = ("Conv", "Gemm")
_INT32_LIMIT = 2**31 - 1


class CorrectBias(ReadsFloatModel, CalibratedPass):
    """Shift the bias of each quantized layer so its mean output is what its float weights give.

    Rounding weights to a coarse (per-tensor) grid biases a layer's outputs: E[W̃x̃] != E[Wx̃],
    and the shift accumulates through the network. Measured on the calibration data, the
    error per output channel is subtracted from the layer's bias (Nagel et al. 2019, "Data-Free
    Quantization Through Weight Equalization and Bias Correction", empirical bias correction).
    Runs after InsertQDQ. Rewrite rules, for each Conv or Gemm whose weight is read through a
    DequantizeLinear of a constant and whose bias is constant or a DequantizeLinear of a
    constant int32 tensor:

    1. bias  ==>  bias - (E[W̃x̃] - E[Wx̃]) per output channel: W̃ the quantized weight, W the
       float weight from the model before InsertQDQ, x̃ the layer's input in the quantized graph
       (quantized, after the quantized upstream layers), E the mean over the calibration set
       and the output positions. An int32 bias is rounded on its own scale, so the layer still
       fuses into ONNX Runtime's integer kernels.
    2. All layers are measured in one run of the quantized graph in which each layer has a twin
       reading the same input with the float weight; `sweeps` > 1 measures again with the
       corrected upstream biases (a second-order change: x̃ moves, the weight error does not)
       and replaces the correction.

    Each layer removes the error its own weights add; the error of its input is removed by the
    upstream layers' corrections. Correcting the full error E[W̃x̃] - E[Wx] of all layers at once
    would count each upstream error again in every layer below it and diverge on deep networks;
    correcting it layer by layer needs one run per layer.

    The float weights come from the model just before InsertQDQ: put `self.snapshot()` before
    InsertQDQ (the `int8-tensor` preset does), or give `reference`; layers are matched by the
    name of their output, which InsertQDQ keeps.
    """

    def __init__(
        self, context: Context | None = None, *, reference: ir.Model | None = None, sweeps: int = 1
    ):
        super().__init__(context)
        self.float_weights: dict | None = None
        self.sweeps = sweeps
        if reference is not None:
            self.record(reference)
            self.recorded = True

    def record(self, model: ir.Model) -> None:
        self.float_weights = _layer_weights(model)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        layers = [n for n in model.graph if self._is_correctable(n)]
        if not layers:
            return ir.passes.PassResult(model, modified=False)
        stored = [_stored_bias(layer) for layer in layers]
        for sweep in range(1, self.sweeps + 1):
            errors = self._weight_errors(model, layers, f"bias correction {sweep}/{self.sweeps}")
            for layer, bias, error in zip(layers, stored, errors, strict=True):
                self._set_bias(model.graph, layer, bias, -error)
            worst = max(float(np.abs(e).max()) for e in errors)
            logger.info("bias correction sweep %d: largest mean error %.3g", sweep, worst)
        logger.info("corrected the biases of %d layers", len(layers))
        return ir.passes.PassResult(model, modified=True)

    def _is_correctable(self, node: ir.Node) -> bool:
        if not is_op(node, *CORRECTED_OPS) or len(node.inputs) < 3 or node.inputs[2] is None:
            return False
        weight = self.float_weights.get(node.outputs[0].name)
        if weight is None or not _is_dequantized_constant(node.inputs[1]):
            return False
        if weight.shape != constant(node.inputs[1].producer().inputs[0]).shape:
            return False
        if node.op_type == "Gemm" and attribute(node, "beta", 1.0) == 0.0:
            return False
        bias = node.inputs[2]
        if _is_dequantized_constant(bias):
            dq = bias.producer()
            zero = constant(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] else None
            return dq.inputs[0].dtype == ir.DataType.INT32 and (zero is None or not zero.any())
        return constant(bias) is not None and constant(bias).ndim == 1

    def _weight_errors(self, model: ir.Model, layers: list[ir.Node], description: str):
        """E[W̃x̃] - E[Wx̃] per output channel of each layer, from one run with float twins.

        The probe graph averages each difference over the spatial axes itself, so a run fetches
        one value per sample and channel instead of whole activations."""
        probe = model.clone()
        opset = probe.opset_imports.get("", 1)
        by_output = {n.outputs[0].name: n for n in probe.graph if n.outputs}
        names = []
        for layer in layers:
            name = layer.outputs[0].name
            node = by_output[name]
            weight = self.float_weights[name]
            twin = ir.node(
                node.op_type,
                [node.inputs[0], initializer(probe.graph, f"{name}.float_weight", weight)],
                attributes=dict(node.attributes),
                name=f"{name}.float_twin",
            )
            twin.resize_inputs(len(node.inputs))
            for i in range(2, len(node.inputs)):
                twin.replace_input_with(i, node.inputs[i])
            diff = ir.node("Sub", [node.outputs[0], twin.outputs[0]], name=f"{name}.weight_error")
            nodes = [twin, diff]
            if weight.ndim > 2:  # Conv: [N, C, spatial...] -> [N, C]
                axes = list(range(2, weight.ndim))
                nodes.append(_reduce_mean(probe.graph, diff.outputs[0], axes, opset, name))
            nodes[-1].outputs[0].name = f"{name}.weight_error"
            probe.graph.insert_after(node, nodes)
            names.append(nodes[-1].outputs[0].name)
        means = self.context.observe(probe, names, lambda _: _ChannelMean(), description)
        return [means[name].mean() for name in names]

    def _set_bias(self, graph: ir.Graph, layer: ir.Node, bias: np.ndarray, shift: np.ndarray):
        """Make the layer's bias the stored (uncorrected) `bias` plus `shift` on its output.

        Rule 1's error does not depend on the bias (both twins add it), so every sweep starts
        from the stored bias instead of adding to the last sweep's correction."""
        if layer.op_type == "Gemm":
            shift = shift / attribute(layer, "beta", 1.0)
        value = layer.inputs[2]
        if not _is_dequantized_constant(value):
            shifted = (bias + shift).astype(bias.dtype)
            layer.replace_input_with(2, set_constant(graph, value, shifted))
            return
        dq = value.producer()
        scale = constant(dq.inputs[1]).astype(np.float64)
        corrected = np.clip(np.rint(bias + shift / scale), -_INT32_LIMIT, _INT32_LIMIT)
        dq.replace_input_with(0, set_constant(graph, dq.inputs[0], corrected.astype(np.int32)))


def _reduce_mean(graph: ir.Graph, x: ir.Value, axes: list[int], opset: int, name: str) -> ir.Node:
    if opset >= 18:
        axes_value = initializer(graph, f"{name}.spatial_axes", np.asarray(axes, np.int64))
        return ir.node("ReduceMean", [x, axes_value], {"keepdims": 0}, name=f"{name}.mean")
    return ir.node("ReduceMean", [x], {"axes": axes, "keepdims": 0}, name=f"{name}.mean")


def _stored_bias(layer: ir.Node) -> np.ndarray:
    """The bias as stored: int32 values under a DequantizeLinear, or the float constant."""
    value = layer.inputs[2]
    if _is_dequantized_constant(value):
        return constant(value.producer().inputs[0]).astype(np.int64)
    return constant(value).copy()


def _layer_weights(model: ir.Model) -> dict[str, np.ndarray]:
    """{output name: constant weight} of each Conv and Gemm."""
    weights = {}
    for node in model.graph:
        if is_op(node, *CORRECTED_OPS) and (weight := constant(node.inputs[1])) is not None:
            weights[node.outputs[0].name] = weight
    return weights


class _ChannelMean:
    """Running mean of a tensor per channel (axis 1), over the batch and every other axis."""

    def __init__(self):
        self.total: np.ndarray | None = None
        self.count = 0

    def update(self, x: np.ndarray) -> None:
        axes = tuple(i for i in range(x.ndim) if i != 1)
        total = x.astype(np.float64).sum(axis=axes)
        self.total = total if self.total is None else self.total + total
        self.count += x.size // x.shape[1]

    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)


def _is_dequantized_constant(value: ir.Value | None) -> bool:
    producer = value.producer() if value is not None else None
    return is_op(producer, "DequantizeLinear") and constant(producer.inputs[0]) is not None
