"""Layer pairs for cross-layer passes: Conv/Gemm -> per-channel ops -> Conv/Gemm.

Shared by EqualizeCrossLayer and AbsorbHighBias (Nagel et al. 2019, "Data-Free Quantization
Through Weight Equalization and Bias Correction"). A pair's first layer writes C channels that
reach the second layer's C input channels through ops that act on each channel alone.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from qpass.graph import attribute, constant, initializer, is_op, set_constant, sole_consumer

LAYER_OPS = ("Conv", "Gemm")
PASS_THROUGH_OPS = ("Relu", "Clip", "Pad", "MaxPool", "Identity")
"""Ops a pair may hold between its layers: each commutes with a positive per-channel scale
(Clip only when its lower bound is 0, and then it equals Relu only below its upper bound)."""


@dataclasses.dataclass
class Pair:
    """Two layers and the per-channel ops between them, in graph order."""

    first: ir.Node
    second: ir.Node
    between: list[ir.Node]

    @property
    def clamps(self) -> list[ir.Node]:
        """The Clip(0, max) nodes between the layers (exact for equalization only as Relu)."""
        return [n for n in self.between if is_op(n, "Clip") and not _is_plain_relu(n)]


def find_pairs(graph: ir.Graph) -> list[Pair]:
    """Every pair whose intermediate tensors each have one reader and are not graph outputs."""
    pairs = []
    for node in graph:
        if not is_layer(node):
            continue
        between, value = [], node.outputs[0]
        while (reader := sole_consumer(value)) is not None and _passes_channels(reader, value):
            between.append(reader)
            value = reader.outputs[0]
        if _reads_channels(reader, value, output_channels(node)):
            pairs.append(Pair(node, reader, between))
    return pairs


def is_layer(node: ir.Node) -> bool:
    """A Conv or Gemm with a constant weight and a constant (or no) one-per-channel bias."""
    if not is_op(node, *LAYER_OPS) or len(node.outputs) != 1:
        return False
    weight = constant(node.inputs[1])
    if weight is None or (node.op_type == "Conv" and weight.ndim < 3):
        return False
    if node.op_type == "Gemm" and (weight.ndim != 2 or attribute(node, "transA", 0)):
        return False
    bias_value = node.inputs[2] if len(node.inputs) > 2 else None
    if bias_value is None:
        return True
    bias = constant(bias_value)
    return bias is not None and bias.shape == (output_channels(node),)


def output_channels(node: ir.Node) -> int:
    weight = constant(node.inputs[1])
    return weight.shape[_output_axis(node)]


def input_channels(node: ir.Node) -> int:
    weight = constant(node.inputs[1])
    if node.op_type == "Gemm":
        return weight.shape[1 - _output_axis(node)]
    return weight.shape[1] * attribute(node, "group", 1)


def output_ranges(node: ir.Node, weight: np.ndarray) -> np.ndarray:
    """max |w| over each output channel of the layer's weight."""
    rows = np.moveaxis(weight, _output_axis(node), 0)
    return np.abs(rows).reshape(rows.shape[0], -1).max(axis=1)


def input_ranges(node: ir.Node, weight: np.ndarray) -> np.ndarray:
    """max |w| over everything each input channel of the layer multiplies (its group's rows)."""
    return np.abs(_by_input_channel(node, weight)).max(axis=(1, 3)).reshape(-1)


def scale_outputs(node: ir.Node, weight: np.ndarray, factor: np.ndarray) -> np.ndarray:
    shape = [1] * weight.ndim
    shape[_output_axis(node)] = -1
    return weight * factor.reshape(shape)


def scale_inputs(node: ir.Node, weight: np.ndarray, factor: np.ndarray) -> np.ndarray:
    grouped = _by_input_channel(node, weight)
    scaled = grouped * factor.reshape(grouped.shape[0], 1, grouped.shape[2], 1)
    if node.op_type == "Gemm":
        matrix = scaled[0, :, :, 0]  # [out, in]
        return matrix if _output_axis(node) == 0 else matrix.T
    return scaled.reshape(weight.shape)


