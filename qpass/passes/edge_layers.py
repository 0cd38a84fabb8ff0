"""Mixed precision: mark the first and last weighted layers for wider quantization."""

from __future__ import annotations

import logging

import onnx_ir as ir

from qpass.metadata import EDGE_LAYER
from qpass.passes.base import Pass
from qpass.passes.keep_leading_float import is_weighted

logger = logging.getLogger(__name__)


class KeepEdgeLayersWide(Pass):
    """Mark the first and the last weighted layer (Conv, ConvTranspose, Gemm, MatMul with a
    constant weight, in graph order) so that the quantizing pass after it gives them, and the
    activations they read, its wider edge schemes (`InsertQDQ(edge_weights=...,
    edge_activations=...)`).

    Rewrite rules (the graph itself is not changed here):

    1. The first and last weighted layers get `node.meta[EDGE_LAYER]`.

    Why: the first layer reads the raw input and the last one writes the logits; with 4 bits and
    fewer, LSQ (Esser et al. 2020, §3) and PACT (Choi et al. 2018) keep both at 8 bits, and the
    low-bit literature reports its accuracies that way.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        layers = [n for n in model.graph if is_weighted(n)]
        for node in {id(n): n for n in layers[:1] + layers[-1:]}.values():
            node.meta[EDGE_LAYER] = True
            logger.info("edge layer kept wide: %s %s", node.op_type, node.name)
        return ir.passes.PassResult(model, modified=False)
