"""Write the float parts of a model in float16 (or bfloat16), keeping in float32 the ops that
float16 breaks, with a Cast wherever the two meet."""

from __future__ import annotations

import functools
import logging

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import IdentityEliminationPass, ShapeInferencePass

from qpass.graph import (
    MS_DOMAIN,
    all_values,
    attribute,
    constant,
    initializer,
    is_op,
    retype,
    set_constant,
)
from qpass.passes.base import Pass, refuse

logger = logging.getLogger(__name__)

FLOAT32 = ir.DataType.FLOAT

KEPT_IN_FLOAT32 = frozenset({
    # Normalizations: a mean and a variance summed over a whole row.
    "LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization", "RMSNormalization", "GroupNormalization",
    "InstanceNormalization",
    # Softmax: exp and a sum over a row.
    "Softmax", "LogSoftmax",
    # Reductions and running sums over many elements.
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum",
    "ReduceLogSumExp", "ReduceProd", "CumSum",
    # Exponentials and powers: exp(x) passes float16's largest number (65504) above x = 11.1.
    "Exp", "Pow", "Log",
})
"""Op types computed in float32 whatever the target type: the reductions of LayerNorm, RMSNorm
and Softmax, other large sums, exp and powers (the op types ModelOpt's AutoCast keeps in high
precision by default for the same reasons: its DepthOfReduction and NormVariance rules, keeping
reductions and the variance of a decomposed RMSNorm in high precision)."""

FOLLOWS_FLOAT32 = frozenset({"Add", "Sub", "Mul", "Div", "Sqrt", "Reciprocal", "Neg", "Abs"})
"""Elementwise ops that stay in float32 when every non-constant float input they read comes from
a float32 op: the `+ eps`, `sqrt` and `1 / x` after a variance stay with it."""

SCALE_TOLERANCE = 2.0**-8
"""A Q/DQ scale whose float16 value is further than this (relative) from it stays float32: an
8-bit step is 2^-8 of the range, and float16 holds normal numbers to 2^-11 (subnormals less)."""

LOW_TYPES = {"float16": ir.DataType.FLOAT16, "bfloat16": ir.DataType.BFLOAT16}
FLOAT_TYPES = ("float32", *LOW_TYPES)
"""The float types a compiled model's float parts can be written in (`qpass.compile`)."""


