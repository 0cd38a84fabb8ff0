"""Insert QuantizeLinear/DequantizeLinear pairs with calibrated ranges."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from qpass.calibration import Context, make_observer
from qpass.errors import ModelError
from qpass.graph import (
    attribute,
    constant,
    initializer,
    is_op,
    output_channel_axis,
    raise_opset,
    sole_consumer,
)
from qpass.metadata import CLAMPS_TO_GRID, EDGE_LAYER, GRID, OBSERVED_RANGE, QUANTIZES
from qpass.passes.base import CalibratedPass, is_kept_float
from qpass.schemes import ACTIVATION_UINT8, FP4, WEIGHT_INT8, QuantScheme

logger = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class _OpRule:
    """Which inputs of an op are activations, weight and bias; when its output is quantized."""

    activations: tuple[int, ...]
    weight: int | None = None
    bias: int | None = None
    output: str = "always"  # "always", or "if-consumed" by another quantized op


_RULES = {
    "Conv": _OpRule((0,), weight=1, bias=2),
    "ConvTranspose": _OpRule((0,), weight=1, bias=2),
    "Gemm": _OpRule((0,), weight=1, bias=2, output="if-consumed"),
    "MatMul": _OpRule((0,), weight=1, output="if-consumed"),
    "Add": _OpRule((0, 1)),
    "GlobalAveragePool": _OpRule((0,)),
    "AveragePool": _OpRule((0,)),
}
QUANTIZABLE_OPS = tuple(_RULES)


class InsertQDQ(CalibratedPass):
    """Quantize the inputs and outputs of every supported op with Q/DQ pairs (QDQ format).

    Rewrite rules, for each op in QUANTIZABLE_OPS not excluded:

    1. A constant weight (Conv/ConvTranspose/Gemm/MatMul input 1) becomes an integer initializer
       read through DequantizeLinear, per output channel (Conv axis 0, ConvTranspose axis 1, Gemm
       by transB, MatMul axis 1) or per tensor, with its own min-max range.
    2. A constant 1-D bias becomes int32 with scale = activation scale x weight scale, zero point 0
       (integer schemes; with an FP8 weight or activation scheme the bias stays float).
       FP4 E2M1 weights are block-scaled instead (`qpass.passes.block_scaled_fp4`).
    3. Each float activation input, and the output (looking through a sole Relu/Clip consumer, which
       FuseRequant later removes), becomes x -> Q -> DQ -> consumers, one pair per tensor shared by
       all readers, with scale and zero point from the activation scheme's calibrated range.
    4. An op whose inputs cannot all be quantized (a computed weight of a Conv, a constant input of
       an Add) is left in float and logged.
    5. The model's opset is raised to what the schemes' types need (19 for FP8 E4M3).
    7. A layer marked by `KeepEdgeLayersWide` gets `edge_weights`, and an activation one of
       them reads gets `edge_activations` (when given): e.g. 8 bits for the first and last
       layer of a 4-bit network.
    8. A 3- or 2-bit activation (stored in a 4-bit tensor, whose QuantizeLinear saturates at
       the 4-bit limits) gets Min(s(qmax - z)) and Max(s(qmin - z)), its grid's ends, before
       its QuantizeLinear, both marked `CLAMPS_TO_GRID`.
    6. An activation whose calibrated range exceeds SENTINEL_RANGE (1e30: masking sentinels,
       not data) gets no pair and stays float.

    Ranges of all activations come from one streaming pass over the calibration data on the float
    graph (Jacob et al. 2018, §3; Nagel et al. 2021, "A White Paper on Neural Network
    Quantization"); min-max ranges an earlier pass left in `meta[OBSERVED_RANGE]` are reused.
    """

    def __init__(
        self,
        context: Context | None = None,
        *,
        weights: QuantScheme = WEIGHT_INT8,
        activations: QuantScheme = ACTIVATION_UINT8,
        op_types=QUANTIZABLE_OPS,
        exclude: frozenset[str] = frozenset(),
        computed_weights: bool = True,
        fp4_storage: str = "float8",
        edge_weights: QuantScheme | None = None,
        edge_activations: QuantScheme | None = None,
    ):
        super().__init__(context)
        self.fp4_storage = fp4_storage  # FP4 weights: "float8" (simulated) or "float4" (opset 23)
        self.computed_weights = computed_weights  # False: MatMul/Gemm of two activations stay float
        self.weights = weights
        self.activations = activations
        self.edge_weights = edge_weights or weights
        self.edge_activations = edge_activations or activations
        self.op_types = tuple(op_types)
        self.exclude = frozenset(exclude)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        schemes = (self.weights, self.activations, self.edge_weights, self.edge_activations)
        raise_opset(model, max(s.min_opset for s in schemes))
        graph = model.graph
        nodes = [n for n in graph if self._is_quantizable(n)]
        if not nodes:
            raise ModelError(
                f"the model has no quantizable op (looked for {', '.join(self.op_types)} with "
                "constant weights); nothing to quantize"
            )
        tensors = self._activation_tensors(nodes)
        self._schemes = {
            name: self.edge_activations
            if any(EDGE_LAYER in c.meta for c in value.consumers())
            else self.activations
            for name, value in tensors.items()
        }
        params = self._calibrate(model, tensors)
        for node in nodes:
            self._quantize_weights(graph, node, params)
        for name, value in tensors.items():
            if _holds_sentinels(params[name][0], self._schemes[name]):
                logger.warning(
                    "%s: calibrated range beyond %g (a masking sentinel such as an attention "
                    "mask's finfo.min), left in float", name, SENTINEL_RANGE,
                )
                continue
            self._insert_pair(graph, value, *params[name])
        logger.info("quantized %d ops and %d activation tensors", len(nodes), len(tensors))
        return ir.passes.PassResult(model, modified=True)

    def _is_quantizable(self, node: ir.Node) -> bool:
        if not is_op(node, *self.op_types) or is_kept_float(node, self.exclude):
            return False
        rule = _RULES[node.op_type]
        float_inputs = [node.inputs[i] for i in rule.activations if i < len(node.inputs)]
        if rule.weight is not None:
            weight = node.inputs[rule.weight]
            if constant(weight) is None and node.op_type not in ("MatMul", "Gemm"):
                logger.warning("%s %s: weight is computed, left in float", node.op_type, node.name)
                return False
            if constant(weight) is None and not self.computed_weights:
                return False
            if constant(weight) is None:
                float_inputs.append(weight)
        if any(constant(v) is not None for v in float_inputs):
            logger.info("%s %s: constant operand, left in float", node.op_type, node.name)
            return False
        return all(v is not None and v.dtype in (ir.DataType.FLOAT, None) for v in float_inputs)

    def _activation_tensors(self, nodes: list[ir.Node]) -> dict[str, ir.Value]:
        """The activation tensors to quantize, by name, in graph order."""
        chosen: dict[str, ir.Value] = {}
        for node in nodes:
            rule = _RULES[node.op_type]
            inputs = [node.inputs[i] for i in rule.activations]
            if rule.weight is not None and constant(node.inputs[rule.weight]) is None:
                inputs.append(node.inputs[rule.weight])
            chosen.update((v.name, v) for v in inputs)
        quantized = {id(node) for node in nodes}
        for node in nodes:
            out = _through_activation(node.outputs[0])
            feeds_quantized = any(id(c) in quantized for c in out.consumers())
            if _RULES[node.op_type].output == "always" or feeds_quantized:
                chosen[out.name] = out
        return chosen

    def _calibrate(self, model: ir.Model, tensors: dict[str, ir.Value]) -> dict[str, tuple]:
        ranges = self._observed_ranges(tensors)
        unknown = [name for name in tensors if name not in ranges]
        if unknown:
            observers = self.context.observe(
                model,
                unknown,
                lambda name: make_observer(self._schemes[name]),
                "calibrating activations",
            )
            ranges.update((name, o.range(self._schemes[name])) for name, o in observers.items())
        return {name: self._schemes[name].scale_zero_point(*ranges[name]) for name in tensors}

    def _observed_ranges(self, tensors: dict[str, ir.Value]) -> dict[str, tuple]:
        """Min-max ranges an earlier pass already measured on the calibration data."""
        if self.activations.method != "minmax":
            return {}
        return {
            name: value.meta[OBSERVED_RANGE]
            for name, value in tensors.items()
            if OBSERVED_RANGE in value.meta
        }

    def _quantize_weights(self, graph: ir.Graph, node: ir.Node, params: dict) -> None:
        rule = _RULES[node.op_type]
        weight = constant(node.inputs[rule.weight]) if rule.weight is not None else None
        if weight is None:
            return
        axis = output_channel_axis(node, weight.ndim)
        if self.weights.dtype == FP4:  # block-scaled FP4 (qpass.passes.block_scaled_fp4)
            from qpass.passes.block_scaled_fp4 import dequantize_node

            name = node.inputs[rule.weight].name
            dq = dequantize_node(graph, name, self.weights, weight, node, self.fp4_storage)
            graph.insert_before(node, dq)
            node.replace_input_with(rule.weight, dq.outputs[0])
            return
        scheme = self.edge_weights if EDGE_LAYER in node.meta else self.weights
        w_scale, w_zero = weight_params(scheme, weight, axis)
        bias = (
            constant(node.inputs[rule.bias])
            if rule.bias is not None and len(node.inputs) > rule.bias
            else None
        )
        quantize_bias = (
            bias is not None
            and bias.ndim == 1
            and _is_plain_gemm(node)
            and not (scheme.is_float or self.activations.is_float)
        )
        if quantize_bias:
            x_scale = params[node.inputs[0].name][0]
            w_scale = _widen_for_int32_bias(w_scale, bias, x_scale)
        q = scheme.quantize(
            weight, _expand(w_scale, axis, weight.ndim), _expand(w_zero, axis, weight.ndim)
        )
        dq = _dequantize(
            graph, node.inputs[rule.weight].name, q, w_scale, w_zero, axis if w_scale.ndim else None
        )
        dq.metadata_props[GRID] = f"{scheme.qmin} {scheme.qmax}"
        graph.insert_before(node, dq)
        node.replace_input_with(rule.weight, dq.outputs[0])
        if not quantize_bias:
            return
        b_scale = (x_scale * w_scale * np.ones_like(bias)).astype(np.float32)
        q = np.clip(np.rint(bias / b_scale), -_INT32_LIMIT, _INT32_LIMIT).astype(np.int32)
        dq = _dequantize(
            graph, node.inputs[rule.bias].name, q, b_scale, np.zeros(q.shape, np.int32), 0
        )
        graph.insert_before(node, dq)
        node.replace_input_with(rule.bias, dq.outputs[0])

    def _insert_pair(self, graph: ir.Graph, value: ir.Value, scale, zero_point) -> None:
        name = value.name
        scheme = self._schemes[name]
        scale, zero_point = np.asarray(scale, np.float32), np.asarray(zero_point)
        scale_v = initializer(graph, f"{name}_scale", scale)
        zero_v = initializer(graph, f"{name}_zero_point", zero_point)
        source, clip = value, []
        if scheme.narrow:  # Min and Max: ORT 1.32 fails on Clip -> QuantizeLinear(uint4)
            high_low = grid_ends(scheme.qmin, scheme.qmax, scale, zero_point)[::-1]
            for op, end in zip(("Min", "Max"), high_low, strict=True):
                bound = initializer(graph, f"{name}_{op.lower()}", end)
                clip.append(ir.node(op, [source, bound], name=f"{name}_{op}",
                                    metadata_props={CLAMPS_TO_GRID: name}))
                source = clip[-1].outputs[0]
                source.name, source.dtype, source.shape = f"{name}_{op}", value.dtype, value.shape
        q = ir.node("QuantizeLinear", [source, scale_v, zero_v], name=f"{name}_QuantizeLinear")
        q.outputs[0].name = f"{name}_quantized"
        q.outputs[0].dtype = scheme.ir_dtype
        q.outputs[0].shape = value.shape
        dq = ir.node(
            "DequantizeLinear",
            [q.outputs[0], scale_v, zero_v],
            name=f"{name}_DequantizeLinear",
            metadata_props={QUANTIZES: name},
        )
        dq.outputs[0].name = f"{name}_dequantized"
        dq.outputs[0].dtype, dq.outputs[0].shape = ir.DataType.FLOAT, value.shape
        producer = value.producer()
        if producer is None:
            graph.insert_before(graph[0], [*clip, q, dq])
        else:
            graph.insert_after(producer, [*clip, q, dq])
        for usage in list(value.uses()):
            if usage.node not in (q, *clip):
                usage.node.replace_input_with(usage.idx, dq.outputs[0])
        if value.is_graph_output():
            index = next(i for i, o in enumerate(graph.outputs) if o is value)
            graph.outputs[index] = dq.outputs[0]
            value.name, dq.outputs[0].name = f"{name}_float", name


SENTINEL_RANGE = 1e30
"""An activation range beyond this holds masking sentinels (an attention mask's finfo.min, about
-3.4e38), not data: its scale would round every real value to zero (docs/methods/fp8.md)."""


def grid_ends(qmin: int, qmax: int, scale, zero_point) -> tuple[np.ndarray, np.ndarray]:
    """The real values of the grid's ends, s(qmin - z) and s(qmax - z), in float32."""
    scale = np.asarray(scale, np.float32)
    zero = np.asarray(zero_point).astype(np.float32)
    return (np.float32(qmin) - zero) * scale, (np.float32(qmax) - zero) * scale


def _holds_sentinels(scale: np.ndarray, scheme: QuantScheme) -> bool:
    width = float(np.max(np.asarray(scale, np.float64))) * (scheme.qmax - scheme.qmin)
    return width >= SENTINEL_RANGE


def _through_activation(value: ir.Value) -> ir.Value:
    """The output of a sole Relu or constant Clip consumer, else `value` itself."""
    consumer = sole_consumer(value)
    if is_op(consumer, "Relu") or (
        is_op(consumer, "Clip") and all(constant(v) is not None for v in consumer.inputs[1:] if v)
    ):
        return consumer.outputs[0]
    return value


_INT32_LIMIT = 2**31 - 2**10  # margin for float32 rounding of the bias scale


def _widen_for_int32_bias(w_scale: np.ndarray, bias: np.ndarray, x_scale: np.ndarray):
    """Grow the weight scale of channels whose bias would overflow int32 at x_scale * w_scale.

    Happens for near-dead channels (a BatchNorm gamma near 0 folded into tiny weights, with a
    large beta): their weights then round to 0, which is what they nearly are.
    """
    needed = np.abs(bias.astype(np.float64)) / (float(x_scale) * _INT32_LIMIT)
    if np.all(needed <= w_scale):
        return w_scale
    logger.info(
        "widened %d weight scales so the int32 bias does not overflow",
        int(np.sum(needed > w_scale)),
    )
    if w_scale.ndim == 0:
        needed = needed.max()
    return np.maximum(w_scale, needed).astype(np.float32)


def _is_plain_gemm(node: ir.Node) -> bool:
    """Bias quantization needs y = x*W + b exactly: no Gemm alpha/beta scaling."""
    return node.op_type != "Gemm" or (
        attribute(node, "alpha", 1.0) == 1.0 and attribute(node, "beta", 1.0) == 1.0
    )


def weight_params(scheme: QuantScheme, weight: np.ndarray, axis: int):
    """Scale and zero point of a weight: its min-max range, or with method "mse" the range
    shrunk by the factor in [0.5, 1] that minimizes each channel's squared rounding error;
    per-channel pow2-group scales take the common base with the least error."""
    rows = (
        np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)
        if scheme.per_channel
        else weight.reshape(1, -1)
    )
    low, high = rows.min(axis=1), rows.max(axis=1)
    if scheme.method == "mse":
        best, best_error = np.ones_like(low), np.full(low.shape, np.inf)
        for factor in np.linspace(0.5, 1.0, 26):
            scale, zero = scheme.scale_zero_point(low * factor, high * factor)
            scale, zero = scale[:, None].astype(np.float64), zero[:, None].astype(np.float64)
            if scheme.is_float:
                error = np.sum((rows - scheme.fake_quantize(rows, scale, zero)) ** 2, axis=1)
            else:
                q = np.clip(np.rint(rows / scale) + zero, scheme.qmin, scheme.qmax)
                error = np.sum((rows - (q - zero) * scale) ** 2, axis=1)
            better = error < best_error
            best[better], best_error[better] = factor, error[better]
        low, high = low * best, high * best
    if not scheme.per_channel:
        low, high = low[0], high[0]
    elif scheme.scale_constraint == "pow2-group":
        return _pow2_group_params(scheme, rows, low, high)
    return scheme.scale_zero_point(low, high)


