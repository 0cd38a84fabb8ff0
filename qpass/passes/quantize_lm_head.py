"""8-bit weights for the final projection (lm_head) of a weight-only quantized decoder."""

from __future__ import annotations

import onnx_ir as ir

from qpass.passes.matmul_weights import is_final_projection
from qpass.passes.rtn import RoundToNearest
from qpass.schemes import QuantScheme

LM_HEAD_UINT8_G128 = QuantScheme(dtype="uint8", group_size=128)


class QuantizeLMHead(RoundToNearest):
    """Quantize the final projection's weight alone, on its own scheme (8-bit groups by default).

    Rewrite rules:

    1. A projection tied to the embeddings, MatMul(x, Transpose(E)) with E [vocab, K] also read
       by the embedding Gather, gets its own weight Eᵀ; the Gather keeps reading E in float.
    2. MatMul(x, W)  ==>  MatMul(x, DequantizeLinear(q, s, z; axis=0, block_size=g)), rounded to
       nearest per group of g input channels as in `RoundToNearest`.

    Why: in a weight-only 4-bit decoder the final projection is the largest weight left in
    float, read whole by every 1-token forward; at 8 bits it costs a quarter of the bytes and
    almost no perplexity, where 4 bits cost much more (docs/methods/weight-only.md).
    `LowerToMatMulNBits` runs the 8-bit form with int8 activations (accuracy level 4): ONNX
    Runtime's 8-bit kernel at level 0 is slower than float.
    """

    def __init__(self, weights: QuantScheme = LM_HEAD_UINT8_G128):
        super().__init__(weights, lm_head=True)

    def _targets(self, graph: ir.Graph) -> list[ir.Node]:
        return [node for node in super()._targets(graph) if is_final_projection(node)]