class CastFloatParts(Pass):
    """Write the float32 parts of a (quantized) model in `dtype` (float16 or bfloat16).

    First, a constant DequantizeLinear (per tensor or per axis) whose scale `dtype` cannot hold
    within `SCALE_TOLERANCE` (the int32 bias of a QDQ Conv, scale = input scale x weight scale,
    is below float16's range; per-channel weight scales of channels with near-zero weights):

    0a. DQ(int32 bias)  ==>  its float value (then stored in `dtype`, as the op reads it);
    0b. DQ(int8 / uint8 weight) with such scales  ==>  the same op, each such scale raised to the
        smallest one `dtype` holds within the tolerance and the integers of its channel rounded
        to it again (those channels' weights are under 127 x that scale; the added error stays
        under half of it).

    Then each node either runs in `dtype` ("low") or stays float32:

    1. A node stays float32 if
       - its op type is in `KEPT_IN_FLOAT32` (normalizations, Softmax, reductions, exp, powers),
         except a ReduceMean of a DequantizeLinear (a quantized global average pool: the mean
         stays inside the quantized range);
       - it is elementwise (`FOLLOWS_FLOAT32`) and every non-constant float input it reads comes
         from a float32 node (the `+ eps`, sqrt and 1/x after a variance);
       - a constant float input or output (Constant) lies outside `dtype`'s range;
       - a subgraph (If, Loop, Scan) reads one of its outputs;
       - it is a QuantizeLinear / DequantizeLinear whose scale `dtype` cannot hold within
         `SCALE_TOLERANCE`;
       - its schema (onnx's; ONNX Runtime's for com.microsoft) does not allow `dtype` for its
         float inputs and outputs: QuantizeLinear and DequantizeLinear below opset 19,
         DynamicQuantizeLinear, ops of other domains (no schema), ops with subgraphs.
    2. In a low node every float32 input and output of a type parameter that allows `dtype`
       becomes `dtype` (Q/DQ scales and outputs, MatMulNBits scales and output, ...); inputs of a
       fixed type (Resize's scales) stay float32. Cast(to=float32) in a low node casts to
       `dtype`; a Constant or ConstantOfShape in a low node holds a `dtype` value.
    3. An initializer whose float readers are all low is converted in place; one read by both
       kinds gets a `dtype` copy for the low readers.
    4. A value produced in one type and read in the other gets a Cast (one per value and type).
    5. Values without a type are typed first (onnx's shape inference, onnx-ir's
       ShapeInferencePass); a value still without one is not a float part.
    6. The graph's inputs and outputs keep their types (a Cast at the boundary), and a Cast to the
       type its input already has is removed (onnx-ir's IdentityEliminationPass).

    TensorRT 11 builds strongly typed networks: the ONNX types decide each layer's precision, so
    this pass decides which layers run in float16. ONNX Runtime's CPU provider lacks float16
    kernels for most compute ops (Conv, MatMul, Add, ...): it runs them in float32 between Casts
    it inserts itself (its InsertCastTransformer), and has almost no bfloat16 kernels, so a
    bfloat16 result is for TensorRT or GPUs only. Node ranges observed on data (AutoCast's
    `data_max` rule) are not used: the rules above read the graph alone.
    """

    def __init__(self, dtype: str = "float16"):
        super().__init__()
        if dtype not in LOW_TYPES:
            raise ValueError(f"float type {dtype!r}: choose one of {', '.join(LOW_TYPES)}")
        self.dtype = LOW_TYPES[dtype]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        if any(v.dtype is None for n in graph for v in n.outputs):  # e.g. no value_info
            ShapeInferencePass(strict_mode=False)(model)
        opset = model.opset_imports.get("", 1)
        for node in list(graph):
            self._try_fit_scale(graph, node)
        low = {id(n): _float_slots(n, opset, self.dtype) for n in self._low_nodes(graph, opset)}
        if not low:
            return ir.passes.PassResult(model, modified=False)
        interface = [v.dtype for v in graph.outputs]
        reads = {  # (node, input index) -> the type it reads there: the float parts only
            (id(u.node), u.idx): self.dtype if u.idx in low.get(id(u.node), ((), ()))[0]
            else FLOAT32
            for v in _float32_values(graph) for u in v.uses()
        }
        self._convert_initializers(graph, reads)
        for node in graph:
            if id(node) in low:
                self._lower_node(node, low[id(node)][1])
        self._insert_casts(graph, reads)
        self._keep_output_types(graph, interface)
        for node in graph:  # a Cast to the type it already has ==> Identity, then removed
            if is_op(node, "Cast") and node.inputs[0].dtype == node.attributes["to"].value:
                node.op_type = "Identity"
                node.attributes.clear()
        IdentityEliminationPass()(model)
        logger.info("%d nodes run in %s", sum(any(s) for s in low.values()),
                    self.dtype.name.lower())
        return ir.passes.PassResult(model, modified=True)

    def _low_nodes(self, graph: ir.Graph, opset: int):
        float32_outputs: set[int] = set()
        for node in graph:
            why = self._why_float32(node, opset, float32_outputs)
            if why:
                refuse(self, node, why)
                float32_outputs.update(id(v) for v in node.outputs)
            else:
                yield node

    def _why_float32(self, node: ir.Node, opset: int, float32_outputs: set[int]) -> str | None:
        if node.op_type in KEPT_IN_FLOAT32 and not _averages_dequantized(node):
            return "float16 loses its sums or overflows (KEPT_IN_FLOAT32)"
        float_inputs = [v for v in node.inputs if v is not None and v.dtype == FLOAT32]
        variable = [v for v in float_inputs if constant(v) is None]
        if node.op_type in FOLLOWS_FLOAT32 and variable and all(
            id(v) in float32_outputs for v in variable
        ):
            return "reads only float32 results (FOLLOWS_FLOAT32)"
        limit = _largest(self.dtype)
        for value in [*float_inputs, *node.outputs]:  # a Constant node's output included
            array = constant(value) if value.dtype == FLOAT32 else None
            if array is not None and array.size and np.abs(array).max() > limit:
                return f"constant {value.name} exceeds {self.dtype.name.lower()}'s range"
        if any(u.node.graph is not node.graph for v in node.outputs for u in v.uses()):
            return "a subgraph reads its output"
        if is_op(node, "QuantizeLinear", "DequantizeLinear") and not self._holds_scale(node):
            return f"its scale does not fit {self.dtype.name.lower()}"
        if _float_slots(node, opset, self.dtype) is None:
            return f"its schema does not allow {self.dtype.name.lower()} (or it has none)"
        return None

    def _holds_scale(self, node: ir.Node) -> bool:
        scale = constant(node.inputs[1]) if len(node.inputs) > 1 else None
        return scale is None or bool(self._fits(scale).all())

    def _fits(self, scale: np.ndarray) -> np.ndarray:
        """Which scales `dtype` holds within SCALE_TOLERANCE (relative)."""
        scale = scale.astype(np.float64)
        low = _round_trip(scale, self.dtype).astype(np.float64)
        return np.abs(low - scale) <= SCALE_TOLERANCE * np.abs(scale)

    @property
    def _smallest_scale(self) -> float:
        """The smallest scale `dtype` holds within SCALE_TOLERANCE: float16's subnormals are
        2^-24 apart, so 2^-24 / SCALE_TOLERANCE (bfloat16 holds float32's range)."""
        return 2.0**-24 / SCALE_TOLERANCE if self.dtype == ir.DataType.FLOAT16 else 2.0**-126

    def _try_fit_scale(self, graph: ir.Graph, node: ir.Node) -> None:
        """Rules 0a and 0b: constant DequantizeLinears whose scales `dtype` cannot hold."""
        if not is_op(node, "DequantizeLinear") or attribute(node, "block_size", 0):
            return
        q, scale = constant(node.inputs[0]), constant(node.inputs[1])
        if q is None or scale is None or self._fits(scale).all():
            return
        zero = constant(node.inputs[2]) if len(node.inputs) > 2 else None
        zero = np.zeros_like(scale) if zero is None else zero.astype(np.float64)
        shape = _broadcast_shape(node, q.ndim, scale)
        if q.dtype == np.int32:  # a bias: DQ(int32) ==> its float value
            array = (q - zero.reshape(shape)) * scale.astype(np.float64).reshape(shape)
            value = initializer(graph, f"{node.outputs[0].name}_float", array.astype(np.float32))
            ir.convenience.replace_all_uses_with(node.outputs[0], value)
            graph.remove(node, safe=True)
        elif q.dtype in (np.int8, np.uint8):  # raise the scale, round the integers again
            info = np.iinfo(q.dtype)
            raised = np.where(self._fits(scale), scale, np.maximum(scale, self._smallest_scale))
            ratio = (scale / raised).astype(np.float64).reshape(shape)
            z = zero.reshape(shape)
            again = np.clip(np.round((q - z) * ratio + z), info.min, info.max).astype(q.dtype)
            node.replace_input_with(0, set_constant(graph, node.inputs[0], again))
            node.replace_input_with(1, set_constant(graph, node.inputs[1], raised.astype(
                scale.dtype)))

    def _convert_initializers(self, graph: ir.Graph, reads: dict) -> None:
        for value in list(graph.initializers.values()):
            if value.dtype != FLOAT32 or value.const_value is None or value.is_graph_output():
                continue
            uses = list(value.uses())
            wants = [reads.get((id(u.node), u.idx)) == self.dtype for u in uses]
            if not any(wants):
                continue
            array = value.const_value.numpy()
            if all(wants):
                value.const_value = _tensor(array, self.dtype, value.name)
                retype(value, self.dtype)
                continue
            copy = ir.Value(name=f"{value.name}_{self.dtype.name.lower()}", shape=value.shape,
                            const_value=_tensor(array, self.dtype, None))
            retype(copy, self.dtype)
            graph.register_initializer(copy)
            for usage, want in zip(uses, wants, strict=True):
                if want:
                    usage.node.replace_input_with(usage.idx, copy)

    def _lower_node(self, node: ir.Node, outputs: set[int]) -> None:
        if is_op(node, "Cast") and node.attributes["to"].value == FLOAT32:
            node.attributes["to"] = ir.AttrInt64("to", int(self.dtype))
        if is_op(node, "Constant", "ConstantOfShape") and "value" in node.attributes:
            tensor = node.attributes["value"].value
            if tensor.dtype == FLOAT32:
                node.attributes["value"] = ir.AttrTensor(
                    "value", _tensor(tensor.numpy(), self.dtype, tensor.name)
                )
        for index in outputs:
            if node.outputs[index].dtype == FLOAT32:
                retype(node.outputs[index], self.dtype)

    def _insert_casts(self, graph: ir.Graph, reads: dict) -> None:
        casts: dict[tuple[int, ir.DataType], ir.Value] = {}
        for node in list(graph):
            for index, value in enumerate(node.inputs):
                want = reads.get((id(node), index))
                if value is None or want is None or want == value.dtype:
                    continue
                key = (id(value), want)
                if key not in casts:
                    casts[key] = _cast(value, want, f"{value.name}_to_{want.name.lower()}")
                    graph.insert_before(node, casts[key].producer())
                node.replace_input_with(index, casts[key])

    def _keep_output_types(self, graph: ir.Graph, interface: list[ir.DataType]) -> None:
        """A graph output whose type changed gets a Cast back, under its own name."""
        for index, (value, dtype) in enumerate(zip(list(graph.outputs), interface, strict=True)):
            if value.dtype == dtype:
                continue
            name = value.name
            value.name = f"{name}_{value.dtype.name.lower()}"
            graph.append((cast := _cast(value, dtype, name)).producer())
            graph.outputs[index] = cast