def _pow2_group_params(scheme: QuantScheme, rows: np.ndarray, low, high, steps: int = 32):
    """pow2-group scales S_i = B / 2^floor(log2(B / S_i)) (each within [S_i, 2 S_i) of its
    float scale S_i, so no channel saturates) for the common base B, among S_max * 2^(-j/steps),
    j < steps, that gives the tensor the smallest squared rounding error. B = S_max, the plain
    M2 rule, is one candidate; where a float grid has the same relative precision at every
    scale (FP8), B decides where each channel's largest value lands in its top binade."""
    scale, zero = dataclasses.replace(scheme, scale_constraint="float").scale_zero_point(low, high)
    live = high > low
    raw = np.where(live, scale, 0.0)
    best, best_error = None, np.inf
    for base in raw.max() * np.exp2(-np.arange(steps) / steps):
        candidate = np.where(live, scheme.constrain(raw, largest=base), 1.0).astype(np.float32)
        fake = scheme.fake_quantize(rows, candidate[:, None], zero[:, None])
        error = np.sum((rows - fake) ** 2)
        if error < best_error:
            best, best_error = candidate, error
    return best, zero


def _expand(array: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    if array.ndim == 0:
        return array
    shape = [1] * ndim
    shape[axis] = -1
    return array.reshape(shape)


def _dequantize(
    graph: ir.Graph,
    name: str,
    q: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray,
    axis: int | None,
) -> ir.Node:
    inputs = [
        initializer(graph, f"{name}_quantized", q),
        initializer(graph, f"{name}_scale", np.asarray(scale, np.float32)),
        initializer(graph, f"{name}_zero_point", np.asarray(zero_point)),
    ]
    attributes = {"axis": axis} if axis is not None else {}
    dq = ir.node("DequantizeLinear", inputs, attributes, name=f"{name}_DequantizeLinear")
    dq.outputs[0].name = f"{name}_dequantized"
    dq.outputs[0].dtype = ir.DataType.FLOAT
    dq.outputs[0].shape = ir.Shape(q.shape)
    return dq
