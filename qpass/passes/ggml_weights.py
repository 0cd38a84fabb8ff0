"""MatMul weights in ggml's block formats (q8_0 and the k-quants), optionally weighted by an
importance matrix computed from the calibration data."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from qpass import ggml
from qpass.graph import MS_DOMAIN, constant, initializer, module_path
from qpass.packing import pack_matmulnbits
from qpass.passes.base import CalibratedPass, keep_float
from qpass.passes.matmul_weights import (
    block_index,
    ensure_weight_opset,
    is_final_projection,
    untie_final_projection,
    weight_matmuls,
)

logger = logging.getLogger(__name__)

GGML_WEIGHT = "qpass.ggml_weight"
"""`node.meta` of a MatMul whose weight a ggml format holds: its `qpass.ggml.Quantized` (the
GGUF bytes, for `qpass.export_gguf`)."""

STORAGE = {
    "q8_0": ir.DataType.INT8, "q5_0": ir.DataType.INT8, "q2_k": ir.DataType.UINT4,
    "q3_k": ir.DataType.INT4, "q4_k": ir.DataType.UINT4, "q5_k": ir.DataType.UINT8,
    "q6_k": ir.DataType.INT8,
}
"""The DequantizeLinear input type that holds each format's values (after `Quantized`'s sign
flips: Q3_K's -4..4, Q6_K's -32..32)."""


def use_more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's choice of the layers that get more bits in its _M mixes: the first and the
    last eighth, and every third layer between (llama-quant.cpp, `use_more_bits`)."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def q4_k_m(node: ir.Node, layers: int) -> str:
    """The type of a MatMul weight in llama.cpp's Q4_K_M (llama-quant.cpp,
    `llama_tensor_get_type`, for Llama-family models without experts): Q6_K for the output
    projection, and for attn_v and ffn_down of the layers `use_more_bits` picks; Q4_K elsewhere.
    """
    path = module_path(node)
    if is_final_projection(node):
        return "q6_k"
    layer = block_index(node)
    more = layer is not None and use_more_bits(layer, layers)
    if more and path.endswith(("v_proj", "down_proj")):
        return "q6_k"
    return "q4_k"


MIXES: dict[str, Callable[[ir.Node, int], str]] = {"q4_k_m": q4_k_m}


class ImportanceObserver:
    """llama.cpp's imatrix entry for one MatMul input x [..., K]: the mean of x² per input
    channel over every calibration token."""

    def __init__(self):
        self.sum, self.rows = None, 0

    def update(self, x: np.ndarray) -> None:
        rows = x.reshape(-1, x.shape[-1]).astype(np.float64)
        squares = (rows * rows).sum(0)
        self.sum = squares if self.sum is None else self.sum + squares
        self.rows += len(rows)

    def importance(self) -> np.ndarray:
        return (self.sum / max(self.rows, 1)).astype(np.float32)


class QuantizeGGML(CalibratedPass):
    """Store MatMul weights in a ggml format (q8_0, q5_0, Q2_K-Q6_K, or a mix such as Q4_K_M),
    read through blockwise DequantizeLinear.

    Rewrite rules, for each MatMul with a constant float weight W [K, N] that is not excluded
    (the final projection only with `lm_head`; a tied one first gets its own weight):

    1. The model's opset is raised to 21 (4-bit types, blockwise scales).
    2. Wᵀ (ggml's rows are output channels, blocks run along K) is quantized to the layer's type
       (`type`, or the mix's rule); rows of K not a multiple of 256 take llama.cpp's fallback
       (Q4_K -> q5_0, Q6_K -> q8_0) or, with none, stay in float.
    3. A type without mins: MatMul(x, W)  ==>  MatMul(x, DequantizeLinear(q, s; axis=0,
       block_size=g)), g the sub-block (32 or 16), s = d * sc, the super-block scale times the
       sub-block's. A type with mins (Q2_K, Q4_K, Q5_K): the dequantized [K, N] is reshaped to
       [K/g, g, N], the sub-block mins dmin * m [K/g, 1, N] subtracted, and reshaped back.
       DequantizeLinear's zero points are integers and cannot hold a float min exactly; the
       Sub keeps the product q * s - min that ggml computes, bit for bit.
    4. With `format="matmulnbits"`, a 4-bit type with mins (Q2_K, Q4_K) instead: MatMul(x, W)
       ==>  MatMulNBits(x, B, s, z; bits 4, block_size g) with float zero points z = min / s:
       ONNX Runtime's CPU kernel (1.32) takes 4-bit zero points of the scales' type and
       computes (q - z) * s, equal to q * s - min up to float32 rounding (not bit for bit). It
       refuses float zero points with 8-bit weights ("MatMulNBits on CPU does not support 8-bit
       weights with floating-point zero points"): Q5_K keeps the DequantizeLinear and Sub form.
       The types without mins stay DequantizeLinear -> MatMul, which `LowerToMatMulNBits` packs
       (4 bits: Q3_K; 8 bits: q8_0, q5_0, Q6_K).
    5. The MatMul keeps the `qpass.ggml.Quantized` (GGUF bytes) in `node.meta[GGML_WEIGHT]`.

    With calibration data (and `importance`), each MatMul input's mean squared activation per
    channel (llama.cpp's importance matrix, computed on the float model) weights the rounding
    searches. Formats: Gerganov et al., ggml / llama.cpp (k-quants: llama.cpp PR #1684).
    """

    calibration_optional = True  # without calibration data: no importance matrix

    def __init__(
        self,
        type: str = "q8_0",
        *,
        exclude: frozenset[str] = frozenset(),
        lm_head: bool = False,
        importance: bool = True,
        format: str = "dq",
    ):
        super().__init__()
        if format not in ("dq", "matmulnbits"):
            raise ValueError(f"format must be 'dq' or 'matmulnbits', not {format!r}")
        self.format = format
        if type not in ggml.TYPES and type not in MIXES:
            raise ValueError(
                f"unknown ggml type {type!r}; choose one of {', '.join(ggml.TYPES + tuple(MIXES))}"
            )
        self.type = type
        self.exclude = frozenset(exclude)
        self.lm_head = lm_head
        self.importance = importance

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.lm_head:
            untie_final_projection(model.graph)
        if not weight_matmuls(model.graph, self.exclude, self.lm_head):
            return ir.passes.PassResult(model, modified=False)
        ensure_weight_opset(model)
        targets = weight_matmuls(model.graph, self.exclude, self.lm_head)
        importance = self._importance(model, targets)
        layers = 1 + max((block_index(n) or 0 for n in targets), default=0)
        done = sum(self._quantize(model, node, layers, importance) for node in targets)
        logger.info("ggml %s: %d MatMul weights%s", self.type, done,
                    " (importance matrix)" if importance else "")
        return ir.passes.PassResult(model, modified=done > 0)

    def _quantize(self, model: ir.Model, node: ir.Node, layers: int, importance: dict) -> bool:
        """One MatMul's weight in its type (or llama.cpp's fallback); False if left in float."""
        wanted = MIXES[self.type](node, layers) if self.type in MIXES else self.type
        k = node.inputs[1].shape[0]
        stored = ggml.storable(wanted, k)
        if stored is None:
            keep_float(node, f"{wanted} needs rows of a multiple of {ggml.block_size(wanted)} "
                       f"input channels, not {k}")
            logger.info("%s: %s does not fit K = %d; left in float", node.name, wanted, k)
            return False
        weight = constant(node.inputs[1])
        quantized = ggml.quantize(weight.T, stored, importance.get(node.inputs[0].name))
        four_bit_mins = quantized.min is not None and STORAGE[stored] == ir.DataType.UINT4
        if four_bit_mins and self.format == "matmulnbits":
            matmulnbits_with_mins(model, node, quantized)
        else:
            read_through(model.graph, node, quantized)
        return True

    def _importance(self, model: ir.Model, targets: list[ir.Node]) -> dict[str, np.ndarray]:
        if self.context is None or not self.importance:
            return {}
        names = [node.inputs[0].name for node in targets]
        observers = self.context.observe(
            model, names, lambda _: ImportanceObserver(), "importance matrix"
        )
        return {name: observer.importance() for name, observer in observers.items()}


def read_through(graph: ir.Graph, matmul: ir.Node, quantized: ggml.Quantized) -> None:
    """MatMul(x, W)  ==>  MatMul(x, W'), W' the float32 weight [K, N] that `quantized` (rows of
    Wᵀ) stands for, built from DequantizeLinear (and a Sub of the mins)."""
    old = matmul.inputs[1]
    base = matmul.name or old.name or "weight"
    g = quantized.group
    q = np.ascontiguousarray(quantized.q.T)
    k, n = q.shape
    qvalue = initializer(graph, f"{base}.weight_q", q.astype(STORAGE[quantized.type].numpy()))
    scale = initializer(graph, f"{base}.weight_scale", np.ascontiguousarray(quantized.scale.T))
    nodes = [ir.node("DequantizeLinear", [qvalue, scale], {"axis": 0, "block_size": g},
                     name=f"{base}.weight_dq")]
    weight = nodes[-1].outputs[0]
    if quantized.min is not None:
        blocks = initializer(graph, f"{base}.weight_blocks", np.array([k // g, g, n], np.int64))
        shape = initializer(graph, f"{base}.weight_shape", np.array([k, n], np.int64))
        mins = initializer(graph, f"{base}.weight_min",
                           np.ascontiguousarray(quantized.min.T)[:, None, :])
        nodes.append(ir.node("Reshape", [weight, blocks], name=f"{base}.weight_blocks"))
        nodes.append(ir.node("Sub", [nodes[-1].outputs[0], mins], name=f"{base}.weight_sub_min"))
        nodes.append(ir.node("Reshape", [nodes[-1].outputs[0], shape], name=f"{base}.weight"))
        weight = nodes[-1].outputs[0]
    weight.name = f"{base}.weight_dequantized"
    weight.dtype, weight.shape = ir.DataType.FLOAT, ir.Shape([k, n])
    for node in nodes:
        graph.insert_before(matmul, node)
    matmul.replace_input_with(1, weight)
    matmul.meta[GGML_WEIGHT] = quantized
    if old.is_initializer() and not old.uses() and not old.is_graph_output():
        graph.initializers.pop(old.name)



def matmulnbits_with_mins(model: ir.Model, matmul: ir.Node, quantized: ggml.Quantized) -> None:
    """MatMul(x, W)  ==>  MatMulNBits(x, B, scales, float zero points min / scale): a 4-bit type
    with mins (Q2_K, Q4_K), packed as `qpass.packing` packs blockwise weights."""
    graph, g = model.graph, quantized.group
    q = np.ascontiguousarray(quantized.q.T).astype(ir.DataType.UINT4.numpy())  # [K, N], 0..15
    k, n = q.shape
    b, scales, _ = pack_matmulnbits(q, quantized.scale.T, None, g)
    zero = (quantized.min / quantized.scale).astype(np.float32)  # [N, K/g]
    base = matmul.name or "weight"
    inputs = [initializer(graph, f"{base}.B", b), initializer(graph, f"{base}.scales", scales),
              initializer(graph, f"{base}.zero_points", zero)]
    fused = ir.node("MatMulNBits", [matmul.inputs[0], *inputs],
                    {"K": k, "N": n, "bits": 4, "block_size": g},
                    domain=MS_DOMAIN, name=matmul.name)
    fused.metadata_props.update(matmul.metadata_props)
    fused.meta[GGML_WEIGHT] = quantized
    graph.insert_before(matmul, fused)
    out = matmul.outputs[0]
    fused.outputs[0].dtype, fused.outputs[0].shape = out.dtype, out.shape
    ir.convenience.replace_all_uses_with(out, fused.outputs[0], replace_graph_outputs=True)
    name, old = out.name, matmul.inputs[1]
    graph.remove(matmul, safe=True)
    out.name = None
    fused.outputs[0].name = name
    if old.is_initializer() and not old.uses() and not old.is_graph_output():
        graph.initializers.pop(old.name)
    model.opset_imports.setdefault(MS_DOMAIN, 1)
