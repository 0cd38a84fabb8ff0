"""Block-scaled FP4 E2M1 weights (ZeroQuant-FP's W4A8 weights) for InsertQDQ.

A weight is split into blocks of `group_size` consecutive input channels of one output channel
(one block per output channel where the weight has fewer input channels than that, e.g. a
depthwise convolution); each block gets scale = max|w| / 6 under the scheme's scale constraint,
pow2-group taking S_max over the blocks of one output channel (Wu et al. 2023, "ZeroQuant-FP",
§4: the per-block factor is then a bit shift, S_max a per-channel scale). Values round to the
nearest E2M1 value (0, 0.5, 1, 1.5, 2, 3, 4, 6), ties to even, saturating at 6.

Storage (`FP4_STORAGES`):
- "float8" (default): the E2M1 values held in a FLOAT8E4M3FN initializer (every E2M1 value is
  an E4M3 value), read by an opset-21 blockwise DequantizeLinear. ONNX Runtime 1.32 runs it on
  CPU; its numbers equal the FLOAT4E2M1 form bit for bit. A simulation: the file holds 8 bits
  per weight, and TensorRT refuses blockwise FP8 (linter rule `blockwise`).
- "float4": the real FLOAT4E2M1 initializer (opset 23). onnx.checker and the ONNX reference
  evaluator accept it; ONNX Runtime 1.32's CPU provider has no FLOAT4E2M1 DequantizeLinear
  kernel ("NOT_IMPLEMENTED"), so qpass cannot run or calibrate behind it.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qpass.graph import attribute, initializer, output_channel_axis
from qpass.schemes import QuantScheme

FP4_STORAGES = ("float8", "float4")


def input_channel_axis(node: ir.Node, ndim: int) -> int:
    """The weight axis that the op reduces over (blocks run along it)."""
    if node.op_type == "ConvTranspose":
        return 0
    if node.op_type == "Conv":
        return 1
    if node.op_type == "Gemm":
        return 1 if attribute(node, "transB", 0) else 0
    return ndim - 2  # MatMul


def quantize_blocks(
    scheme: QuantScheme, weight: np.ndarray, node: ir.Node
) -> tuple[np.ndarray, np.ndarray, int, int | None]:
    """(values on the scheme's grid as float32, scale, axis, block_size or None (per channel))."""
    out_axis = output_channel_axis(node, weight.ndim)
    in_axis = input_channel_axis(node, weight.ndim)
    g = scheme.group_size or weight.shape[in_axis]
    w = weight.astype(np.float32)
    if weight.shape[in_axis] < g or in_axis == out_axis:
        reduce = tuple(a for a in range(weight.ndim) if a != out_axis)
        amax = np.abs(w).max(axis=reduce, keepdims=True)
        scale = _constrained(scheme, amax, out_axis)
        q = scheme.quantize(w, scale, np.zeros_like(scale)).astype(np.float32)
        return q, scale.reshape(-1), out_axis, None
    c = weight.shape[in_axis]
    blocks = -(-c // g)
    moved = np.moveaxis(w, in_axis, 0)
    padded = np.zeros((blocks * g, *moved.shape[1:]), np.float32)
    padded[:c] = moved
    amax = np.abs(padded.reshape(blocks, g, *moved.shape[1:])).max(axis=1)
    scale = np.moveaxis(_constrained(scheme, amax, _moved(out_axis, in_axis)), 0, in_axis)
    full = np.repeat(scale, g, axis=in_axis).take(np.arange(c), axis=in_axis)
    q = scheme.quantize(w, full, np.zeros_like(full)).astype(np.float32)
    return q, scale, in_axis, g


def dequantize_node(
    graph: ir.Graph, name: str, scheme: QuantScheme, weight: np.ndarray, node: ir.Node,
    storage: str = "float8",
) -> ir.Node:
    """A DequantizeLinear of the block-quantized `weight`, stored as `storage` says."""
    import ml_dtypes

    if storage not in FP4_STORAGES:
        raise ValueError(f"FP4 storage {storage!r} is unknown; use one of {FP4_STORAGES}")
    q, scale, axis, block = quantize_blocks(scheme, weight, node)
    dtype = ml_dtypes.float8_e4m3fn if storage == "float8" else scheme.np_dtype
    inputs = [
        initializer(graph, f"{name}_quantized", q.astype(dtype)),
        initializer(graph, f"{name}_scale", scale.astype(np.float32)),
        initializer(graph, f"{name}_zero_point", np.zeros(scale.shape, dtype)),
    ]
    attributes = {"axis": axis} | ({"block_size": block} if block else {})
    dq = ir.node("DequantizeLinear", inputs, attributes, name=f"{name}_DequantizeLinear")
    dq.outputs[0].name = f"{name}_dequantized"
    dq.outputs[0].dtype = ir.DataType.FLOAT
    dq.outputs[0].shape = ir.Shape(weight.shape)
    return dq


def _moved(axis: int, moved_to_front: int) -> int:
    """Where `axis` lands after np.moveaxis(x, moved_to_front, 0)."""
    if axis == moved_to_front:
        return 0
    return axis + 1 if axis < moved_to_front else axis


def _constrained(scheme: QuantScheme, amax: np.ndarray, out_axis: int) -> np.ndarray:
    """Scales amax / 6 under the scheme's constraint; pow2-group relative to the largest scale
    of the same output channel."""
    scale = amax.astype(np.float64) / scheme.qmax
    if scheme.scale_constraint != "float":
        reduce = tuple(a for a in range(scale.ndim) if a != out_axis)
        scale = scheme.constrain(scale, largest=scale.max(axis=reduce, keepdims=True))
    return np.where(scale > 0, scale, 1.0).astype(np.float32)
