"""Empirical bias correction: remove the mean output error that weight quantization causes."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from qpass.calibration import Context
from qpass.passes._graph import attribute, constant, initializer, is_op, set_constant

logger = logging.getLogger(__name__)

CORRECTED_OPS = ("Conv", "Gemm")
_INT32_LIMIT = 2**31 - 1


class CorrectBias(ir.passes.InPlacePass):
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
       reading the same input with the float weight; `sweeps` > 1 repeats rule 1 with the
       corrected upstream biases (a second-order change: x̃ moves, the weight error does not).

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
        super().__init__()
        self.context = context
        self.float_weights = None if reference is None else _layer_weights(reference)
        self.sweeps = sweeps

    def snapshot(self) -> ir.passes.InPlacePass:
        """A pass that records the float weights of the model it sees; place it before InsertQDQ."""
        return _RecordFloatWeights(self)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.context is None:
            raise ValueError("CorrectBias needs a calibration Context (qpass.compile supplies one)")
        if self.float_weights is None:
            raise ValueError(
                "CorrectBias needs the float weights from before InsertQDQ: put its snapshot() "
                "pass before InsertQDQ, or give reference="
            )
        layers = [n for n in model.graph if self._is_correctable(n)]
        if not layers:
            return ir.passes.PassResult(model, modified=False)
        for sweep in range(1, self.sweeps + 1):
            errors = self._weight_errors(model, layers, f"bias correction {sweep}/{self.sweeps}")
            for layer, error in zip(layers, errors, strict=True):
                self._shift_bias(model.graph, layer, -error)
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
        """E[W̃x̃] - E[Wx̃] per output channel of each layer, from one run with float twins."""
        probe = model.clone()
        by_output = {n.outputs[0].name: n for n in probe.graph if n.outputs}
        pairs = []
        for layer in layers:
            name = layer.outputs[0].name
            node = by_output[name]
            weight = initializer(probe.graph, f"{name}.float_weight", self.float_weights[name])
            twin = ir.node(
                node.op_type,
                [node.inputs[0], weight, *node.inputs[2:]],
                attributes=dict(node.attributes),
                name=f"{node.name}.float_twin",
            )
            twin.outputs[0].name = f"{name}.float_twin"
            probe.graph.insert_after(node, twin)
            pairs.append((name, twin.outputs[0].name))
        names = [n for pair in pairs for n in pair]
        means = self.context.observe(probe, names, lambda _: _ChannelMean(), description)
        return [means[q].mean() - means[f].mean() for q, f in pairs]

    def _shift_bias(self, graph: ir.Graph, layer: ir.Node, shift: np.ndarray) -> None:
        """Add `shift` to the layer's output, per channel, through its bias."""
        if layer.op_type == "Gemm":
            shift = shift / attribute(layer, "beta", 1.0)
        value = layer.inputs[2]
        if not _is_dequantized_constant(value):
            bias = constant(value)
            shifted = (bias + shift).astype(bias.dtype)
            layer.replace_input_with(2, set_constant(graph, value, shifted))
            return
        dq = value.producer()
        q, scale = constant(dq.inputs[0]), constant(dq.inputs[1]).astype(np.float64)
        corrected = np.clip(np.rint(q + shift / scale), -_INT32_LIMIT, _INT32_LIMIT)
        dq.replace_input_with(0, set_constant(graph, dq.inputs[0], corrected.astype(np.int32)))


class _RecordFloatWeights(ir.passes.InPlacePass):
    """Keep the float weights of every layer for a CorrectBias pass; changes nothing."""

    def __init__(self, owner: CorrectBias):
        super().__init__()
        self.owner = owner

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.owner.float_weights = _layer_weights(model)
        return ir.passes.PassResult(model, modified=False)


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
