"""Round-to-nearest group-wise weight-only quantization of MatMul weights."""

from __future__ import annotations

import logging

import onnx_ir as ir

from qpass.graph import constant
from qpass.passes.base import Pass
from qpass.passes.groupwise import quantize_rtn
from qpass.passes.matmul_weights import (
    ensure_weight_opset,
    replace_weight,
    untie_final_projection,
    weight_matmuls,
)
from qpass.schemes import QuantScheme

logger = logging.getLogger(__name__)

WEIGHT_UINT4_G128 = QuantScheme(dtype="uint4", group_size=128)


class RoundToNearest(Pass):
    """Quantize MatMul weights to 4 bits, one scale per group of input channels (weight-only).

    Rewrite rules, for each MatMul with a constant float weight W [K, N] that is not excluded:

    1. The model's opset is raised to 21 if it is lower (INT4 and blockwise scales).
    2. MatMul(x, W)  ==>  MatMul(x, DequantizeLinear(q, s, z; axis=0, block_size=g)), with, for
       each output channel n and group j of g input channels, s and z from the group's min and
       max (widened to hold 0; symmetric: s = max|w| / 7.5) and q = clip(round(w / s) + z).
    3. The final projection (lm_head, or a MatMul writing a graph output) stays in float unless
       `lm_head=True`; embeddings are Gathers and are never touched. A projection tied to the
       embeddings (MatMul(x, Transpose(E))) is first given its own weight Eᵀ.

    Activations stay in float (W4A16). The baseline that GPTQ and AWQ improve on (Frantar et al.
    2022, "GPTQ", §2; Dettmers & Zettlemoyer 2023, "The case for 4-bit precision").
    """

    def __init__(
        self,
        weights: QuantScheme = WEIGHT_UINT4_G128,
        *,
        exclude: frozenset[str] = frozenset(),
        lm_head: bool = False,
    ):
        super().__init__()
        self.weights = weights
        self.exclude = frozenset(exclude)
        self.lm_head = lm_head

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.lm_head:
            untie_final_projection(model.graph)
        if self._targets(model.graph):
            ensure_weight_opset(model)  # may rebuild nodes: look them up again after it
        targets = self._targets(model.graph)
        for node in targets:
            q, scale, zero = quantize_rtn(constant(node.inputs[1]), self.weights)
            replace_weight(model.graph, node, q, scale, zero, self.weights)
        logger.info("RTN quantized %d MatMul weights", len(targets))
        return ir.passes.PassResult(model, modified=bool(targets))

    def _targets(self, graph: ir.Graph) -> list[ir.Node]:
        return weight_matmuls(graph, self.exclude, self.lm_head)