def sum_over_inputs(node: ir.Node, weight: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The layer's output, per output channel, for an input that is the constant x[i] on channel
    i (every kernel position; no padding): sum over i and kernel positions of W[o, i, k] x[i]."""
    grouped = _by_input_channel(node, weight)  # [groups, per_group_out, per_group_in, kernel]
    x = x.reshape(grouped.shape[0], 1, grouped.shape[2], 1)
    out = (grouped * x).sum(axis=(2, 3)).reshape(-1)
    return out * attribute(node, "alpha", 1.0) if node.op_type == "Gemm" else out


def bias_of(node: ir.Node) -> np.ndarray:
    """The layer's per-channel output shift: its bias (times Gemm's beta), zeros if it has none."""
    value = node.inputs[2] if len(node.inputs) > 2 else None
    bias = constant(value)
    if bias is None:
        return np.zeros(output_channels(node))
    return bias.astype(np.float64) * _bias_factor(node)


def set_weight(graph: ir.Graph, node: ir.Node, weight: np.ndarray) -> None:
    old = node.inputs[1]
    node.replace_input_with(1, set_constant(graph, old, weight.astype(constant(old).dtype)))


def set_bias(graph: ir.Graph, node: ir.Node, shift: np.ndarray) -> None:
    """Make the layer's per-channel output shift `shift` (creating a bias input if needed)."""
    dtype = constant(node.inputs[1]).dtype
    bias = (shift / _bias_factor(node)).astype(dtype)
    value = node.inputs[2] if len(node.inputs) > 2 else None
    if value is None:
        value = initializer(graph, f"{node.name or node.outputs[0].name}.bias", bias)
        if len(node.inputs) < 3:
            node.resize_inputs(3)
        node.replace_input_with(2, value)
    else:
        node.replace_input_with(2, set_constant(graph, value, bias))


def has_bias_input(node: ir.Node) -> bool:
    """Whether a bias can be written: Gemm's C is scaled by beta, which must not be 0."""
    return node.op_type != "Gemm" or attribute(node, "beta", 1.0) != 0.0


def replace_by_relu(graph: ir.Graph, clip: ir.Node) -> ir.Node:
    """Put a Relu in place of a Clip(0, max); the output keeps its name."""
    relu = ir.node("Relu", [clip.inputs[0]], name=clip.name)
    graph.insert_before(clip, relu)
    out, name = clip.outputs[0], clip.outputs[0].name
    relu.outputs[0].dtype, relu.outputs[0].shape = out.dtype, out.shape
    ir.convenience.replace_all_uses_with(out, relu.outputs[0], replace_graph_outputs=True)
    graph.remove(clip, safe=True)
    out.name = None
    relu.outputs[0].name = name
    return relu


def clip_bounds(node: ir.Node) -> tuple[float | None, float | None]:
    """Constant (low, high) of a Clip (None where unbounded), or (nan, nan) if computed."""
    if len(node.inputs) == 1:  # opset < 11: attributes
        return attribute(node, "min", None), attribute(node, "max", None)
    bounds = []
    for i in (1, 2):
        value = node.inputs[i] if i < len(node.inputs) else None
        if value is None:
            bounds.append(None)
            continue
        array = constant(value)
        if array is None:
            return float("nan"), float("nan")
        bounds.append(float(array))
    return bounds[0], bounds[1]


def _reads_channels(node: ir.Node | None, value: ir.Value, channels: int) -> bool:
    """The node is a layer whose data input is `value`, with `channels` input channels."""
    return (
        node is not None
        and is_layer(node)
        and node.inputs[0] is value
        and input_channels(node) == channels
    )


def _passes_channels(node: ir.Node, value: ir.Value) -> bool:
    """The op maps each channel on its own and commutes with a positive per-channel scale."""
    if not is_op(node, *PASS_THROUGH_OPS) or node.inputs[0] is not value or len(node.outputs) != 1:
        return False
    if node.op_type == "Clip":
        return clip_bounds(node)[0] == 0.0
    if node.op_type == "Pad":
        return _pads_spatial_zeros(node)
    return True


def _is_plain_relu(node: ir.Node) -> bool:
    return is_op(node, "Relu") or (is_op(node, "Clip") and clip_bounds(node) == (0.0, None))


def _pads_spatial_zeros(node: ir.Node) -> bool:
    if attribute(node, "mode", "constant") not in ("constant", b"constant"):
        return False
    if attribute(node, "value", 0.0) != 0.0:  # opset < 11
        return False
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        value = constant(node.inputs[2])
        if value is None or float(value) != 0.0:
            return False
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        return False  # explicit axes: rare; not checked
    pads = constant(node.inputs[1]) if len(node.inputs) > 1 else attribute(node, "pads", None)
    if pads is None:
        return False
    pads = np.asarray(pads).reshape(2, -1)
    return pads.shape[1] >= 2 and not pads[:, :2].any()


def _output_axis(node: ir.Node) -> int:
    if node.op_type == "Gemm":
        return 0 if attribute(node, "transB", 0) else 1
    return 0


def _bias_factor(node: ir.Node) -> float:
    return attribute(node, "beta", 1.0) if node.op_type == "Gemm" else 1.0


def _by_input_channel(node: ir.Node, weight: np.ndarray) -> np.ndarray:
    """The weight as [groups, outputs per group, inputs per group, everything else]."""
    if node.op_type == "Gemm":
        matrix = weight if _output_axis(node) == 0 else weight.T  # [out, in]
        return matrix[None, :, :, None]
    groups = attribute(node, "group", 1)
    return weight.reshape(groups, weight.shape[0] // groups, weight.shape[1], -1)
