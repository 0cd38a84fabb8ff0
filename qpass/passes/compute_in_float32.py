"""Compute a float16 or bfloat16 model in float32 inside, keeping its interface types."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from qpass.graph import all_values, is_op, retype
from qpass.metadata import SOURCE_FLOAT_TYPE
from qpass.passes.base import Pass

logger = logging.getLogger(__name__)

LOW_FLOATS = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


class ComputeInFloat32(Pass):
    """Turn the float16 / bfloat16 parts of a model into float32, with a Cast at its boundary.

    Rewrite rules:

    1. A float16 / bfloat16 graph input x  ==>  x -> Cast(float32) -> its readers; a float16 /
       bfloat16 graph output y  ==>  y (now float32) -> Cast(back) -> the output, so the model's
       inputs and outputs keep their types.
    2. A float16 / bfloat16 initializer, Constant or ConstantOfShape value  ==>  its float32 value
       (exact: every float16 and bfloat16 number is a float32 number).
    3. Cast(to=float16 | bfloat16)  ==>  Cast(to=float32); every value of those types is float32.

    Quantization (QuantizeLinear-13 reads float32 only; scales follow the activations' type) then
    works on every float16 model; the quantized model computes its float parts in float32 where
    the source model computed them in float16 (never less exact). The source type goes to
    `model.meta[SOURCE_FLOAT_TYPE]`: `qpass.compile` writes the float parts back in float16 after
    quantization (`CastFloatParts`).
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        if not any(_is_low(v) for v in all_values(graph)):
            return ir.passes.PassResult(model, modified=False)
        low = next(v.dtype for v in all_values(graph) if _is_low(v))
        model.meta[SOURCE_FLOAT_TYPE] = "float16" if low == ir.DataType.FLOAT16 else "bfloat16"
        boundary = self._cast_inputs(graph) | self._cast_outputs(graph)
        for value in graph.initializers.values():
            if value.const_value is not None and value.const_value.dtype in LOW_FLOATS:
                value.const_value = _float32(value.const_value, value.name)
        for node in graph:
            if id(node) not in boundary:
                _upcast_node(node)
        for value in all_values(graph):
            if _is_low(value) and not value.is_graph_input() and (
                id(value.producer()) not in boundary
            ):
                retype(value, ir.DataType.FLOAT)
        return ir.passes.PassResult(model, modified=True)

    def _cast_inputs(self, graph: ir.Graph) -> set[int]:
        casts = set()
        for value in graph.inputs:
            if not _is_low(value):
                continue
            to_float = {"to": int(ir.DataType.FLOAT)}
            cast = ir.node("Cast", [value], to_float, name=f"{value.name}_float32")
            cast.outputs[0].name = f"{value.name}_float32"
            cast.outputs[0].dtype, cast.outputs[0].shape = ir.DataType.FLOAT, value.shape
            for usage in list(value.uses()):
                if usage.node is not cast:
                    usage.node.replace_input_with(usage.idx, cast.outputs[0])
            graph.insert_before(graph[0], cast)
            casts.add(id(cast))
        return casts

    def _cast_outputs(self, graph: ir.Graph) -> set[int]:
        casts = set()
        for index, value in enumerate(graph.outputs):
            if not _is_low(value):
                continue
            dtype, name = value.dtype, value.name
            cast = ir.node("Cast", [value], {"to": int(dtype)}, name=f"{name}_cast")
            value.name = f"{name}_float32"
            cast.outputs[0].name, cast.outputs[0].dtype = name, dtype
            cast.outputs[0].shape = value.shape
            graph.append(cast)
            graph.outputs[index] = cast.outputs[0]
            casts.add(id(cast))
        return casts


def _is_low(value: ir.Value) -> bool:
    return value.dtype in LOW_FLOATS


def _float32(tensor: ir.TensorProtocol, name: str | None) -> ir.Tensor:
    return ir.tensor(tensor.numpy().astype(np.float32), name=name)


def _upcast_node(node: ir.Node) -> None:
    if is_op(node, "Cast") and node.attributes["to"].value in LOW_FLOATS:
        node.attributes["to"] = ir.AttrInt64("to", int(ir.DataType.FLOAT))
    if is_op(node, "Constant", "ConstantOfShape") and "value" in node.attributes:
        tensor = node.attributes["value"].value
        if tensor.dtype in LOW_FLOATS:
            node.attributes["value"] = ir.AttrTensor("value", _float32(tensor, tensor.name))
