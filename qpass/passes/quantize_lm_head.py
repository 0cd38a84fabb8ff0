"""8-bit weights for the final projection (lm_head) of a weight-only quantized decoder."""

from __future__ import annotations

import logging

import onnx_ir as ir

from qpass.passes._blockwise import (
    ensure_weight_opset,
    is_final_projection,
    quantize_rtn,
    replace_weight,
    untie_final_projection,
    weight_matmuls,
)
from qpass.passes._graph import constant
from qpass.schemes import QuantScheme

logger = logging.getLogger(__name__)

LM_HEAD_UINT8_G128 = QuantScheme(dtype="uint8", group_size=128)


class QuantizeLMHead(ir.passes.InPlacePass):
    """Quantize the final projection's weight alone, on its own scheme (8-bit groups by default).

    Rewrite rules:

    1. A projection tied to the embeddings, MatMul(x, Transpose(E)) with E [vocab, K] also read
       by the embedding Gather, gets its own weight Eᵀ; the Gather keeps reading E in float.
    2. MatMul(x, W)  ==>  MatMul(x, DequantizeLinear(q, s, z; axis=0, block_size=g)), rounded to
       nearest per group of g input channels as in `RoundToNearest`.

    Why: in a weight-only 4-bit decoder the final projection is the largest weight left in
    float. SmolLM2-135M's is 576 x 49152, 113 MB of the ~170 MB a 1-token forward reads; at 8
    bits it reads 28 MB and the perplexity stays within 0.03 of a float lm_head's, while at 4
    bits it rises by 8 (`benchmarks/llm.py`). llama.cpp's 4-bit k-quant mixes likewise keep
    the output tensor at 6 bits. `LowerToMatMulNBits` runs the 8-bit form with int8 activations
    (accuracy level 4): ONNX Runtime's 8-bit kernel at level 0 is slower than float.
    """

    def __init__(self, weights: QuantScheme = LM_HEAD_UINT8_G128):
        super().__init__()
        self.weights = weights

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        untie_final_projection(model.graph)
        targets = [n for n in weight_matmuls(model.graph, lm_head=True) if is_final_projection(n)]
        if targets:
            ensure_weight_opset(model)
        for node in targets:
            q, scale, zero = quantize_rtn(constant(node.inputs[1]), self.weights)
            replace_weight(model.graph, node, q, scale, zero, self.weights)
        logger.info("quantized %d final projections to %s", len(targets), self.weights.dtype)
        return ir.passes.PassResult(model, modified=bool(targets))
