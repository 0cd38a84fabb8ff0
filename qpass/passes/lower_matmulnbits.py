"""Lower blockwise 4-bit and 8-bit DequantizeLinear -> MatMul to com.microsoft.MatMulNBits."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from qpass.graph import MS_DOMAIN, attribute, constant, initializer
from qpass.packing import pack_matmulnbits, pack_matmulnbits_8bit
from qpass.passes.base import Pass
from qpass.passes.matmul_weights import EIGHT_BIT, FOUR_BIT, is_packable_weight

logger = logging.getLogger(__name__)


class LowerToMatMulNBits(Pass):
    """Replace weight-only 4-bit (and 8-bit) MatMuls by `com.microsoft.MatMulNBits` (ONNX
    Runtime contrib op).

    Rewrite rules:

    1. MatMul(x, DequantizeLinear(q [K, N] int4/uint4 constant, s [K/g, N], z; axis=0,
       block_size=g))  ==>  MatMulNBits(x, B, s', z'; K, N, bits=4, block_size=g,
       accuracy_level), with B = q + 8 (int4) or q (uint4), transposed to [N, K/g, g/2] uint8,
       two values per byte, the first in the low nibble; s' = sᵀ [N, K/g]; z' the zero points
       packed the same way, or left out when all are 8 (the op's default).
    2. The same with q int8/uint8 (`QuantizeLMHead`)  ==>  MatMulNBits(...; bits=8,
       accuracy_level=`accuracy_level_8bit`), B = q + 128 (int8) or q (uint8) as [N, K/g, g],
       zero points [N, K/g] uint8 (left out when all are 128).

    The rules fire for g a power of two >= 16 (the op's requirement) and a DequantizeLinear
    read by MatMuls only. MatMulNBits dequantizes exactly as DequantizeLinear does ((q - z) x s
    in float32), so both forms compute the same weights. `accuracy_level` 0 (default) keeps
    fp32 activations; 4 quantizes them to int8 per block at run time (faster, less exact). For
    8-bit weights the default is 4: in ONNX Runtime 1.32 on CPU the 8-bit kernel at level 0 is
    slower than the float MatMul it replaces (docs/methods/weight-only.md).
    """

    def __init__(self, accuracy_level: int = 0, accuracy_level_8bit: int = 4):
        super().__init__()
        self.accuracy_level = accuracy_level
        self.accuracy_level_8bit = accuracy_level_8bit

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        lowered = 0
        for node in list(model.graph):
            if is_packable_weight(node, FOUR_BIT + EIGHT_BIT):
                lowered += self._lower(model.graph, node)
        if lowered:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
            logger.info("lowered %d MatMuls to MatMulNBits", lowered)
        return ir.passes.PassResult(model, modified=lowered > 0)

    def _lower(self, graph: ir.Graph, dq: ir.Node) -> int:
        q, scale = constant(dq.inputs[0]), constant(dq.inputs[1])
        zero = constant(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] is not None else None
        g = attribute(dq, "block_size", 0)
        k, n = q.shape
        bits = 4 if dq.inputs[0].dtype in FOUR_BIT else 8
        pack = pack_matmulnbits if bits == 4 else pack_matmulnbits_8bit
        b, scales, zero_points = pack(q, scale, zero, g)
        base = dq.name.removesuffix(".weight_dq") if dq.name else dq.inputs[0].name
        inputs = [
            initializer(graph, f"{base}.B", b),
            initializer(graph, f"{base}.scales", scales.astype(np.float32)),
        ]
        if zero_points is not None:
            inputs.append(initializer(graph, f"{base}.zero_points", zero_points))
        attrs = {"K": k, "N": n, "bits": bits, "block_size": g}
        level = self.accuracy_level if bits == 4 else self.accuracy_level_8bit
        if level:
            attrs["accuracy_level"] = level
        matmuls = [use.node for use in dq.outputs[0].uses()]
        for matmul in matmuls:
            fused = ir.node(
                "MatMulNBits", [matmul.inputs[0], *inputs], attrs, domain=MS_DOMAIN,
                name=matmul.name,
            )
            graph.insert_before(matmul, fused)
            out = matmul.outputs[0]
            if out.dtype is not None:
                fused.outputs[0].dtype, fused.outputs[0].shape = out.dtype, out.shape
            ir.convenience.replace_all_uses_with(out, fused.outputs[0], replace_graph_outputs=True)
            name = out.name
            graph.remove(matmul, safe=True)
            out.name = None
            fused.outputs[0].name = name
            fused.metadata_props.update(matmul.metadata_props)
        dead = [v for v in dq.inputs if v is not None]
        graph.remove(dq, safe=True)
        for value in dead:
            if value.is_initializer() and not value.uses() and not value.is_graph_output():
                graph.initializers.pop(value.name)
        return len(matmuls)
