"""Mixed precision: leave the layers nearest the model's input in float."""

from __future__ import annotations

import logging

import onnx_ir as ir

from qpass.graph import constant, is_op
from qpass.metadata import LEADING_FLOAT
from qpass.passes.base import Pass, keep_float

logger = logging.getLogger(__name__)

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


class KeepLeadingLayersFloat(Pass):
    """Leave the first `count` weighted layers (Conv, ConvTranspose, Gemm, MatMul with a constant
    weight, in graph order from the inputs) in float; the quantizing pass that runs next skips
    them.

    Rewrite rules (the graph itself is not changed here):

    1. The first `count` weighted layers are marked to stay float (`keep_float`: the quantizing
       pass that runs next skips them); an unnamed one is named "{op_type}_{position in the
       graph}" first, for the report.
    2. Their names go to model.meta[LEADING_FLOAT].

    With a contiguous prefix left float, no Q/DQ pair remains between two float layers (a
    quantized layer's output pair is only ever read by later layers), and TensorRT runs the prefix
    in FP16/FP32. Why the first layers: a layer's quantization noise is amplified by every layer
    after it; keeping the first layer (or the stem) in higher precision is the usual remedy (Wu et
    al. 2020, "Integer Quantization for Deep Learning Inference", §6; Nagel et al. 2021, "A White
    Paper on Neural Network Quantization", §4.4 debugging); on EfficientNet-Lite0 with FP8 the
    stem and the first blocks are the most sensitive layers (docs/methods/fp8.md).
    """

    def __init__(self, count: int):
        super().__init__()
        if count < 0:
            raise ValueError(f"the number of float layers must be >= 0, not {count}")
        self.count = count

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        nodes = [n for n in model.graph if is_weighted(n)][: self.count]
        renamed = False
        taken = {n.name for n in model.graph}
        for position, node in enumerate(model.graph):
            if node in nodes and not node.name:
                node.name = _unique(f"{node.op_type}_{position}", taken)
                renamed = True
        for node in nodes:
            keep_float(node, f"among the first {self.count} layers (KeepLeadingLayersFloat)")
        layers = [n.name for n in nodes]
        model.meta[LEADING_FLOAT] = layers
        logger.info("left the first %d weighted layers in float: %s", len(layers), layers)
        return ir.passes.PassResult(model, modified=renamed)


def _unique(name: str, taken: set[str]) -> str:
    base, index = name, 0
    while name in taken:
        index += 1
        name = f"{base}_{index}"
    taken.add(name)
    return name


def is_weighted(node: ir.Node) -> bool:
    return (
        is_op(node, *WEIGHTED_OPS)
        and len(node.inputs) > 1
        and constant(node.inputs[1]) is not None
    )
