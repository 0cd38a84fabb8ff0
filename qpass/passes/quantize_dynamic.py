"""Dynamic per-token activation quantization of MatMul layers, in standard ONNX ops."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from qpass.errors import ModelError
from qpass.graph import constant, initializer, is_op
from qpass.passes.base import Pass, is_kept_float
from qpass.schemes import WEIGHT_INT8, QuantScheme

logger = logging.getLogger(__name__)

ACTIVATION_ZERO_POINT = 128
"""Symmetric per-token activations are stored as uint8 around 128: ORT's x86 integer GEMM wants
u8 activations with s8 weights."""


class QuantizeDynamicPerToken(Pass):
    """W8A8 with activations quantized per token at run time (no calibration data needed).

    Rewrite rules, for each MatMul with a float activation and a constant 2-D weight W [K, N],
    not excluded:

    1. W becomes an int8 initializer Wq with symmetric per-output-column scales w_s [N]
       (`weights`, the int8 per-channel scheme).
    2. Its activation x gets one quantizer, shared by every rewritten MatMul that reads x:
       s = Max(ReduceMax(Abs(x), axes=[-1], keepdims=1) / 127, tiny) (one scale per token, i.e.
       per row of the last axis), xq = QuantizeLinear(x / s, 1, 128) (uint8, symmetric).
    3. MatMul(x, W) ==> Mul(Mul(Cast(MatMulInteger(xq, Wq, 128, 0), float), w_s), s).

    Every op is standard ONNX (opset >= 13); `LowerIntegerMatMul` then turns step 3 into ONNX
    Runtime's fused MatMulIntegerToFloat kernel. Per-token dynamic ranges follow ZeroQuant (Yao
    et al. 2022, "ZeroQuant: Efficient and Affordable Post-Training Quantization for
    Large-Scale Transformers") and the W8A8 setting of SmoothQuant (Xiao et al. 2023).
    """

    def __init__(
        self, *, weights: QuantScheme = WEIGHT_INT8, exclude: frozenset[str] = frozenset()
    ):
        super().__init__()
        if weights.dtype != "int8" or not weights.symmetric:
            raise ValueError("QuantizeDynamicPerToken needs symmetric int8 weights")
        self.weights = weights
        self.exclude = frozenset(exclude)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = [n for n in graph if not is_kept_float(n, self.exclude) and _is_weight_matmul(n)]
        if not nodes:
            raise ModelError("the model has no MatMul with a constant 2-D weight to quantize")
        quantized: dict[int, tuple[ir.Value, ir.Value]] = {}
        for node in nodes:
            x = node.inputs[0]
            if id(x) not in quantized:
                opset = model.opset_imports.get("", 13)
                quantized[id(x)] = _quantize_per_token(graph, x, node, opset)
            self._rewrite_matmul(graph, node, *quantized[id(x)])
        logger.info("quantized %d MatMuls per token (%d activations)", len(nodes), len(quantized))
        return ir.passes.PassResult(model, modified=True)

    def _rewrite_matmul(self, graph: ir.Graph, node: ir.Node, xq: ir.Value, s: ir.Value) -> None:
        old = node.inputs[1]
        weight = constant(old)
        peak = np.maximum(weight.max(axis=0), -weight.min(axis=0)).astype(np.float64)
        w_scale = np.maximum(peak, 1e-30) / self.weights.qmax
        name = old.name or node.name
        w = initializer(graph, f"{name}_quantized", _quantize_rows(weight, w_scale, self.weights))
        w_zero = initializer(graph, f"{name}_zero_point", np.array(0, np.int8))
        a_zero = initializer(
            graph, f"{name}_a_zero_point", np.array(ACTIVATION_ZERO_POINT, np.uint8)
        )
        ws = initializer(graph, f"{name}_scale", w_scale.astype(np.float32))
        base = node.name or name
        matmul = ir.node("MatMulInteger", [xq, w, a_zero, w_zero], name=f"{base}_MatMulInteger")
        cast = ir.node("Cast", [matmul.outputs[0]], {"to": ir.DataType.FLOAT}, name=f"{base}_Cast")
        by_column = ir.node("Mul", [cast.outputs[0], ws], name=f"{base}_weight_scale")
        by_row = ir.node("Mul", [by_column.outputs[0], s], name=f"{base}_token_scale")
        matmul.outputs[0].dtype = ir.DataType.INT32
        for n in (cast, by_column):
            n.outputs[0].dtype = ir.DataType.FLOAT
        graph.insert_before(node, [matmul, cast, by_column, by_row])
        out = node.outputs[0]
        by_row.outputs[0].dtype, by_row.outputs[0].shape = ir.DataType.FLOAT, out.shape
        ir.convenience.replace_all_uses_with(out, by_row.outputs[0], replace_graph_outputs=True)
        old_name = out.name
        graph.remove(node, safe=True)
        by_row.outputs[0].name = old_name
        if old.is_initializer() and not old.uses() and not old.is_graph_output():
            graph.initializers.pop(old.name)  # its memory (or mapped file pages) freed now


_CHUNK_ELEMENTS = 1 << 22


def _quantize_rows(weight: np.ndarray, scale: np.ndarray, scheme: QuantScheme) -> np.ndarray:
    """`scheme.quantize(weight, scale, 0)`, a few rows at a time: its float64 temporaries stay
    ~100 MB however large the weight (a 32k x 2048 lm_head would take 2 GB at once)."""
    q = np.empty(weight.shape, scheme.np_dtype)
    rows = max(1, _CHUNK_ELEMENTS // max(weight.shape[1], 1))
    zero = np.zeros_like(scale)
    for start in range(0, weight.shape[0], rows):
        q[start : start + rows] = scheme.quantize(weight[start : start + rows], scale, zero)
    return q


def _is_weight_matmul(node: ir.Node) -> bool:
    if not is_op(node, "MatMul"):
        return False
    weight, x = constant(node.inputs[1]), node.inputs[0]
    return (
        weight is not None
        and weight.ndim == 2
        and weight.dtype == np.float32
        and constant(x) is None
        and x.dtype in (ir.DataType.FLOAT, None)
    )


def _quantize_per_token(graph: ir.Graph, x: ir.Value, first_reader: ir.Node, opset: int):
    """Insert the per-token quantizer of x before `first_reader`; return (xq, s)."""
    name = x.name
    inv = initializer(graph, f"{name}_inv_qmax", np.array(1.0 / 127.0, np.float32))
    tiny = initializer(graph, f"{name}_min_scale", np.array(1e-12, np.float32))
    one = initializer(graph, f"{name}_unit_scale", np.array(1.0, np.float32))
    zero = initializer(graph, f"{name}_token_zero_point", np.array(ACTIVATION_ZERO_POINT, np.uint8))
    absolute = ir.node("Abs", [x], name=f"{name}_Abs")
    if opset >= 18:  # axes became an input in opset 18
        axes = initializer(graph, f"{name}_token_axes", np.array([-1], np.int64))
        peak = ir.node(
            "ReduceMax", [absolute.outputs[0], axes], {"keepdims": 1}, name=f"{name}_peak"
        )
    else:
        peak = ir.node(
            "ReduceMax", [absolute.outputs[0]], {"axes": [-1], "keepdims": 1}, name=f"{name}_peak"
        )
    scaled = ir.node("Mul", [peak.outputs[0], inv], name=f"{name}_per_token_scale")
    scale = ir.node("Max", [scaled.outputs[0], tiny], name=f"{name}_token_scale")
    divided = ir.node("Div", [x, scale.outputs[0]], name=f"{name}_Div")
    quant = ir.node(
        "QuantizeLinear", [divided.outputs[0], one, zero], name=f"{name}_QuantizeLinear"
    )
    nodes = [absolute, peak, scaled, scale, divided, quant]
    for n in nodes[:-1]:
        n.outputs[0].dtype = ir.DataType.FLOAT
    quant.outputs[0].dtype = ir.DataType.UINT8
    quant.outputs[0].shape = x.shape
    scale.outputs[0].name = f"{name}_token_scale"
    quant.outputs[0].name = f"{name}_quantized"
    graph.insert_before(first_reader, nodes)
    return quant.outputs[0], scale.outputs[0]