def _cast(value: ir.Value, dtype: ir.DataType, name: str) -> ir.Value:
    """The output, named `name`, of a new Cast of `value` to `dtype` (not yet in a graph)."""
    node = ir.node("Cast", [value], {"to": int(dtype)}, name=name)
    node.outputs[0].name, node.outputs[0].shape = name, value.shape
    retype(node.outputs[0], dtype)
    return node.outputs[0]


def _float32_values(graph: ir.Graph):
    yield from (v for v in all_values(graph) if v.dtype == FLOAT32)


def _float_slots(
    node: ir.Node, opset: int, dtype: ir.DataType
) -> tuple[set[int], set[int]] | None:
    """(input indices, output indices) of `node` that take `dtype` when it runs low, or None if
    its schema does not allow `dtype` for a float input or output (or it has no schema)."""
    if any(a.type == ir.AttributeType.GRAPH or a.type == ir.AttributeType.GRAPHS
           for a in node.attributes.values()):
        return None
    schema = _schema(node.op_type, node.domain, opset)
    if schema is None:
        return None
    wanted = f"tensor({_TYPE_NAMES[dtype]})"
    params = {param: types for param, types in schema[2]}

    def slots(values, formals) -> set[int] | None:
        found = set()
        for index, value in enumerate(values):
            if value is None or value.dtype != FLOAT32 or not formals:
                continue
            formal = formals[min(index, len(formals) - 1)]
            if formal not in params:  # a fixed type: tensor(float)
                continue
            if wanted not in params[formal]:
                return None
            found.add(index)
        return found

    inputs, outputs = slots(node.inputs, schema[0]), slots(node.outputs, schema[1])
    if inputs is None or outputs is None:
        return None
    bound = {schema[0][min(i, len(schema[0]) - 1)] for i in inputs}
    unbound = [i for i in outputs if schema[1][min(i, len(schema[1]) - 1)] not in bound]
    if is_op(node, "DequantizeLinear") and not attribute(node, "output_dtype", 0):
        unbound = []  # opset 23+: output_dtype 0 means the scale's type
    if unbound and not is_op(node, "Cast", "Constant", "ConstantOfShape"):
        return None  # the output type comes from an attribute (RandomNormal's dtype, ...)
    return inputs, outputs


