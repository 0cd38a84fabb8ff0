"""LoRC: a low-rank float branch adding back the largest part of a weight's quantization error."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from qpass.errors import QpassError
from qpass.graph import attribute, constant, initializer, is_op
from qpass.passes.base import ReadsFloatModel
from qpass.passes.groupwise import dequantize
from qpass.passes.matmul_weights import FOUR_BIT, weight_matmuls

logger = logging.getLogger(__name__)


class LowRankCompensation(ReadsFloatModel):
    """Low-rank compensation of weight quantization error (Yao et al. 2023, "ZeroQuant-V2:
    Exploring Post-training Quantization in LLMs from Comprehensive Study to Low Rank
    Compensation", §5).

    Needs the float weights: run `snapshot()` (a pass) before the quantizing pass, this pass after.

    Rewrite rule, for each MatMul whose weight is DequantizeLinear(q, s, z; axis 0, block g) of
    constant 4-bit q and whose float weight W [K, N] was recorded by the snapshot:

    1. E = W - Ŵ (Ŵ = (q - z) s, the dequantized weight) is cut to rank r by its SVD,
       E ≈ U_r Σ_r V_rᵀ, A = U_r Σ_r [K, r], B = V_rᵀ [r, N].
    2. y = MatMul(x, Ŵ)  ==>  y = Add(MatMul(x, Ŵ), MatMul(MatMul(x, A), B)): a float branch in
       standard ONNX (the quantized MatMul itself, and its MatMulNBits lowering, are unchanged).

    Cost per MatMul: r (K + N) float weights and as many multiply-adds per token.
    """

    def __init__(self, rank: int = 8):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRC rank must be >= 1, not {rank}")
        self.rank = rank
        self.float_weights: dict[str, ir.TensorProtocol] = {}

    def record(self, model: ir.Model) -> None:
        """Keep references to the float weights of the MatMuls to compensate (no copy)."""
        for node in weight_matmuls(model.graph, lm_head=True):
            weight = ir.convenience.get_const_tensor(node.inputs[1])
            if self.rank > min(weight.shape):
                raise QpassError(
                    f"lorc_rank (--lorc-rank) {self.rank} exceeds min(K, N) = {min(weight.shape)} "
                    f"of MatMul {node.name!r}: choose a rank <= {min(weight.shape)}"
                )
            self.float_weights[node.name] = weight

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        compensated = 0
        for node in list(model.graph):
            w_hat = _dequantized_weight(node)
            tensor = self.float_weights.get(node.name)
            if w_hat is None or tensor is None or tensor.shape != w_hat.shape:
                continue
            a, b = low_rank(tensor.numpy().astype(np.float64) - w_hat, self.rank)
            _add_branch(model.graph, node, a, b)
            compensated += 1
        self.float_weights.clear()
        logger.info("LoRC added rank-%d branches to %d MatMuls", self.rank, compensated)
        return ir.passes.PassResult(model, modified=compensated > 0)


def low_rank(e: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """A [K, r], B [r, N] (float32): A B is the best rank-r approximation of E (Frobenius)."""
    u, sigma, vt = np.linalg.svd(e, full_matrices=False)
    r = min(rank, len(sigma))
    return (u[:, :r] * sigma[:r]).astype(np.float32), vt[:r].astype(np.float32)


def _dequantized_weight(node: ir.Node) -> np.ndarray | None:
    """The float32 weight a MatMul reads through a constant blockwise 4-bit DequantizeLinear."""
    if not is_op(node, "MatMul") or node.inputs[1] is None:
        return None
    dq = node.inputs[1].producer()
    if not is_op(dq, "DequantizeLinear") or dq.inputs[0].dtype not in FOUR_BIT:
        return None
    q, scale = constant(dq.inputs[0]), constant(dq.inputs[1])
    zero = constant(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] is not None else None
    if q is None or scale is None or q.ndim != 2 or attribute(dq, "axis", 1) != 0:
        return None
    return dequantize(q, scale, zero, attribute(dq, "block_size", 0) or q.shape[0])


def _add_branch(graph: ir.Graph, matmul: ir.Node, a: np.ndarray, b: np.ndarray) -> None:
    base = matmul.name or matmul.outputs[0].name
    x, y = matmul.inputs[0], matmul.outputs[0]
    down = ir.node("MatMul", [x, initializer(graph, f"{base}.lorc_a", a)], name=f"{base}.lorc_a")
    up = ir.node("MatMul", [down.outputs[0], initializer(graph, f"{base}.lorc_b", b)],
                 name=f"{base}.lorc_b")
    add = ir.node("Add", [y, up.outputs[0]], name=f"{base}.lorc_add")
    for node, suffix in ((down, "lorc_xa"), (up, "lorc_xab")):
        node.outputs[0].name, node.outputs[0].dtype = f"{base}.{suffix}", ir.DataType.FLOAT
    graph.insert_after(matmul, [down, up, add])
    ir.convenience.replace_all_uses_with(y, add.outputs[0], replace_graph_outputs=True)
    add.replace_input_with(0, y)  # replace_all_uses_with also rewired the Add's own input
    name = y.name
    y.name = f"{base}.quantized"
    add.outputs[0].name = name
    add.outputs[0].dtype, add.outputs[0].shape = ir.DataType.FLOAT, y.shape
