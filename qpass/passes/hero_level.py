"""ZeroQuant-HERO's quantization levels: which parts of a transformer the next quantizing pass
may put in int8."""

from __future__ import annotations

import logging

import onnx_ir as ir

from qpass.graph import constant, is_op, sole_consumer
from qpass.passes.base import Pass, keep_float

logger = logging.getLogger(__name__)

LEVELS = ("m1", "m2", "m3")


class HeroLevel(Pass):
    """Choose the int8 parts of a transformer by ZeroQuant-HERO's level (Yao et al. 2023,
    "ZeroQuant-HERO: Hardware-Enhanced Robust Optimized Post-Training Quantization Framework
    for W8A8 Transformers", §3): M1 the GEMMs with weights, M2 also attention's two
    activation x activation MatMuls (Q·Kᵀ and softmax·V), M3 also the memory-bound parts
    (LayerNorm input and output, residual, softmax output).

    Placed before a quantizing pass (InsertQDQ on MatMul, Gemm and Add with computed weights
    allowed), it marks what that pass must leave in float (`keep_float`); the graph itself is
    not changed. Rewrite rules:

    1. A MatMul or Gemm whose second input is computed (activation x activation) is kept float
       at M1.
    2. An Add of two computed tensors is kept float at M1 and M2, and at M3 unless its output
       goes to a LayerNormalization alone (a residual connection, or the embedding sum): the
       other Adds of an encoder (the attention mask added to the scores) stay float at every
       level. Adds with a constant operand (biases) are never quantized by InsertQDQ.

    What each level's int8 becomes in ONNX Runtime 1.32 (CPU), measured on all-MiniLM-L6-v2
    (docs/methods/hero.md): M1's and M2's MatMuls run as MatMulIntegerToFloat (int8 inputs,
    float output); M3's residual Adds as QLinearAdd (int8 in and out). The softmax output is
    int8 from M2 on (it is the softmax·V MatMul's input), the LayerNorm output from M1 on (the
    q/k/v and FFN MatMuls' input); LayerNormalization and Softmax themselves compute in float
    from the dequantized tensor (ORT has no int8 LayerNorm kernel; its QLinearSoftmax would
    need the scores, which carry the mask's sentinels, in int8).
    """

    def __init__(self, level: str = "m1"):
        super().__init__()
        if level not in LEVELS:
            raise ValueError(f"ZeroQuant-HERO level {level!r} is unknown; use one of {LEVELS}")
        self.level = level

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        kept = 0
        for node in model.graph:
            reason = self._float_reason(node)
            if reason:
                keep_float(node, f"{reason} (ZeroQuant-HERO {self.level.upper()})")
                kept += 1
        logger.info("ZeroQuant-HERO %s: %d activation x activation ops kept float",
                    self.level.upper(), kept)
        return ir.passes.PassResult(model, modified=False)

    def _float_reason(self, node: ir.Node) -> str | None:
        computed = [v is not None and constant(v) is None for v in node.inputs[:2]]
        if len(computed) < 2 or not all(computed):
            return None
        if is_op(node, "MatMul", "Gemm") and self.level == "m1":
            return "activation x activation MatMul"
        if not is_op(node, "Add"):
            return None
        if self.level != "m3":
            return "residual Add"
        if not is_op(sole_consumer(node.outputs[0]), "LayerNormalization"):
            return "Add outside the residual path"
        return None