_TYPE_NAMES = {ir.DataType.FLOAT16: "float16", ir.DataType.BFLOAT16: "bfloat16"}


@functools.cache
def _schema(op_type: str, domain: str, opset: int):
    """(input type strings, output type strings, ((param, allowed types), ...)) or None."""
    if domain in ("", "ai.onnx"):
        try:
            s = onnx.defs.get_schema(op_type, opset, "")
        except onnx.defs.SchemaError:
            return None
        return (tuple(i.type_str for i in s.inputs), tuple(o.type_str for o in s.outputs),
                tuple((t.type_param_str, tuple(t.allowed_type_strs)) for t in s.type_constraints))
    if domain == MS_DOMAIN:
        s = _contrib_schemas().get(op_type)
        if s is None:
            return None
        return (tuple(i.typeStr for i in s.inputs), tuple(o.typeStr for o in s.outputs),
                tuple((t.type_param_str, tuple(t.allowed_type_strs)) for t in s.type_constraints))
    return None


@functools.cache
def _contrib_schemas() -> dict:
    """ONNX Runtime's com.microsoft schemas, newest version of each op."""
    from onnxruntime.capi.onnxruntime_pybind11_state import get_all_operator_schema

    found = {}
    for s in get_all_operator_schema():
        if s.domain == MS_DOMAIN and s.since_version >= getattr(found.get(s.name), "since_version",
                                                                0):
            found[s.name] = s
    return found


def _averages_dequantized(node: ir.Node) -> bool:
    """ReduceMean of a DequantizeLinear's output (a quantized global average pool): the mean stays
    inside the quantized input's range, and a Cast between the two would keep TensorRT from
    fusing the DQ into the reduction."""
    return is_op(node, "ReduceMean") and is_op(node.inputs[0].producer(), "DequantizeLinear")


def _broadcast_shape(node: ir.Node, ndim: int, scale: np.ndarray) -> tuple[int, ...]:
    """The shape that broadcasts a DequantizeLinear's scale over its input (per tensor or per
    axis)."""
    if scale.size == 1:
        return ()
    axis = attribute(node, "axis", 1) % ndim
    return tuple(scale.size if i == axis else 1 for i in range(ndim))


def _largest(dtype: ir.DataType) -> float:
    return 65504.0 if dtype == ir.DataType.FLOAT16 else 3.38e38


def _round_trip(array: np.ndarray, dtype: ir.DataType) -> np.ndarray:
    return _tensor(array, dtype, None).numpy().astype(np.float32)


def _tensor(array: np.ndarray, dtype: ir.DataType, name: str | None) -> ir.Tensor:
    array = np.asarray(array, dtype=np.float32)
    if dtype == ir.DataType.FLOAT16:
        return ir.tensor(array.astype(np.float16), name=name)
    return ir.tensor(array.astype(dtype.numpy()), dtype=dtype, name=name)
