"""Remove quantization work that is exact to remove: clamps, repeated scales, identity requants."""

from __future__ import annotations

import logging

import ml_dtypes
import numpy as np
import onnx_ir as ir

from qpass.graph import attribute, constant, is_op, sole_consumer
from qpass.passes.base import Pass, refuse

logger = logging.getLogger(__name__)

SCALE_PRESERVING_OPS = (
    "MaxPool",
    "Reshape",
    "Flatten",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Slice",
    "Identity",
    "Pad",
)
"""Ops whose outputs are a rearrangement or selection of their input values (Pad: zeros added,
which every asymmetric range here holds exactly), so quantization commutes with them."""

_RELATIVE_TOLERANCE = 1e-5


class FuseRequant(Pass):
    """Remove requantization work from a QDQ graph.

    Rules 1-3 leave the computed values bit-identical; rule 4 replaces two roundings by one.

    Rewrite rules:

    1. x -> Relu/Clip -> Q(s, z)  ==>  x -> Q(s, z)  when the representable range
       [s(qmin - z), s(qmax - z)] lies within the clamp bounds: Q's saturation already clamps.
       This is what lets ONNX Runtime fuse Conv+ReLU6 into one QLinearConv.
    2. DQ(s, z) -> op ... op -> Q(s', z')  ==>  DQ(s, z) -> op ... op -> Q(s, z)  for a chain
       of scale-preserving ops (MaxPool, Reshape, Flatten, Transpose, Squeeze, Unsqueeze, Slice,
       Identity, zero Pad), e.g. ResNet's option-A shortcut Slice -> Slice -> Pad: one scale is
       shared through the chain, the requantization becomes exact (the values are already on
       the grid of s) where a second rounding onto s' was, and ONNX Runtime runs a lone op on
       integers.
    3. DQ(s, z) -> Q(s, z)  ==>  the integer tensor itself (an identity requant).
    4. Q(s, z) -> DQ(s, z) -> Q(s2, z2)  ==>  Q(s2, z2) directly from the float tensor when the
       middle DQ has no other reader and [s2 range] ⊆ [s range]: one rounding instead of two.
    5. Q_i(s_i) -> DQ_i -> Concat -> Q(s, z)  ==>  every Q_i takes (s, z)  when each DQ_i is read
       by the Concat alone: the Concat then joins integers exactly (the inputs are quantized once,
       on the output's grid, instead of twice).
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        counts = {"clamp": 0, "shared": 0, "identity": 0, "double": 0}
        graph = model.graph
        for node in list(graph):
            if node.graph is None:
                continue
            if self._try_drop_clamp(graph, node):
                counts["clamp"] += 1
            elif self._try_share_scale(node) or self._try_share_concat_scale(node):
                counts["shared"] += 1
        for node in list(graph):
            if node.graph is None or not is_op(node, "QuantizeLinear"):
                continue
            if self._try_drop_identity_requant(graph, node):
                counts["identity"] += 1
            elif self._try_merge_double_quantize(graph, node):
                counts["double"] += 1
        logger.info("FuseRequant: %s", counts)
        return ir.passes.PassResult(model, modified=any(counts.values()))

    def _try_drop_clamp(self, graph: ir.Graph, node: ir.Node) -> bool:
        if not is_op(node, "Relu", "Clip"):
            return False
        q = sole_consumer(node.outputs[0])
        if not is_op(q, "QuantizeLinear") or node.outputs[0].is_graph_output():
            return False
        low, high = _representable_range(q)
        if low is None:
            return refuse(self, node, "the QuantizeLinear's range is not constant")
        clamp_low, clamp_high = _clamp_bounds(node)
        if clamp_low is None or not _within(low, high, clamp_low, clamp_high):
            return refuse(self, node, "the quantized range reaches past the clamp's bounds")
        q.replace_input_with(0, node.inputs[0])
        graph.remove(node, safe=True)
        return True

    def _try_share_scale(self, node: ir.Node) -> bool:
        if not _is_scale_preserving(node):
            return False
        dq = _chain_source(node)
        q = sole_consumer(node.outputs[0])
        if not (is_op(dq, "DequantizeLinear") and is_op(q, "QuantizeLinear")):
            return False
        if len(dq.inputs) < 3 or attribute(dq, "axis", 1) != attribute(q, "axis", 1):
            return False
        if _same_params(dq, q) or _is_per_axis(dq):
            return False
        if dq.inputs[0].dtype != q.outputs[0].dtype:
            return refuse(self, node, "the pairs around it have different integer types")
        _set_params(q, dq.inputs[1], dq.inputs[2])
        return True

    def _try_share_concat_scale(self, node: ir.Node) -> bool:
        if not is_op(node, "Concat"):
            return False
        q = sole_consumer(node.outputs[0])
        dqs = [v.producer() if v is not None else None for v in node.inputs]
        if not is_op(q, "QuantizeLinear") or _is_per_axis(q):
            return False
        if not all(
            is_op(dq, "DequantizeLinear") and sole_consumer(dq.outputs[0]) is node for dq in dqs
        ):
            return False
        sources = [dq.inputs[0].producer() for dq in dqs]
        if not all(
            is_op(src, "QuantizeLinear") and src.outputs[0].dtype == q.outputs[0].dtype
            for src in sources
        ):
            return False
        if all(_same_params(src, q) for src in sources):
            return False
        for src in sources:
            _set_params(src, q.inputs[1], q.inputs[2])
        return True

    def _try_drop_identity_requant(self, graph: ir.Graph, q: ir.Node) -> bool:
        dq = q.inputs[0].producer()
        if not is_op(dq, "DequantizeLinear") or not _same_params(dq, q):
            return False
        if dq.inputs[0].dtype != q.outputs[0].dtype or q.outputs[0].is_graph_output():
            return False
        ir.convenience.replace_all_uses_with(q.outputs[0], dq.inputs[0])
        graph.remove(q, safe=True)
        if not dq.outputs[0].uses() and not dq.outputs[0].is_graph_output():
            graph.remove(dq, safe=True)
        return True

    def _try_merge_double_quantize(self, graph: ir.Graph, q2: ir.Node) -> bool:
        dq = q2.inputs[0].producer()
        if not is_op(dq, "DequantizeLinear") or sole_consumer(dq.outputs[0]) is not q2:
            return False
        q1 = dq.inputs[0].producer()
        if not is_op(q1, "QuantizeLinear") or sole_consumer(q1.outputs[0]) is not dq:
            return False
        if _is_per_axis(q1) or _is_per_axis(q2):
            return refuse(self, q2, "per-axis scales")
        low1, high1 = _representable_range(q1)
        low2, high2 = _representable_range(q2)
        if low1 is None or low2 is None or not _within(low2, high2, low1, high1):
            return refuse(self, q2, "the second range does not lie within the first")
        q2.replace_input_with(0, q1.inputs[0])
        graph.remove([dq, q1], safe=True)
        return True


def _set_params(q: ir.Node, scale: ir.Value, zero: ir.Value) -> None:
    """Give a QuantizeLinear, and every DequantizeLinear of its output, new scale and zero point."""
    for node in [q, *q.outputs[0].consumers()]:
        if node is q or is_op(node, "DequantizeLinear"):
            node.replace_input_with(1, scale)
            node.replace_input_with(2, zero)


def _params(node: ir.Node):
    scale = constant(node.inputs[1])
    zero = constant(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    return scale, zero


def _same_params(a: ir.Node, b: ir.Node) -> bool:
    (sa, za), (sb, zb) = _params(a), _params(b)
    if sa is None or sb is None or za is None or zb is None:
        return False
    return sa.shape == sb.shape and np.array_equal(sa, sb) and np.array_equal(za, zb)


def _is_per_axis(node: ir.Node) -> bool:
    scale = constant(node.inputs[1])
    return scale is None or scale.size != 1


def _representable_range(q: ir.Node):
    """Real interval [s(qmin - z), s(qmax - z)] of a per-tensor QuantizeLinear, or (None, None)."""
    scale, zero = _params(q)
    if scale is None or zero is None or scale.size != 1:
        return None, None
    info = ml_dtypes.iinfo(zero.dtype)  # numpy types and the 4-bit ones
    s, z = float(scale.reshape(())), int(zero.reshape(()))
    return s * (info.min - z), s * (info.max - z)


def _clamp_bounds(node: ir.Node):
    if node.op_type == "Relu":
        return 0.0, np.inf
    if len(node.inputs) == 1:  # Clip-6 and older carry bounds as attributes
        return attribute(node, "min", -np.inf), attribute(node, "max", np.inf)
    bounds = []
    for i, default in ((1, -np.inf), (2, np.inf)):
        if i >= len(node.inputs) or node.inputs[i] is None:
            bounds.append(default)
            continue
        value = constant(node.inputs[i])
        if value is None:
            return None, None
        bounds.append(float(value))
    return tuple(bounds)


def _within(low: float, high: float, bound_low: float, bound_high: float) -> bool:
    """[low, high] ⊆ [bound_low, bound_high], up to float32 rounding of the scale."""
    slack = _RELATIVE_TOLERANCE * max(abs(low), abs(high), 1e-12)
    return low >= bound_low - slack and high <= bound_high + slack


def _is_scale_preserving(node: ir.Node | None) -> bool:
    if not is_op(node, *SCALE_PRESERVING_OPS) or not node.inputs or node.inputs[0] is None:
        return False
    return node.op_type != "Pad" or _pads_with_zero(node)


def _chain_source(node: ir.Node) -> ir.Node | None:
    """The producer above `node` and the scale-preserving ops right above it."""
    source = node.inputs[0].producer()
    while _is_scale_preserving(source):
        source = source.inputs[0].producer()
    return source


def _pads_with_zero(node: ir.Node) -> bool:
    if attribute(node, "mode", "constant") not in ("constant", b"constant"):
        return False
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        value = constant(node.inputs[2])
        return value is not None and float(value) == 0.0
    return True
